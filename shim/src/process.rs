//! The pod's process table: each container's init process and the processes exec'd into
//! it, with their state as containerd sees it (created, running, stopped with a status)
//! and their standard I/O copies.

use crate::events::now;
use crate::io::{IoPaths, ProcessIo};
use crate::rpc_status::{not_found, RpcResult};
use crate::sandbox::agent::StdioSpec;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcStatus {
    Created,
    Running,
    Stopped,
}

pub struct ProcState {
    pub status: ProcStatus,
    pub guest_pid: u32,
    pub exit_status: u32,
    pub exited_at: Option<Timestamp>,
}

/// A container's init process or an exec'd process.
pub struct Process {
    pub container_id: String,
    /// Empty for the init process.
    pub exec_id: String,
    pub paths: IoPaths,
    /// The OCI process (JSON) of an exec, kept from `exec` until `start`.
    pub exec_spec: Vec<u8>,
    state: Mutex<ProcState>,
    exited: Condvar,
    io: Mutex<Option<ProcessIo>>,
}

impl Process {
    pub fn new(container_id: &str, exec_id: &str, paths: IoPaths, exec_spec: Vec<u8>) -> Arc<Process> {
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

    pub fn is_init(&self) -> bool {
        self.exec_id.is_empty()
    }

    /// `<container>` or `<container>/<exec>`, for messages.
    pub fn name(&self) -> String {
        if self.is_init() {
            self.container_id.clone()
        } else {
            format!("{}/{}", self.container_id, self.exec_id)
        }
    }

    /// The id containerd's events and state name the process by.
    pub fn task_id(&self) -> &str {
        if self.is_init() {
            &self.container_id
        } else {
            &self.exec_id
        }
    }

    pub fn state(&self) -> MutexGuard<'_, ProcState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks a created process as running as `guest_pid`.
    pub fn set_running(&self, guest_pid: u32) {
        let mut s = self.state();
        s.status = ProcStatus::Running;
        s.guest_pid = guest_pid;
    }

    /// Records the exit; false if it was already recorded (the first report wins).
    pub fn set_exited(&self, exit_status: u32) -> bool {
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

    /// Blocks until the process has exited; its state then.
    pub fn wait_exited(&self) -> MutexGuard<'_, ProcState> {
        let mut s = self.state();
        while s.status != ProcStatus::Stopped {
            s = self.exited.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s
    }

    /// The standard streams the process asked containerd for.
    pub fn stdio(&self) -> StdioSpec {
        StdioSpec {
            terminal: self.paths.terminal,
            stdin: !self.paths.stdin.is_empty(),
            stdout: !self.paths.stdout.is_empty(),
            stderr: !self.paths.stderr.is_empty(),
        }
    }

    fn io(&self) -> MutexGuard<'_, Option<ProcessIo>> {
        self.io.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_io(&self, io: ProcessIo) {
        *self.io() = Some(io);
    }

    /// Waits up to `timeout` for the last output to reach containerd; false if it did not.
    pub fn wait_output(&self, timeout: Duration) -> bool {
        self.io().as_ref().is_none_or(|io| io.wait_output(timeout))
    }

    pub fn close_stdin(&self) {
        if let Some(io) = self.io().as_ref() {
            io.close_stdin();
        }
    }

    pub fn release_io(&self) {
        if let Some(io) = self.io().as_ref() {
            io.release();
        }
    }
}

pub struct Container {
    pub bundle: String,
    pub init: Arc<Process>,
    pub execs: HashMap<String, Arc<Process>>,
    pub paused: bool,
}

impl Container {
    pub fn new(bundle: &str, init: Arc<Process>) -> Container {
        Container { bundle: bundle.to_string(), init, execs: HashMap::new(), paused: false }
    }

    /// The init process first, then the execs.
    pub fn processes(&self) -> impl Iterator<Item = Arc<Process>> + '_ {
        std::iter::once(self.init.clone()).chain(self.execs.values().cloned())
    }
}

/// The pod's containers by id.
#[derive(Default)]
pub struct ProcessTable {
    containers: HashMap<String, Container>,
}

impl ProcessTable {
    pub fn container(&self, id: &str) -> RpcResult<&Container> {
        self.containers.get(id).ok_or_else(|| not_found(&format!("container {id}")))
    }

    pub fn container_mut(&mut self, id: &str) -> RpcResult<&mut Container> {
        self.containers.get_mut(id).ok_or_else(|| not_found(&format!("container {id}")))
    }

    /// A container's init process (`exec_id` empty) or one of its execs.
    pub fn process(&self, id: &str, exec_id: &str) -> RpcResult<Arc<Process>> {
        let c = self.container(id)?;
        if exec_id.is_empty() {
            return Ok(c.init.clone());
        }
        c.execs.get(exec_id).cloned().ok_or_else(|| not_found(&format!("process {exec_id} of container {id}")))
    }

    pub fn contains(&self, id: &str) -> bool {
        self.containers.contains_key(id)
    }

    pub fn is_empty(&self) -> bool {
        self.containers.is_empty()
    }

    pub fn len(&self) -> usize {
        self.containers.len()
    }

    pub fn insert(&mut self, id: &str, container: Container) {
        self.containers.insert(id.to_string(), container);
    }

    pub fn remove(&mut self, id: &str) -> Option<Container> {
        self.containers.remove(id)
    }

    /// Every process of every container.
    pub fn all_processes(&self) -> Vec<Arc<Process>> {
        self.containers.values().flat_map(Container::processes).collect()
    }
}
