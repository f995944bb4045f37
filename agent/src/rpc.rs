//! The agent API's surface: one method per RPC of `nestbox.agent.v1.AgentService`, each a
//! thin mapping onto the sandbox and its containers (`sandbox`, `container`), with errors
//! as ttrpc status codes (`error`); the network calls map onto `network`.

use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use nestbox_protocols::agent::{self, check_response::ServingStatus};
use nestbox_protocols::agent_ttrpc::AgentService;
use nestbox_protocols::ttrpc::{self, TtrpcContext};
use nestbox_protocols::types::{self, Empty};

use crate::error::AgentError;
use crate::guest_work;
use crate::sandbox::Sandbox;

/// The agent's version, answered by the Version call and printed at start.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub struct AgentRpc {
    /// Running as the guest's init (PID 1) rather than in host mode.
    init_daemon: bool,
    /// Tells whoever owns the server to stop it and end the agent (see `serve`).
    shutdown: Sender<()>,
    sandbox: Arc<Sandbox>,
    /// Log what each container call costs the guest (`guest_work`; debug level only).
    count_work: bool,
}

impl AgentRpc {
    pub fn new(init_daemon: bool, shutdown: Sender<()>, sandbox: Arc<Sandbox>) -> Self {
        let count_work = guest_work::enabled(init_daemon);
        Self { init_daemon, shutdown, sandbox, count_work }
    }

    /// Runs one container call, logging its guest work when counting is on. `id`: the
    /// container (and exec) the call is about; a created container's mounts are counted too.
    fn counted<T>(&self, call: &str, id: &str, f: impl FnOnce() -> ttrpc::Result<T>) -> ttrpc::Result<T> {
        let probe = guest_work::begin(self.count_work);
        let result = f();
        if let Some(probe) = probe {
            let new_container = (call == "CreateContainer" && result.is_ok())
                .then(|| self.sandbox.container(id).ok()?.process("").ok().map(|p| p.pid))
                .flatten();
            probe.end(call, id, new_container, result.is_ok());
        }
        result
    }
}

pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

fn empty(r: Result<(), AgentError>) -> ttrpc::Result<Empty> {
    r.map(|()| Empty::new()).map_err(Into::into)
}

impl AgentService for AgentRpc {
    fn check(&self, _ctx: &TtrpcContext, _req: agent::CheckRequest) -> ttrpc::Result<agent::CheckResponse> {
        let mut resp = agent::CheckResponse::new();
        resp.status = ServingStatus::SERVING.into();
        Ok(resp)
    }

    fn version(&self, _ctx: &TtrpcContext, _req: agent::VersionRequest) -> ttrpc::Result<agent::VersionResponse> {
        let mut resp = agent::VersionResponse::new();
        resp.agent_version = VERSION.to_string();
        resp.kernel_release = kernel_release();
        resp.init_daemon = self.init_daemon;
        Ok(resp)
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: agent::ShutdownRequest) -> ttrpc::Result<Empty> {
        eprintln!("nestbox-agent: shutdown requested");
        // Only a request: the server's owner stops the server, which first lets this
        // answer go out, then ends the agent. A failed send means it is already doing so.
        self.counted("Shutdown", "", || {
            let _ = self.shutdown.send(());
            Ok(Empty::new())
        })
    }

    fn create_sandbox(&self, _ctx: &TtrpcContext, req: agent::CreateSandboxRequest) -> ttrpc::Result<Empty> {
        self.counted("CreateSandbox", "", || empty(self.sandbox.create_sandbox(&req)))
    }

    fn destroy_sandbox(&self, _ctx: &TtrpcContext, _req: agent::DestroySandboxRequest) -> ttrpc::Result<Empty> {
        self.counted("DestroySandbox", "", || empty(self.sandbox.destroy_sandbox()))
    }

    fn create_container(&self, _ctx: &TtrpcContext, req: agent::CreateContainerRequest) -> ttrpc::Result<Empty> {
        self.counted("CreateContainer", &req.container_id, || empty(self.sandbox.create_container(&req)))
    }

    fn start_container(
        &self,
        _ctx: &TtrpcContext,
        req: agent::StartContainerRequest,
    ) -> ttrpc::Result<agent::StartContainerResponse> {
        self.counted("StartContainer", &req.container_id, || {
            let pid = self.sandbox.container(&req.container_id)?.start(&self.sandbox.env)?;
            Ok(agent::StartContainerResponse { pid, ..Default::default() })
        })
    }

    fn exec_process(
        &self,
        _ctx: &TtrpcContext,
        req: agent::ExecProcessRequest,
    ) -> ttrpc::Result<agent::ExecProcessResponse> {
        self.counted("ExecProcess", &format!("{}/{}", req.container_id, req.exec_id), || {
            let container = self.sandbox.container(&req.container_id)?;
            let stdio = req.stdio.clone().unwrap_or_default();
            let pid = container.exec(&self.sandbox.env, &req.exec_id, &req.oci_process_json, &stdio)?;
            Ok(agent::ExecProcessResponse { pid, ..Default::default() })
        })
    }

