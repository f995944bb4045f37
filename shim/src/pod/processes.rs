//! What runs in the pod's containers: starting init and exec'd processes, watching for
//! their exits, signals, terminal and stdin, pause/resume, resource updates, statistics,
//! and deleting them.

use super::{Pod, VM_DIED_EXIT_STATUS};
use crate::events::now;
use crate::io::{IoPaths, BOUND_WARNING};
use crate::metrics::cgroup_v2_metrics;
use crate::process::{ProcStatus, Process};
use crate::rpc_status::{agent_error, internal, status, RpcResult};
use crate::sandbox::start_gate::{self, StartKind};
use crate::sandbox::Sandbox;
use containerd_shim::api::{
    DeleteRequest, DeleteResponse, ExecProcessRequest, KillRequest, PidsResponse, StartRequest, StartResponse,
    StateRequest, StateResponse, StatsResponse, Status, WaitResponse,
};
use containerd_shim::protos::events::task::{
    TaskDelete, TaskExecAdded, TaskExecStarted, TaskPaused, TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::types::task::ProcessInfo;
use nestbox_protocols::ttrpc;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// How long a process's exit report waits, at most, for its output streams to end. They
/// end as soon as the guest sees EOF on the process's output, normally at its exit; the
/// bound is a safety net for output a guest never closes (a daemon the process left
/// behind that inherited it, or a hostile guest), so that the exit is reported anyway.
const OUTPUT_DRAIN_BOUND: Duration = Duration::from_secs(60);

impl Pod {
    pub fn start(self: &Arc<Self>, req: &StartRequest) -> RpcResult<StartResponse> {
        let p = self.process(&req.id, &req.exec_id)?;
        let sandbox = self.sandbox()?;
        if p.state().status != ProcStatus::Created {
            return Err(status(ttrpc::Code::FAILED_PRECONDITION, format!("{} was already started", p.name())));
        }
        let guest_pid = if p.is_init() {
            let _slot = start_gate::enter(&self.config, StartKind::InRunningVm, &format!("{}: start", p.name()));
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
        p.set_running(guest_pid);
        log::info!("{} started (guest pid {guest_pid})", p.name());
        if p.is_init() {
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

    /// Waits for a started process in the guest and reports its exit.
    fn watch(self: &Arc<Self>, sandbox: Arc<Sandbox>, p: Arc<Process>) {
        let pod = Arc::downgrade(self);
        let name = format!("wait-{}", p.name());
        let spawned = std::thread::Builder::new().name(name.chars().take(15).collect()).spawn(move || {
            let exit_status = match sandbox.agent().wait_process(&p.container_id, &p.exec_id) {
                Ok(exit) => exit.status,
                // The VMM's supervisor reports this one (with every other process).
                Err(_) if sandbox.vmm_exited() => return,
                Err(e) => {
                    log::error!("{}: {e}; reporting it as exited", p.name());
                    VM_DIED_EXIT_STATUS
                }
            };
            // Report the exit once the last output is with containerd (`ctr run` prints
            // what it got by the time the task ends), as runc's shim does.
            if !p.wait_output(OUTPUT_DRAIN_BOUND) {
                log::warn!(
                    "{BOUND_WARNING}: {}: output streams still open {OUTPUT_DRAIN_BOUND:?} after its exit; \
                     reporting the exit without them",
                    p.name()
                );
            }
            if p.set_exited(exit_status) {
                if let Some(pod) = Weak::upgrade(&pod) {
                    pod.exit_event(&p);
                }
            }
        });
        if let Err(e) = spawned {
            log::error!("cannot watch a process ({e}): its exit will not be seen");
        }
    }

    pub fn wait(&self, id: &str, exec_id: &str) -> RpcResult<WaitResponse> {
        let p = self.process(id, exec_id)?;
        let s = p.wait_exited();
        Ok(WaitResponse {
            exit_status: s.exit_status,
            exited_at: MessageField::from_option(s.exited_at.clone()),
            ..Default::default()
        })
    }

    pub fn delete(&self, req: &DeleteRequest) -> RpcResult<DeleteResponse> {
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
        if !p.is_init() {
            if let Ok(c) = self.state().processes.container_mut(&req.id) {
                c.execs.remove(&req.exec_id);
            }
            return Ok(response);
        }
        let result = self.delete_container(&req.id);
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

    /// Removes a container whose init process ended: from the guest, its files, and the
    /// table; with the pod's own container (CRI's sandbox, or a `ctr run` container) or
    /// the last one, the VM goes too.
    fn delete_container(&self, id: &str) -> RpcResult<()> {
        let (sandbox, sandbox_id, execs) = {
            let state = self.state();
            let execs: Vec<Arc<Process>> =
                state.processes.container(id).map(|c| c.execs.values().cloned().collect()).unwrap_or_default();
            (state.sandbox.clone(), state.sandbox_id.clone(), execs)
        };
        for exec in execs {
            exec.release_io();
        }
        let mut result = Ok(());
        if let Some(sandbox) = &sandbox {
            if let Err(e) = sandbox.agent().remove_container(id) {
                log::error!("removing container {id} from the guest: {e}");
            }
            if let Err(e) = sandbox.paths.remove_container_dir(id) {
                result = Err(internal(format!("cleaning up container {id}: {e}")));
            }
        }
        let remaining = {
            let mut state = self.state();
            state.processes.remove(id);
            state.processes.len()
        };
        if sandbox_id.as_deref() == Some(id) || remaining == 0 {
            if let Err(e) = self.stop_vm() {
                result = Err(e);
            }
        }
        result
    }

    pub fn kill(&self, req: &KillRequest) -> RpcResult<()> {
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

    pub fn exec(&self, req: &ExecProcessRequest) -> RpcResult<()> {
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
            let c = state.processes.container_mut(&req.id)?;
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

    pub fn state_of(&self, req: &StateRequest) -> RpcResult<StateResponse> {
        let p = self.process(&req.id, &req.exec_id)?;
        let (bundle, paused) = {
            let state = self.state();
            let c = state.processes.container(&req.id).ok();
            (c.map(|c| c.bundle.clone()).unwrap_or_default(), c.is_some_and(|c| c.paused))
        };
        let s = p.state();
        let st = match s.status {
            ProcStatus::Created => Status::CREATED,
            ProcStatus::Running if paused => Status::PAUSED,
            ProcStatus::Running => Status::RUNNING,
            ProcStatus::Stopped => Status::STOPPED,
        };
        Ok(StateResponse {
            id: p.task_id().to_string(),
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

    pub fn pause_resume(&self, id: &str, pause: bool) -> RpcResult<()> {
        let p = self.process(id, "")?;
        if p.state().status != ProcStatus::Running {
            return Err(status(ttrpc::Code::FAILED_PRECONDITION, format!("container {id} is not running")));
        }
        let sandbox = self.sandbox()?;
        let agent = sandbox.agent();
        let result = if pause { agent.pause_container(id) } else { agent.resume_container(id) };
        result.map_err(|e| agent_error(&format!("{} {id}", if pause { "pausing" } else { "resuming" }), e))?;
        if let Ok(c) = self.state().processes.container_mut(id) {
            c.paused = pause;
        }
        if pause {
            self.publish(TaskPaused { container_id: id.to_string(), ..Default::default() });
        } else {
            self.publish(TaskResumed { container_id: id.to_string(), ..Default::default() });
        }
        Ok(())
    }

    /// The guest PIDs of a container's running processes.
    pub fn pids(&self, id: &str) -> RpcResult<PidsResponse> {
        let processes: Vec<Arc<Process>> = self.state().processes.container(id)?.processes().collect();
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

    pub fn stats(&self, id: &str) -> RpcResult<StatsResponse> {
        self.process(id, "")?;
        let sandbox = self.sandbox()?;
        let stats = sandbox.agent().stats_container(id).map_err(|e| agent_error(&format!("statistics of {id}"), e))?;
        let any = containerd_shim::util::convert_to_any(Box::new(cgroup_v2_metrics(&stats)))
            .map_err(|e| internal(format!("encoding metrics: {e}")))?;
        Ok(StatsResponse { stats: MessageField::some(any), ..Default::default() })
    }

    /// New resources (OCI `LinuxResources` JSON, as containerd sends them) for a container.
    pub fn update(&self, id: &str, resources_json: Vec<u8>) -> RpcResult<()> {
        self.process(id, "")?;
        let sandbox = self.sandbox()?;
        sandbox.agent().update_container(id, resources_json).map_err(|e| agent_error(&format!("updating {id}"), e))
    }

    pub fn resize_pty(&self, id: &str, exec_id: &str, height: u32, width: u32) -> RpcResult<()> {
        let p = self.process(id, exec_id)?;
        let sandbox = self.sandbox()?;
        sandbox
            .agent()
            .tty_win_resize(&p.container_id, &p.exec_id, height, width)
            .map_err(|e| agent_error(&format!("resizing the terminal of {}", p.name()), e))
    }

    /// containerd closed a process's stdin.
    pub fn close_stdin(&self, id: &str, exec_id: &str) -> RpcResult<()> {
        let p = self.process(id, exec_id)?;
        p.close_stdin();
        // A terminal has no separate stdin stream to half-close: the agent ends its input.
        if p.paths.terminal {
            if let Ok(sandbox) = self.sandbox() {
                if let Err(e) = sandbox.agent().close_stdin(&p.container_id, &p.exec_id) {
                    log::debug!("{}: CloseStdin: {e}", p.name());
                }
            }
        }
        Ok(())
    }
}
