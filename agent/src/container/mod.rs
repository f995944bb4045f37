//! Containers from OCI runtime specs: validation, namespaces, cgroup, the init process and
//! exec'd processes, signals, pause/resume, resources, teardown.
//!
//! Built on nix and oci-spec, not youki's libcontainer (evaluated for this; the reasons are
//! in docs/agent.md): libcontainer runs its setup in children forked from the caller (here
//! a multi-threaded PID 1), waits for its intermediate process itself (racing the PID 1
//! reaper), keeps state files of its own, and without libseccomp, which the static musl
//! agent cannot link, it skips seccomp with only a warning. It would also add megabytes
//! to an initramfs that costs boot time per megabyte.
//!
//! Process model: every container process (init or exec) is a direct child of the agent,
//! created by `spawn` in the container's namespaces, set up by the re-executed helper
//! (`helper`), registered with the reaper before it can exit.

mod caps;
pub mod helper;
pub mod mounts;
mod seccomp;
pub mod spawn;
#[rustfmt::skip]
mod syscalls_x86_64;

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nestbox_protocols::agent::CreateContainerRequest;
use nestbox_protocols::stdio::validate_id;
use nestbox_protocols::types::{CgroupStats, Stdio};
use oci_spec::runtime::{LinuxNamespaceType, LinuxResources, Process as OciProcess, Spec};

use crate::cgroup::{Cgroup, Hierarchy};
use crate::error::AgentError;
use crate::oom::{OomQueue, OomWatcher};
use crate::process::streams::IoHub;
use crate::process::{self, Process};
use crate::reaper::{Exit, Reaper, SignalError};
use spawn::{ChildFds, HelperConfig, Mode, Report};

/// How long a process's streams may take to be opened by the host before its start fails.
pub const ATTACH_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the helper may take to build a container (slow on emulated guests: seconds).
const SETUP_TIMEOUT: Duration = Duration::from_secs(300);
const FREEZE_TIMEOUT: Duration = Duration::from_secs(30);

/// What every container operation needs from the agent.
pub struct Env {
    pub reaper: Arc<Reaper>,
    pub io: Arc<IoHub>,
    /// The agent's own executable, re-executed as the helper.
    pub exe: OwnedFd,
    /// Where container cgroups go; an error (why there is none) when the system has none.
    pub cgroups: Result<Hierarchy, String>,
    pub oom: Arc<OomQueue>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// The init process is set up and waits for StartContainer.
    Created,
    Running,
    Paused,
    /// The init process has exited.
    Stopped,
}

