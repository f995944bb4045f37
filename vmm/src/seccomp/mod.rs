//! Per-thread seccomp filters (built with seccompiler): each kind of VMM thread may make
//! only the system calls it uses; any other kills the whole VMM (SECCOMP_RET_KILL_PROCESS)
//! with SIGSYS. Every thread installs its own filter when its setup is done, once
//! [`enable`] has been called (by `main`, after the jail). The lists come from traces of
//! the real suites (docs/jail.md says how to redo that).
//!
//! A filter is inherited by the threads its thread creates, and stacked filters allow only
//! what all of them allow. vCPU threads start device threads when the guest activates a
//! device, so they would need every device call themselves; instead they hand the start
//! to the launcher thread ([`launch`]), whose filter is the device filter plus thread
//! creation, and keep the narrow vCPU filter.

mod kind;
mod launcher;
mod syscalls;

pub use kind::{SeccompError, ThreadKind};
pub use launcher::launch;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// What a call outside the list does.
#[derive(Debug, Clone)]
pub enum Mode {
    /// SECCOMP_RET_KILL_PROCESS: the VMM dies of SIGSYS.
    Kill,
    /// Diagnostics (NESTBOX_VMM_SECCOMP=log): the call fails with ENOSYS and the VMM
    /// writes the thread kind and call number to stderr (or to this file, opened before
    /// the jail: NESTBOX_VMM_SECCOMP_LOG), so one run lists every call a filter lacks.
    /// Never for production: the guest's attacker could go on probing.
    Log(Option<std::sync::Arc<std::fs::File>>),
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static FILTERS: OnceLock<BTreeMap<ThreadKind, BpfProgram>> = OnceLock::new();

/// Builds every filter (so no thread can fail to build its own later) and turns filtering
/// on for the threads that start from now on; starts the device launcher.
pub fn enable(mode: Mode) -> Result<(), SeccompError> {
    let mut filters = BTreeMap::new();
    for kind in ThreadKind::ALL {
        filters.insert(kind, build(kind, &mode)?);
    }
    let _ = FILTERS.set(filters);
    if let Mode::Log(file) = mode {
        let file = file.and_then(|f| f.try_clone().ok());
        syscalls::install_log_handler(file);
    }
    ENABLED.store(true, Ordering::Release);
    launcher::start(|| install_or_exit(ThreadKind::Launcher))
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Acquire)
}

/// Installs the filter of `kind` on the calling thread, if filtering is on.
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    if !enabled() {
        return Ok(());
    }
    let Some(filter) = FILTERS.get().and_then(|f| f.get(&kind)) else {
        return Err(SeccompError::Install { kind: kind.name(), reason: "filters not built".into() });
    };
    kind::set_current(kind);
    seccompiler::apply_filter(filter).map_err(|e| SeccompError::Install { kind: kind.name(), reason: e.to_string() })
}

/// [`install`] for a thread that cannot report an error: a thread left without its
/// filter must not run, so the VMM ends.
pub fn install_or_exit(kind: ThreadKind) {
    if let Err(e) = install(kind) {
        eprintln!("nestbox-vmm: error: {e}");
        std::process::exit(1);
    }
}

/// The BPF program of `kind`.
pub fn build(kind: ThreadKind, mode: &Mode) -> Result<BpfProgram, SeccompError> {
    let rules = syscalls::rules(kind).map_err(|reason| SeccompError::Build { kind: kind.name(), reason })?;
    let mismatch = match mode {
        Mode::Kill => SeccompAction::KillProcess,
        Mode::Log(_) => SeccompAction::Trap,
    };
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| SeccompError::Build { kind: kind.name(), reason: e.to_string() })?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| SeccompError::Build { kind: kind.name(), reason: e.to_string() })
}

/// For the control API's hidden self-test: a system call no filter allows. Without a
/// filter it only reads the process's execution domain.
pub fn forbidden_syscall() -> i64 {
    // SAFETY: personality(0xffffffff) queries the execution domain and changes nothing.
    let result = unsafe { libc::syscall(syscalls::FORBIDDEN, 0xffff_ffffu64) };
    if enabled() {
        // Still alive: the diagnostic mode let the call fail. End as Kill mode would have,
        // so the self-test's path is the same in both modes.
        // SAFETY: the default action of SIGSYS, then SIGSYS to this process.
        unsafe {
            libc::signal(libc::SIGSYS, libc::SIG_DFL);
            libc::raise(libc::SIGSYS);
        }
    }
    result
}

#[cfg(test)]
mod tests;
