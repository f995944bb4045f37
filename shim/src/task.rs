//! containerd's task API v2, served by one shim per pod and mapped onto that pod's
//! sandbox: the first container creates the VM, every container's rootfs is shared into
//! it, processes run through the agent, and their standard streams are copied to
//! containerd's fifos.
//!
//! Host-side PIDs: containerd expects a host PID for each task; guest PIDs mean nothing on
//! the host (and could name an unrelated host process), so, as Kata does, tasks report the
//! shim's own PID. `pids` lists the guest PIDs, which is what a user wants to see there.
//!
//! Events go out in the order containerd expects (TaskCreate, TaskStart, ExecAdded,
//! ExecStarted, TaskExit, TaskDelete) from one publisher thread fed in call order.

use crate::config::Config;
use crate::io::{IoPaths, ProcessIo};
use crate::sandbox::agent::{AgentError, StdioSpec, GUEST_SHARED_DIR};
use crate::sandbox::mounts::{self, MountSpec};
use crate::sandbox::{self, Sandbox, SandboxError};
use containerd_shim::api::{
    CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse, DeleteRequest,
    DeleteResponse, Empty, ExecProcessRequest, KillRequest, PauseRequest, PidsRequest, PidsResponse, ResizePtyRequest,
    ResumeRequest, ShutdownRequest, StartRequest, StartResponse, StateRequest, StateResponse, StatsRequest,
    StatsResponse, Status, UpdateTaskRequest, WaitRequest, WaitResponse,
};
use containerd_shim::event::Event;
use containerd_shim::protos::cgroups_v2::metrics as cg2;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused, TaskResumed,
    TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{MessageDyn, MessageField};
use containerd_shim::protos::types::task::ProcessInfo;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{ExitSignal, Task, TtrpcContext};
use nestbox_protocols::ttrpc;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The annotation containerd's CRI puts on every container of a pod.
pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";
/// The exit status reported for processes whose VM died under them (containerd uses 255
/// for "unknown" exits as well).
pub const VM_DIED_EXIT_STATUS: u32 = 255;
/// How long a process's exit waits for its last output to be copied.
const OUTPUT_DRAIN: Duration = Duration::from_secs(5);

type RpcResult<T> = ttrpc::Result<T>;

