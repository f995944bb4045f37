//! The agent API's surface: one method per RPC of `nestbox.agent.v1.AgentService`.
//!
//! For now the agent answers Check, Version and Shutdown; every container, sandbox and
//! network call answers ttrpc status UNIMPLEMENTED naming the method, so a shim can tell
//! "not there yet" from a failure.

use std::sync::mpsc::Sender;

use nestbox_protocols::agent::{self, check_response::ServingStatus};
use nestbox_protocols::agent_ttrpc::AgentService;
use nestbox_protocols::ttrpc::{self, TtrpcContext};
use nestbox_protocols::types::{self, Empty};

pub struct AgentRpc {
    /// Running as the guest's init (PID 1) rather than in host mode.
    init_daemon: bool,
    /// Tells whoever owns the server to stop it and end the agent (see `serve`).
    shutdown: Sender<()>,
}

impl AgentRpc {
    pub fn new(init_daemon: bool, shutdown: Sender<()>) -> Self {
        Self { init_daemon, shutdown }
    }
}

fn not_implemented<T>(method: &str) -> ttrpc::Result<T> {
    Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
        ttrpc::Code::UNIMPLEMENTED,
        format!("{method} is not implemented yet"),
    )))
}

pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

impl AgentService for AgentRpc {
    fn check(&self, _ctx: &TtrpcContext, _req: agent::CheckRequest) -> ttrpc::Result<agent::CheckResponse> {
        let mut resp = agent::CheckResponse::new();
        resp.status = ServingStatus::SERVING.into();
        Ok(resp)
    }

    fn version(&self, _ctx: &TtrpcContext, _req: agent::VersionRequest) -> ttrpc::Result<agent::VersionResponse> {
        let mut resp = agent::VersionResponse::new();
        resp.agent_version = crate::VERSION.to_string();
        resp.kernel_release = kernel_release();
        resp.init_daemon = self.init_daemon;
        Ok(resp)
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: agent::ShutdownRequest) -> ttrpc::Result<Empty> {
        eprintln!("nestbox-agent: shutdown requested");
        // Only a request: the server's owner stops the server, which first lets this
        // answer go out, then ends the agent. A failed send means it is already doing so.
        let _ = self.shutdown.send(());
        Ok(Empty::new())
    }

    fn create_sandbox(&self, _ctx: &TtrpcContext, _req: agent::CreateSandboxRequest) -> ttrpc::Result<Empty> {
        not_implemented("CreateSandbox")
    }

    fn destroy_sandbox(&self, _ctx: &TtrpcContext, _req: agent::DestroySandboxRequest) -> ttrpc::Result<Empty> {
        not_implemented("DestroySandbox")
    }

    fn create_container(&self, _ctx: &TtrpcContext, _req: agent::CreateContainerRequest) -> ttrpc::Result<Empty> {
        not_implemented("CreateContainer")
    }

    fn start_container(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::StartContainerRequest,
    ) -> ttrpc::Result<agent::StartContainerResponse> {
        not_implemented("StartContainer")
    }

    fn exec_process(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::ExecProcessRequest,
    ) -> ttrpc::Result<agent::ExecProcessResponse> {
        not_implemented("ExecProcess")
    }

    fn signal_process(&self, _ctx: &TtrpcContext, _req: agent::SignalProcessRequest) -> ttrpc::Result<Empty> {
        not_implemented("SignalProcess")
    }

    fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::WaitProcessRequest,
    ) -> ttrpc::Result<agent::WaitProcessResponse> {
        not_implemented("WaitProcess")
    }

    fn remove_container(&self, _ctx: &TtrpcContext, _req: agent::RemoveContainerRequest) -> ttrpc::Result<Empty> {
        not_implemented("RemoveContainer")
    }

    fn update_container(&self, _ctx: &TtrpcContext, _req: agent::UpdateContainerRequest) -> ttrpc::Result<Empty> {
        not_implemented("UpdateContainer")
    }

    fn stats_container(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::StatsContainerRequest,
    ) -> ttrpc::Result<agent::StatsContainerResponse> {
        not_implemented("StatsContainer")
    }

    fn pause_container(&self, _ctx: &TtrpcContext, _req: agent::PauseContainerRequest) -> ttrpc::Result<Empty> {
        not_implemented("PauseContainer")
    }

    fn resume_container(&self, _ctx: &TtrpcContext, _req: agent::ResumeContainerRequest) -> ttrpc::Result<Empty> {
        not_implemented("ResumeContainer")
    }

    fn tty_win_resize(&self, _ctx: &TtrpcContext, _req: agent::TtyWinResizeRequest) -> ttrpc::Result<Empty> {
        not_implemented("TtyWinResize")
    }

    fn close_stdin(&self, _ctx: &TtrpcContext, _req: agent::CloseStdinRequest) -> ttrpc::Result<Empty> {
        not_implemented("CloseStdin")
    }

    fn get_oom_event(&self, _ctx: &TtrpcContext, _req: agent::GetOOMEventRequest) -> ttrpc::Result<agent::OOMEvent> {
        not_implemented("GetOOMEvent")
    }

    fn update_interface(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::UpdateInterfaceRequest,
    ) -> ttrpc::Result<types::Interface> {
        not_implemented("UpdateInterface")
    }

    fn update_routes(&self, _ctx: &TtrpcContext, _req: agent::UpdateRoutesRequest) -> ttrpc::Result<types::Routes> {
        not_implemented("UpdateRoutes")
    }
}
