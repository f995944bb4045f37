//! nestbox's containerd shim (`containerd-shim-nestbox-v2`) and host tool (`nestbox`).
//!
//! - [`config`]: `/etc/nestbox/config.toml` and per-pod annotations;
//! - [`sandbox`]: one pod's VM: directory, VMM process, rootfs sharing, agent client;
//! - [`io`]: containerd's fifos copied to and from the guest's process streams;
//! - [`task`]: containerd's task API v2, each call mapped onto the pod;
//! - [`pod`]: the pod this shim serves: containers, processes and the VM's life;
//! - [`process`]: the process table; [`events`]: task events to containerd, in order;
//! - [`spec`]: the OCI spec (oci-spec types): its pod, rewritten for the guest;
//! - [`metrics`]: the agent's statistics as containerd's cgroup v2 metrics;
//! - [`rpc_status`]: failures as the ttrpc statuses containerd sees;
//! - [`shim`]: the `start` and `delete` subcommands (pod grouping, cleanup after a lost shim);
//! - [`check`]: what `nestbox check` verifies about the host.

pub mod check;
pub mod config;
pub mod events;
pub mod io;
pub mod metrics;
pub mod pod;
pub mod process;
pub mod rpc_status;
pub mod sandbox;
pub mod shim;
pub mod spec;
pub mod task;
