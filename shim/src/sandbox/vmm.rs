//! The pod's VMM process: spawned with the sandbox's console log, vsock socket and shared
//! directory, and supervised by a thread that reports its end exactly once.
//!
//! The VMM gets SIGKILL when the supervising thread ends (PR_SET_PDEATHSIG): a pod VM
//! whose shim is gone serves nobody, and this way a killed shim cannot leak a VM. The
//! signal follows the thread that spawned the child, not the process, which is why the
//! supervising thread itself spawns the VMM and lives exactly as long as it.

use super::agent::FS_TAG;
use super::jail::{self, JailSpec};
use super::paths::SandboxPaths;
use crate::config::{Config, VmSize};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How often the supervisor looks at the child where the kernel has no pidfd (before
/// Linux 5.3). With one, the supervisor sleeps in poll(2) on it until the child exits. Either
/// way it reaps with a non-blocking wait under the state's lock, which [`Vmm::kill`] also
/// signals under, so a recycled PID can never be hit.
const POLL: Duration = Duration::from_millis(50);

/// The MAC address of every VM's virtio-net device: one fixed, locally administered
/// address, so that a template (made before any pod exists) carries the same device as a
/// cold-booted VM. The agent gives the guest's interface CNI's MAC when the pod has a
/// network; the device's own address is never seen outside the VM.
pub const GUEST_NET_MAC: &str = "02:6e:62:00:00:01";

/// Everything the VMM is started with.
#[derive(Clone, Debug)]
pub struct VmmSpec {
    pub binary: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub kernel_params: String,
    pub cpu_template: String,
    pub console: PathBuf,
    pub vsock_socket: PathBuf,
    pub shared_dir: PathBuf,
    pub fs_tag: String,
    /// The VMM's own stderr (its error messages).
    pub log: PathBuf,
    /// The VMM's control API socket (pause, snapshot), if wanted.
    pub api_socket: Option<PathBuf>,
    /// Start from this template (snapshot directory) instead of booting the kernel.
    pub restore: Option<PathBuf>,
    /// The virtio-net device's MAC on boot (`--net-mac`); a restored VM has the template's.
    pub net_mac: Option<String>,
    /// The pod's tap for that device (`--net-tap-fd`): a descriptor of the shim, which the
    /// child inherits (see [`Vmm::spawn`]); without it the device has no backend.
    pub net_tap_fd: Option<RawFd>,
    /// Confine the VMM (`--jail`) in this cgroup, with these limits.
    pub jail: Option<JailSpec>,
}

/// The jail of the VMM of the sandbox (or template VM) in `paths`: its cgroup is named after
/// the sandbox's directory, which is named after the sandbox (a template's after its key).
pub fn jail_spec(config: &Config, paths: &SandboxPaths, vcpus: u8) -> JailSpec {
    let name = paths.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    JailSpec::new(&config.cgroup_parent, &name, vcpus, config.oom_score_adj)
}

impl VmmSpec {
    /// A VM of `size` booted from the configured kernel, with the files of `paths`.
    pub fn boot(config: &Config, size: VmSize, paths: &SandboxPaths) -> VmmSpec {
        VmmSpec {
            binary: config.vmm.clone(),
            kernel: config.kernel.clone(),
            initramfs: config.initramfs.clone(),
            vcpus: size.vcpus,
            memory_mib: size.memory_mib,
            // The agent's log level travels on the kernel command line, which it reads at boot.
            kernel_params: config.guest_kernel_params(),
            cpu_template: config.cpu_template.clone(),
            console: paths.console.clone(),
            vsock_socket: paths.vsock.clone(),
            shared_dir: paths.shared.clone(),
            fs_tag: FS_TAG.to_string(),
            log: paths.vmm_log.clone(),
            // Pause and snapshot for templates; for tests, the seccomp self-test.
            api_socket: Some(paths.dir.join("api.sock")),
            restore: None,
            net_mac: Some(GUEST_NET_MAC.to_string()),
            net_tap_fd: None,
            jail: config.jail.then(|| jail_spec(config, paths, size.vcpus)),
        }
    }

    /// The same VM restored from `template` (which fixes vCPUs, memory and kernel).
    pub fn restore(config: &Config, size: VmSize, paths: &SandboxPaths, template: &Path) -> VmmSpec {
        VmmSpec { restore: Some(template.to_path_buf()), ..VmmSpec::boot(config, size, paths) }
    }

    pub fn command(&self) -> Command {
        #[cfg(feature = "host-agent")]
        return super::host_agent::command(&self.vsock_socket, &self.shared_dir);
        #[allow(unreachable_code)]
        let mut cmd = Command::new(&self.binary);
        if let Some(template) = &self.restore {
            // Size, kernel and command line are the template's; the files are this VM's.
            cmd.arg("--restore").arg(template);
        } else {
            self.boot_args(&mut cmd);
        }
        cmd.arg("--console")
            .arg(&self.console)
            .arg("--vsock-socket")
            .arg(&self.vsock_socket)
            .arg("--shared-dir")
            .arg(&self.shared_dir)
            .arg("--fs-tag")
            .arg(&self.fs_tag);
        if let Some(api) = &self.api_socket {
            cmd.arg("--api-socket").arg(api);
        }
        if let Some(fd) = self.net_tap_fd {
            cmd.arg("--net-tap-fd").arg(fd.to_string());
        }
        if let Some(jail) = &self.jail {
            cmd.args(jail.args());
        }
        cmd
    }

    fn boot_args(&self, cmd: &mut Command) {
        cmd.arg("--kernel")
            .arg(&self.kernel)
            .arg("--initramfs")
            .arg(&self.initramfs)
            .arg("--vcpus")
            .arg(self.vcpus.to_string())
            .arg("--memory-mib")
            .arg(self.memory_mib.to_string())
            .arg("--cpu-template")
            .arg(&self.cpu_template);
        if !self.kernel_params.is_empty() {
            cmd.arg("--cmdline").arg(&self.kernel_params);
        }
        if let Some(mac) = &self.net_mac {
            cmd.arg("--net-mac").arg(mac);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("creating the VMM log {path}: {source}", path = path.display())]
    Log { path: PathBuf, source: std::io::Error },
    #[error("starting the VMM {binary}: {source}", binary = binary.display())]
    Spawn { binary: PathBuf, source: std::io::Error },
    #[error("starting the VMM's supervisor thread: {0}")]
    Thread(std::io::Error),
    #[error("preparing the VMM's jail: {0}")]
    Jail(String),
}

struct State {
    child: Option<Child>,
    exit: Option<ExitStatus>,
}

/// A running (or ended) VMM.
pub struct Vmm {
    pid: u32,
    state: Arc<(Mutex<State>, Condvar)>,
}

impl Vmm {
    /// Spawns the VMM; `on_exit` runs once, on the supervisor thread, when it has ended
    /// for whatever reason (including [`Vmm::kill`]).
    pub fn spawn(spec: &VmmSpec, on_exit: Box<dyn FnOnce(ExitStatus) + Send>) -> Result<Vmm, VmmError> {
        let log = File::create(&spec.log).map_err(|source| VmmError::Log { path: spec.log.clone(), source })?;
        if spec.jail.is_some() {
            jail::share_mounts_below(&spec.shared_dir).map_err(VmmError::Jail)?;
        }
        let jail_spec = spec.jail.clone();
        let mut cmd = spec.command();
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        let tap = spec.net_tap_fd;
        // SAFETY: prctl(PR_SET_PDEATHSIG) and fcntl(F_SETFD) are async-signal-safe and touch
        // no memory of the parent; they are all that runs between fork and exec. The tap's
        // close-on-exec flag is cleared in the child's own descriptor table only, so no
        // other child of the shim (spawned meanwhile by another thread) inherits the tap.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(fd) = tap {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let state = Arc::new((Mutex::new(State { child: None, exit: None }), Condvar::new()));
        let (started_tx, started_rx) = mpsc::channel();
        let supervised = state.clone();
        let binary = spec.binary.clone();
        std::thread::Builder::new()
            .name("vmm-supervisor".into())
            .spawn(move || {
                let child = match cmd.spawn() {
                    Ok(child) => child,
                    Err(source) => {
                        let _ = started_tx.send(Err(VmmError::Spawn { binary, source }));
                        return;
                    }
                };
                let pid = child.id();
                // The child is in the shared state before anyone hears of it, so a kill
                // right after spawn (a create failing at once) finds it to kill.
                lock(&supervised.0).child = Some(child);
                let _ = started_tx.send(Ok(pid));
                let exited = pidfd_open(pid);
                let status = supervise(&supervised, exited.as_ref(), |status| {
                    if let Some(jail) = jail_spec {
                        report_seccomp_kill(pid, status);
                        jail.remove_cgroup();
                    }
                });
                on_exit(status);
            })
            .map_err(VmmError::Thread)?;
        let pid = match started_rx.recv() {
            Ok(result) => result?,
            Err(_) => return Err(VmmError::Thread(std::io::Error::other("supervisor thread ended early"))),
        };
        Ok(Vmm { pid, state })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The VMM's exit status, once it has ended.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        lock(&self.state.0).exit
    }

    /// Kills the VMM (if still running) and waits until it is reaped, at most `timeout`.
    pub fn kill(&self, timeout: Duration) -> Option<ExitStatus> {
        self.wait_exit(timeout, true)
    }

    /// Waits until the VMM has ended and been reaped, at most `timeout` (woken by the
    /// supervisor when it reaps the VMM, not by polling here).
    pub fn wait(&self, timeout: Duration) -> Option<ExitStatus> {
        self.wait_exit(timeout, false)
    }

    fn wait_exit(&self, timeout: Duration, kill_first: bool) -> Option<ExitStatus> {
        let (lock_, cond) = &*self.state;
        let mut state = lock(lock_);
        if let (true, Some(child)) = (kill_first, state.child.as_mut()) {
            let _ = child.kill();
        }
        let deadline = Instant::now() + timeout;
        while state.exit.is_none() {
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            state = match cond.wait_timeout(state, deadline - now) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        state.exit
    }
}

/// A VMM that made a system call its seccomp filter does not allow is killed with SIGSYS:
/// say so, with the call where the kernel's audit record names it.
fn report_seccomp_kill(pid: u32, status: ExitStatus) {
    if status.signal() != Some(libc::SIGSYS) {
        return;
    }
    let syscall = match jail::seccomp_kill_syscall(pid) {
        Some(nr) => format!("system call {nr} (x86_64)"),
        None => "a system call the kernel did not log (no audit record: audit is disabled on this host)".into(),
    };
    log::error!("the VMM (pid {pid}) was killed by its seccomp filter (SIGSYS): it made {syscall} that its filter does not allow");
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Polls the child until it has ended; `reaped` runs before anyone waiting hears of it
/// (so a caller that kills the VMM and exits does not leave its cgroup behind).
fn supervise(state: &(Mutex<State>, Condvar), exited: Option<&OwnedFd>, reaped: impl FnOnce(ExitStatus)) -> ExitStatus {
    let mut woken = false;
    loop {
        {
            let mut s = lock(&state.0);
            let polled = match s.child.as_mut() {
                Some(child) => child.try_wait(),
                None => Ok(Some(ExitStatus::from_raw(0))),
            };
            match polled {
                Ok(Some(status)) => {
                    s.child = None;
                    reaped(status);
                    s.exit = Some(status);
                    state.1.notify_all();
                    return status;
                }
                Ok(None) => {}
                Err(e) => {
                    // waitpid cannot fail for our own child short of a bug; report the
                    // VMM as gone (killed) rather than spin.
                    log::error!("waiting for the VMM: {e}");
                    if let Some(mut child) = s.child.take() {
                        let _ = child.kill();
                    }
                    let status = ExitStatus::from_raw(libc::SIGKILL);
                    s.exit = Some(status);
                    state.1.notify_all();
                    return status;
                }
            }
        }
        // A pidfd that said "exited" for a child not yet reapable is not trusted twice:
        // the loop falls back to the interval rather than spin.
        match exited {
            Some(pidfd) if !woken => woken = wait_readable(pidfd),
            _ => std::thread::sleep(POLL),
        }
    }
}

/// A pidfd of our own child `pid` (not reaped yet, so the PID is still its), or None where
/// the kernel has none.
fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open with a PID and no flags; the result is checked before use.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: a descriptor pidfd_open just returned, owned from here on.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sleeps until the pidfd is readable (its process has exited: true) or a signal
/// interrupts (false).
fn wait_readable(pidfd: &OwnedFd) -> bool {
    let mut fds = libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one pollfd on our stack, for a descriptor we own; no timeout.
    let ready = unsafe { libc::poll(&mut fds, 1, -1) };
    ready > 0 && fds.revents & libc::POLLIN != 0
}

/// Kills a VMM left by a shim that is gone, identified by its PID file and checked by
/// its command line (which names the sandbox's own socket), so a recycled PID is never hit.
pub fn kill_stale(pid_file: &Path, vsock_socket: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(pid_file) else { return false };
    let Ok(pid) = text.trim().parse::<i32>() else { return false };
    if pid <= 1 {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let needle = vsock_socket.as_os_str().as_encoded_bytes();
    let ours = cmdline.split(|b| *b == 0).any(|arg| arg == needle);
    if !ours {
        return false;
    }
    // SAFETY: kill(2) with a PID we just identified; no memory is involved.
    let killed = unsafe { libc::kill(pid, libc::SIGKILL) } == 0;
    // Not our child: wait for it to disappear rather than reap it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    killed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path, binary: &str) -> VmmSpec {
        VmmSpec {
            binary: PathBuf::from(binary),
            kernel: dir.join("k"),
            initramfs: dir.join("i"),
            vcpus: 1,
            memory_mib: 128,
            kernel_params: String::new(),
            cpu_template: "auto".into(),
            console: dir.join("console.log"),
            vsock_socket: dir.join("vsock.sock"),
            shared_dir: dir.join("shared"),
            fs_tag: "nestbox".into(),
            log: dir.join("vmm.log"),
            api_socket: None,
            restore: None,
            net_mac: Some(GUEST_NET_MAC.into()),
            net_tap_fd: None,
            jail: None,
        }
    }

    #[test]
    fn a_restore_takes_the_template_and_the_sandbox_files_but_not_the_kernel() {
        let dir = tempfile::tempdir().expect("tempdir");
        let restore = VmmSpec { restore: Some(dir.path().join("tpl")), ..spec(dir.path(), "vmm") };
        let args: Vec<String> = restore.command().get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        let has = |flag: &str| args.iter().any(|a| a == flag);
        assert!(has("--restore") && has("--vsock-socket") && has("--shared-dir") && has("--console"), "{args:?}");
        assert!(!has("--kernel") && !has("--memory-mib") && !has("--cmdline"), "{args:?}");
        let boot: Vec<String> =
            spec(dir.path(), "vmm").command().get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert!(boot.iter().any(|a| a == "--kernel") && !boot.iter().any(|a| a == "--restore"), "{boot:?}");
    }

    /// Every VM has the virtio-net device (a restored one from its template); a pod with a
    /// network also gets its tap.
    #[test]
    fn the_net_device_is_booted_with_the_fixed_mac_and_the_tap_goes_to_boot_and_restore() {
        let dir = tempfile::tempdir().expect("tempdir");
        let args =
            |s: &VmmSpec| -> Vec<String> { s.command().get_args().map(|a| a.to_string_lossy().into_owned()).collect() };
        let pair = |args: &[String], flag: &str| args.windows(2).find(|w| w[0] == flag).map(|w| w[1].clone());
        let detached = args(&spec(dir.path(), "vmm"));
        assert_eq!(pair(&detached, "--net-mac").as_deref(), Some(GUEST_NET_MAC));
        assert!(!detached.iter().any(|a| a == "--net-tap-fd"), "no tap: a device without backend");
        let booted = args(&VmmSpec { net_tap_fd: Some(7), ..spec(dir.path(), "vmm") });
        assert_eq!(pair(&booted, "--net-tap-fd").as_deref(), Some("7"));
        let restored =
            args(&VmmSpec { net_tap_fd: Some(7), restore: Some(dir.path().join("tpl")), ..spec(dir.path(), "vmm") });
        assert_eq!(pair(&restored, "--net-tap-fd").as_deref(), Some("7"));
        assert!(!restored.iter().any(|a| a == "--net-mac"), "device and MAC come from the snapshot: {restored:?}");
    }

    /// The tap descriptor, close-on-exec in the shim, is open in the VMM.
    #[test]
    fn the_tap_descriptor_is_inherited_by_the_vmm_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tap = File::open("/dev/null").expect("a descriptor standing in for the tap");
        let fd = std::os::fd::AsRawFd::as_raw_fd(&tap);
        // SAFETY: F_GETFD on a descriptor we own.
        assert_ne!(unsafe { libc::fcntl(fd, libc::F_GETFD) } & libc::FD_CLOEXEC, 0, "close-on-exec in the shim");
        let script = dir.path().join("fake-vmm");
        let out = dir.path().join("fds");
        std::fs::write(&script, format!("#!/bin/sh\nls /proc/self/fd > {}\n", out.display())).expect("write");
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        let (tx, rx) = mpsc::channel();
        let spec = VmmSpec { net_tap_fd: Some(fd), ..spec(dir.path(), &script.to_string_lossy()) };
        let _vmm = Vmm::spawn(&spec, Box::new(move |s| tx.send(s).expect("send"))).expect("spawn");
        assert!(rx.recv_timeout(Duration::from_secs(10)).expect("ended").success());
        let fds = std::fs::read_to_string(&out).expect("the child listed its descriptors");
        assert!(fds.lines().any(|l| l == fd.to_string()), "fd {fd} open in the child: {fds}");
        // SAFETY: as above.
        assert_ne!(unsafe { libc::fcntl(fd, libc::F_GETFD) } & libc::FD_CLOEXEC, 0, "still close-on-exec in the shim");
    }

    #[test]
    fn missing_binary_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = Vmm::spawn(&spec(dir.path(), "/nonexistent/nestbox-vmm"), Box::new(|_| {}))
            .err()
            .expect("spawn fails")
            .to_string();
        assert!(err.contains("/nonexistent/nestbox-vmm"), "{err}");
    }

    /// A stand-in VMM (`sleep`) is killed, reaped, and reported once.
    #[test]
    fn kill_reaps_and_reports_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        // `sleep` rejects the VMM's arguments; use a shell that ignores them and sleeps.
        let script = dir.path().join("fake-vmm");
        std::fs::write(&script, "#!/bin/sh\nexec sleep 600\n").expect("write");
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        let (tx, rx) = mpsc::channel();
        let vmm =
            Vmm::spawn(&spec(dir.path(), &script.to_string_lossy()), Box::new(move |s| tx.send(s).expect("send")))
                .expect("spawn");
        assert!(Path::new(&format!("/proc/{}", vmm.pid())).exists());
        assert!(vmm.exit_status().is_none());
        let status = vmm.kill(Duration::from_secs(10)).expect("reaped");
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).expect("on_exit ran").signal(), Some(libc::SIGKILL));
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err(), "on_exit ran twice");
        // Killing again is harmless.
        assert_eq!(vmm.kill(Duration::from_secs(1)), Some(status));
    }

    #[test]
    fn stale_vmm_is_killed_only_if_its_command_line_matches() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("vsock.sock");
        let mut child = Command::new("sleep").arg("600").spawn().expect("sleep");
        let pid_file = dir.path().join("vmm.pid");
        std::fs::write(&pid_file, child.id().to_string()).expect("write");
        // `sleep 600` does not name our socket: left alone.
        assert!(!kill_stale(&pid_file, &socket));
        assert!(child.try_wait().expect("try_wait").is_none());
        let _ = child.kill();
        let _ = child.wait();
        std::fs::write(&pid_file, "garbage").expect("write");
        assert!(!kill_stale(&pid_file, &socket));
    }
}