fn status(code: ttrpc::Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

fn not_found(what: &str) -> ttrpc::Error {
    status(ttrpc::Code::NOT_FOUND, format!("{what} not found"))
}

/// An agent failure as containerd sees it: the agent's own status code where it gave one
/// (NotFound, Unimplemented, ...), otherwise Unavailable or Internal, with the message.
fn agent_error(context: &str, e: AgentError) -> ttrpc::Error {
    let code = e.status_code().unwrap_or(ttrpc::Code::INTERNAL);
    status(code, format!("{context}: {e}"))
}

fn sandbox_error(context: &str, e: SandboxError) -> ttrpc::Error {
    let code = match &e {
        SandboxError::Agent(a) => a.status_code().unwrap_or(ttrpc::Code::INTERNAL),
        SandboxError::BootTimeout { .. } => ttrpc::Code::DEADLINE_EXCEEDED,
        SandboxError::Exists { .. } => ttrpc::Code::ALREADY_EXISTS,
        _ => ttrpc::Code::INTERNAL,
    };
    status(code, format!("{context}: {e}"))
}

pub fn now() -> Timestamp {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp { seconds: since.as_secs() as i64, nanos: since.subsec_nanos() as i32, ..Default::default() }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ProcStatus {
    Created,
    Running,
    Stopped,
}

struct ProcState {
    status: ProcStatus,
    guest_pid: u32,
    exit_status: u32,
    exited_at: Option<Timestamp>,
}

/// A container's init process or an exec'd process.
struct Process {
    container_id: String,
    /// Empty for the init process.
    exec_id: String,
    paths: IoPaths,
    /// The OCI process (JSON) of an exec, kept from `exec` until `start`.
    exec_spec: Vec<u8>,
    state: Mutex<ProcState>,
    exited: Condvar,
    io: Mutex<Option<ProcessIo>>,
}

impl Process {
    fn new(container_id: &str, exec_id: &str, paths: IoPaths, exec_spec: Vec<u8>) -> Arc<Process> {
        Arc::new(Process {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            paths,
            exec_spec,
            state: Mutex::new(ProcState { status: ProcStatus::Created, guest_pid: 0, exit_status: 0, exited_at: None }),
            exited: Condvar::new(),
            io: Mutex::new(None),
        })
    }

    fn name(&self) -> String {
        if self.exec_id.is_empty() {
            self.container_id.clone()
        } else {
            format!("{}/{}", self.container_id, self.exec_id)
        }
    }

    fn state(&self) -> MutexGuard<'_, ProcState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the exit; false if it was already recorded (the first report wins).
    fn set_exited(&self, exit_status: u32) -> bool {
        let mut s = self.state();
        if s.status == ProcStatus::Stopped {
            return false;
        }
        s.status = ProcStatus::Stopped;
        s.exit_status = exit_status;
        s.exited_at = Some(now());
        self.exited.notify_all();
        true
    }

    fn stdio(&self) -> StdioSpec {
        StdioSpec {
            terminal: self.paths.terminal,
            stdin: !self.paths.stdin.is_empty(),
            stdout: !self.paths.stdout.is_empty(),
            stderr: !self.paths.stderr.is_empty(),
        }
    }

    fn release_io(&self) {
        if let Some(io) = self.io.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            io.release();
        }
    }
}

struct Container {
    bundle: String,
    init: Arc<Process>,
    execs: HashMap<String, Arc<Process>>,
    paused: bool,
}

#[derive(Default)]
struct State {
    /// The pod this shim serves, fixed by its first container.
    sandbox_id: Option<String>,
    sandbox: Option<Arc<Sandbox>>,
    /// Why the VM is gone, once it died: calls that need the guest fail with it.
    vm_gone: Option<String>,
    containers: HashMap<String, Container>,
}

struct Shared {
    config: Config,
    events: Mutex<mpsc::Sender<Box<dyn Event + Send>>>,
    exit: Arc<ExitSignal>,
    state: Mutex<State>,
    /// Serialises creates, so concurrent creates of one pod boot one VM.
    create_lock: Mutex<()>,
    shim_pid: u32,
}

/// The task service containerd talks to.
#[derive(Clone)]
pub struct Service {
    shared: Arc<Shared>,
}

impl Service {
    pub fn new(config: Config, namespace: &str, publisher: RemotePublisher, exit: Arc<ExitSignal>) -> Service {
        let (tx, rx) = mpsc::channel::<Box<dyn Event + Send>>();
        let namespace = namespace.to_string();
        // One thread publishes every event, in the order they were queued.
        let spawned = std::thread::Builder::new().name("events".into()).spawn(move || {
            for event in rx {
                let topic = event.topic();
                let event: Box<dyn MessageDyn> = event;
                if let Err(e) = publisher.publish(ttrpc::context::with_timeout(0), &topic, &namespace, event) {
                    log::error!("publishing {topic}: {e}");
                }
            }
        });
        if let Err(e) = spawned {
            log::error!("no event publisher thread, events are lost: {e}");
        }
        Service {
            shared: Arc::new(Shared {
                config,
                events: Mutex::new(tx),
                exit,
                state: Mutex::new(State::default()),
                create_lock: Mutex::new(()),
                shim_pid: std::process::id(),
            }),
        }
    }
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, event: impl Event + Send + 'static) {
        let _ = self.events.lock().unwrap_or_else(|e| e.into_inner()).send(Box::new(event));
    }

    fn process(&self, id: &str, exec_id: &str) -> RpcResult<Arc<Process>> {
        let state = self.state();
        let c = state.containers.get(id).ok_or_else(|| not_found(&format!("container {id}")))?;
        if exec_id.is_empty() {
            return Ok(c.init.clone());
        }
        c.execs.get(exec_id).cloned().ok_or_else(|| not_found(&format!("process {exec_id} of container {id}")))
    }

    /// The running sandbox, or why there is none.
    fn sandbox(&self) -> RpcResult<Arc<Sandbox>> {
        let state = self.state();
        if let Some(reason) = &state.vm_gone {
            return Err(status(ttrpc::Code::UNAVAILABLE, reason.clone()));
        }
        state.sandbox.clone().ok_or_else(|| status(ttrpc::Code::FAILED_PRECONDITION, "the sandbox VM is not running"))
    }

    fn exit_event(&self, p: &Process) {
        let s = p.state();
        self.publish(TaskExit {
            container_id: p.container_id.clone(),
            id: if p.exec_id.is_empty() { p.container_id.clone() } else { p.exec_id.clone() },
            pid: self.shim_pid,
            exit_status: s.exit_status,
            exited_at: MessageField::from_option(s.exited_at.clone()),
            ..Default::default()
        });
    }

    /// The VMM ended on its own: every process of the pod exited with an error status,
    /// containerd is told, and the sandbox's mounts and directory go. Later `delete`
    /// calls then only report the statuses.
    fn vmm_died(&self, exit: std::process::ExitStatus) {
        let (sandbox, processes) = {
            let mut state = self.state();
            let sandbox = state.sandbox.take();
            let tail = sandbox.as_ref().map(|s| s.console_tail()).unwrap_or_default();
            let reason = format!("the sandbox VM exited unexpectedly ({exit})");
            log::error!("{reason}{tail}");
            state.vm_gone = Some(reason);
            let processes: Vec<Arc<Process>> = state
                .containers
                .values()
                .flat_map(|c| std::iter::once(c.init.clone()).chain(c.execs.values().cloned()))
                .collect();
            (sandbox, processes)
        };
        for p in processes {
            p.release_io();
            if p.set_exited(VM_DIED_EXIT_STATUS) {
                self.exit_event(&p);
            }
        }
        if let Some(sandbox) = sandbox {
            if let Err(e) = sandbox.stop() {
                log::error!("cleaning up after the VM died: {e}");
            }
        }
    }

    /// Waits for a started process in the guest and reports its exit.
    fn watch(self: &Arc<Self>, sandbox: Arc<Sandbox>, p: Arc<Process>) {
        let shared = Arc::downgrade(self);
        let name = format!("wait-{}", p.name());
        let spawned = std::thread::Builder::new().name(name.chars().take(15).collect()).spawn(move || {
            let result = sandbox.agent().wait_process(&p.container_id, &p.exec_id);
            let exit_status = match result {
                Ok(exit) => exit.status,
                Err(e) => {
                    if sandbox.vmm_exited() {
                        // The VMM's supervisor reports this one (with every other process).
                        return;
                    }
                    log::error!("{}: {e}; reporting it as exited", p.name());
                    VM_DIED_EXIT_STATUS
                }
            };
            // Report the exit once the last output is with containerd (`ctr run` prints
            // what it got by the time the task ends).
            if let Some(io) = p.io.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                if !io.wait_output(OUTPUT_DRAIN) {
                    log::warn!("{}: output still open {OUTPUT_DRAIN:?} after exit", p.name());
                }
            }
            if p.set_exited(exit_status) {
                if let Some(shared) = Weak::upgrade(&shared) {
                    shared.exit_event(&p);
                }
            }
        });
        if let Err(e) = spawned {
            log::error!("cannot watch a process ({e}): its exit will not be seen");
        }
    }

    /// Polls the agent for OOM kills for as long as the sandbox lives.
    fn watch_oom(self: &Arc<Self>, sandbox: Arc<Sandbox>) {
        let shared = Arc::downgrade(self);
        let spawned = std::thread::Builder::new().name("oom".into()).spawn(move || loop {
            match sandbox.agent().get_oom_event() {
                Ok(container_id) => match Weak::upgrade(&shared) {
                    Some(shared) => {
                        log::warn!("container {container_id}: OOM kill in the guest");
                        shared.publish(TaskOOM { container_id, ..Default::default() });
                    }
                    None => return,
                },
                Err(e) => {
                    if !sandbox.vmm_exited() {
                        log::info!("no more OOM events: {e}");
                    }
                    return;
                }
            }
        });
        if let Err(e) = spawned {
            log::warn!("not watching for OOM kills: {e}");
        }
    }

    /// Opens the streams a process asked for and starts copying them.
    fn attach_io(&self, sandbox: &Sandbox, p: &Process) -> RpcResult<()> {
        let mut streams = Vec::new();
        for kind in p.stdio().kinds() {
            let stream = sandbox
                .agent()
                .open_stream(kind, &p.container_id, &p.exec_id)
                .map_err(|e| agent_error(&format!("{}: standard I/O", p.name()), e))?;
            streams.push((kind, stream));
        }
        let io = ProcessIo::start(&p.name(), &p.paths, streams)
            .map_err(|e| status(ttrpc::Code::INTERNAL, format!("{}: starting I/O copies: {e}", p.name())))?;
        *p.io.lock().unwrap_or_else(|e| e.into_inner()) = Some(io);
        Ok(())
    }

    fn create(self: &Arc<Self>, req: &CreateTaskRequest) -> RpcResult<CreateTaskResponse> {
        let id = req.id.as_str();
        nestbox_protocols::stdio::validate_id("container id", id)
            .map_err(|reason| status(ttrpc::Code::INVALID_ARGUMENT, reason))?;
        if !req.checkpoint.is_empty() {
            return Err(status(ttrpc::Code::UNIMPLEMENTED, "nestbox cannot restore checkpoints"));
        }
        let spec_path = Path::new(&req.bundle).join("config.json");
        let spec_text = std::fs::read(&spec_path).map_err(|e| {
            status(ttrpc::Code::INVALID_ARGUMENT, format!("reading the OCI spec {}: {e}", spec_path.display()))
        })?;
        let mut spec: Value = serde_json::from_slice(&spec_text).map_err(|e| {
            status(ttrpc::Code::INVALID_ARGUMENT, format!("parsing the OCI spec {}: {e}", spec_path.display()))
        })?;
        let annotations = annotations(&spec);
        let sandbox_id = annotations.get(SANDBOX_ID_ANNOTATION).cloned().unwrap_or_else(|| id.to_string());

        let _creating = self.create_lock.lock().unwrap_or_else(|e| e.into_inner());
        let sandbox = {
            let mut state = self.state();
            if state.containers.contains_key(id) {
                return Err(status(ttrpc::Code::ALREADY_EXISTS, format!("container {id} already exists")));
            }
            if let Some(reason) = &state.vm_gone {
                return Err(status(ttrpc::Code::UNAVAILABLE, reason.clone()));
            }
            match &state.sandbox_id {
                Some(sid) if *sid != sandbox_id => {
                    return Err(status(
                        ttrpc::Code::FAILED_PRECONDITION,
                        format!("this shim serves pod {sid}, not {sandbox_id}"),
                    ))
                }
                _ => state.sandbox_id = Some(sandbox_id.clone()),
            }
            state.sandbox.clone()
        };
        let paths = IoPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let init = Process::new(id, "", paths, Vec::new());
        let result = match sandbox {
            Some(sandbox) => {
                let container_dir = sandbox.paths.container_dir(id);
                self.create_container(&sandbox, &container_dir, req, &mut spec, &init).inspect_err(|_| {
                    init.release_io();
                    if let Err(cleanup) = sandbox::remove_dir(&container_dir) {
                        log::error!("container {id}: cleanup after failed create: {cleanup}");
                    }
                })
            }
            None => self.create_pod(&sandbox_id, &annotations, req, &mut spec, &init).inspect_err(|_| {
                init.release_io();
                let mut state = self.state();
                state.sandbox = None;
                state.sandbox_id = None;
            }),
        };
        if let Err(e) = result {
            log::error!("creating container {id}: {e:?}");
            return Err(e);
        }

        self.state().containers.insert(
            id.to_string(),
            Container { bundle: req.bundle.clone(), init: init.clone(), execs: HashMap::new(), paused: false },
        );
        self.publish(TaskCreate {
            container_id: id.to_string(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            }),
            checkpoint: req.checkpoint.clone(),
            pid: self.shim_pid,
            ..Default::default()
        });
        Ok(CreateTaskResponse { pid: self.shim_pid, ..Default::default() })
    }

    /// The pod's first container: its files are mounted first, then the VM boots and the
    /// container is created in it. On failure everything goes (VM, mounts, directory).
    fn create_pod(
        self: &Arc<Self>,
        sandbox_id: &str,
        annotations: &HashMap<String, String>,
        req: &CreateTaskRequest,
        spec: &mut Value,
        init: &Process,
    ) -> RpcResult<()> {
        let size =
            self.config.vm_size(annotations).map_err(|e| status(ttrpc::Code::INVALID_ARGUMENT, e.to_string()))?;
        let context = format!("starting the VM of pod {sandbox_id}");
        let paths = Sandbox::prepare(&self.config, sandbox_id).map_err(|e| sandbox_error(&context, e))?;
        let cleanup = |e: ttrpc::Error| {
            if let Err(cleanup) = sandbox::remove_dir(&paths.dir) {
                log::error!("pod {sandbox_id}: cleanup after failed create: {cleanup}");
            }
            e
        };
        self.share_files(&paths.container_dir(&req.id), req, spec).map_err(cleanup)?;
        let weak = Arc::downgrade(self);
        let on_exit = Box::new(move |exit| {
            if let Some(shared) = Weak::upgrade(&weak) {
                shared.vmm_died(exit);
            }
        });
        log::info!("pod {sandbox_id}: starting a VM ({} vCPUs, {} MiB)", size.vcpus, size.memory_mib);
        let sandbox = Sandbox::boot(&self.config, sandbox_id, size, paths.clone(), on_exit)
            .map_err(|e| cleanup(sandbox_error(&context, e)))?;
        let sandbox = Arc::new(sandbox);
        if let Err(e) = self.create_in_guest(&sandbox, req, spec, init) {
            // The pod's first container failed: the VM has nothing to run.
            if let Err(cleanup) = sandbox.stop() {
                log::error!("pod {sandbox_id}: cleanup after failed create: {cleanup}");
            }
            return Err(e);
        }
        self.state().sandbox = Some(sandbox.clone());
        self.watch_oom(sandbox);
        Ok(())
    }

    /// A further container of a running pod.
    fn create_container(
        &self,
        sandbox: &Sandbox,
        container_dir: &Path,
        req: &CreateTaskRequest,
        spec: &mut Value,
        init: &Process,
    ) -> RpcResult<()> {
        self.share_files(container_dir, req, spec)?;
        self.create_in_guest(sandbox, req, spec, init)
    }

    /// Mounts the container's rootfs and the spec's host files under `container_dir` and
    /// rewrites the spec to the guest's paths. The caller removes `container_dir` on failure.
    fn share_files(&self, container_dir: &Path, req: &CreateTaskRequest, spec: &mut Value) -> RpcResult<()> {
        let id = req.id.as_str();
        let internal = |what: String| status(ttrpc::Code::INTERNAL, what);
        let rootfs = container_dir.join("rootfs");
        std::fs::create_dir_all(&rootfs).map_err(|e| internal(format!("creating {}: {e}", rootfs.display())))?;
        if req.rootfs.is_empty() {
            // No snapshot mounts (`ctr run --rootfs`): the spec's root is a host directory.
            let root = spec_root(spec, &req.bundle)?;
            mounts::bind(&root, &rootfs, false).map_err(|e| internal(e.to_string()))?;
        }
        for m in &req.rootfs {
            let mount = MountSpec { kind: m.type_.clone(), source: m.source.clone(), options: m.options.clone() };
            mounts::mount(&mount, &rootfs).map_err(|e| internal(format!("mounting the rootfs: {e}")))?;
        }
        share_spec(spec, id, container_dir).map_err(internal)
    }

    /// Creates the container in the guest and attaches its standard streams.
    fn create_in_guest(
        &self,
        sandbox: &Sandbox,
        req: &CreateTaskRequest,
        spec: &Value,
        init: &Process,
    ) -> RpcResult<()> {
        let id = req.id.as_str();
        let internal = |what: String| status(ttrpc::Code::INTERNAL, what);
        let spec_json = serde_json::to_vec(spec).map_err(|e| internal(format!("encoding the spec: {e}")))?;
        sandbox
            .agent()
            .create_container(id, spec_json, init.stdio())
            .map_err(|e| agent_error(&format!("creating container {id} in the guest"), e))?;
        if let Err(e) = self.attach_io(sandbox, init) {
            // The guest has the container: take it back out, or it outlives this failure.
            let _ = sandbox.agent().remove_container(id);
            return Err(e);
        }
        Ok(())
    }

    fn start(self: &Arc<Self>, req: &StartRequest) -> RpcResult<StartResponse> {
        let p = self.process(&req.id, &req.exec_id)?;
        let sandbox = self.sandbox()?;
        if p.state().status != ProcStatus::Created {
            return Err(status(ttrpc::Code::FAILED_PRECONDITION, format!("{} was already started", p.name())));
        }
        let guest_pid = if p.exec_id.is_empty() {
            sandbox
                .agent()
                .start_container(&p.container_id)
                .map_err(|e| agent_error(&format!("starting {}", p.name()), e))?
        } else {
            // The exec's streams go first: the agent starts the process once they are attached.
            self.attach_io(&sandbox, &p)?;
            match sandbox.agent().exec_process(&p.container_id, &p.exec_id, p.exec_spec.clone(), p.stdio()) {
                Ok(pid) => pid,
                Err(e) => {
                    p.release_io();
                    return Err(agent_error(&format!("starting {}", p.name()), e));
                }
            }
        };
        {
            let mut s = p.state();
            s.status = ProcStatus::Running;
            s.guest_pid = guest_pid;
        }
        log::info!("{} started (guest pid {guest_pid})", p.name());
        if p.exec_id.is_empty() {
            self.publish(TaskStart { container_id: p.container_id.clone(), pid: self.shim_pid, ..Default::default() });
        } else {
            self.publish(TaskExecStarted {
                container_id: p.container_id.clone(),
                exec_id: p.exec_id.clone(),
                pid: self.shim_pid,
                ..Default::default()
            });
        }
        // After the start event, so that the exit event cannot overtake it.
        self.watch(sandbox, p);
        Ok(StartResponse { pid: self.shim_pid, ..Default::default() })
    }

    fn delete(&self, req: &DeleteRequest) -> RpcResult<DeleteResponse> {
        let p = self.process(&req.id, &req.exec_id)?;
        let (st, exit_status, exited_at) = {
            let s = p.state();
            (s.status, s.exit_status, s.exited_at.clone())
        };
        if st == ProcStatus::Running {
            return Err(status(ttrpc::Code::FAILED_PRECONDITION, format!("{} is still running", p.name())));
        }
        let response = DeleteResponse {
            pid: self.shim_pid,
            exit_status,
            exited_at: MessageField::from_option(exited_at.clone().or_else(|| Some(now()))),
            ..Default::default()
        };
        p.release_io();
        if !req.exec_id.is_empty() {
            if let Some(c) = self.state().containers.get_mut(&req.id) {
                c.execs.remove(&req.exec_id);
            }
            return Ok(response);
        }

        let (sandbox, sandbox_id, others) = {
            let state = self.state();
            let others: Vec<Arc<Process>> =
                state.containers.get(&req.id).map(|c| c.execs.values().cloned().collect()).unwrap_or_default();
            (state.sandbox.clone(), state.sandbox_id.clone(), others)
        };
        for exec in others {
            exec.release_io();
        }
        let mut result = Ok(());
        if let Some(sandbox) = &sandbox {
            if let Err(e) = sandbox.agent().remove_container(&req.id) {
                log::error!("removing container {} from the guest: {e}", req.id);
            }
            if let Err(e) = sandbox::remove_dir(&sandbox.paths.container_dir(&req.id)) {
                result = Err(status(ttrpc::Code::INTERNAL, format!("cleaning up container {}: {e}", req.id)));
            }
        }
        let remaining = {
            let mut state = self.state();
            state.containers.remove(&req.id);
            state.containers.len()
        };
        // The pod's own container goes last (CRI's sandbox, or a `ctr run` container):
        // with it goes the VM.
        if sandbox_id.as_deref() == Some(req.id.as_str()) || remaining == 0 {
            let sandbox = self.state().sandbox.take();
            if let Some(sandbox) = sandbox {
                log::info!("pod {}: stopping the VM", sandbox.id);
                if let Err(e) = sandbox.stop() {
                    result = Err(status(ttrpc::Code::INTERNAL, format!("stopping the VM: {e}")));
                }
            }
        }
        self.publish(TaskDelete {
            container_id: req.id.clone(),
            pid: self.shim_pid,
            exit_status,
            exited_at: MessageField::from_option(exited_at),
            id: req.id.clone(),
            ..Default::default()
        });
        result.map(|()| response)
    }

    fn kill(&self, req: &KillRequest) -> RpcResult<()> {
        let p = self.process(&req.id, &req.exec_id)?;
        if p.state().status == ProcStatus::Stopped {
            return Err(status(ttrpc::Code::NOT_FOUND, format!("{}: process already finished", p.name())));
        }
        let sandbox = self.sandbox()?;
        sandbox
            .agent()
            .signal_process(&p.container_id, &p.exec_id, req.signal, req.all)
            .map_err(|e| agent_error(&format!("signalling {}", p.name()), e))
    }

    fn exec(&self, req: &ExecProcessRequest) -> RpcResult<()> {
        nestbox_protocols::stdio::validate_id("exec id", &req.exec_id)
            .map_err(|reason| status(ttrpc::Code::INVALID_ARGUMENT, reason))?;
        let spec = req.spec.as_ref().map(|any| any.value.clone()).unwrap_or_default();
        if spec.is_empty() {
            return Err(status(ttrpc::Code::INVALID_ARGUMENT, "exec without a process spec"));
        }
        let paths = IoPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        {
            let mut state = self.state();
            let c = state.containers.get_mut(&req.id).ok_or_else(|| not_found(&format!("container {}", req.id)))?;
            if c.init.state().status != ProcStatus::Running {
                return Err(status(ttrpc::Code::FAILED_PRECONDITION, format!("container {} is not running", req.id)));
            }
            if c.execs.contains_key(&req.exec_id) {
                return Err(status(ttrpc::Code::ALREADY_EXISTS, format!("process {} already exists", req.exec_id)));
            }
            c.execs.insert(req.exec_id.clone(), Process::new(&req.id, &req.exec_id, paths, spec));
        }
        self.publish(TaskExecAdded {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        });
        Ok(())
    }

    fn state_of(&self, req: &StateRequest) -> RpcResult<StateResponse> {
        let p = self.process(&req.id, &req.exec_id)?;
        let (bundle, paused) = {
            let state = self.state();
            let c = state.containers.get(&req.id);
            (c.map(|c| c.bundle.clone()).unwrap_or_default(), c.map(|c| c.paused).unwrap_or(false))
        };
        let s = p.state();
        let st = match s.status {
            ProcStatus::Created => Status::CREATED,
            ProcStatus::Running if paused => Status::PAUSED,
            ProcStatus::Running => Status::RUNNING,
            ProcStatus::Stopped => Status::STOPPED,
        };
        Ok(StateResponse {
            id: if req.exec_id.is_empty() { req.id.clone() } else { req.exec_id.clone() },
            bundle,
            pid: self.shim_pid,
            status: st.into(),
            stdin: p.paths.stdin.clone(),
            stdout: p.paths.stdout.clone(),
            stderr: p.paths.stderr.clone(),
            terminal: p.paths.terminal,
            exit_status: s.exit_status,
            exited_at: MessageField::from_option(s.exited_at.clone()),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    fn pause_resume(&self, id: &str, pause: bool) -> RpcResult<()> {
        let p = self.process(id, "")?;
        if p.state().status != ProcStatus::Running {
            return Err(status(ttrpc::Code::FAILED_PRECONDITION, format!("container {id} is not running")));
        }
        let sandbox = self.sandbox()?;
        let agent = sandbox.agent();
        let result = if pause { agent.pause_container(id) } else { agent.resume_container(id) };
        result.map_err(|e| agent_error(&format!("{} {id}", if pause { "pausing" } else { "resuming" }), e))?;
        if let Some(c) = self.state().containers.get_mut(id) {
            c.paused = pause;
        }
        if pause {
            self.publish(TaskPaused { container_id: id.to_string(), ..Default::default() });
        } else {
            self.publish(TaskResumed { container_id: id.to_string(), ..Default::default() });
        }
        Ok(())
    }

    fn pids(&self, id: &str) -> RpcResult<PidsResponse> {
        let processes: Vec<Arc<Process>> = {
            let state = self.state();
            let c = state.containers.get(id).ok_or_else(|| not_found(&format!("container {id}")))?;
            std::iter::once(c.init.clone()).chain(c.execs.values().cloned()).collect()
        };
        let mut infos: Vec<ProcessInfo> = processes
            .iter()
            .filter_map(|p| {
                let s = p.state();
                (s.status == ProcStatus::Running).then(|| ProcessInfo { pid: s.guest_pid, ..Default::default() })
            })
            .collect();
        infos.sort_by_key(|i| i.pid);
        Ok(PidsResponse { processes: infos, ..Default::default() })
    }

    fn stats(&self, id: &str) -> RpcResult<StatsResponse> {
        self.process(id, "")?;
        let sandbox = self.sandbox()?;
        let stats = sandbox.agent().stats_container(id).map_err(|e| agent_error(&format!("statistics of {id}"), e))?;
        let metrics = metrics_v2(&stats);
        let any = containerd_shim::util::convert_to_any(Box::new(metrics))
            .map_err(|e| status(ttrpc::Code::INTERNAL, format!("encoding metrics: {e}")))?;
        Ok(StatsResponse { stats: MessageField::some(any), ..Default::default() })
    }
}

/// The spec's annotations as a map (absent or malformed: none).
fn annotations(spec: &Value) -> HashMap<String, String> {
    spec.get("annotations")
        .and_then(Value::as_object)
        .map(|m| m.iter().filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string()))).collect())
        .unwrap_or_default()
}