pub struct Container {
    pub id: String,
    cgroup: Cgroup,
    init: Arc<Process>,
    /// The init process as a pidfd: stable across PID reuse, the handle execs join the
    /// container's namespaces through.
    init_pidfd: OwnedFd,
    /// The namespaces (clone flags) an exec joins besides the PID one.
    join_flags: i32,
    has_pid_ns: bool,
    /// The spec as received: an exec's helper reads the seccomp profile from it.
    spec_json: String,
    /// The helper's control socket until StartContainer.
    control: Mutex<Option<File>>,
    started: Mutex<bool>,
    paused: Mutex<bool>,
    /// Exec'd processes by exec id; `None` while one is being started.
    execs: Mutex<HashMap<String, Option<Arc<Process>>>>,
    _oom: Option<OomWatcher>,
    /// Storage mounted for this container (unmounted at removal).
    storages: Vec<PathBuf>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn invalid(msg: impl Into<String>) -> AgentError {
    AgentError::InvalidArgument(msg.into())
}

/// Clone flags for the spec's namespaces, after checking they are ones the agent supports.
fn namespace_flags(spec: &Spec) -> Result<(i32, bool), AgentError> {
    let mut flags = 0;
    let namespaces = spec.linux().as_ref().and_then(|l| l.namespaces().as_ref());
    for ns in namespaces.into_iter().flatten() {
        let flag = match ns.typ() {
            // The pod shares the VM's network: there is nothing else to join in a guest.
            LinuxNamespaceType::Network => continue,
            LinuxNamespaceType::Pid if ns.path().is_none() => libc::CLONE_NEWPID,
            LinuxNamespaceType::Mount if ns.path().is_none() => libc::CLONE_NEWNS,
            LinuxNamespaceType::Ipc | LinuxNamespaceType::Uts | LinuxNamespaceType::Cgroup if ns.path().is_some() => {
                continue; // the helper joins these by path
            }
            LinuxNamespaceType::Ipc => libc::CLONE_NEWIPC,
            LinuxNamespaceType::Uts => libc::CLONE_NEWUTS,
            LinuxNamespaceType::Cgroup => continue, // the helper unshares it once in its cgroup
            other => {
                let how = if ns.path().is_some() { "joining an existing" } else { "a new" };
                return Err(invalid(format!("{how} {other:?} namespace is not supported")));
            }
        };
        flags |= flag;
    }
    if flags & libc::CLONE_NEWNS == 0 {
        return Err(invalid("the spec must ask for a new mount namespace (the container gets its own root)"));
    }
    Ok((flags, flags & libc::CLONE_NEWPID != 0))
}

fn console_size(process: &OciProcess) -> Option<(u16, u16)> {
    process
        .console_size()
        .as_ref()
        .map(|b| (b.height().min(u16::MAX as u64) as u16, b.width().min(u16::MAX as u64) as u16))
}

fn check_process(process: &OciProcess, stdio: &Stdio) -> Result<(), AgentError> {
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(invalid("process.args is empty: nothing to run"));
    }
    if process.terminal().unwrap_or(false) != stdio.terminal {
        return Err(invalid(format!(
            "process.terminal is {} but stdio.terminal is {}: they must agree",
            process.terminal().unwrap_or(false),
            stdio.terminal
        )));
    }
    if let Some(c) = process.capabilities() {
        caps::validate(c).map_err(|e| invalid(e.to_string()))?;
    }
    Ok(())
}

/// A process being started: the helper is set up and waits for its start byte.
struct Launched {
    process: Arc<Process>,
    control: File,
}

struct LaunchSpec<'a> {
    container_id: &'a str,
    exec_id: &'a str,
    mode: Mode,
    spec_json: &'a str,
    /// For an exec: its process.
    process_json: Option<&'a str>,
    console: Option<(u16, u16)>,
    stdio: &'a Stdio,
    clone_flags: i32,
    /// For an exec: the container's init, whose namespaces are joined...
    join: Option<&'a OwnedFd>,
    /// ...its PID namespace included (when the container has one of its own).
    join_pid_ns: bool,
}

