//! Snapshot and restore of a real guest: boot once, wait for the agent, snapshot through
//! the control API, then start two new VMMs from that snapshot at once, each with its own
//! vsock socket, and talk to the agent in both. The booted guest has a detached
//! virtio-net device, as a warm-start template does; one restored VM attaches a tap (made
//! here in a network namespace of the test's own) to it, the other stays detached. Bad
//! snapshots are refused with a clear error before any guest runs.

use nestbox_protocols::agent::check_response::ServingStatus;
use nestbox_protocols::agent::{CheckRequest, ShutdownRequest, VersionRequest};
use nestbox_protocols::{hybrid, ttrpc};
use nestbox_tests::{binary, vmm_command, GUEST_DEADLINE};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

const MAC: &str = "02:6e:62:00:00:01";

/// A network namespace holding the tap a restored VM is given, deleted when dropped.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// A tap opened the way the shim opens one, in a namespace of its own.
fn tap_in_netns() -> (Netns, OwnedFd) {
    let ns = Netns(format!("nbx-snap-{}", std::process::id()));
    let _ = Command::new("ip").args(["netns", "del", &ns.0]).output();
    assert!(Command::new("ip").args(["netns", "add", &ns.0]).status().unwrap().success());
    let path = format!("/run/netns/{}", ns.0);
    let tap = std::thread::spawn(move || {
        let netns = std::fs::File::open(path).unwrap();
        // SAFETY: setns affects only this thread, with a namespace descriptor it opened.
        assert_eq!(unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        let tun = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun").unwrap();
        let flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        let mut ifr = IfReq { name: [0; 16], flags: flags as libc::c_short, _pad: [0; 22] };
        ifr.name[..6].copy_from_slice(b"nbxtap");
        // SAFETY: TUNSETIFF reads and writes the one ifreq in `ifr`.
        assert_eq!(unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut ifr) }, 0);
        OwnedFd::from(tun)
    })
    .join()
    .unwrap();
    (ns, tap)
}

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Vm(Child);

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Vm {
    fn wait_exit(&mut self, deadline: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(start.elapsed() < deadline, "VMM still running after {deadline:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn api(socket: &Path, request: &str) -> String {
    let mut stream = UnixStream::connect(socket).expect("connecting to the API socket");
    stream.write_all(format!("{request}\n").as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    line.trim().to_string()
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(60_000_000_000)
}

/// Restores `snapshot` as VM `name`, its net device attached to `tap` if given.
fn restore(dir: &Path, snapshot: &Path, name: &str, tap: Option<RawFd>) -> (Vm, PathBuf, Instant) {
    let vsock = dir.join(format!("{name}.vsock"));
    let started = Instant::now();
    let mut cmd = Command::new(binary("nestbox-vmm", "nestbox-vmm"));
    if let Some(fd) = tap {
        cmd.arg("--net-tap-fd").arg(fd.to_string()).arg("--api-socket").arg(dir.join(format!("{name}.api")));
        // SAFETY: only fcntl, async-signal-safe, runs between fork and exec: the tap
        // (opened close-on-exec, like every descriptor here) is inherited by this child.
        unsafe {
            cmd.pre_exec(move || match libc::fcntl(fd, libc::F_SETFD, 0) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            });
        }
    }
    let child = cmd
        .arg("--restore")
        .arg(snapshot)
        .arg("--vsock-socket")
        .arg(&vsock)
        .arg("--console")
        .arg(dir.join(format!("{name}.console")))
        .spawn()
        .expect("spawning the restored VMM");
    (Vm(child), vsock, started)
}

#[test]
fn snapshot_a_booted_guest_and_restore_it_twice() {
    let dir = Dir(std::env::temp_dir().join(format!("nestbox-test-snapshot-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).unwrap();
    let (vsock, api_sock, snapshot) = (dir.0.join("boot.vsock"), dir.0.join("api.sock"), dir.0.join("template"));

    // One vCPU: on this software-nested host, a loaded machine has been seen to lose an
    // IPI between two vCPUs of a booting guest (docs/guest-kernel.md).
    let mut booted = Vm(vmm_command(None)
        .args(["--vcpus", "1", "--memory-mib", "256", "--net-mac", MAC])
        .arg("--vsock-socket")
        .arg(&vsock)
        .arg("--api-socket")
        .arg(&api_sock)
        .arg("--console")
        .arg(dir.0.join("boot.console"))
        .spawn()
        .expect("spawning nestbox-vmm"));
    let agent = hybrid::connect_agent(&vsock, Instant::now() + GUEST_DEADLINE).expect("agent after boot");
    let uptime_at_snapshot = agent.version(ctx(), &VersionRequest::new()).expect("Version");
    drop(agent);

    // Requests the API does not know are refused; pause and resume round-trip.
    assert!(api(&api_sock, "reboot").starts_with("ERROR unknown request"));
    // The guest's virtio_net driver took the device: it accepted features (VERSION_1,
    // bit 32, at least) and started it.
    let metrics = api(&api_sock, "metrics");
    assert!(metrics.starts_with(&format!("OK net_mac={MAC} net_acked_features=0x")), "{metrics}");
    let acked = metrics.split_whitespace().find_map(|w| w.strip_prefix("net_acked_features=0x")).unwrap();
    assert_ne!(u64::from_str_radix(acked, 16).unwrap() & (1 << 32), 0, "{metrics}");
    assert_eq!(api(&api_sock, "pause"), "OK");
    assert_eq!(api(&api_sock, "resume"), "OK");
    let t = Instant::now();
    assert_eq!(api(&api_sock, &format!("snapshot {}", snapshot.display())), "OK");
    eprintln!("snapshot written in {:?}", t.elapsed());
    assert!(booted.wait_exit(Duration::from_secs(60)).success(), "the VMM ends after a snapshot");
    assert!(!api_sock.exists() && !vsock.exists(), "sockets removed");
    let memory = std::fs::metadata(snapshot.join("memory")).unwrap();
    assert_eq!(memory.len(), 256 << 20);

    // Two sandboxes from the one snapshot, at the same time: a with a tap, b detached.
    let (_netns, tap) = tap_in_netns();
    let (mut a, vsock_a, started_a) = restore(&dir.0, &snapshot, "a", Some(tap.as_raw_fd()));
    let (mut b, vsock_b, started_b) = restore(&dir.0, &snapshot, "b", None);
    for (vsock, started, name) in [(&vsock_a, started_a, "a"), (&vsock_b, started_b, "b")] {
        let agent = hybrid::connect_agent(vsock, Instant::now() + Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("restored guest {name}: {e}"));
        let check = agent.check(ctx(), &CheckRequest::new()).expect("Check on a restored guest");
        assert_eq!(check.status.enum_value(), Ok(ServingStatus::SERVING));
        eprintln!("restored guest {name} answered Check {:?} after its VMM started", started.elapsed());
        let version = agent.version(ctx(), &VersionRequest::new()).expect("Version");
        assert_eq!(version.kernel_release, uptime_at_snapshot.kernel_release);
        if name == "a" {
            let metrics = api(&dir.0.join("a.api"), "metrics");
            assert!(metrics.contains("net_tx_backend_errors=0"), "tap attached on restore: {metrics}");
        }
        agent.shutdown(ctx(), &ShutdownRequest::new()).expect("Shutdown");
    }
    assert!(a.wait_exit(Duration::from_secs(120)).success());
    assert!(b.wait_exit(Duration::from_secs(120)).success());
    assert!(!vsock_a.exists() && !vsock_b.exists());

    // Bad snapshots: clear errors, exit 1, no guest.
    let vmm = binary("nestbox-vmm", "nestbox-vmm");
    let refuse = |args: &[&std::ffi::OsStr], needle: &str| {
        let out = Command::new(&vmm).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
    };
    let snap = snapshot.as_os_str();
    refuse(&["--restore".as_ref(), snap, "--vcpus".as_ref(), "2".as_ref()], "it has 1 vCPUs, the configuration 2");
    // Restored without the vsock device it was taken with (the net device comes with it).
    refuse(&["--restore".as_ref(), snap], "it has 2 virtio devices, the configuration 1");
    // The MAC is the snapshot's, and a tap needs a descriptor that is one.
    refuse(&["--restore".as_ref(), snap, "--net-mac".as_ref(), "02:00:00:00:00:09".as_ref()], &format!("MAC {MAC}"));
    refuse(
        &["--restore".as_ref(), snap, "--net-tap-fd".as_ref(), "0".as_ref()],
        "--net-tap-fd 0: not an attached tun/tap",
    );
    let state = std::fs::read(snapshot.join("state")).unwrap();
    std::fs::write(snapshot.join("state"), &state[..state.len() / 2]).unwrap();
    refuse(&["--restore".as_ref(), snap], "truncated");
    let mut corrupt = state.clone();
    let middle = corrupt.len() / 2;
    corrupt[middle] ^= 0xff;
    std::fs::write(snapshot.join("state"), &corrupt).unwrap();
    refuse(&["--restore".as_ref(), snap], "checksum mismatch");
    std::fs::write(snapshot.join("state"), b"not a snapshot at all").unwrap();
    refuse(&["--restore".as_ref(), snap], "not a nestbox snapshot");
    std::fs::write(snapshot.join("state"), &state).unwrap();
    std::fs::OpenOptions::new().write(true).open(snapshot.join("memory")).unwrap().set_len(1 << 20).unwrap();
    refuse(&["--restore".as_ref(), snap, "--vsock-socket".as_ref(), dir.0.join("x.vsock").as_os_str()], "truncated?");
}
