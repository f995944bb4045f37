//! nestbox's agent API, shared by the host (shim, tests) and the guest (nestbox-agent).
//!
//! - [`agent`], [`types`]: the messages of `protos/agent.proto` and `protos/types.proto`;
//! - [`agent_ttrpc`]: [`agent_ttrpc::AgentServiceClient`] (host) and the
//!   [`agent_ttrpc::AgentService`] trait with [`agent_ttrpc::create_agent_service`] (guest),
//!   served as ttrpc service `nestbox.agent.v1.AgentService` on vsock port [`AGENT_PORT`];
//! - [`hybrid`]: the host side of Firecracker-style hybrid vsock (a Unix socket into the VMM);
//! - [`mount_options`]: mount option lists split into mount(2) flags and data;
//! - [`pod`]: the reserved paths by which a container's spec names the pod's namespaces;
//! - [`port_forward`]: the header of a CRI port-forward connection into the pod;
//! - [`stdio`]: the header that opens a process's standard stream on [`IO_PORT`];
//! - [`vsock_test`]: the guest's vsock test services, for tests of the VMM's vsock device.
//!
//! The code is generated at build time by ttrpc-codegen (sync ttrpc API) from the .proto
//! files; the re-exported [`ttrpc`] and [`protobuf`] are the versions it was generated for.

pub use protobuf;
pub use ttrpc;

include!(concat!(env!("OUT_DIR"), "/modules.rs"));

pub mod hybrid;
pub mod mount_options;
pub mod pod;
pub mod port_forward;
pub mod stdio;
pub mod vsock_test;

/// The guest vsock port the agent serves its ttrpc API on.
pub const AGENT_PORT: u32 = 1024;

/// The guest vsock port where the host opens processes' standard streams, one connection
/// per stream (see [`stdio`]). Not in 1025-1028, the test services' ports
/// ([`vsock_test`]), which a guest booted with `nestbox.vsock_test` also listens on.
pub const IO_PORT: u32 = 1030;

/// The guest vsock port where the host opens port-forward connections into the pod's
/// network namespace, one per forwarded TCP connection (see [`port_forward`]).
pub const PORT_FORWARD_PORT: u32 = 1031;

/// The ttrpc service name of the agent API (the method path is `/<service>/<Method>`).
pub const AGENT_SERVICE: &str = "nestbox.agent.v1.AgentService";

/// Starts a ttrpc agent client on a connected stream: one from [`hybrid::connect`] (a
/// guest), or a Unix socket of an agent in host mode (`nestbox-agent --listen unix://...`).
pub fn agent_client(stream: std::os::unix::net::UnixStream) -> Result<agent_ttrpc::AgentServiceClient, ttrpc::Error> {
    use std::os::fd::IntoRawFd;
    // ttrpc's client takes ownership of the descriptor and closes it when the last clone
    // of the client is dropped. (Should ttrpc fail to set up its own socket pair here, it
    // fails before taking the descriptor, which then stays open: only when out of fds.)
    let client = ttrpc::Client::new(stream.into_raw_fd())?;
    Ok(agent_ttrpc::AgentServiceClient::new(client))
}
