//! Serving the agent API with ttrpc's synchronous server (its own threads), in either
//! mode: on vsock as the guest's init, on a Unix socket on a host.

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use nestbox_protocols::agent_ttrpc::create_agent_service;
use nestbox_protocols::ttrpc;

use crate::rpc::AgentRpc;
use crate::sandbox::Sandbox;

/// How long a shutdown waits for the server to finish the calls in flight (the Shutdown
/// call's own answer among them) before the agent ends anyway: a call blocked for good
/// (a future WaitProcess, say) must not keep the VM alive.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Serving {
    server: ttrpc::Server,
    address: String,
    shutdown_tx: Sender<()>,
    shutdown_rx: Receiver<()>,
}

/// Starts serving the API on `address` (`vsock://-1:1024`, `unix:///path`) on ttrpc's
/// threads and returns at once.
pub fn start(address: &str, init_daemon: bool, sandbox: Arc<Sandbox>) -> anyhow::Result<Serving> {
    let (shutdown_tx, shutdown_rx) = mpsc::channel();
    let service = create_agent_service(Arc::new(AgentRpc::new(init_daemon, shutdown_tx.clone(), sandbox)));
    let mut server = ttrpc::Server::new()
        .bind(address)
        .with_context(|| format!("binding the agent API to {address}"))?
        .register_service(service);
    server.start().with_context(|| format!("starting the agent API server on {address}"))?;
    Ok(Serving { server, address: address.to_string(), shutdown_tx, shutdown_rx })
}

impl Serving {
    /// A handle that asks for a shutdown as the Shutdown call does (for signals).
    pub fn shutdown_handle(&self) -> Sender<()> {
        self.shutdown_tx.clone()
    }

    /// Blocks until a shutdown is asked for, then stops the server: no new connections,
    /// and the answers of calls in flight are written before their connections close.
    pub fn wait_for_shutdown(self) {
        // Cannot fail: `self` holds a sender.
        let _ = self.shutdown_rx.recv();
        let (done_tx, done_rx) = mpsc::channel();
        let server = self.server;
        let drained = std::thread::Builder::new().name("api-shutdown".into()).spawn(move || {
            server.shutdown();
            let _ = done_tx.send(());
        });
        match drained {
            Ok(_) => {
                if done_rx.recv_timeout(DRAIN_TIMEOUT).is_err() {
                    eprintln!(
                        "nestbox-agent: calls on {} still running after {DRAIN_TIMEOUT:?}; ending anyway",
                        self.address
                    );
                }
            }
            // No thread to drain with: end without waiting rather than not at all.
            Err(e) => eprintln!("nestbox-agent: stopping the API server: {e}"),
        }
    }
}
