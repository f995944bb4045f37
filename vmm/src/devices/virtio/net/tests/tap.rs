//! The real backend: a tap made by the test in a network namespace of its own, checked
//! the way `--net-tap-fd` is, and frames through it both ways seen by a packet socket on
//! the tap's interface.

use super::*;
use crate::devices::virtio::net::tap::{tun_offload_flags, Tap, TapError};
use crate::devices::virtio::net::{F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6, F_HOST_TSO4};
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

/// An ethertype for local experiments: no stack in the namespace answers it.
const ETHERTYPE: u16 = 0x88b5;
const TAP_NAME: &str = "nbxtap0";

/// A network namespace for one test, deleted when dropped (the tap goes with it once
/// its descriptors are closed).
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("nbx-net-{}-{tag}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let ok = Command::new("ip").args(["netns", "add", &name]).status().unwrap().success();
        assert!(ok, "ip netns add {name}");
        let ns = Netns(name);
        // No IPv6 autoconfiguration traffic on the tap: the test sees only its frames.
        ns.exec(&["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1", "net.ipv6.conf.all.disable_ipv6=1"]);
        ns
    }

    fn exec(&self, args: &[&str]) {
        let ok = Command::new("ip").args(["netns", "exec", &self.0]).args(args).status().unwrap().success();
        assert!(ok, "in {}: {args:?}", self.0);
    }

    /// Runs `f` on a thread that entered the namespace: descriptors it opens (a tap, a
    /// packet socket) belong to the namespace.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap();
            // SAFETY: setns on this thread only, with a namespace descriptor we opened.
            assert_eq!(unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) }, 0);
            f()
        })
        .join()
        .unwrap()
    }
}

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

/// Opens /dev/net/tun and creates tap `name` with `flags`, as the shim does.
fn open_tap(name: &str, flags: libc::c_int) -> OwnedFd {
    let fd = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun").unwrap();
    let mut ifr = IfReq { name: [0; 16], flags: flags as libc::c_short, _pad: [0; 22] };
    ifr.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes one ifreq in `ifr`.
    let rc = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&fd), libc::TUNSETIFF, &mut ifr) };
    assert_eq!(rc, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
    fd.into()
}

/// A raw packet socket on interface `name` (in the calling thread's namespace).
fn packet_socket(name: &str) -> OwnedFd {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket creation; the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_NONBLOCK, i32::from(proto)) };
    assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let cname = std::ffi::CString::new(name).unwrap();
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    assert_ne!(index, 0);
    // SAFETY: sockaddr_ll is plain data; zero is a valid start.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = index as i32;
    let len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
    // SAFETY: `addr` is a sockaddr_ll of `len` bytes.
    let rc =
        unsafe { libc::bind(std::os::fd::AsRawFd::as_raw_fd(&fd), (&addr as *const libc::sockaddr_ll).cast(), len) };
    assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
    fd
}

fn eth_frame(payload_len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend(frame(payload_len, seed));
    f
}

