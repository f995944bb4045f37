//! The pod network against a namespace made the way CNI's bridge plugin leaves it (a veth
//! with `eth0` inside, an address, MTU 1400, a default route, a permanent neighbour).

use super::*;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip {args:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("ip {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn tc(ns: &str, args: &[&str]) -> String {
    let out = Command::new("tc").arg("-n").arg(ns).args(args).output().expect("tc");
    assert!(out.status.success(), "tc {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace deleted (with its veth pair) when dropped.
pub(crate) struct TestNetns {
    pub(crate) name: String,
    peer: String,
}

impl TestNetns {
    /// An empty namespace (loopback only, down).
    pub(crate) fn empty(tag: &str) -> TestNetns {
        let pid = std::process::id() % 100_000;
        let netns = TestNetns { name: format!("nestbox-test-{tag}-{pid}"), peer: format!("nbp{tag}{pid}") };
        let _ = ip(&["netns", "del", &netns.name]);
        ip(&["netns", "add", &netns.name]).expect("ip netns add");
        netns
    }

    /// What CNI's bridge plugin leaves: eth0 in the namespace, its peer on the host side.
    fn cni(tag: &str) -> TestNetns {
        let netns = TestNetns::empty(tag);
        let (ns, peer) = (netns.name.as_str(), netns.peer.as_str());
        for args in [
            vec![
                "link", "add", peer, "mtu", "1400", "type", "veth", "peer", "name", "eth0", "mtu", "1400", "netns", ns,
            ],
            vec!["link", "set", peer, "up"],
            vec!["-n", ns, "link", "set", "lo", "up"],
            vec!["-n", ns, "link", "set", "eth0", "address", "0a:58:0a:63:00:05", "up"],
            vec!["-n", ns, "addr", "add", "10.99.0.5/24", "dev", "eth0"],
            vec!["-n", ns, "addr", "add", "fd00:99::5/64", "dev", "eth0", "nodad"],
            vec!["-n", ns, "route", "add", "default", "via", "10.99.0.1", "dev", "eth0"],
            vec!["-n", ns, "route", "add", "10.100.0.0/16", "dev", "eth0", "scope", "link"],
            vec![
                "-n",
                ns,
                "neigh",
                "add",
                "10.99.0.1",
                "lladdr",
                "0a:58:0a:63:00:01",
                "dev",
                "eth0",
                "nud",
                "permanent",
            ],
        ] {
            ip(&args).expect("playing CNI");
        }
        netns
    }

    pub(crate) fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    fn has_tap(&self) -> bool {
        ip(&["-n", &self.name, "link", "show", TAP_NAME]).is_ok()
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.peer]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

use std::path::PathBuf;

/// An AF_PACKET socket on a host-side interface: sees every frame on it, sends raw frames.
struct PacketSocket(OwnedFd);

impl PacketSocket {
    fn bind(name: &str) -> PacketSocket {
        let protocol = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: socket(2) with constant arguments; the descriptor is owned at once.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(protocol)) };
        assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
        // SAFETY: fd was just returned by socket(2) and is not owned elsewhere.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let c_name = std::ffi::CString::new(name).expect("name");
        // SAFETY: if_nametoindex reads the NUL-terminated name we own.
        let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
        assert!(index > 0, "no interface {name}");
        // SAFETY: sockaddr_ll is plain data; bind reads the one we own.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = protocol;
        addr.sll_ifindex = index as i32;
        let len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: as above.
        let rc = unsafe { libc::bind(fd.as_raw_fd(), (&addr as *const libc::sockaddr_ll).cast(), len) };
        assert_eq!(rc, 0, "bind to {name}: {}", std::io::Error::last_os_error());
        PacketSocket(fd)
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: send(2) reads frame, which we own, on our socket.
        let n = unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(n, frame.len() as isize, "send: {}", std::io::Error::last_os_error());
    }
}

/// Reads frames from `fd` until one holds `marker` (true) or 5 s passed (false).
fn wait_for(fd: i32, marker: &[u8]) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = vec![0u8; 65536];
    while Instant::now() < deadline {
        let mut poll = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: poll(2) on one pollfd we own, bounded to 200 ms.
        if unsafe { libc::poll(&mut poll, 1, 200) } <= 0 {
            continue;
        }
        // SAFETY: read(2) into buf, which we own, at most its length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 && buf[..n as usize].windows(marker.len()).any(|w| w == marker) {
            return true;
        }
    }
    false
}

