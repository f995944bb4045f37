//! Serving the agent API with ttrpc's synchronous server (its own threads), in either
//! mode: on vsock as the guest's init, on a Unix socket on a host.
//!
//! A shutdown is signalled once the Shutdown call's answer is handed to the server's
//! writer, and first ends the long polls (GetOOMEvent waits for an event that may never
//! come). On a host the server is then drained (every call in flight answered) before
//! the agent ends; in the guest the agent reboots at once, while the server tears down:
//! that teardown (threads woken and joined one by one) takes seconds in an emulated guest
//! kernel, and the reboot ends every call anyway.

use std::collections::HashMap;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use nestbox_protocols::agent_ttrpc::create_agent_service;
use nestbox_protocols::ttrpc::{self, MethodHandler, TtrpcContext};

use crate::oom::OomQueue;
use crate::rpc::AgentRpc;
use crate::sandbox::Sandbox;

/// The stable start of every warning a safety-net bound logs when it is reached (here,
/// and in the shim's process and stdin paths): the end-to-end tests fail on it, since a
/// normal start or stop never waits that long.
pub const BOUND_WARNING: &str = "safety-net bound reached";

/// How long a host-mode shutdown waits for the calls still in flight once the long polls
/// ended before the agent ends anyway. Normally nothing is left by then and the drain
/// takes milliseconds; the bound is for a call that cannot end by itself (a WaitProcess of
/// a process still running, a container setup stuck), which must not keep the agent alive.
const DRAIN_BOUND: Duration = Duration::from_secs(10);

const SHUTDOWN: &str = "/nestbox.agent.v1.AgentService/Shutdown";

pub struct Serving {
    server: ttrpc::Server,
    address: String,
    shutdown_tx: Sender<()>,
    shutdown_rx: Receiver<()>,
    oom: Arc<OomQueue>,
    /// Where `AgentRpc` signals a Shutdown (before its answer exists): kept, not read; the
    /// Shutdown handler's wrapper signals `shutdown_tx` once the answer is queued.
    _early_rx: Receiver<()>,
}

/// Starts serving the API on `address` (`vsock://-1:1024`, `unix:///path`) on ttrpc's
/// threads and returns at once.
pub fn start(address: &str, init_daemon: bool, sandbox: Arc<Sandbox>) -> anyhow::Result<Serving> {
    let (shutdown_tx, shutdown_rx) = mpsc::channel();
    let (early_tx, early_rx) = mpsc::channel();
    let oom = sandbox.env.oom.clone();
    let mut service = create_agent_service(Arc::new(AgentRpc::new(init_daemon, early_tx, sandbox)));
    signal_shutdown_after_its_answer(&mut service, shutdown_tx.clone());
    let mut server = ttrpc::Server::new()
        .bind(address)
        .with_context(|| format!("binding the agent API to {address}"))?
        .register_service(service);
    server.start().with_context(|| format!("starting the agent API server on {address}"))?;
    Ok(Serving { server, address: address.to_string(), shutdown_tx, shutdown_rx, oom, _early_rx: early_rx })
}

type Methods = HashMap<String, Box<dyn MethodHandler + Send + Sync>>;

/// The Shutdown call signals the shutdown once its answer is queued for writing, so the
/// agent never ends before it has an answer to send.
fn signal_shutdown_after_its_answer(methods: &mut Methods, shutdown: Sender<()>) {
    if let Some(inner) = methods.remove(SHUTDOWN) {
        methods.insert(SHUTDOWN.to_string(), Box::new(AnswerThenShutDown { inner, shutdown }));
    }
}

struct AnswerThenShutDown {
    inner: Box<dyn MethodHandler + Send + Sync>,
    shutdown: Sender<()>,
}

impl MethodHandler for AnswerThenShutDown {
    fn handler(&self, ctx: TtrpcContext, req: ttrpc::Request) -> ttrpc::Result<()> {
        let answered = self.inner.handler(ctx, req);
        // A failed send: the shutdown is under way already.
        let _ = self.shutdown.send(());
        answered
    }
}

