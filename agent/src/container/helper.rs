//! The helper: the agent binary re-executed in a new container process (see `spawn`).
//! Single-threaded, it receives its [`HelperConfig`], builds the container (or joins one),
//! reports ready, waits for the start byte, and executes the container's program.
//!
//! Order matters and follows runc: mounts and hostname while root; rlimits; seccomp early
//! only when no_new_privs is off (installing it then needs CAP_SYS_ADMIN, gone after the
//! capability drop); bounding set, user and groups, capabilities; then after the start
//! byte: cwd, no_new_privs, seccomp as late as possible, signal state reset, exec.

use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::os::fd::FromRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use nestbox_protocols::pod;
use nix::unistd::{Gid, Uid};
use oci_spec::runtime::{LinuxNamespace, LinuxNamespaceType, PosixRlimit, PosixRlimitType, Process, Spec};

use super::spawn::{self, HelperConfig, Mode, Report, CONTROL_FD, PIDFD_FD};
use super::{avx_quirk, caps, mounts, seccomp};

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Entry point of `nestbox-agent --container-helper`; never returns.
pub fn main() -> ! {
    // SAFETY: the agent placed the control socket on this descriptor before exec (see
    // spawn::exec_child); nothing else in this process owns it.
    let mut control = unsafe { File::from_raw_fd(CONTROL_FD) };
    // dup2 cleared close-on-exec; the program must not inherit the socket, and the agent
    // reads the exec's success as EOF on it.
    // SAFETY: fcntl on our own descriptor.
    unsafe { libc::fcntl(CONTROL_FD, libc::F_SETFD, libc::FD_CLOEXEC) };
    let err = match run(&mut control) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    let _ = spawn::send(&mut control, &Report::Failed(format!("{err:#}")));
    std::process::exit(1)
}

/// The helper's steps, in order; each returns with the reason it failed.
fn run(control: &mut File) -> Result<std::convert::Infallible> {
    make_non_dumpable();
    let config: HelperConfig =
        spawn::recv(control).context("reading the configuration")?.ok_or_else(|| anyhow!("agent went away"))?;
    let spec: Spec = serde_json::from_str(&config.spec_json).context("parsing the spec")?;
    let process: Process = match &config.process_json {
        Some(json) => serde_json::from_str(json).context("parsing the process")?,
        None => spec.process().clone().ok_or_else(|| anyhow!("the spec has no process"))?,
    };
    let process = &process;
    let no_new_privs = process.no_new_privileges().unwrap_or(false);
    let seccomp_profile = spec.linux().as_ref().and_then(|l| l.seccomp().as_ref());
    let filter = seccomp_profile.map(seccomp::compile).transpose()?;

    match &config.mode {
        Mode::Create => build_container(&spec)?,
        Mode::Exec { namespaces } => join_container(*namespaces)?,
    }
    start_session(process)?;
    for rlimit in process.rlimits().iter().flatten() {
        set_rlimit(rlimit)?;
    }
    drop_privileges(process, filter.as_deref(), no_new_privs)?;
    let program = Program::find(process, config.glibc_avx_off)?;

    spawn::send(control, &Report::Ready).context("reporting ready")?;
    let mut start = [0u8; 1];
    control.read_exact(&mut start).context("waiting for the start")?;

    if no_new_privs {
        set_no_new_privs()?;
        if let Some(filter) = &filter {
            seccomp::install(filter).context("installing the seccomp filter")?;
        }
    }
    reset_signals();
    program.exec()
}

/// No other process (the container's included) may ptrace this one or open its
/// /proc/<pid>/exe (the agent binary) while it runs as root in the container's PID
/// namespace: the runc CVE-2019-5736 pattern. The final exec resets this.
fn make_non_dumpable() {
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
}

