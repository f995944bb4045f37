//! Helpers shared by nestbox's integration tests: building and locating the project's
//! binaries, finding the installed guest image, and running processes with a deadline.
//!
//! Guests are slow on software-nested KVM (a boot takes about a minute, twice that
//! while the other core is busy), so deadlines here are generous: they catch a hung
//! guest, they do not measure speed.

pub mod containerd;
#[cfg(feature = "cri")]
pub mod cri;
pub mod procmem;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long a guest may take to boot and run a self-test before it counts as hung.
pub const GUEST_DEADLINE: Duration = Duration::from_secs(600);

/// The workspace's top folder.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ lives in the workspace").to_path_buf()
}

/// Builds (once per test process) and returns the path of one of the workspace's
/// binaries, so a test never runs a stale build.
pub fn binary(package: &str, bin: &str) -> PathBuf {
    static BUILT: OnceLock<std::sync::Mutex<Vec<String>>> = OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
    let target_dir =
        std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"));
    let path = target_dir.join("debug").join(bin);
    if !built.iter().any(|b| b == bin) {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "-p", package, "--bin", bin])
            .current_dir(workspace_root())
            .status()
            .expect("running cargo build");
        assert!(status.success(), "cargo build of {bin} failed");
        built.push(bin.to_string());
    }
    path
}

/// The installed guest image (`guest-image/build.sh`), honouring NESTBOX_GUEST_DIR.
pub fn guest_image() -> (PathBuf, PathBuf) {
    let dir = std::env::var_os("NESTBOX_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/local/share/nestbox"));
    let (kernel, initramfs) = (dir.join("vmlinux"), dir.join("initramfs.cpio"));
    assert!(
        kernel.exists() && initramfs.exists(),
        "guest image missing in {}: run guest-image/build.sh",
        dir.display()
    );
    (kernel, initramfs)
}

/// What a finished process left: its status and everything it wrote.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

/// Runs `cmd` to completion, killing it (and failing the test) after `deadline`.
pub fn run_with_deadline(cmd: &mut Command, deadline: Duration) -> Finished {
    match run_bounded(cmd, deadline) {
        Ok(finished) => finished,
        Err(killed) => panic!(
            "{cmd:?} still running after {deadline:?}; killed.\nstdout:\n{}\nstderr:\n{}",
            killed.stdout, killed.stderr
        ),
    }
}

/// Runs `cmd` to completion; after `deadline` it is killed and what it wrote is the `Err`.
/// A hung child is no panic (only a failure to spawn is): for cleanup paths, where a panic
/// during unwinding would abort.
pub fn run_bounded(cmd: &mut Command, deadline: Duration) -> Result<Finished, Finished> {
    let start = Instant::now();
    let mut child = match cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn() {
        Ok(child) => child,
        Err(e) => panic!("spawning {cmd:?}: {e}"),
    };
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let status = wait_until(&mut child, deadline);
    let timed_out = status.is_none();
    let status = status.unwrap_or_else(|| {
        let _ = child.kill();
        child.wait().expect("reaping a killed child")
    });
    let finished = Finished {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
        elapsed: start.elapsed(),
    };
    if timed_out {
        Err(finished)
    } else {
        Ok(finished)
    }
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut out);
        }
        String::from_utf8_lossy(&out).into_owned()
    })
}

/// Woken by the child's exit through a pidfd (not a polling interval: the benchmark times
/// ctr calls of tens of milliseconds with this).
fn wait_until(child: &mut Child, deadline: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    // SAFETY: pidfd_open with our own child's PID and no flags; the result is checked.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
    // SAFETY: a descriptor pidfd_open just returned to us, owned from here on.
    let pidfd =
        (raw >= 0).then(|| unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw as i32) });
    loop {
        if let Some(status) = child.try_wait().expect("waiting for child") {
            return Some(status);
        }
        let left = deadline.checked_sub(start.elapsed())?;
        match &pidfd {
            Some(fd) => {
                let mut poll =
                    libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(fd), events: libc::POLLIN, revents: 0 };
                let millis = i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1);
                // SAFETY: one pollfd we own, for at most `millis`.
                unsafe { libc::poll(&mut poll, 1, millis) };
            }
            None => std::thread::sleep(left.min(Duration::from_millis(10))),
        }
    }
}

/// The host's kernel release (`uname -r`).
pub fn host_kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("reading osrelease").trim().to_string()
}

/// Builds (release, static musl) one of this crate's binaries that runs inside a guest,
/// and returns its path.
pub fn guest_binary(bin: &str) -> PathBuf {
    const TARGET: &str = "x86_64-unknown-linux-musl";
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        // Without the CRI client: the guest programs need none of tonic and tokio.
        .args(["build", "--quiet", "--release", "-p", "nestbox-tests", "--no-default-features"])
        .args(["--bin", bin, "--target", TARGET])
        .current_dir(workspace_root())
        .status()
        .expect("running cargo build");
    assert!(status.success(), "cargo build of guest binary {bin} failed (is the {TARGET} target installed?)");
    let target_dir =
        std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"));
    target_dir.join(TARGET).join("release").join(bin)
}

/// Packs `init` as /init of an initramfs at `out`, the way guest-image/build.sh packs
/// the agent: for tests that need their own program as the guest's PID 1.
pub fn test_initramfs(init: &Path, out: &Path) {
    let status = Command::new("python3")
        .arg(workspace_root().join("guest-image/mkcpio.py"))
        .arg(out)
        .arg("--agent")
        .arg(init)
        .status()
        .expect("running mkcpio.py");
    assert!(status.success(), "packing {} into {}", init.display(), out.display());
}

/// A `nestbox-vmm` command (freshly built) booting the installed guest kernel with
/// `initramfs`, or the installed initramfs when `None`; stdin is null.
pub fn vmm_command(initramfs: Option<&Path>) -> Command {
    let (kernel, installed) = guest_image();
    let mut cmd = Command::new(binary("nestbox-vmm", "nestbox-vmm"));
    cmd.arg("--kernel").arg(kernel).arg("--initramfs").arg(initramfs.unwrap_or(&installed)).stdin(Stdio::null());
    cmd
}