impl Serving {
    /// A handle that asks for a shutdown as the Shutdown call does (for signals).
    pub fn shutdown_handle(&self) -> Sender<()> {
        self.shutdown_tx.clone()
    }

    /// Blocks until a shutdown is asked for, ends the long polls, then stops the server:
    /// no new connections, and the answers of calls in flight are written before their
    /// connections close (host mode: the process ends next).
    pub fn wait_for_shutdown(self) {
        let (asked, address, drained) = self.shut_down();
        match drained {
            Some(done) => {
                if done.recv_timeout(DRAIN_BOUND).is_ok() {
                    eprintln!("nestbox-agent: shutdown: calls drained in {:?}", asked.elapsed());
                } else {
                    eprintln!(
                        "nestbox-agent: {BOUND_WARNING}: calls on {address} still running {DRAIN_BOUND:?} after the \
                         shutdown (the long polls ended); ending anyway"
                    );
                }
            }
            None => eprintln!("nestbox-agent: stopping the API server on {address}: no thread to drain with"),
        }
    }

    /// Blocks until a shutdown is asked for (the Shutdown call's answer is queued by then),
    /// ends the long polls and starts stopping the server, then returns for the reboot:
    /// the answer is written by the server's writer thread while the caller syncs the
    /// file systems, and nothing else in flight outlives the reboot. (Should the answer
    /// still be lost, the host sees the connection close as the VM ends.)
    pub fn wait_for_shutdown_to_reboot(self) {
        let (_, address, drained) = self.shut_down();
        if drained.is_none() {
            eprintln!("nestbox-agent: stopping the API server on {address}: no thread to stop it with");
        }
    }

    /// Waits for the shutdown signal, ends the long polls and stops the server on a thread
    /// of its own; the receiver hears when it is stopped.
    fn shut_down(self) -> (Instant, String, Option<Receiver<()>>) {
        // Cannot fail: `self` holds a sender.
        let _ = self.shutdown_rx.recv();
        let asked = Instant::now();
        self.oom.close();
        let (done_tx, done_rx) = mpsc::channel();
        let server = self.server;
        let spawned = std::thread::Builder::new().name("api-shutdown".into()).spawn(move || {
            server.shutdown();
            let _ = done_tx.send(());
        });
        (asked, self.address, spawned.ok().map(|_| done_rx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nestbox_protocols::agent::{GetOOMEventRequest, ShutdownRequest};
    use nestbox_protocols::agent_ttrpc::AgentServiceClient;

    fn sandbox() -> Arc<Sandbox> {
        let env = crate::container::Env {
            reaper: crate::reaper::Reaper::new(),
            io: crate::process::streams::IoHub::new(),
            exe: std::fs::File::open("/proc/self/exe").expect("own executable").into(),
            cgroups: Err("none in this test".into()),
            oom: Default::default(),
            share: None,
            glibc_avx_off: false,
        };
        Sandbox::new(env, false)
    }

    /// A GetOOMEvent in flight when Shutdown arrives is answered "shutting down", Shutdown
    /// itself is answered, and the wait (`reboot`: the guest's, else the host's full drain)
    /// returns at once, far inside the drain bound.
    fn shutdown_ends_the_oom_poll_and_returns_at_once(reboot: bool) {
        let dir = tempfile::tempdir().expect("tempdir");
        let address = format!("unix://{}", dir.path().join("agent.sock").display());
        let serving = start(&address, false, sandbox()).expect("serving");
        let (drained_tx, drained) = mpsc::channel();
        std::thread::spawn(move || {
            if reboot {
                serving.wait_for_shutdown_to_reboot();
            } else {
                serving.wait_for_shutdown();
            }
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
        drained.recv_timeout(Duration::from_secs(5)).expect("the shutdown still waits");
        assert!(asked.elapsed() < DRAIN_BOUND / 2, "returned after {:?}", asked.elapsed());
    }

    #[test]
    fn host_shutdown_ends_the_oom_poll_and_drains_at_once() {
        shutdown_ends_the_oom_poll_and_returns_at_once(false);
    }

    #[test]
    fn guest_shutdown_answers_and_returns_for_the_reboot_at_once() {
        shutdown_ends_the_oom_poll_and_returns_at_once(true);
    }
}