/// An Ethernet broadcast frame of an experimental EtherType carrying `marker`.
fn frame(marker: &[u8]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0xaa, 0x88, 0xb5]);
    f.extend_from_slice(marker);
    f.resize(64, 0);
    f
}

#[test]
fn setup_reads_cnis_network_and_redirects_both_ways_and_teardown_leaves_nothing() {
    let netns = TestNetns::cni("a");
    let mut network = PodNetwork::setup(&netns.path()).expect("setup");
    let c = network.config().clone();
    assert_eq!((c.interface.name.as_str(), c.interface.hw_addr.as_str()), ("eth0", "0a:58:0a:63:00:05"));
    assert_eq!(c.interface.mtu, 1400);
    assert_eq!(c.interface.device, "", "the guest's virtio-net interface");
    let addresses: Vec<(String, u32)> =
        c.interface.addresses.iter().map(|a| (a.address.clone(), a.prefix_len)).collect();
    assert_eq!(addresses, [("10.99.0.5".to_string(), 24), ("fd00:99::5".to_string(), 64)], "no link-local");
    let routes: Vec<(&str, &str, &str)> =
        c.routes.iter().map(|r| (r.dest.as_str(), r.gateway.as_str(), r.device.as_str())).collect();
    assert_eq!(
        routes,
        [("10.100.0.0/16", "", "eth0"), ("", "10.99.0.1", "eth0")],
        "link routes before gateway routes; kernel prefix routes left out"
    );
    assert_eq!(c.routes[0].scope, 253, "RT_SCOPE_LINK");
    assert_eq!(c.neighbors.len(), 1, "{:?}", c.neighbors);
    let n = &c.neighbors[0];
    assert_eq!(
        (n.to_ip.address.as_str(), n.lladdr.as_str(), n.device.as_str()),
        ("10.99.0.1", "0a:58:0a:63:00:01", "eth0")
    );
    assert_eq!(n.state, 0x80, "NUD_PERMANENT");

    let tap = ip(&["-n", &netns.name, "link", "show", TAP_NAME]).expect("the tap exists");
    assert!(tap.contains("mtu 1400") && tap.contains(",UP"), "{tap}");
    let veth_filter = tc(&netns.name, &["filter", "show", "dev", "eth0", "ingress"]);
    assert!(
        veth_filter.contains("mirred") && veth_filter.contains(&format!("Redirect to device {TAP_NAME}")),
        "{veth_filter}"
    );
    let tap_filter = tc(&netns.name, &["filter", "show", "dev", TAP_NAME, "ingress"]);
    assert!(tap_filter.contains("Redirect to device eth0") && tap_filter.contains("protocol all"), "{tap_filter}");

    // The VM's side: frames through the tap with the 12-byte virtio-net header the VMM sets.
    let tap_fd = network.tap_fd().expect("tap fd");
    let size: libc::c_int = 12;
    // SAFETY: TUNSETVNETHDRSZ reads the int we own.
    assert_eq!(unsafe { libc::ioctl(tap_fd, libc::TUNSETVNETHDRSZ, &size) }, 0);
    let peer = PacketSocket::bind(&netns.peer);
    let mut out = vec![0u8; 12];
    out.extend(frame(b"nestbox-tap-to-veth"));
    // SAFETY: tap_fd is the open tap, valid while `network` lives; ManuallyDrop keeps it open.
    let mut tap_file = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(tap_fd) });
    tap_file.write_all(&out).expect("write to the tap");
    assert!(wait_for(peer.0.as_raw_fd(), b"nestbox-tap-to-veth"), "a frame from the tap reaches the veth's peer");
    peer.send(&frame(b"nestbox-veth-to-tap"));
    assert!(wait_for(tap_fd, b"nestbox-veth-to-tap"), "a frame into the veth's peer reaches the tap");

    network.teardown().expect("teardown");
    assert!(!netns.has_tap(), "the tap goes with its descriptor");
    let qdiscs = tc(&netns.name, &["qdisc", "show", "dev", "eth0"]);
    assert!(!qdiscs.contains("ingress"), "{qdiscs}");
    network.teardown().expect("a second teardown does nothing");
}

