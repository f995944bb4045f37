//! containerd's task API v2, served by one shim per pod: each call is logged and mapped
//! onto the pod ([`crate::pod`]), which holds the process table and the sandbox VM.
//! Events go out in the order containerd expects (TaskCreate, TaskStart, ExecAdded,
//! ExecStarted, TaskExit, TaskDelete) from one publisher thread ([`crate::events`]).

use crate::config::Config;
use crate::events::EventPublisher;
use crate::pod::Pod;
use crate::rpc_status::{status, RpcResult};
use containerd_shim::api::{
    CheckpointTaskRequest, CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse,
    DeleteRequest, DeleteResponse, Empty, ExecProcessRequest, KillRequest, PauseRequest, PidsRequest, PidsResponse,
    ResizePtyRequest, ResumeRequest, ShutdownRequest, StartRequest, StartResponse, StateRequest, StateResponse,
    StatsRequest, StatsResponse, UpdateTaskRequest, WaitRequest, WaitResponse,
};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{ExitSignal, Task, TtrpcContext};
use nestbox_protocols::ttrpc;
use std::sync::Arc;

/// The task service containerd talks to.
#[derive(Clone)]
pub struct Service {
    pod: Arc<Pod>,
}

impl Service {
    pub fn new(config: Config, namespace: &str, publisher: RemotePublisher, exit: Arc<ExitSignal>) -> Service {
        let events = EventPublisher::start(publisher, namespace);
        Service { pod: Arc::new(Pod::new(config, events, exit)) }
    }
}

/// Calls that change something are logged with their outcome; failures as warnings.
fn log_call<T>(call: &str, id: &str, result: RpcResult<T>) -> RpcResult<T> {
    match &result {
        Ok(_) => log::debug!("{call} {id}: ok"),
        Err(e) => log::warn!("{call} {id}: {e:?}"),
    }
    result
}

impl Task for Service {
    fn create(&self, _ctx: &TtrpcContext, req: CreateTaskRequest) -> RpcResult<CreateTaskResponse> {
        log::info!("create {} (bundle {}, {} rootfs mounts)", req.id, req.bundle, req.rootfs.len());
        log_call("create", &req.id, self.pod.create(&req))
    }

    fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> RpcResult<StartResponse> {
        log_call("start", &req.id, self.pod.start(&req))
    }

    fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> RpcResult<StateResponse> {
        self.pod.state_of(&req)
    }

    fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> RpcResult<DeleteResponse> {
        log_call("delete", &req.id, self.pod.delete(&req))
    }

    fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> RpcResult<Empty> {
        log::info!("kill {} {} signal {} all {}", req.id, req.exec_id, req.signal, req.all);
        log_call("kill", &req.id, self.pod.kill(&req)).map(|()| Empty::new())
    }

    fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> RpcResult<WaitResponse> {
        self.pod.wait(&req.id, &req.exec_id)
    }

    fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> RpcResult<Empty> {
        log_call("exec", &req.id, self.pod.exec(&req)).map(|()| Empty::new())
    }

    fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> RpcResult<Empty> {
        self.pod.resize_pty(&req.id, &req.exec_id, req.height, req.width).map(|()| Empty::new())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> RpcResult<Empty> {
        if req.stdin {
            self.pod.close_stdin(&req.id, &req.exec_id)?;
        } else {
            self.pod.process(&req.id, &req.exec_id)?;
        }
        Ok(Empty::new())
    }

    fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> RpcResult<PidsResponse> {
        self.pod.pids(&req.id)
    }

    fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> RpcResult<Empty> {
        log_call("pause", &req.id, self.pod.pause_resume(&req.id, true)).map(|()| Empty::new())
    }

    fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> RpcResult<Empty> {
        log_call("resume", &req.id, self.pod.pause_resume(&req.id, false)).map(|()| Empty::new())
    }

    fn checkpoint(&self, _ctx: &TtrpcContext, _req: CheckpointTaskRequest) -> RpcResult<Empty> {
        Err(status(ttrpc::Code::UNIMPLEMENTED, "nestbox does not checkpoint containers"))
    }

    fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> RpcResult<Empty> {
        let resources = req.resources.as_ref().map(|any| any.value.clone()).unwrap_or_default();
        self.pod.update(&req.id, resources).map(|()| Empty::new())
    }

    fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> RpcResult<StatsResponse> {
        self.pod.stats(&req.id)
    }

    fn connect(&self, _ctx: &TtrpcContext, _req: ConnectRequest) -> RpcResult<ConnectResponse> {
        Ok(ConnectResponse {
            shim_pid: self.pod.shim_pid(),
            task_pid: self.pod.shim_pid(),
            version: format!("nestbox {}", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, req: ShutdownRequest) -> RpcResult<Empty> {
        self.pod.shutdown(req.now);
        Ok(Empty::new())
    }
}
