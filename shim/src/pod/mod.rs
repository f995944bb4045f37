//! One pod as this shim serves it: its process table, its sandbox VM (or why it is gone),
//! and the events containerd gets. The task API ([`crate::task`]) calls into it; it calls
//! the sandbox's agent.
//!
//! - [`create`]: a container's files shared into the sandbox, the container created in the
//!   guest; the pod's first container starts the VM;
//! - [`vm`]: the VM's life: started with the first container, watched for OOM kills and for
//!   its own death, stopped with the pod's last container or at shutdown;
//! - [`processes`]: what runs in a container: start, exec, signals, exits, delete, state.
//!
//! Host-side PIDs: containerd expects a host PID for each task; guest PIDs mean nothing on
//! the host (and could name an unrelated host process), so, as Kata does, tasks report the
//! shim's own PID. `pids` lists the guest PIDs, which is what a user wants to see there.

mod create;
mod processes;
mod vm;

use crate::config::Config;
use crate::events::EventPublisher;
use crate::io::ProcessIo;
use crate::process::{Process, ProcessTable};
use crate::rpc_status::{agent_error, internal, status, RpcResult};
use crate::sandbox::Sandbox;
use containerd_shim::event::Event;
use containerd_shim::protos::events::task::TaskExit;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::ExitSignal;
use nestbox_protocols::ttrpc;
use std::sync::{Arc, Mutex, MutexGuard};

/// The exit status reported for processes whose VM died under them (containerd uses 255
/// for "unknown" exits as well).
pub const VM_DIED_EXIT_STATUS: u32 = 255;

#[derive(Default)]
struct PodState {
    /// The pod this shim serves, fixed by its first container.
    sandbox_id: Option<String>,
    sandbox: Option<Arc<Sandbox>>,
    /// Why the VM is gone, once it died: calls that need the guest fail with it.
    vm_gone: Option<String>,
    processes: ProcessTable,
}

pub struct Pod {
    config: Config,
    events: EventPublisher,
    /// Ends the shim's daemon (after `shutdown`).
    exit: Arc<ExitSignal>,
    state: Mutex<PodState>,
    /// Serialises creates, so concurrent creates of one pod boot one VM.
    create_lock: Mutex<()>,
    shim_pid: u32,
}

impl Pod {
    pub fn new(config: Config, events: EventPublisher, exit: Arc<ExitSignal>) -> Pod {
        Pod {
            config,
            events,
            exit,
            state: Mutex::new(PodState::default()),
            create_lock: Mutex::new(()),
            shim_pid: std::process::id(),
        }
    }

    /// The PID every task reports (see the module's documentation).
    pub fn shim_pid(&self) -> u32 {
        self.shim_pid
    }

    fn state(&self) -> MutexGuard<'_, PodState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, event: impl Event + Send + 'static) {
        self.events.publish(event);
    }

    /// A container's init process (`exec_id` empty) or one of its execs.
    pub fn process(&self, id: &str, exec_id: &str) -> RpcResult<Arc<Process>> {
        self.state().processes.process(id, exec_id)
    }

    /// The running sandbox, or why there is none.
    pub fn sandbox(&self) -> RpcResult<Arc<Sandbox>> {
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
            id: p.task_id().to_string(),
            pid: self.shim_pid,
            exit_status: s.exit_status,
            exited_at: MessageField::from_option(s.exited_at.clone()),
            ..Default::default()
        });
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
            .map_err(|e| internal(format!("{}: starting I/O copies: {e}", p.name())))?;
        p.set_io(io);
        Ok(())
    }
}