/// The host directory the spec names as root (relative paths are relative to the bundle).
fn spec_root(spec: &Value, bundle: &str) -> RpcResult<PathBuf> {
    let root = spec.pointer("/root/path").and_then(Value::as_str).unwrap_or("rootfs");
    let path = Path::new(bundle).join(root);
    if !path.is_dir() {
        return Err(status(
            ttrpc::Code::INVALID_ARGUMENT,
            format!("no rootfs mounts and the spec's root {} is not a directory", path.display()),
        ));
    }
    Ok(path)
}

/// Rewrites the spec for the guest: its root becomes the shared rootfs, and every bind
/// mount of a host path is shared through `<container_dir>/mounts/<n>` (host side) and
/// read from there in the guest. `/dev/shm` becomes the guest's own tmpfs: shared memory
/// through virtio-fs would be neither shared nor memory. Namespaces given by a host path
/// (CRI gives a pod's containers the pause container's `/proc/<pid>/ns/...`) mean nothing
/// in the guest: the container gets namespaces of its own there (the pod already shares the
/// VM's network); sharing IPC/UTS/PID with the pod's other containers inside the guest is
/// not done yet.
fn share_spec(spec: &mut Value, id: &str, container_dir: &Path) -> Result<(), String> {
    if let Some(namespaces) = spec.pointer_mut("/linux/namespaces").and_then(Value::as_array_mut) {
        for ns in namespaces.iter_mut().filter_map(Value::as_object_mut) {
            if let Some(path) = ns.remove("path") {
                let kind = ns.get("type").and_then(Value::as_str).unwrap_or("?");
                log::info!("container {id}: {kind} namespace {path} is a host path; a new one in the guest instead");
            }
        }
    }
    let guest_dir = format!("{GUEST_SHARED_DIR}/{id}");
    let root = spec
        .as_object_mut()
        .ok_or("the OCI spec is not a JSON object")?
        .entry("root")
        .or_insert_with(|| Value::Object(Default::default()));
    root.as_object_mut()
        .ok_or("the spec's root is not an object")?
        .insert("path".into(), format!("{guest_dir}/rootfs").into());
    let Some(mounts) = spec.get_mut("mounts").and_then(Value::as_array_mut) else { return Ok(()) };
    for (n, m) in mounts.iter_mut().enumerate() {
        let kind = m.get("type").and_then(Value::as_str).unwrap_or("").to_string();
        let options: Vec<String> = m
            .get("options")
            .and_then(Value::as_array)
            .map(|o| o.iter().filter_map(|v| v.as_str().map(String::from)).collect())
            .unwrap_or_default();
        let is_bind = kind == "bind" || options.iter().any(|o| o == "bind" || o == "rbind");
        if !is_bind {
            continue;
        }
        let destination = m.get("destination").and_then(Value::as_str).unwrap_or("").to_string();
        let obj = m.as_object_mut().ok_or("a spec mount is not an object")?;
        if destination == "/dev/shm" {
            obj.insert("type".into(), "tmpfs".into());
            obj.insert("source".into(), "shm".into());
            obj.insert("options".into(), serde_json::json!(["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]));
            continue;
        }
        let source = obj.get("source").and_then(Value::as_str).unwrap_or("").to_string();
        if !source.starts_with('/') {
            return Err(format!("bind mount of {destination}: source {source:?} is not an absolute host path"));
        }
        let host_target = container_dir.join("mounts").join(n.to_string());
        let read_only = options.iter().any(|o| o == "ro");
        mounts::bind(Path::new(&source), &host_target, read_only)
            .map_err(|e| format!("sharing {source} for {destination}: {e}"))?;
        obj.insert("source".into(), format!("{guest_dir}/mounts/{n}").into());
    }
    Ok(())
}

/// The agent's cgroup v2 statistics in containerd's cgroups v2 metrics message.
fn metrics_v2(stats: &nestbox_protocols::agent::StatsContainerResponse) -> cg2::Metrics {
    let mut m = cg2::Metrics::new();
    if let Some(cg) = stats.cgroup_stats.as_ref() {
        if let Some(cpu) = cg.cpu.as_ref() {
            m.cpu = MessageField::some(cg2::CPUStat {
                usage_usec: cpu.usage_usec,
                user_usec: cpu.user_usec,
                system_usec: cpu.system_usec,
                nr_periods: cpu.nr_periods,
                nr_throttled: cpu.nr_throttled,
                throttled_usec: cpu.throttled_usec,
                ..Default::default()
            });
        }
        if let Some(mem) = cg.memory.as_ref() {
            let stat = |k: &str| mem.stat.get(k).copied().unwrap_or(0);
            m.memory = MessageField::some(cg2::MemoryStat {
                usage: mem.usage,
                usage_limit: mem.limit,
                max_usage: mem.max_usage,
                swap_usage: mem.swap_usage,
                anon: stat("anon"),
                file: stat("file"),
                kernel_stack: stat("kernel_stack"),
                slab: stat("slab"),
                sock: stat("sock"),
                shmem: stat("shmem"),
                file_mapped: stat("file_mapped"),
                file_dirty: stat("file_dirty"),
                pgfault: stat("pgfault"),
                pgmajfault: stat("pgmajfault"),
                ..Default::default()
            });
            m.memory_events = MessageField::some(cg2::MemoryEvents {
                max: mem.oom_events,
                oom: mem.oom_events,
                oom_kill: mem.oom_kill_events,
                ..Default::default()
            });
        }
        if let Some(pids) = cg.pids.as_ref() {
            m.pids =
                MessageField::some(cg2::PidsStat { current: pids.current, limit: pids.limit, ..Default::default() });
        }
        if let Some(io) = cg.io.as_ref() {
            m.io = MessageField::some(cg2::IOStat {
                usage: io
                    .entries
                    .iter()
                    .map(|e| cg2::IOEntry {
                        major: e.major,
                        minor: e.minor,
                        rbytes: e.rbytes,
                        wbytes: e.wbytes,
                        rios: e.rios,
                        wios: e.wios,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            });
        }
    }
    m.network = stats
        .network_stats
        .iter()
        .map(|n| cg2::NetworkStat {
            name: n.name.clone(),
            rx_bytes: n.rx_bytes,
            rx_packets: n.rx_packets,
            rx_errors: n.rx_errors,
            rx_dropped: n.rx_dropped,
            tx_bytes: n.tx_bytes,
            tx_packets: n.tx_packets,
            tx_errors: n.tx_errors,
            tx_dropped: n.tx_dropped,
            ..Default::default()
        })
        .collect();
    m
}

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
        log_call("create", &req.id, self.shared.create(&req))
    }

    fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> RpcResult<StartResponse> {
        log_call("start", &req.id, self.shared.start(&req))
    }

    fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> RpcResult<StateResponse> {
        self.shared.state_of(&req)
    }

    fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> RpcResult<DeleteResponse> {
        log_call("delete", &req.id, self.shared.delete(&req))
    }

    fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> RpcResult<Empty> {
        log::info!("kill {} {} signal {} all {}", req.id, req.exec_id, req.signal, req.all);
        log_call("kill", &req.id, self.shared.kill(&req)).map(|()| Empty::new())
    }

    fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> RpcResult<WaitResponse> {
        let p = self.shared.process(&req.id, &req.exec_id)?;
        let mut s = p.state();
        while s.status != ProcStatus::Stopped {
            s = p.exited.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        Ok(WaitResponse {
            exit_status: s.exit_status,
            exited_at: MessageField::from_option(s.exited_at.clone()),
            ..Default::default()
        })
    }

    fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> RpcResult<Empty> {
        log_call("exec", &req.id, self.shared.exec(&req)).map(|()| Empty::new())
    }

    fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> RpcResult<Empty> {
        let p = self.shared.process(&req.id, &req.exec_id)?;
        let sandbox = self.shared.sandbox()?;
        sandbox
            .agent()
            .tty_win_resize(&p.container_id, &p.exec_id, req.height, req.width)
            .map_err(|e| agent_error(&format!("resizing the terminal of {}", p.name()), e))?;
        Ok(Empty::new())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> RpcResult<Empty> {
        let p = self.shared.process(&req.id, &req.exec_id)?;
        if req.stdin {
            if let Some(io) = p.io.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                io.close_stdin();
            }
            // A terminal has no separate stdin stream to half-close: the agent ends its input.
            if p.paths.terminal {
                if let Ok(sandbox) = self.shared.sandbox() {
                    if let Err(e) = sandbox.agent().close_stdin(&p.container_id, &p.exec_id) {
                        log::debug!("{}: CloseStdin: {e}", p.name());
                    }
                }
            }
        }
        Ok(Empty::new())
    }

    fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> RpcResult<PidsResponse> {
        self.shared.pids(&req.id)
    }

    fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> RpcResult<Empty> {
        log_call("pause", &req.id, self.shared.pause_resume(&req.id, true)).map(|()| Empty::new())
    }

    fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> RpcResult<Empty> {
        log_call("resume", &req.id, self.shared.pause_resume(&req.id, false)).map(|()| Empty::new())
    }

    fn checkpoint(&self, _ctx: &TtrpcContext, _req: containerd_shim::api::CheckpointTaskRequest) -> RpcResult<Empty> {
        Err(status(ttrpc::Code::UNIMPLEMENTED, "nestbox does not checkpoint containers"))
    }

    fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> RpcResult<Empty> {
        self.shared.process(&req.id, "")?;
        let sandbox = self.shared.sandbox()?;
        let resources = req.resources.as_ref().map(|any| any.value.clone()).unwrap_or_default();
        sandbox
            .agent()
            .update_container(&req.id, resources)
            .map_err(|e| agent_error(&format!("updating {}", req.id), e))?;
        Ok(Empty::new())
    }

    fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> RpcResult<StatsResponse> {
        self.shared.stats(&req.id)
    }

    fn connect(&self, _ctx: &TtrpcContext, _req: ConnectRequest) -> RpcResult<ConnectResponse> {
        Ok(ConnectResponse {
            shim_pid: self.shared.shim_pid,
            task_pid: self.shared.shim_pid,
            version: format!("nestbox {}", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, req: ShutdownRequest) -> RpcResult<Empty> {
        let sandbox = {
            let mut state = self.shared.state();
            if !state.containers.is_empty() && !req.now {
                return Ok(Empty::new());
            }
            state.sandbox.take()
        };
        if let Some(sandbox) = sandbox {
            if let Err(e) = sandbox.stop() {
                log::error!("shutdown: {e}");
            }
        }
        log::info!("shutting down");
        self.shared.exit.signal();
        Ok(Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn spec_is_rewritten_for_the_guest_and_binds_are_shared() {
        let dir = tempfile::tempdir().expect("tempdir");
        let host = dir.path().join("host");
        std::fs::create_dir(&host).expect("mkdir");
        std::fs::write(host.join("hosts"), "127.0.0.1 localhost\n").expect("write");
        let container_dir = dir.path().join("shared/c1");
        let mut spec = json!({
            "root": {"path": "rootfs", "readonly": false},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind", "source": host.join("hosts"), "options": ["rbind", "ro"]},
                {"destination": "/data", "source": host, "options": ["rbind"]},
                {"destination": "/dev/shm", "type": "bind", "source": "/run/whatever/shm", "options": ["rbind"]}
            ]
        });
        spec["linux"] = json!({"namespaces": [
            {"type": "mount"},
            {"type": "ipc", "path": "/proc/4242/ns/ipc"},
            {"type": "network", "path": "/proc/4242/ns/net"}
        ]});
        share_spec(&mut spec, "c1", &container_dir).expect("shared");
        assert_eq!(spec["root"]["path"], "/run/nestbox/shared/c1/rootfs");
        assert_eq!(
            spec["linux"]["namespaces"],
            json!([{"type": "mount"}, {"type": "ipc"}, {"type": "network"}]),
            "host namespace paths dropped"
        );
        assert_eq!(spec["mounts"][0]["source"], "proc");
        assert_eq!(spec["mounts"][1]["source"], "/run/nestbox/shared/c1/mounts/1");
        assert_eq!(spec["mounts"][2]["source"], "/run/nestbox/shared/c1/mounts/2");
        assert_eq!(spec["mounts"][3]["type"], "tmpfs");
        assert_eq!(std::fs::read_to_string(container_dir.join("mounts/1")).expect("bound"), "127.0.0.1 localhost\n");
        assert!(container_dir.join("mounts/2/hosts").exists());
        sandbox::remove_dir(&container_dir).expect("cleanup");
        assert!(mounts::mounts_under(dir.path()).expect("table").is_empty());

        let mut relative = json!({"mounts": [{"destination": "/x", "type": "bind", "source": "rel"}]});
        assert!(share_spec(&mut relative, "c2", &dir.path().join("c2")).expect_err("relative").contains("/x"));
    }

    #[test]
    fn annotations_and_root_are_read_leniently() {
        let spec = json!({"annotations": {SANDBOX_ID_ANNOTATION: "pod", "n": 1}});
        let a = annotations(&spec);
        assert_eq!(a.get(SANDBOX_ID_ANNOTATION).map(String::as_str), Some("pod"));
        assert!(!a.contains_key("n"));
        assert!(annotations(&json!([])).is_empty());
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("rootfs")).expect("mkdir");
        let bundle = dir.path().to_string_lossy().to_string();
        assert_eq!(spec_root(&json!({}), &bundle).expect("default rootfs"), dir.path().join("rootfs"));
        assert!(spec_root(&json!({"root": {"path": "missing"}}), &bundle).is_err());
    }

    #[test]
    fn metrics_carry_the_agent_figures() {
        use nestbox_protocols::agent::StatsContainerResponse;
        use nestbox_protocols::types::{CgroupStats, CpuStats, MemoryStats, PidsStats};
        let stats = StatsContainerResponse {
            cgroup_stats: MessageField::some(CgroupStats {
                cpu: MessageField::some(CpuStats { usage_usec: 7, ..Default::default() }),
                memory: MessageField::some(MemoryStats {
                    usage: 4096,
                    limit: 8192,
                    stat: [("anon".to_string(), 100)].into_iter().collect(),
                    ..Default::default()
                }),
                pids: MessageField::some(PidsStats { current: 3, limit: 0, ..Default::default() }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let m = metrics_v2(&stats);
        assert_eq!(m.cpu.usage_usec, 7);
        assert_eq!((m.memory.usage, m.memory.usage_limit, m.memory.anon), (4096, 8192, 100));
        assert_eq!(m.pids.current, 3);
        let any = containerd_shim::util::convert_to_any(Box::new(m)).expect("any");
        // The name containerd's typeurl registry knows the v2 metrics by.
        assert_eq!(any.type_url, "io.containerd.cgroups.v2.Metrics");
    }
}