/// A new container, built from its spec while still root: namespaces given by path
/// joined, the root file system set up (mounts, pivot), hostname, domain name, sysctls.
fn build_container(spec: &Spec) -> Result<()> {
    let linux = spec.linux().as_ref();
    let namespaces: &[LinuxNamespace] = linux.and_then(|l| l.namespaces().as_deref()).unwrap_or_default();
    join_namespaces(namespaces)?;
    // Before the root file system: the container's /proc/sys is read-only once its
    // read-only paths are applied (containerd lists /proc/sys), and the agent's /proc is
    // still here. A namespaced sysctl written through it lands in the writer's namespaces,
    // which are the container's (the pod's network and IPC namespaces for a CRI pod).
    for (key, value) in linux.and_then(|l| l.sysctl().as_ref()).into_iter().flatten() {
        std::fs::write(sysctl_path(key), value).with_context(|| format!("sysctl {key}={value}"))?;
    }
    let root = spec.root().as_ref().ok_or_else(|| anyhow!("the spec has no root"))?;
    mounts::setup_rootfs(spec, root.path()).context("setting up the root file system")?;
    if namespaces.iter().any(|n| n.typ() == LinuxNamespaceType::Uts) {
        set_host_names(spec)?;
    }
    Ok(())
}

/// The /proc/sys file of a sysctl key: dots become slashes (as runc does), so a key
/// cannot climb out of /proc/sys with "..".
fn sysctl_path(key: &str) -> PathBuf {
    PathBuf::from("/proc/sys").join(key.replace('.', "/").trim_start_matches('/'))
}

/// Joins the IPC, UTS and cgroup namespaces the spec names by path (the agent refused any
/// other kind), then makes a new cgroup namespace if one is asked for without a path. The
/// pod's namespaces (reserved paths, see `nestbox_protocols::pod`) are not files: this
/// process was created in them.
fn join_namespaces(namespaces: &[LinuxNamespace]) -> Result<()> {
    for ns in namespaces {
        let Some(path) = ns.path().as_deref().filter(|p| pod::namespace_kind(p).is_none()) else { continue };
        let flag = match ns.typ() {
            LinuxNamespaceType::Ipc => libc::CLONE_NEWIPC,
            LinuxNamespaceType::Uts => libc::CLONE_NEWUTS,
            LinuxNamespaceType::Cgroup => libc::CLONE_NEWCGROUP,
            _ => continue, // refused or ignored by the agent's validation
        };
        let file = File::open(path).with_context(|| format!("opening namespace {}", path.display()))?;
        nix::sched::setns(file, nix::sched::CloneFlags::from_bits_truncate(flag))
            .with_context(|| format!("joining namespace {}", path.display()))?;
    }
    // The agent moved this process into the container's cgroup before sending the
    // configuration: a new cgroup namespace is rooted there.
    if namespaces.iter().any(|n| n.typ() == LinuxNamespaceType::Cgroup && n.path().is_none()) {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWCGROUP).context("new cgroup namespace")?;
    }
    Ok(())
}

/// The spec's hostname and domain name, set in the container's own UTS namespace.
fn set_host_names(spec: &Spec) -> Result<()> {
    if let Some(hostname) = spec.hostname() {
        nix::unistd::sethostname(hostname).context("setting the hostname")?;
    }
    if let Some(domain) = spec.domainname() {
        let name = CString::new(domain.as_str()).context("domainname")?;
        // SAFETY: a valid pointer and its length.
        if unsafe { libc::setdomainname(name.as_ptr(), domain.len()) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setting the domain name");
        }
    }
    Ok(())
}

/// An exec: joins the running container's namespaces (`namespaces`, clone flags) through
/// the pidfd of its init that the agent placed on [`PIDFD_FD`].
fn join_container(namespaces: i32) -> Result<()> {
    if namespaces != 0 {
        // SAFETY: setns with the pidfd the agent placed on PIDFD_FD; this process
        // is single-threaded, as joining a mount namespace requires.
        if unsafe { libc::setns(PIDFD_FD, namespaces) } != 0 {
            return Err(std::io::Error::last_os_error()).context("joining the container's namespaces");
        }
    }
    // SAFETY: closing our own descriptor, not used after this.
    unsafe { libc::close(PIDFD_FD) };
    Ok(())
}