/// Spawns the helper, puts it in the cgroup, sends its configuration and waits until it
/// reports ready (or why not: then it is killed and reaped before this returns).
fn launch(env: &Env, cgroup: &Cgroup, spec: LaunchSpec<'_>) -> Result<Launched, AgentError> {
    let (child_io, agent_io) =
        process::prepare(spec.stdio, spec.console).map_err(|e| AgentError::Internal(e.to_string()))?;
    let (control, helper_end) = spawn::control_pair().map_err(|e| AgentError::internal("control socket", e))?;
    let fds = ChildFds { stdio: child_io.raw(), control: &helper_end, pidfd: spec.join };
    let join_pid_ns = spec.join.filter(|_| spec.join_pid_ns);
    let (pid, exit) = spawn::spawn_helper(&env.reaper, &env.exe, spec.clone_flags, &fds, join_pid_ns)
        .map_err(|e| AgentError::internal("starting the container process", e))?;
    // The process's ends belong to it now.
    drop(child_io);
    drop(helper_end);
    let process = Arc::new(Process { exec_id: spec.exec_id.to_string(), pid, exit, io: agent_io });
    let mut control = File::from(control);
    let fail = |err: AgentError| {
        let _ = env.reaper.signal(pid, libc::SIGKILL);
        // Reaped before returning, so the cgroup it was in is empty for removal.
        process.exit.wait_timeout(SETUP_TIMEOUT);
        err
    };
    if let Err(e) = cgroup.add(pid) {
        return Err(fail(AgentError::internal("adding the process to the container's cgroup", e)));
    }
    let config = HelperConfig {
        container_id: spec.container_id.to_string(),
        mode: spec.mode,
        spec_json: spec.spec_json.to_string(),
        process_json: spec.process_json.map(str::to_string),
    };
    if let Err(e) = spawn::send(&mut control, &config) {
        return Err(fail(helper_gone(&process, e)));
    }
    let timeout = nix::sys::time::TimeVal::new(SETUP_TIMEOUT.as_secs() as _, 0);
    let _ = nix::sys::socket::setsockopt(&control, nix::sys::socket::sockopt::ReceiveTimeout, &timeout);
    match spawn::recv::<Report>(&mut control) {
        Ok(Some(Report::Ready)) => Ok(Launched { process, control }),
        Ok(Some(Report::Failed(why))) => Err(fail(AgentError::FailedPrecondition(format!("container setup: {why}")))),
        Ok(None) => Err(fail(helper_gone(&process, std::io::Error::other("closed without a report")))),
        Err(e) => Err(fail(helper_gone(&process, e))),
    }
}

fn helper_gone(process: &Process, e: std::io::Error) -> AgentError {
    let status = process.exit.wait_timeout(Duration::from_secs(1)).map(|x| x.status);
    AgentError::Internal(format!("the container process ended during setup ({e}; exit status {status:?})"))
}

/// Attaches the streams, lets the helper exec, and waits for the exec's verdict.
fn run(env: &Env, container_id: &str, launched: Launched) -> Result<Arc<Process>, AgentError> {
    let Launched { process, mut control } = launched;
    let kill = |err: AgentError| {
        let _ = env.reaper.signal(process.pid, libc::SIGKILL);
        err
    };
    if let Err(e) = process.io.attach(&env.io, container_id, &process.exec_id, Instant::now() + ATTACH_TIMEOUT) {
        return Err(kill(AgentError::FailedPrecondition(e.to_string())));
    }
    if let Err(e) = control.write_all(&[1]) {
        return Err(kill(helper_gone(&process, e)));
    }
    // EOF: the control socket was closed by the exec (close-on-exec).
    match spawn::recv::<Report>(&mut control) {
        Ok(None) => {
            let io = process.clone();
            process.exit.on_exit(move || io.io.process_exited());
            Ok(process)
        }
        Ok(Some(Report::Failed(why))) => {
            Err(kill(AgentError::FailedPrecondition(format!("starting the process: {why}"))))
        }
        Ok(Some(Report::Ready)) => Err(kill(AgentError::Internal("the helper reported ready twice".into()))),
        Err(e) => Err(kill(helper_gone(&process, e))),
    }
}

