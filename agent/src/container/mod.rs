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

pub mod avx_quirk;
mod caps;
mod env;
pub mod helper;
mod launch;
pub mod mounts;
mod seccomp;
pub mod spawn;
mod validate;

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nestbox_protocols::stdio::validate_id;
use nestbox_protocols::types::{CgroupStats, Stdio, Storage};
use oci_spec::runtime::LinuxResources;

use crate::cgroup::Cgroup;
use crate::error::{invalid, AgentError};
use crate::oom::OomWatcher;
use crate::process::Process;
use crate::reaper::{Exit, SignalError};
pub use env::Env;
use launch::{LaunchSpec, Launched};
use spawn::Mode;
pub use validate::CreateRequest;

const FREEZE_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// The device program attached to the cgroup (freed with it), replaced on an update.
    devices: Mutex<OwnedFd>,
    /// Storage mounted for this container (unmounted at removal).
    storages: Vec<PathBuf>,
}

/// The init process up to its start byte, and what watches it.
struct ReadyInit {
    launched: Launched,
    pidfd: OwnedFd,
    oom: Option<OomWatcher>,
    devices: OwnedFd,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Mounts the request's storages in order; on a failure unmounts those already mounted.
fn mount_storages(storages: &[Storage]) -> Result<Vec<PathBuf>, AgentError> {
    let mut mounted = Vec::new();
    for storage in storages {
        let point = PathBuf::from(&storage.mount_point);
        if let Err(e) = mounts::mount_storage(&storage.source, &storage.fstype, &storage.options, &point) {
            unmount_storages(&mounted);
            return Err(invalid(format!("storage: {e:#}")));
        }
        mounted.push(point);
    }
    Ok(mounted)
}

/// Unmounts storages, the last mounted first.
fn unmount_storages(points: &[PathBuf]) {
    for point in points.iter().rev() {
        let _ = nix::mount::umount2(point, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A bad rule is the request's fault; a program the kernel did not take is ours.
fn devices_error(e: crate::cgroup::CgroupError) -> AgentError {
    match e {
        crate::cgroup::CgroupError::Devices(_) => invalid(format!("resources: {e}")),
        e => AgentError::internal("setting up the device cgroup", e),
    }
}

fn check_rootfs(root: &Path) -> Result<(), AgentError> {
    if !root.is_dir() {
        return Err(invalid(format!("rootfs {} does not exist or is not a directory", root.display())));
    }
    Ok(())
}

impl Container {
    /// Builds the container of a checked request up to its ready init process, created in
    /// the namespaces to `enter` (the pod's it names, see `nestbox_protocols::pod`). On any
    /// error everything made so far is undone.
    pub fn create(
        env: &Env,
        request: &CreateRequest<'_>,
        enter: &[(BorrowedFd<'_>, i32)],
    ) -> Result<Container, AgentError> {
        let hierarchy = env.cgroups.as_ref().map_err(|e| AgentError::FailedPrecondition(e.clone()))?;

        // From here on, each step is undone if a later one fails.
        let storages = mount_storages(request.storages)?;
        // The rootfs is checked after the storages: it may live on one of them.
        let made = check_rootfs(&request.root)
            .and_then(|()| hierarchy.create(request.id).map_err(|e| AgentError::internal("creating the cgroup", e)))
            .and_then(|cgroup| match Self::ready_init(env, request, &cgroup, enter) {
                Ok(init) => Ok((cgroup, init)),
                Err(e) => {
                    let _ = cgroup.remove(Duration::from_secs(5));
                    Err(e)
                }
            });
        let (cgroup, init) = match made {
            Ok(made) => made,
            Err(e) => {
                unmount_storages(&storages);
                return Err(e);
            }
        };
        Ok(Container {
            id: request.id.to_string(),
            cgroup,
            init: init.launched.process,
            init_pidfd: init.pidfd,
            join_flags: validate::exec_join_flags(&request.spec),
            has_pid_ns: request.has_pid_ns,
            spec_json: request.spec_json.to_string(),
            control: Mutex::new(Some(init.launched.control)),
            started: Mutex::new(false),
            paused: Mutex::new(false),
            execs: Mutex::new(HashMap::new()),
            _oom: init.oom,
            devices: Mutex::new(init.devices),
            storages,
        })
    }

    /// In the new cgroup: applies the resources, watches for OOM kills, and sets up the
    /// init process until it waits for its start byte.
    fn ready_init(
        env: &Env,
        request: &CreateRequest<'_>,
        cgroup: &Cgroup,
        enter: &[(BorrowedFd<'_>, i32)],
    ) -> Result<ReadyInit, AgentError> {
        let resources = request.spec.linux().as_ref().and_then(|l| l.resources().as_ref());
        if let Some(resources) = resources {
            cgroup.apply(resources).map_err(|e| invalid(format!("resources: {e}")))?;
        }
        // Always: with no rules in the spec, runc's default devices only.
        let rules = resources.and_then(|r| r.devices().as_deref()).unwrap_or_default();
        let devices = cgroup.set_devices(rules, None).map_err(devices_error)?;
        // Watching starts before the process exists, so no OOM kill can be missed.
        let oom = crate::oom::watch(request.id, cgroup, env.oom.clone()).ok();
        let launched = launch::set_up(
            env,
            cgroup,
            LaunchSpec {
                container_id: request.id,
                exec_id: "",
                mode: Mode::Create,
                spec_json: request.spec_json,
                process_json: None,
                console: validate::console_size(&request.process),
                stdio: &request.stdio,
                clone_flags: request.clone_flags,
                join: None,
                enter,
            },
        )?;
        let pid = launched.process.pid;
        // Held off from reaping: the PID names our child while the pidfd is opened.
        let pidfd = env.reaper.hold(|| spawn::pidfd_open(pid)).map_err(|e| {
            launch::kill_and_reap(&env.reaper, &launched.process);
            AgentError::internal("pidfd of the container's init", e)
        })?;
        Ok(ReadyInit { launched, pidfd, oom, devices })
    }

    /// The init process as a pidfd: its PID namespace is the pod's when this container
    /// made it (see `Sandbox::create_container`).
    pub fn init_pidfd(&self) -> &OwnedFd {
        &self.init_pidfd
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
        launch::start(env, &self.id, Launched { process: self.init.clone(), control })?;
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
        let (process_json, process) = validate::exec_process(exec_id, process_json)?;
        validate::check_process(&process, stdio)?;
        {
            let mut execs = lock(&self.execs);
            if execs.contains_key(exec_id) {
                return Err(AgentError::AlreadyExists(format!("exec {exec_id} exists in container {}", self.id)));
            }
            execs.insert(exec_id.to_string(), None);
        }
        // Created in the container's PID namespace (its own or the pod's); the helper joins
        // the others through the same pidfd.
        let enter_pid = [(self.init_pidfd.as_fd(), libc::CLONE_NEWPID)];
        let enter: &[(BorrowedFd<'_>, i32)] = if self.has_pid_ns { &enter_pid } else { &[] };
        let result = launch::set_up(
            env,
            &self.cgroup,
            LaunchSpec {
                container_id: &self.id,
                exec_id,
                mode: Mode::Exec { namespaces: self.join_flags },
                spec_json: &self.spec_json,
                process_json: Some(process_json),
                console: validate::console_size(&process),
                stdio,
                clone_flags: 0,
                join: Some(&self.init_pidfd),
                enter,
            },
        )
        .and_then(|launched| {
            // Visible (for CloseStdin, TtyWinResize) while its streams are awaited.
            lock(&self.execs).insert(exec_id.to_string(), Some(launched.process.clone()));
            launch::start(env, &self.id, launched)
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
        self.cgroup.apply(&resources).map_err(|e| invalid(format!("resources: {e}")))?;
        // containerd sends the whole resources again, devices included: replace the program.
        if let Some(rules) = resources.devices() {
            let mut devices = lock(&self.devices);
            *devices = self.cgroup.set_devices(rules, Some(&devices)).map_err(devices_error)?;
        }
        Ok(())
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
        unmount_storages(&self.storages);
        Ok(())
    }
}