/// oom_score_adj, then a session of its own (signals to the agent's process group stay
/// there), with the terminal, if any, as its controlling terminal.
fn start_session(process: &Process) -> Result<()> {
    if let Some(score) = process.oom_score_adj() {
        std::fs::write("/proc/self/oom_score_adj", score.to_string()).context("setting oom_score_adj")?;
    }
    nix::unistd::setsid().context("setsid")?;
    if process.terminal().unwrap_or(false) {
        // SAFETY: ioctl on stdin, which the agent made the pty's slave end.
        if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } != 0 {
            return Err(std::io::Error::last_os_error()).context("making the terminal the controlling terminal");
        }
    }
    Ok(())
}

/// From root to the process's user and capabilities. Without no_new_privs the seccomp
/// filter goes in first: installing it then needs CAP_SYS_ADMIN, gone after the drop.
fn drop_privileges(process: &Process, filter: Option<&[seccomp::Insn]>, no_new_privs: bool) -> Result<()> {
    if let (Some(filter), false) = (filter, no_new_privs) {
        seccomp::install(filter).context("installing the seccomp filter")?;
    }
    if let Some(c) = process.capabilities() {
        caps::drop_bounding(c).context("dropping bounding capabilities")?;
    }
    set_user(process)?;
    if let Some(c) = process.capabilities() {
        caps::set(c).context("setting capabilities")?;
    }
    Ok(())
}

fn set_no_new_privs() -> Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setting no_new_privs");
    }
    Ok(())
}

/// The program to execute, found (with the working directory entered) before the helper
/// reports ready, as runc does: a missing program fails the create (and containerd cleans
/// up), not the start.
struct Program {
    path: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
}

impl Program {
    /// `avx_off`: the guest leaves AVX registers unsaved (see `avx_quirk`).
    fn find(process: &Process, avx_off: bool) -> Result<Program> {
        let cwd = if process.cwd().as_os_str().is_empty() { Path::new("/") } else { process.cwd().as_path() };
        nix::unistd::chdir(cwd).with_context(|| format!("cwd {}", cwd.display()))?;
        let mut env: Vec<String> = process.env().clone().unwrap_or_default();
        if avx_off {
            env = avx_quirk::with_avx_off(env);
        }
        let (path, argv) = command(process, &env)?;
        let envp = to_cstrings(env.iter().map(String::as_str))?;
        Ok(Program { path, argv, envp })
    }

    /// Replaces the helper by the program; returns only with the reason the exec failed.
    fn exec(self) -> Result<std::convert::Infallible> {
        let Program { path, argv, envp } = self;
        let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());
        let mut envp_ptrs: Vec<*const libc::c_char> = envp.iter().map(|e| e.as_ptr()).collect();
        envp_ptrs.push(std::ptr::null());
        // SAFETY: NUL-terminated strings and NULL-terminated arrays that outlive the call.
        unsafe { libc::execve(path.as_ptr(), argv_ptrs.as_ptr(), envp_ptrs.as_ptr()) };
        // Still here: the exec failed and the control socket is still open for the report.
        Err(std::io::Error::last_os_error()).with_context(|| format!("executing {:?}", path))
    }
}

fn to_cstrings<'a>(items: impl Iterator<Item = &'a str>) -> Result<Vec<CString>> {
    items.map(|s| CString::new(s).with_context(|| format!("{s:?} contains a NUL byte"))).collect()
}