impl Container {
    /// Validates the request, then builds the container up to its ready init process.
    /// On any error everything made so far is undone.
    pub fn create(env: &Env, req: &CreateContainerRequest) -> Result<Container, AgentError> {
        let id = req.container_id.as_str();
        validate_id("container id", id).map_err(invalid)?;
        let spec_json = std::str::from_utf8(&req.oci_spec_json)
            .map_err(|e| invalid(format!("container {id}: invalid OCI spec JSON: {e}")))?;
        let spec: Spec = serde_json::from_str(spec_json)
            .map_err(|e| invalid(format!("container {id}: invalid OCI spec JSON: {e}")))?;
        let process = spec.process().clone().ok_or_else(|| invalid("the spec has no process"))?;
        let stdio = req.stdio.clone().unwrap_or_default();
        check_process(&process, &stdio)?;
        let root = spec.root().as_ref().ok_or_else(|| invalid("the spec has no root"))?;
        if !root.path().is_absolute() {
            return Err(invalid(format!(
                "root.path {} is not absolute (it must be a guest path)",
                root.path().display()
            )));
        }
        let (clone_flags, has_pid_ns) = namespace_flags(&spec)?;
        let linux = spec.linux().as_ref();
        if let Some(profile) = linux.and_then(|l| l.seccomp().as_ref()) {
            seccomp::compile(profile).map_err(|e| invalid(e.to_string()))?;
        }
        let hierarchy = env.cgroups.as_ref().map_err(|e| AgentError::FailedPrecondition(e.clone()))?;

        // From here on, each step is undone if a later one fails.
        let mut storages = Vec::new();
        let undo_storages = |storages: &[PathBuf]| {
            for point in storages.iter().rev() {
                let _ = nix::mount::umount2(point, nix::mount::MntFlags::MNT_DETACH);
            }
        };
        for storage in &req.storages {
            let point = PathBuf::from(&storage.mount_point);
            if let Err(e) = mounts::mount_storage(&storage.source, &storage.fstype, &storage.options, &point) {
                undo_storages(&storages);
                return Err(invalid(format!("storage: {e:#}")));
            }
            storages.push(point);
        }
        // Checked after the storages: the rootfs may live on one of them.
        if !root.path().is_dir() {
            undo_storages(&storages);
            return Err(invalid(format!("rootfs {} does not exist or is not a directory", root.path().display())));
        }
        let cgroup = match hierarchy.create(id) {
            Ok(c) => c,
            Err(e) => {
                undo_storages(&storages);
                return Err(AgentError::internal("creating the cgroup", e));
            }
        };
        let undo = |err: AgentError| {
            let _ = cgroup.remove(Duration::from_secs(5));
            undo_storages(&storages);
            err
        };
        if let Some(resources) = linux.and_then(|l| l.resources().as_ref()) {
            if let Err(e) = cgroup.apply(resources) {
                return Err(undo(invalid(format!("resources: {e}"))));
            }
        }
        // Watching starts before the process exists, so no OOM kill can be missed.
        let oom = crate::oom::watch(id, &cgroup, env.oom.clone()).ok();
        let join_flags = [
            (LinuxNamespaceType::Mount, libc::CLONE_NEWNS),
            (LinuxNamespaceType::Ipc, libc::CLONE_NEWIPC),
            (LinuxNamespaceType::Uts, libc::CLONE_NEWUTS),
            (LinuxNamespaceType::Cgroup, libc::CLONE_NEWCGROUP),
        ]
        .into_iter()
        .filter(|(t, _)| linux.and_then(|l| l.namespaces().as_ref()).into_iter().flatten().any(|n| n.typ() == *t))
        .fold(0, |acc, (_, f)| acc | f);

        let launched = launch(
            env,
            &cgroup,
            LaunchSpec {
                container_id: id,
                exec_id: "",
                mode: Mode::Create,
                spec_json,
                process_json: None,
                console: console_size(&process),
                stdio: &stdio,
                clone_flags,
                join: None,
                join_pid_ns: false,
            },
        )
        .map_err(undo)?;
        let pid = launched.process.pid;
        // Held off from reaping: the PID names our child while the pidfd is opened.
        let pidfd = env.reaper.hold(|| spawn::pidfd_open(pid)).map_err(|e| {
            let _ = env.reaper.signal(pid, libc::SIGKILL);
            launched.process.exit.wait_timeout(SETUP_TIMEOUT);
            undo(AgentError::internal("pidfd of the container's init", e))
        })?;
        Ok(Container {
            id: id.to_string(),
            cgroup,
            init: launched.process,
            init_pidfd: pidfd,
            join_flags,
            has_pid_ns,
            spec_json: spec_json.to_string(),
            control: Mutex::new(Some(launched.control)),
            started: Mutex::new(false),
            paused: Mutex::new(false),
            execs: Mutex::new(HashMap::new()),
            _oom: oom,
            storages,
        })
    }

