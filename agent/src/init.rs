//! The guest's init duties: file systems, console, readiness, reaping (the main thread is
//! the reaper, see `reaper`), and serving the agent API and the I/O port.

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

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV).union(MsFlags::MS_NOEXEC);

/// (source, target, fstype, flags, data, required) of the guest's mounts: /dev/pts for
/// containers' terminals, cgroup2 (every controller, see `cgroup`) for their limits. Those
/// two are not required: without them the API still serves and container calls say why.
type BaseMount = (&'static str, &'static str, &'static str, MsFlags, Option<&'static str>, bool);
const BASE_MOUNTS: [BaseMount; 5] = [
    ("proc", "/proc", "proc", NOSUID_NODEV_NOEXEC, None, true),
    ("sysfs", "/sys", "sysfs", NOSUID_NODEV_NOEXEC, None, true),
    ("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID, None, true),
    (
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        Some("mode=620,ptmxmode=666"),
        false,
    ),
    ("cgroup2", "/sys/fs/cgroup", "cgroup2", NOSUID_NODEV_NOEXEC, None, false),
];

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

pub fn run() -> ! {
    // Before any thread exists: threads inherit the signal mask, so with SIGCHLD blocked
    // everywhere it stays pending for the reaper's sigwait. Unblocked on some server
    // thread, it would be delivered there and discarded (default action), and orphans
    // would wait for the next SIGCHLD to be reaped.
    block_sigchld();
    if let Err(e) = bring_up() {
        // Without its file systems the agent cannot serve; say why and end the VM so the
        // host sees it stop instead of waiting for an agent that never comes.
        eprintln!("nestbox-agent: fatal: {e:#}");
        reboot();
    }
    println!("nestbox-agent {}: ready, guest kernel {}", crate::rpc::VERSION, crate::rpc::kernel_release());

    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if cmdline.split_whitespace().any(|p| p == SELFTEST_PARAM) {
        println!("nestbox-agent: {SELFTEST_PARAM}: boot self-test passed, rebooting");
        reboot();
    }
    let reaper = crate::reaper::Reaper::new();
    if let Err(e) = serve(&cmdline, reaper.clone()) {
        // An agent that cannot serve its API leaves the host waiting for nothing: end
        // the VM so the host sees it stop, as for a failed bring-up.
        eprintln!("nestbox-agent: fatal: {e:#}");
        reboot();
    }
    reaper.run()
}

/// Starts the agent API on vsock (and the vsock test services when asked for) on their
/// own threads; a Shutdown call ends the VM from the "shutdown" thread. The main thread
/// stays the reaper.
fn serve(cmdline: &str, reaper: std::sync::Arc<crate::reaper::Reaper>) -> anyhow::Result<()> {
    let io = crate::process::streams::IoHub::new();
    io.serve_vsock(nestbox_protocols::IO_PORT)
        .with_context(|| format!("listening on the I/O port (vsock {})", nestbox_protocols::IO_PORT))?;
    let cgroups = crate::cgroup::Hierarchy::guest(std::path::Path::new(CGROUP_ROOT)).map_err(|e| e.to_string());
    if let Err(e) = &cgroups {
        // The API still answers (Check, Version, Shutdown); container creation reports this.
        eprintln!("nestbox-agent: cgroups unavailable, containers cannot be created: {e}");
    }
    let env = crate::container::Env {
        reaper,
        io,
        exe: crate::container::spawn::own_executable().context("opening the agent's own executable")?,
        cgroups,
        oom: Default::default(),
        share: None,
        glibc_avx_off: crate::container::avx_quirk::ymm_unsaved(cmdline),
    };
    let sandbox = crate::sandbox::Sandbox::new(env, true);
    let forward_port = nestbox_protocols::PORT_FORWARD_PORT;
    if let Err(e) = crate::port_forward::serve_vsock(forward_port, crate::port_forward::of_sandbox(sandbox.clone())) {
        // Pods work without it; only CRI PortForward into them fails.
        eprintln!("nestbox-agent: port forwarding unavailable (vsock {forward_port}): {e}");
    }
    let address = format!("vsock://-1:{}", nestbox_protocols::AGENT_PORT);
    let serving = crate::serve::start(&address, true, sandbox)?;
    println!(
        "nestbox-agent: serving the agent API on vsock port {}, standard I/O on port {}",
        nestbox_protocols::AGENT_PORT,
        nestbox_protocols::IO_PORT
    );
    if cmdline.split_whitespace().any(|p| p == nestbox_protocols::vsock_test::PARAM) {
        // The API works without them: report and go on.
        if let Err(e) = crate::vsock_test::start() {
            eprintln!("nestbox-agent: {}: test services not started: {e}", nestbox_protocols::vsock_test::PARAM);
        }
    }
    std::thread::Builder::new()
        .name("shutdown".into())
        .spawn(move || {
            serving.wait_for_shutdown_to_reboot();
            println!("nestbox-agent: shutdown: rebooting the VM");
            let err = restart_vm();
            // The main thread keeps reaping; nothing else to do here.
            eprintln!("nestbox-agent: reboot failed: {err}");
        })
        .context("starting the shutdown thread")?;
    Ok(())
}

/// Where / is bound before it is moved over itself (see `leave_rootfs`); removed after.
const NEW_ROOT: &str = "/.nestbox-root";

/// Leaves the initramfs's rootfs for a bind mount of it, as switch_root does (bind on a
/// directory, move over /, chroot into it). The kernel refuses pivot_root where the
/// caller's root is a mount without a parent, which rootfs is; containers' roots must be
/// entered with pivot_root (a chroot keeps the old root reachable to a process with
/// CAP_SYS_CHROOT), and in the mount namespace the helper copies from this one the root is
/// now the bind mount, whose parent is rootfs. The files are the same, nothing is copied:
/// six system calls. First of all, before anything is mounted below /, so a non-recursive
/// bind takes all there is. (Binding / on / itself would not do: a path walk never
/// crosses a mount stacked on the caller's own root, so it could not be entered.)
fn leave_rootfs() -> anyhow::Result<()> {
    let new_root = std::path::Path::new(NEW_ROOT);
    match std::fs::create_dir(new_root) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            return Err(e).with_context(|| format!("creating {NEW_ROOT}"))
        }
        _ => {}
    }
    mount(Some("/"), new_root, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .with_context(|| format!("bind-mounting / on {NEW_ROOT}"))?;
    nix::unistd::chdir(new_root).with_context(|| format!("chdir {NEW_ROOT}"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>).context("moving the bind of / over /")?;
    nix::unistd::chroot(".").context("chroot into the bind of /")?;
    // The bind shows rootfs's files, this empty directory among them; nothing is on it now.
    std::fs::remove_dir(new_root).with_context(|| format!("removing {NEW_ROOT}"))
}

fn bring_up() -> anyhow::Result<()> {
    // Containers cannot be created without it (pivot_root fails with a named error), but
    // the API still serves and says so.
    if let Err(e) = leave_rootfs() {
        eprintln!("nestbox-agent: still on the initramfs's rootfs, containers' pivot_root will fail: {e:#}");
    }
    for (source, target, fstype, flags, data, required) in BASE_MOUNTS {
        let result = std::fs::create_dir_all(target).with_context(|| format!("creating {target}")).and_then(|()| {
            match mount(Some(source), target, Some(fstype), flags, data) {
                Ok(()) | Err(Errno::EBUSY) => Ok(()),
                Err(e) => Err(e).with_context(|| format!("mounting {fstype} on {target}")),
            }
        });
        match result {
            Err(e) if required => return Err(e),
            Err(e) => eprintln!("nestbox-agent: {e:#}"),
            Ok(()) => {}
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
    let err = restart_vm();
    eprintln!("nestbox-agent: reboot failed: {err}");
    reap_forever()
}

/// Syncs and reboots; returns only if the reboot failed, with the reason.
fn restart_vm() -> nix::Error {
    nix::unistd::sync();
    match nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT) {
        Err(e) => e,
        // reboot(2) does not return on success; nix's signature still has an Ok type.
        Ok(never) => match never {},
    }
}

fn block_sigchld() {
    let mut sigchld = SigSet::empty();
    sigchld.add(Signal::SIGCHLD);
    if let Err(e) = sigchld.thread_block() {
        eprintln!("nestbox-agent: blocking SIGCHLD: {e}");
    }
}

/// PID 1 inherits every orphan: wait for SIGCHLD and reap all that have exited.
fn reap_forever() -> ! {
    let mut sigchld = SigSet::empty();
    sigchld.add(Signal::SIGCHLD);
    // Blocked, so a SIGCHLD between two waits stays pending instead of being lost (run()
    // blocked it already; reboot() may get here first).
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
