//! The guest's init duties: file systems, console, readiness, reaping.

use anyhow::Context;
use nix::errno::Errno;
use nix::mount::{mount, MsFlags};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

/// The kernel parameter that turns a boot into a self-test: ready, then reboot.
pub const SELFTEST_PARAM: &str = "nestbox.selftest";

/// (source, target, fstype, flags) of the mounts every guest needs.
const BASE_MOUNTS: [(&str, &str, &str, MsFlags); 3] = [
    ("proc", "/proc", "proc", MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV).union(MsFlags::MS_NOEXEC)),
    ("sysfs", "/sys", "sysfs", MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV).union(MsFlags::MS_NOEXEC)),
    ("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID),
];

pub fn run() -> ! {
    if let Err(e) = bring_up() {
        // Without its file systems the agent cannot serve; say why and end the VM so the
        // host sees it stop instead of waiting for an agent that never comes.
        eprintln!("nestbox-agent: fatal: {e:#}");
        reboot();
    }
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|e| format!("unknown ({e})"));
    println!("nestbox-agent {}: ready, guest kernel {release}", crate::VERSION);

    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if cmdline.split_whitespace().any(|p| p == SELFTEST_PARAM) {
        println!("nestbox-agent: {SELFTEST_PARAM}: boot self-test passed, rebooting");
        reboot();
    }
    reap_forever()
}

fn bring_up() -> anyhow::Result<()> {
    for (source, target, fstype, flags) in BASE_MOUNTS {
        std::fs::create_dir_all(target).with_context(|| format!("creating {target}"))?;
        match mount(Some(source), target, Some(fstype), flags, None::<&str>) {
            Ok(()) | Err(Errno::EBUSY) => {}
            Err(e) => return Err(e).with_context(|| format!("mounting {fstype} on {target}")),
        }
    }
    // The kernel gives init /dev/console only if the initramfs has the node; with
    // devtmpfs mounted it exists now, so make sure stdio is the console either way.
    let console = OpenOptions::new().read(true).write(true).open("/dev/console").context("opening /dev/console")?;
    for fd in 0..3 {
        nix::unistd::dup2(console.as_raw_fd(), fd).context("attaching stdio to /dev/console")?;
    }
    Ok(())
}

/// Restarts the VM: with `reboot=k` the kernel pulses the i8042 reset line, which
/// nestbox-vmm turns into a clean exit. (A power-off only halts the vCPUs.)
pub fn reboot() -> ! {
    nix::unistd::sync();
    let err = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT).unwrap_err();
    eprintln!("nestbox-agent: reboot failed: {err}");
    reap_forever()
}

/// PID 1 inherits every orphan: wait for SIGCHLD and reap all that have exited.
fn reap_forever() -> ! {
    let mut sigchld = SigSet::empty();
    sigchld.add(Signal::SIGCHLD);
    // Blocked, so a SIGCHLD between two waits stays pending instead of being lost.
    let _ = sigchld.thread_block();
    loop {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(_) => break,
            }
        }
        let _ = sigchld.wait();
    }
}