    pub fn state(&self) -> State {
        if self.init.exit.get().is_some() {
            State::Stopped
        } else if *lock(&self.paused) {
            State::Paused
        } else if *lock(&self.started) {
            State::Running
        } else {
            State::Created
        }
    }

    /// Starts the init process (once), after its streams are attached.
    pub fn start(&self, env: &Env) -> Result<u32, AgentError> {
        let control = lock(&self.control)
            .take()
            .ok_or_else(|| AgentError::FailedPrecondition(format!("container {} was already started", self.id)))?;
        if self.init.exit.get().is_some() {
            return Err(AgentError::FailedPrecondition(format!("container {} has stopped", self.id)));
        }
        run(env, &self.id, Launched { process: self.init.clone(), control })?;
        *lock(&self.started) = true;
        Ok(self.init.pid as u32)
    }

    /// Runs another process in the running container.
    pub fn exec(&self, env: &Env, exec_id: &str, process_json: &[u8], stdio: &Stdio) -> Result<u32, AgentError> {
        validate_id("exec id", exec_id).map_err(invalid)?;
        match self.state() {
            State::Running => {}
            // Its setup would freeze in the cgroup until the container is resumed.
            State::Paused => return Err(AgentError::FailedPrecondition(format!("container {} is paused", self.id))),
            State::Created => {
                return Err(AgentError::FailedPrecondition(format!("container {} is not started", self.id)))
            }
            State::Stopped => {
                return Err(AgentError::FailedPrecondition(format!(
                    "container {} is not running (its init process exited)",
                    self.id
                )))
            }
        }
        let process_json = std::str::from_utf8(process_json)
            .map_err(|e| invalid(format!("exec {exec_id}: invalid OCI process JSON: {e}")))?;
        let process: OciProcess = serde_json::from_str(process_json)
            .map_err(|e| invalid(format!("exec {exec_id}: invalid OCI process JSON: {e}")))?;
        check_process(&process, stdio)?;
        {
            let mut execs = lock(&self.execs);
            if execs.contains_key(exec_id) {
                return Err(AgentError::AlreadyExists(format!("exec {exec_id} exists in container {}", self.id)));
            }
            execs.insert(exec_id.to_string(), None);
        }
        let result = launch(
            env,
            &self.cgroup,
            LaunchSpec {
                container_id: &self.id,
                exec_id,
                mode: Mode::Exec { namespaces: self.join_flags },
                spec_json: &self.spec_json,
                process_json: Some(process_json),
                console: console_size(&process),
                stdio,
                clone_flags: 0,
                join: Some(&self.init_pidfd),
                join_pid_ns: self.has_pid_ns,
            },
        )
        .and_then(|launched| {
            // Visible (for CloseStdin, TtyWinResize) while its streams are awaited.
            lock(&self.execs).insert(exec_id.to_string(), Some(launched.process.clone()));
            run(env, &self.id, launched)
        });
        match result {
            Ok(p) => Ok(p.pid as u32),
            Err(e) => {
                lock(&self.execs).remove(exec_id);
                Err(e)
            }
        }
    }

