//! Serving the agent API with ttrpc's synchronous server (its own threads), in either
//! mode: on vsock as the guest's init, on a Unix socket on a host.
//!
//! A shutdown first ends the long polls (GetOOMEvent waits for an event that may never
//! come), so the server's drain, which waits for every call in flight, finishes as soon
//! as the Shutdown call's own answer is written and the guest reboots at once.

use std::collections::HashMap;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use nestbox_protocols::agent::OOMEvent;
use nestbox_protocols::agent_ttrpc::create_agent_service;
use nestbox_protocols::protobuf::Message;
use nestbox_protocols::ttrpc::{self, MethodHandler, TtrpcContext};

use crate::oom::OomQueue;
use crate::rpc::AgentRpc;
use crate::sandbox::Sandbox;

/// The stable start of every warning a safety-net bound logs when it is reached (here,
/// and in the shim's process and stdin paths): the end-to-end tests fail on it, since a
/// normal start or stop never waits that long.
pub const BOUND_WARNING: &str = "safety-net bound reached";

/// How long a shutdown waits for the calls still in flight once the long polls ended (the
/// Shutdown call's own answer among them) before the agent ends anyway. Normally nothing
/// is left by then and the drain takes microseconds; the bound is for a call that cannot
/// end by itself (a WaitProcess of a process still running, a container setup stuck in
/// the guest): the reboot ends those, and they must not keep the VM alive.
const DRAIN_BOUND: Duration = Duration::from_secs(10);

const GET_OOM_EVENT: &str = "/nestbox.agent.v1.AgentService/GetOOMEvent";

pub struct Serving {
    server: ttrpc::Server,
    address: String,
    shutdown_tx: Sender<()>,
    shutdown_rx: Receiver<()>,
    oom: Arc<OomQueue>,
}

/// Starts serving the API on `address` (`vsock://-1:1024`, `unix:///path`) on ttrpc's
/// threads and returns at once.
pub fn start(address: &str, init_daemon: bool, sandbox: Arc<Sandbox>) -> anyhow::Result<Serving> {
    let (shutdown_tx, shutdown_rx) = mpsc::channel();
    let oom = sandbox.env.oom.clone();
    let mut service = create_agent_service(Arc::new(AgentRpc::new(init_daemon, shutdown_tx.clone(), sandbox)));
    end_oom_polls_at_shutdown(&mut service, oom.clone());
    let mut server = ttrpc::Server::new()
        .bind(address)
        .with_context(|| format!("binding the agent API to {address}"))?
        .register_service(service);
    server.start().with_context(|| format!("starting the agent API server on {address}"))?;
    Ok(Serving { server, address: address.to_string(), shutdown_tx, shutdown_rx, oom })
}

type Methods = HashMap<String, Box<dyn MethodHandler + Send + Sync>>;

/// GetOOMEvent is answered from [`OomQueue::next_event`], which ends with "shutting down"
/// (UNAVAILABLE) when the agent stops, where `AgentRpc`'s answer would wait for an event
/// for good. (Here, because ending calls at shutdown is the server's business.)
fn end_oom_polls_at_shutdown(methods: &mut Methods, oom: Arc<OomQueue>) {
    methods.insert(GET_OOM_EVENT.to_string(), Box::new(GetOomEvent { oom }));
}

struct GetOomEvent {
    oom: Arc<OomQueue>,
}

impl MethodHandler for GetOomEvent {
    fn handler(&self, ctx: TtrpcContext, _req: ttrpc::Request) -> ttrpc::Result<()> {
        // The request has no fields: nothing to decode.
        let mut res = ttrpc::Response::new();
        match self.oom.next_event() {
            Ok(container_id) => {
                let event = OOMEvent { container_id, ..Default::default() };
                res.payload = event.write_to_bytes().map_err(|e| ttrpc::Error::Others(format!("OOMEvent: {e}")))?;
                res.set_status(ttrpc::get_status(ttrpc::Code::OK, ""));
            }
            Err(e) => res.set_status(ttrpc::get_status(ttrpc::Code::UNAVAILABLE, e.to_string())),
        }
        ttrpc::response_to_channel(ctx.mh.stream_id, res, ctx.res_tx)
    }
}

