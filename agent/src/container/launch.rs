//! The agent's side of starting a container process (init or exec), in two halves:
//! [`set_up`] spawns the helper, puts it in the cgroup, sends its configuration and waits
//! until it reports ready; [`start`] attaches the process's streams, sends the start byte
//! and waits for the exec's verdict. A create stops between the two until StartContainer;
//! an exec runs both at once.

use std::fs::File;
use std::io::Write;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nestbox_protocols::types::Stdio;

use super::env::Env;
use super::spawn::{self, ChildFds, HelperConfig, Mode, Report};
use crate::cgroup::Cgroup;
use crate::error::AgentError;
use crate::process::{self, Process};
use crate::reaper::Reaper;

/// How long a process's streams may take to be opened by the host before its start fails.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the helper may take to build a container (slow on emulated guests: seconds).
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(300);

/// A process being started: the helper is set up and waits for its start byte.
pub struct Launched {
    pub process: Arc<Process>,
    pub control: File,
}

/// What the helper is to become.
pub struct LaunchSpec<'a> {
    pub container_id: &'a str,
    pub exec_id: &'a str,
    pub mode: Mode,
    pub spec_json: &'a str,
    /// For an exec: its process.
    pub process_json: Option<&'a str>,
    pub console: Option<(u16, u16)>,
    pub stdio: &'a Stdio,
    pub clone_flags: i32,
    /// For an exec: the container's init, whose namespaces the helper joins.
    pub join: Option<&'a OwnedFd>,
    /// Namespaces the process is created in (entered before the clone, see
    /// `spawn::spawn_helper`): the pod's for a new container, the PID one for an exec.
    pub enter: &'a [(BorrowedFd<'a>, i32)],
}

/// Kills a process that is still being set up and reaps it before returning, so the
/// cgroup it was in is empty for removal.
pub fn kill_and_reap(reaper: &Reaper, process: &Process) {
    let _ = reaper.signal(process.pid, libc::SIGKILL);
    process.exit.wait_timeout(SETUP_TIMEOUT);
}

/// Spawns the helper, puts it in the cgroup, sends its configuration and waits until it
/// reports ready (or why not: then it is killed and reaped before this returns).
pub fn set_up(env: &Env, cgroup: &Cgroup, spec: LaunchSpec<'_>) -> Result<Launched, AgentError> {
    let (child_io, agent_io) =
        process::prepare(spec.stdio, spec.console).map_err(|e| AgentError::Internal(e.to_string()))?;
    let (control, helper_end) = spawn::control_pair().map_err(|e| AgentError::internal("control socket", e))?;
    let fds = ChildFds { stdio: child_io.raw(), control: &helper_end, pidfd: spec.join };
    let (pid, exit) = spawn::spawn_helper(&env.reaper, &env.exe, spec.clone_flags, &fds, spec.enter)
        .map_err(|e| AgentError::internal("starting the container process", e))?;
    // The process's ends belong to it now.
    drop(child_io);
    drop(helper_end);
    let process = Arc::new(Process { exec_id: spec.exec_id.to_string(), pid, exit, io: agent_io });
    let mut control = File::from(control);
    let fail = |err: AgentError| {
        kill_and_reap(&env.reaper, &process);
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
        glibc_avx_off: env.glibc_avx_off,
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
pub fn start(env: &Env, container_id: &str, launched: Launched) -> Result<Arc<Process>, AgentError> {
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