    /// The init process (empty exec id) or an exec'd one.
    pub fn process(&self, exec_id: &str) -> Result<Arc<Process>, AgentError> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        lock(&self.execs)
            .get(exec_id)
            .cloned()
            .flatten()
            .ok_or_else(|| AgentError::NotFound(format!("no exec {exec_id} in container {}", self.id)))
    }

    pub fn signal(&self, env: &Env, exec_id: &str, signal: u32, all: bool) -> Result<(), AgentError> {
        let signal = i32::try_from(signal)
            .ok()
            .filter(|s| (1..=64).contains(s))
            .ok_or_else(|| invalid(format!("signal {signal} is not a valid signal number")))?;
        let process = self.process(exec_id)?;
        if all {
            // Every process of the container; PIDs read with reaping held off stay ours.
            env.reaper.hold(|| {
                for pid in self.cgroup.pids() {
                    // SAFETY: kill(2) has no memory effects.
                    unsafe { libc::kill(pid, signal) };
                }
            });
            return Ok(());
        }
        match env.reaper.signal(process.pid, signal) {
            Ok(()) => Ok(()),
            Err(SignalError::Exited(_)) => Err(AgentError::FailedPrecondition(format!(
                "process {} of container {} has already exited",
                if exec_id.is_empty() { "init" } else { exec_id },
                self.id
            ))),
            Err(e) => Err(AgentError::Internal(e.to_string())),
        }
    }

    /// Waits for a process's exit. An exec'd process is forgotten once its status has been
    /// delivered (as Kata does: execs would otherwise pile up, one per probe); the init
    /// process's status stays until the container is removed.
    pub fn wait(&self, exec_id: &str) -> Result<Exit, AgentError> {
        let process = self.process(exec_id)?;
        let exit = process.exit.wait();
        if !exec_id.is_empty() {
            lock(&self.execs).remove(exec_id);
        }
        Ok(exit)
    }

    pub fn set_paused(&self, paused: bool) -> Result<(), AgentError> {
        let state = self.state();
        let ok = match paused {
            true => state == State::Running,
            false => state == State::Paused,
        };
        if !ok {
            return Err(AgentError::FailedPrecondition(format!("container {} is {state:?}", self.id)));
        }
        self.cgroup
            .set_frozen(paused, FREEZE_TIMEOUT)
            .map_err(|e| AgentError::internal(if paused { "pausing" } else { "resuming" }, e))?;
        *lock(&self.paused) = paused;
        Ok(())
    }

    pub fn update(&self, resources_json: &[u8]) -> Result<(), AgentError> {
        let resources: LinuxResources =
            serde_json::from_slice(resources_json).map_err(|e| invalid(format!("invalid OCI resources JSON: {e}")))?;
        self.cgroup.apply(&resources).map_err(|e| invalid(format!("resources: {e}")))
    }

    pub fn stats(&self) -> CgroupStats {
        self.cgroup.stats()
    }

    /// Kills every process of the container, waits for them (up to `timeout`, None: no
    /// limit), and frees the cgroup and storages.
    pub fn destroy(&self, env: &Env, timeout: Option<Duration>) -> Result<(), AgentError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let _ = env.reaper.signal(self.init.pid, libc::SIGKILL);
        let execs: Vec<Arc<Process>> = lock(&self.execs).values().flatten().cloned().collect();
        for p in &execs {
            let _ = env.reaper.signal(p.pid, libc::SIGKILL);
        }
        env.reaper.hold(|| {
            for pid in self.cgroup.pids() {
                // SAFETY: kill(2) has no memory effects.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        });
        // Frozen processes cannot act on SIGKILL until thawed.
        if *lock(&self.paused) {
            let _ = self.cgroup.set_frozen(false, FREEZE_TIMEOUT);
        }
        for p in std::iter::once(&self.init).chain(&execs) {
            let left = match deadline {
                None => {
                    p.exit.wait();
                    continue;
                }
                Some(d) => d.saturating_duration_since(Instant::now()),
            };
            if p.exit.wait_timeout(left).is_none() {
                return Err(AgentError::DeadlineExceeded(format!(
                    "container {}: process {} still running {:?} after SIGKILL",
                    self.id,
                    p.pid,
                    timeout.unwrap_or_default()
                )));
            }
        }
        drop(lock(&self.control).take());
        env.io.forget_container(&self.id);
        let left = deadline.map_or(Duration::from_secs(30), |d| d.saturating_duration_since(Instant::now()));
        self.cgroup
            .remove(left.max(Duration::from_secs(1)))
            .map_err(|e| AgentError::internal("removing the cgroup", e))?;
        for point in self.storages.iter().rev() {
            let _ = nix::mount::umount2(point, nix::mount::MntFlags::MNT_DETACH);
        }
        Ok(())
    }
}