/// The program to execute and its argv: args[0] as a path, or looked up in the process's
/// PATH (inside the container) as runc does.
fn command(process: &Process, env: &[String]) -> Result<(CString, Vec<CString>)> {
    let args = process.args().as_ref().filter(|a| !a.is_empty()).ok_or_else(|| anyhow!("process.args is empty"))?;
    let argv = to_cstrings(args.iter().map(String::as_str))?;
    let name = &args[0];
    if name.contains('/') {
        let path = CString::new(name.as_str())?;
        // SAFETY: access(2) with a valid NUL-terminated path.
        if unsafe { libc::access(path.as_ptr(), libc::X_OK) } != 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("executable file {name:?}"));
        }
        return Ok((path, argv));
    }
    let path_var = env.iter().find_map(|e| e.strip_prefix("PATH=")).unwrap_or(DEFAULT_PATH);
    for dir in path_var.split(':').filter(|d| !d.is_empty()) {
        let candidate = Path::new(dir).join(name);
        let c = CString::new(candidate.as_os_str().as_bytes())?;
        // SAFETY: access(2) with a valid NUL-terminated path.
        if unsafe { libc::access(c.as_ptr(), libc::X_OK) } == 0 && candidate.is_file() {
            return Ok((c, argv));
        }
    }
    bail!("executable file {name:?} not found in $PATH ({path_var})")
}

fn set_user(process: &Process) -> Result<()> {
    let user = process.user();
    let groups: Vec<Gid> = user.additional_gids().iter().flatten().map(|g| Gid::from_raw(*g)).collect();
    nix::unistd::setgroups(&groups).context("setgroups")?;
    let gid = Gid::from_raw(user.gid());
    nix::unistd::setresgid(gid, gid, gid).with_context(|| format!("setting gid {gid}"))?;
    // Keep the permitted capabilities across the switch to a non-root uid; the effective
    // ones are set from the spec right after.
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) };
    let uid = Uid::from_raw(user.uid());
    nix::unistd::setresuid(uid, uid, uid).with_context(|| format!("setting uid {uid}"))?;
    // SAFETY: as above.
    unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) };
    if let Some(umask) = user.umask() {
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(umask));
    }
    Ok(())
}

fn set_rlimit(rlimit: &PosixRlimit) -> Result<()> {
    let resource = match rlimit.typ() {
        PosixRlimitType::RlimitCpu => libc::RLIMIT_CPU,
        PosixRlimitType::RlimitFsize => libc::RLIMIT_FSIZE,
        PosixRlimitType::RlimitData => libc::RLIMIT_DATA,
        PosixRlimitType::RlimitStack => libc::RLIMIT_STACK,
        PosixRlimitType::RlimitCore => libc::RLIMIT_CORE,
        PosixRlimitType::RlimitRss => libc::RLIMIT_RSS,
        PosixRlimitType::RlimitNproc => libc::RLIMIT_NPROC,
        PosixRlimitType::RlimitNofile => libc::RLIMIT_NOFILE,
        PosixRlimitType::RlimitMemlock => libc::RLIMIT_MEMLOCK,
        PosixRlimitType::RlimitAs => libc::RLIMIT_AS,
        PosixRlimitType::RlimitLocks => libc::RLIMIT_LOCKS,
        PosixRlimitType::RlimitSigpending => libc::RLIMIT_SIGPENDING,
        PosixRlimitType::RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        PosixRlimitType::RlimitNice => libc::RLIMIT_NICE,
        PosixRlimitType::RlimitRtprio => libc::RLIMIT_RTPRIO,
        PosixRlimitType::RlimitRttime => libc::RLIMIT_RTTIME,
    };
    let limit = libc::rlimit { rlim_cur: rlimit.soft(), rlim_max: rlimit.hard() };
    // SAFETY: setrlimit reads the struct, valid for the call.
    if unsafe { libc::setrlimit(resource as _, &limit) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("setting {}", rlimit.typ()));
    }
    Ok(())
}

/// The agent blocks SIGCHLD (and in host mode SIGINT/SIGTERM) and Rust ignores SIGPIPE;
/// a mask and ignored signals survive exec, so the program gets a clean slate.
fn reset_signals() {
    // SAFETY: plain libc signal calls on this single-threaded process, with valid sets.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        for sig in 1..libc::SIGRTMIN() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
    }
}