/// Frames of our ethertype the packet socket sees within 10 s.
fn wait_packet(sock: &OwnedFd) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = vec![0u8; 70000];
    loop {
        // SAFETY: recv writes at most `buf.len()` bytes into `buf`.
        let n = unsafe { libc::recv(std::os::fd::AsRawFd::as_raw_fd(sock), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n >= 14 && buf[12..14] == ETHERTYPE.to_be_bytes() {
            return buf[..n as usize].to_vec();
        }
        assert!(Instant::now() < deadline, "no frame of ours on the tap");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn inherited_fd_is_checked() {
    let ns = Netns::new("check");
    let (good, plain) = ns.run(|| {
        let good = open_tap(TAP_NAME, libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR);
        let plain = open_tap("nbxtap1", libc::IFF_TAP | libc::IFF_NO_PI);
        (good.into_raw_fd(), plain.into_raw_fd())
    });
    let tap = Tap::from_inherited_fd(good).unwrap();
    assert_eq!(tap.name(), TAP_NAME);
    // SAFETY: F_GETFL on a descriptor the Tap owns.
    assert_ne!(unsafe { libc::fcntl(good, libc::F_GETFL) } & libc::O_NONBLOCK, 0, "made non-blocking");
    let mut size: libc::c_int = 0;
    // SAFETY: TUNGETVNETHDRSZ writes one int.
    assert_eq!(unsafe { libc::ioctl(good, libc::TUNGETVNETHDRSZ, &mut size) }, 0);
    assert_eq!(size, 12);
    assert!(tap.set_guest_features(F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6).is_ok());

    let err = Tap::from_inherited_fd(plain).err().unwrap();
    assert!(matches!(err, TapError::Flags { fd, .. } if fd == plain), "{err}");
    assert!(err.to_string().contains(&format!("--net-tap-fd {plain}")), "{err}");
    // SAFETY: `plain` was left open by the failed check and is ours to close.
    drop(unsafe { OwnedFd::from_raw_fd(plain) });
    let pipe = std::fs::File::open("/proc/self/status").unwrap();
    let err = Tap::from_inherited_fd(std::os::fd::AsRawFd::as_raw_fd(&pipe)).err().unwrap();
    assert!(matches!(err, TapError::NotATun { .. }), "{err}");
    assert!(matches!(Tap::from_inherited_fd(9999), Err(TapError::NotOpen { fd: 9999 })));
    assert!(matches!(Tap::from_inherited_fd(-1), Err(TapError::NotOpen { fd: -1 })));
}

#[test]
fn offloads_follow_what_the_guest_accepted() {
    assert_eq!(tun_offload_flags(0), 0);
    assert_eq!(tun_offload_flags(F_GUEST_TSO4 | F_HOST_TSO4), 0, "TSO without checksum offload is not asked for");
    assert_eq!(tun_offload_flags(F_GUEST_CSUM), libc::TUN_F_CSUM);
    assert_eq!(
        tun_offload_flags(F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6),
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
    );
}

#[test]
fn frames_cross_a_real_tap_both_ways() {
    let ns = Netns::new("frames");
    let tap_fd = ns.run(|| open_tap(TAP_NAME, libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR));
    ns.exec(&["ip", "link", "set", TAP_NAME, "up"]);
    let sock = ns.run(|| packet_socket(TAP_NAME));
    let tap = Arc::new(Tap::from_inherited_fd(tap_fd.into_raw_fd()).unwrap());
    tap.set_guest_features(F_GUEST_CSUM).unwrap();

    let mut g = Guest::new();
    let (mut worker, _stop) = g.worker(Some(tap));
    // TX: a plain frame (header all zero) from the guest comes out of the tap.
    let out = eth_frame(200, 5);
    g.write(DATA, &[0u8; 12]);
    g.write(DATA + 0x1000, &out);
    g.tx.add(&g.mem, &[(DATA, 12, false), (DATA + 0x1000, out.len() as u32, false)]);
    worker.process_tx();
    assert_eq!(g.count(|m| &m.tx_frames), 1, "backend errors: {}", g.count(|m| &m.tx_backend_errors));
    assert_eq!(wait_packet(&sock), out);

    // RX: a frame sent on the interface reaches the guest behind a vnet header.
    let inbound = eth_frame(300, 6);
    // SAFETY: send reads `inbound.len()` bytes from `inbound`.
    let sent = unsafe { libc::send(std::os::fd::AsRawFd::as_raw_fd(&sock), inbound.as_ptr().cast(), inbound.len(), 0) };
    assert_eq!(sent as usize, inbound.len(), "{}", std::io::Error::last_os_error());
    let head = g.rx.add(&g.mem, &[(DATA + 0x4000, 12, true), (DATA + 0x5000, 4096, true)]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let used = loop {
        worker.process_rx();
        let used = g.rx.take_used(&g.mem);
        if !used.is_empty() {
            break used;
        }
        assert!(Instant::now() < deadline, "no frame from the tap");
        std::thread::sleep(Duration::from_millis(2));
    };
    assert_eq!(used, vec![(head, (12 + inbound.len()) as u32)]);
    assert_eq!(&g.read(DATA + 0x4000, 12)[10..], &[1, 0], "num_buffers 1");
    assert_eq!(g.read(DATA + 0x5000, inbound.len()), inbound);
}