/// A killed shim's record: the tap a surviving VMM kept and the veth's qdisc are removed.
#[test]
fn a_stale_record_removes_what_a_killed_shim_left() {
    let netns = TestNetns::cni("d");
    let mut network = PodNetwork::setup(&netns.path()).expect("setup");
    let record = network.record();
    assert_eq!(record, format!("{}\teth0\t{}\n", netns.path().display(), network.veth.index));
    // What the kill leaves: the qdisc and filters, and the tap while a copy of its descriptor
    // lives (here: the one taken out of `network`, which then has nothing to tear down).
    let tap = network.tap.take().expect("tap");
    remove_stale(&record).expect("removed");
    assert!(!netns.has_tap());
    assert!(!tc(&netns.name, &["qdisc", "show", "dev", "eth0"]).contains("ingress"));
    drop(tap);
    assert!(remove_stale("garbage").expect_err("unreadable").to_string().contains("garbage"));
    let gone = record.replace(&netns.name, "nestbox-test-gone");
    remove_stale(&gone).expect("a namespace that is gone leaves nothing to do");
}

#[test]
fn teardown_after_the_veth_went_only_closes_the_tap() {
    let netns = TestNetns::cni("b");
    let network = PodNetwork::setup(&netns.path()).expect("setup");
    // CNI's DEL deletes the veth pair; containerd may do that before the shim is done.
    ip(&["link", "del", &netns.peer]).expect("delete the veth");
    drop(network);
    assert!(!netns.has_tap());
}

#[test]
fn bad_namespaces_are_named_and_nothing_is_made() {
    let err = |path: &Path| PodNetwork::setup(path).err().expect("refused").to_string();
    let missing = Path::new("/var/run/netns/nestbox-test-does-not-exist");
    let e = err(missing);
    assert!(e.contains(&missing.display().to_string()) && e.contains("does not exist"), "{e}");
    assert!(err(Path::new("netns/x")).contains("not an absolute path"));
    assert!(err(Path::new("/var/run/netns/../netns/x")).contains("not an absolute path"));

    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("regular");
    std::fs::write(&file, "").expect("write");
    let e = err(&file);
    assert!(e.contains("regular") && e.contains("not a namespace file"), "{e}");

    let netns = TestNetns::empty("c");
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(netns.path(), &link).expect("symlink");
    assert!(err(&link).contains("symbolic link"), "a link is not followed");
    let e = err(&netns.path());
    assert!(e.contains(&netns.name) && e.contains("no interface besides loopback"), "{e}");
    assert!(!netns.has_tap(), "nothing made");

    // The shim's own namespace, bind-mounted the way `ip netns` mounts one.
    let own = dir.path().join("own");
    std::fs::write(&own, "").expect("write");
    nix::mount::mount(Some("/proc/thread-self/ns/net"), &own, None::<&str>, nix::mount::MsFlags::MS_BIND, None::<&str>)
        .expect("bind the shim's namespace");
    let e = err(&own);
    nix::mount::umount(&own).expect("umount");
    assert!(e.contains("the shim's own"), "{e}");
}