impl Serving {
    /// A handle that asks for a shutdown as the Shutdown call does (for signals).
    pub fn shutdown_handle(&self) -> Sender<()> {
        self.shutdown_tx.clone()
    }

    /// Blocks until a shutdown is asked for, ends the long polls, then stops the server:
    /// no new connections, and the answers of calls in flight are written before their
    /// connections close.
    pub fn wait_for_shutdown(self) {
        // Cannot fail: `self` holds a sender.
        let _ = self.shutdown_rx.recv();
        let asked = std::time::Instant::now();
        self.oom.close();
        let (done_tx, done_rx) = mpsc::channel();
        let server = self.server;
        let drained = std::thread::Builder::new().name("api-shutdown".into()).spawn(move || {
            server.shutdown();
            let _ = done_tx.send(());
        });
        match drained {
            Ok(_) => {
                if done_rx.recv_timeout(DRAIN_BOUND).is_ok() {
                    // Logged: how long a VM stop spends here (the guest's share of it).
                    eprintln!("nestbox-agent: shutdown: calls drained in {:?}", asked.elapsed());
                } else {
                    eprintln!(
                        "nestbox-agent: {BOUND_WARNING}: calls on {} still running {DRAIN_BOUND:?} after the \
                         shutdown (the long polls ended); ending anyway",
                        self.address
                    );
                }
            }
            // No thread to drain with: end without waiting rather than not at all.
            Err(e) => eprintln!("nestbox-agent: stopping the API server: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nestbox_protocols::agent::{GetOOMEventRequest, ShutdownRequest};
    use nestbox_protocols::agent_ttrpc::AgentServiceClient;
    use std::time::Instant;

    fn sandbox() -> Arc<Sandbox> {
        let env = crate::container::Env {
            reaper: crate::reaper::Reaper::new(),
            io: crate::process::streams::IoHub::new(),
            exe: std::fs::File::open("/proc/self/exe").expect("own executable").into(),
            cgroups: Err("none in this test".into()),
            oom: Default::default(),
        };
        Sandbox::new(env, false)
    }

    /// A GetOOMEvent in flight when Shutdown arrives is answered "shutting down" and the
    /// server stops at once, far inside the drain bound.
    #[test]
    fn shutdown_ends_the_oom_poll_and_drains_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let address = format!("unix://{}", dir.path().join("agent.sock").display());
        let serving = start(&address, false, sandbox()).expect("serving");
        let (drained_tx, drained) = mpsc::channel();
        std::thread::spawn(move || {
            serving.wait_for_shutdown();
            let _ = drained_tx.send(());
        });
        let client = AgentServiceClient::new(ttrpc::Client::connect(&address).expect("connecting"));

        let poller = client.clone();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(poller.get_oom_event(ttrpc::context::with_timeout(0), &GetOOMEventRequest::new()));
        });
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err(), "the poll answered without an event");

        let asked = Instant::now();
        client.shutdown(ttrpc::context::with_timeout(10_000_000_000), &ShutdownRequest::new()).expect("Shutdown");
        // Bounds that only catch a poll or drain that never ends (they take milliseconds).
        let answer = rx.recv_timeout(Duration::from_secs(5)).expect("the OOM poll still waits after Shutdown");
        match answer {
            Err(ttrpc::Error::RpcStatus(s)) => {
                assert_eq!(s.code(), ttrpc::Code::UNAVAILABLE);
                assert!(s.message().contains("shutting down"), "{}", s.message());
            }
            other => panic!("GetOOMEvent after Shutdown: {other:?}"),
        }
        drained.recv_timeout(Duration::from_secs(5)).expect("the server still drains");
        assert!(asked.elapsed() < DRAIN_BOUND / 2, "drained in {:?}", asked.elapsed());
    }
}
