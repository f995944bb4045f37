//! The one place that waits for children: the reaper owns `waitpid` for the whole agent.
//!
//! As PID 1 the agent inherits every orphan of the guest and must reap them all, while
//! each container process's exit status must reach its WaitProcess callers exactly once.
//! A per-process `waitpid(pid)` next to a global `waitpid(-1)` races (whichever runs first
//! takes the status, the other gets ECHILD), so nothing else in the agent waits: a
//! process the agent starts is registered here, under the reaper's lock, by [`Reaper::spawn`]
//! *before* the reaper can see it exit, and the reaper hands its status to the process's
//! [`ExitCell`]. Children nobody registered (orphans) are reaped and forgotten.
//!
//! The same lock makes signals safe from PID reuse: a PID is only freed by the reap, which
//! happens under the lock after the entry is settled, so [`Reaper::signal`] (also under the
//! lock) never signals a PID that was already handed to another process.
//!
//! SIGCHLD must be blocked in every thread (the agent blocks it before starting any), so it
//! stays pending for the reaper's `sigwait` instead of being discarded by another thread.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use nix::errno::Errno;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exit {
    /// The exit code, or 128 + the signal number for a process killed by a signal.
    pub status: u32,
    pub at: SystemTime,
}

type Hook = Box<dyn FnOnce() + Send>;

/// Where a registered process's exit lands; any number of threads may wait on it.
#[derive(Default)]
pub struct ExitCell {
    state: Mutex<(Option<Exit>, Vec<Hook>)>,
    exited: Condvar,
}

impl ExitCell {
    fn lock(&self) -> MutexGuard<'_, (Option<Exit>, Vec<Hook>)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, exit: Exit) {
        let hooks = {
            let mut state = self.lock();
            if state.0.is_none() {
                state.0 = Some(exit);
            }
            std::mem::take(&mut state.1)
        };
        self.exited.notify_all();
        for hook in hooks {
            hook();
        }
    }

    /// Runs `hook` once the process has exited (at once if it has; else on the reaper's
    /// thread, so it must be quick).
    pub fn on_exit(&self, hook: impl FnOnce() + Send + 'static) {
        let mut state = self.lock();
        if state.0.is_some() {
            drop(state);
            hook();
        } else {
            state.1.push(Box::new(hook));
        }
    }

    /// The exit, if the process has exited.
    pub fn get(&self) -> Option<Exit> {
        self.lock().0
    }

    /// Blocks until the process exits.
    pub fn wait(&self) -> Exit {
        let mut state = self.lock();
        loop {
            if let Some(exit) = state.0 {
                return exit;
            }
            state = self.exited.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Blocks until the process exits or `timeout` passes.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<Exit> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if let Some(exit) = state.0 {
                return Some(exit);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            state = self.exited.wait_timeout(state, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    #[error("process {0} has already exited")]
    Exited(i32),
    #[error("signalling process {pid}: {source}")]
    Kill { pid: i32, source: Errno },
}

#[derive(Default)]
pub struct Reaper {
    /// Live registered children by PID.
    children: Mutex<HashMap<i32, Arc<ExitCell>>>,
}

impl Reaper {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<i32, Arc<ExitCell>>> {
        self.children.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `fork` (which creates a child and returns its PID) with the reaper held off,
    /// and registers the child before the reaper can reap it.
    pub fn spawn(&self, fork: impl FnOnce() -> io::Result<i32>) -> io::Result<(i32, Arc<ExitCell>)> {
        let mut children = self.lock();
        let pid = fork()?;
        let cell = Arc::new(ExitCell::default());
        children.insert(pid, cell.clone());
        Ok((pid, cell))
    }

    /// Sends `signal` to a registered child that has not been reaped.
    pub fn signal(&self, pid: i32, signal: i32) -> Result<(), SignalError> {
        let children = self.lock();
        if !children.contains_key(&pid) {
            return Err(SignalError::Exited(pid));
        }
        // SAFETY: kill(2) has no memory effects; the PID is ours and not yet reaped (see
        // the module comment), so it names the registered process.
        match unsafe { libc::kill(pid, signal) } {
            0 => Ok(()),
            _ => Err(SignalError::Kill { pid, source: Errno::last() }),
        }
    }

    /// Runs `f` while no child can be reaped: PIDs it reads stay valid for its duration.
    pub fn hold<T>(&self, f: impl FnOnce() -> T) -> T {
        let _children = self.lock();
        f()
    }

    /// Reaps forever on the calling thread.
    pub fn run(&self) -> ! {
        let mut sigchld = SigSet::empty();
        sigchld.add(Signal::SIGCHLD);
        // Blocked here too, in case the caller did not: a SIGCHLD between two reaps must
        // stay pending for the wait below.
        let _ = sigchld.thread_block();
        loop {
            self.reap_all();
            let _ = sigchld.wait();
        }
    }

    /// Reaps every child that has exited.
    pub fn reap_all(&self) {
        loop {
            // Peek without reaping, then reap under the lock: the PID stays a zombie (not
            // reusable) until its entry is settled.
            let Some(pid) = exited_child() else { return };
            let mut children = self.lock();
            let status = match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, code)) => code as u32,
                Ok(WaitStatus::Signaled(_, signal, _)) => 128 + signal as u32,
                // Stopped/continued are not reported (no WUNTRACED); nothing to settle.
                Ok(_) => continue,
                Err(Errno::EINTR) => continue,
                Err(_) => return,
            };
            if let Some(cell) = children.remove(&pid) {
                cell.set(Exit { status, at: SystemTime::now() });
            }
        }
    }
}

/// The PID of a child that has exited and is not reaped yet, without reaping it.
fn exited_child() -> Option<i32> {
    loop {
        // SAFETY: siginfo_t is plain data; waitid writes it and reads nothing from it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid with a valid siginfo pointer; WNOWAIT leaves the child waitable.
        let rc = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOHANG | libc::WNOWAIT) };
        if rc != 0 {
            if Errno::last() == Errno::EINTR {
                continue;
            }
            return None; // ECHILD: no children at all
        }
        // SAFETY: after a successful waitid the union holds the child fields.
        let pid = unsafe { info.si_pid() };
        return (pid != 0).then_some(pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fork_exit(code: i32) -> io::Result<i32> {
        // SAFETY: the child only calls _exit, which is async-signal-safe.
        match unsafe { libc::fork() } {
            -1 => Err(io::Error::last_os_error()),
            0 => unsafe { libc::_exit(code) },
            pid => Ok(pid),
        }
    }

    #[test]
    fn statuses_reach_their_cells_once_and_signals_after_exit_are_refused() {
        let reaper = Reaper::new();
        let (pid, cell) = reaper.spawn(|| fork_exit(7)).expect("fork");
        // Wait for the child to be a zombie, then reap as the reaper thread would.
        while exited_child() != Some(pid) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(reaper.signal(pid, 0).is_ok(), "a zombie not yet reaped is still ours");
        reaper.reap_all();
        assert_eq!(cell.get().map(|e| e.status), Some(7));
        assert_eq!(cell.wait_timeout(Duration::from_millis(1)).map(|e| e.status), Some(7));
        assert!(matches!(reaper.signal(pid, 15), Err(SignalError::Exited(p)) if p == pid));
        reaper.reap_all(); // nothing left: returns at once
    }
}