    fn signal_process(&self, _ctx: &TtrpcContext, req: agent::SignalProcessRequest) -> ttrpc::Result<Empty> {
        self.counted("SignalProcess", &format!("{}/{}", req.container_id, req.exec_id), || {
            let container = self.sandbox.container(&req.container_id)?;
            empty(container.signal(&self.sandbox.env, &req.exec_id, req.signal, req.all))
        })
    }

    fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        req: agent::WaitProcessRequest,
    ) -> ttrpc::Result<agent::WaitProcessResponse> {
        // A long poll: its line holds the process's whole run (and whatever else overlapped).
        self.counted("WaitProcess", &format!("{}/{}", req.container_id, req.exec_id), || {
            let exit = self.sandbox.container(&req.container_id)?.wait(&req.exec_id)?;
            let at = exit.at.duration_since(UNIX_EPOCH).unwrap_or_default();
            Ok(agent::WaitProcessResponse {
                exit_status: exit.status,
                exited_at_unix_nanos: i64::try_from(at.as_nanos()).unwrap_or(i64::MAX),
                ..Default::default()
            })
        })
    }

    fn remove_container(&self, _ctx: &TtrpcContext, req: agent::RemoveContainerRequest) -> ttrpc::Result<Empty> {
        let timeout = (req.timeout_secs > 0).then(|| Duration::from_secs(req.timeout_secs.into()));
        self.counted("RemoveContainer", &req.container_id, || {
            empty(self.sandbox.remove_container(&req.container_id, timeout))
        })
    }

    fn update_container(&self, _ctx: &TtrpcContext, req: agent::UpdateContainerRequest) -> ttrpc::Result<Empty> {
        empty(self.sandbox.container(&req.container_id)?.update(&req.oci_resources_json))
    }

    fn stats_container(
        &self,
        _ctx: &TtrpcContext,
        req: agent::StatsContainerRequest,
    ) -> ttrpc::Result<agent::StatsContainerResponse> {
        let stats = self.sandbox.container(&req.container_id)?.stats();
        Ok(agent::StatsContainerResponse { cgroup_stats: Some(stats).into(), ..Default::default() })
    }

    fn pause_container(&self, _ctx: &TtrpcContext, req: agent::PauseContainerRequest) -> ttrpc::Result<Empty> {
        empty(self.sandbox.container(&req.container_id)?.set_paused(true))
    }

    fn resume_container(&self, _ctx: &TtrpcContext, req: agent::ResumeContainerRequest) -> ttrpc::Result<Empty> {
        empty(self.sandbox.container(&req.container_id)?.set_paused(false))
    }

    fn tty_win_resize(&self, _ctx: &TtrpcContext, req: agent::TtyWinResizeRequest) -> ttrpc::Result<Empty> {
        let process = self.sandbox.container(&req.container_id)?.process(&req.exec_id)?;
        let clamp = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
        let name = format!("process {:?} of container {}", req.exec_id, req.container_id);
        process
            .io
            .resize(&name, clamp(req.rows), clamp(req.columns))
            .map_err(|e| AgentError::FailedPrecondition(e.to_string()))?;
        Ok(Empty::new())
    }

    fn close_stdin(&self, _ctx: &TtrpcContext, req: agent::CloseStdinRequest) -> ttrpc::Result<Empty> {
        self.sandbox.container(&req.container_id)?.process(&req.exec_id)?.io.close_stdin();
        Ok(Empty::new())
    }

    fn get_oom_event(&self, _ctx: &TtrpcContext, _req: agent::GetOOMEventRequest) -> ttrpc::Result<agent::OOMEvent> {
        // Ends with UNAVAILABLE at shutdown (serve.rs closes the queue), not waiting for good.
        let container_id = self.sandbox.env.oom.next_event().map_err(|e| AgentError::Unavailable(e.to_string()))?;
        Ok(agent::OOMEvent { container_id, ..Default::default() })
    }

    fn update_interface(
        &self,
        _ctx: &TtrpcContext,
        req: agent::UpdateInterfaceRequest,
    ) -> ttrpc::Result<types::Interface> {
        let iface =
            req.interface.as_ref().ok_or_else(|| crate::error::invalid("UpdateInterface without an interface"))?;
        let pod = self.sandbox.pod_namespaces();
        Ok(crate::network::update_interface(pod.as_ref().map(|p| p.net()), iface, self.init_daemon)?)
    }

    fn update_routes(&self, _ctx: &TtrpcContext, req: agent::UpdateRoutesRequest) -> ttrpc::Result<types::Routes> {
        let pod = self.sandbox.pod_namespaces();
        let wanted = req.routes.as_ref().cloned().unwrap_or_default();
        Ok(crate::network::update_routes(pod.as_ref().map(|p| p.net()), &wanted)?)
    }

    fn add_arp_neighbors(&self, _ctx: &TtrpcContext, req: agent::AddArpNeighborsRequest) -> ttrpc::Result<Empty> {
        let pod = self.sandbox.pod_namespaces();
        empty(crate::network::add_arp_neighbors(pod.as_ref().map(|p| p.net()), &req.neighbors))
    }
}
