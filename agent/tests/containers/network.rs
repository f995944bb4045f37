//! The pod's network (UpdateInterface, UpdateRoutes, AddArpNeighbors) in host mode, as it
//! is in a guest: the agent runs in a network namespace of the test's own (entered with
//! nsenter: the guest's root namespace) holding one end of a veth pair (the VM's virtio-net
//! interface); its peer stays there with the subnet's gateway address (the host's side).
//! UpdateInterface moves the first end into the pod's namespace, and a container of the
//! pod reaches the peer through it.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::Duration;

use nestbox_protocols::agent::*;
use nestbox_protocols::pod::namespace_path;
use nestbox_protocols::ttrpc;
use nestbox_protocols::types::{ARPNeighbor, IPAddress, IPFamily, Interface, Route, Routes, Stdio};
use serde_json::{json, Value};

use crate::harness::{ctx, expect_code, Agent};

const DEVICE: &str = "nbt-pod";
const PEER: &str = "nbt-peer";
const MAC: &str = "02:00:c6:33:64:02";
const GATEWAY: &str = "198.51.100.1";
const GATEWAY6: &str = "2001:db8:5::1";

/// A network namespace of the test's own (`ip netns add`), deleted on drop, failure or not.
struct TestNet {
    name: String,
}

impl TestNet {
    /// The namespace with the veth pair: DEVICE (for the pod) and PEER, up with the
    /// gateway's addresses.
    fn new() -> TestNet {
        let mut random = [0u8; 4];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").expect("urandom"), &mut random)
            .expect("random bytes");
        let name = format!("nbtest-{:08x}", u32::from_ne_bytes(random));
        run(&["ip", "netns", "add", &name]);
        let net = TestNet { name };
        net.ip(&["link", "add", DEVICE, "type", "veth", "peer", "name", PEER]);
        net.ip(&["addr", "add", &format!("{GATEWAY}/24"), "dev", PEER]);
        net.ip(&["addr", "add", &format!("{GATEWAY6}/64"), "dev", PEER, "nodad"]);
        net.ip(&["link", "set", PEER, "up"]);
        net.ip(&["link", "set", "lo", "up"]);
        net
    }

    fn agent(&self) -> Agent {
        // nsenter, not `ip netns exec`: that mounts a sysfs of the namespace over /sys,
        // and the agent's cgroups are below /sys/fs/cgroup.
        Agent::start_in(&["nsenter", &format!("--net=/run/netns/{}", self.name)])
    }

    fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["ip", "-n", &self.name];
        all.extend_from_slice(args);
        run(&all)
    }

    /// `ip -j addr show dev NAME` in the test's namespace (link and addresses), None when it
    /// is not there.
    fn link(&self, name: &str) -> Option<Value> {
        let out = Command::new("ip").args(["-n", &self.name, "-j", "addr", "show", "dev", name]).output().expect("ip");
        out.status.success().then(|| serde_json::from_slice::<Value>(&out.stdout).expect("ip -j")[0].clone())
    }

    /// A TCP listener on the gateway's address, made by a thread that entered the namespace.
    fn listener(&self) -> TcpListener {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("opening the test's netns");
            // SAFETY: setns on this thread only, with a descriptor we hold.
            assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns");
            TcpListener::bind((GATEWAY, 0)).expect("binding in the test's netns")
        })
        .join()
        .expect("listener thread")
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn address(addr: &str, prefix: u32) -> IPAddress {
    let family = if addr.contains(':') { IPFamily::IP_FAMILY_V6 } else { IPFamily::IP_FAMILY_V4 };
    IPAddress { family: family.into(), address: addr.into(), prefix_len: prefix, ..Default::default() }
}

fn pod_interface() -> Interface {
    Interface {
        name: "eth0".into(),
        hw_addr: MAC.into(),
        mtu: 1400,
        addresses: vec![address("198.51.100.2", 24), address("2001:db8:5::2", 64)],
        device: DEVICE.into(),
        ..Default::default()
    }
}

fn route(dest: &str, gateway: &str, scope: u32) -> Route {
    Route { dest: dest.into(), gateway: gateway.into(), device: "eth0".into(), scope, ..Default::default() }
}

fn update_interface(agent: &Agent, iface: Interface) -> ttrpc::Result<Interface> {
    let req = UpdateInterfaceRequest { interface: Some(iface).into(), ..Default::default() };
    agent.client.update_interface(ctx(), &req)
}

fn update_routes(agent: &Agent, routes: Vec<Route>) -> ttrpc::Result<Vec<Route>> {
    let req =
        UpdateRoutesRequest { routes: Some(Routes { routes, ..Default::default() }).into(), ..Default::default() };
    agent.client.update_routes(ctx(), &req).map(|r| r.routes)
}

fn add_neighbours(agent: &Agent, neighbors: Vec<ARPNeighbor>) -> ttrpc::Result<()> {
    let req = AddArpNeighborsRequest { neighbors, ..Default::default() };
    agent.client.add_arp_neighbors(ctx(), &req).map(drop)
}

fn neighbour(ip: &str, lladdr: &str) -> ARPNeighbor {
    ARPNeighbor {
        to_ip: Some(address(ip, 0)).into(),
        device: "eth0".into(),
        lladdr: lladdr.into(),
        state: 0x80,
        ..Default::default()
    }
}

fn sandbox(agent: &Agent) {
    let req = CreateSandboxRequest { sandbox_id: "pod".into(), ..Default::default() };
    agent.client.create_sandbox(ctx(), &req).expect("CreateSandbox");
}

/// A spec in the pod's network namespace.
fn pod_spec(agent: &Agent, rootfs: &std::path::Path, args: &[&str]) -> Value {
    let mut spec = agent.spec(rootfs, args);
    spec["linux"]["namespaces"] = json!([{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network", "path": namespace_path("net")}]);
    spec
}

/// A route of an answer as "dest via gateway dev device scope N" (dest "default").
fn show(r: &Route) -> String {
    let dest = if r.dest.is_empty() { "default" } else { &r.dest };
    format!("{dest} via {} dev {} scope {}", r.gateway, r.device, r.scope)
}

#[test]
fn a_pod_gets_its_interface_routes_and_neighbours_and_reaches_the_peer() {
    let net = TestNet::new();
    let agent = net.agent();
    sandbox(&agent);

    let answer = update_interface(&agent, pod_interface()).expect("UpdateInterface");
    assert_eq!((answer.name.as_str(), answer.hw_addr.as_str(), answer.mtu), ("eth0", MAC, 1400));
    let addrs: Vec<String> = answer.addresses.iter().map(|a| format!("{}/{}", a.address, a.prefix_len)).collect();
    assert_eq!(addrs, ["198.51.100.2/24", "2001:db8:5::2/64"], "{answer:?}");
    assert_eq!(answer.device, "eth0", "the answer names the interface by its name now");
    assert!(net.link(DEVICE).is_none(), "{DEVICE} left the agent's namespace for the pod's");

    // A stale route first, then the table asked for: the stale one goes, the kernel's stay.
    update_routes(&agent, vec![route("192.0.2.0/24", "", 253), route("", GATEWAY, 0)]).expect("first UpdateRoutes");
    let mut v6_default = route("", GATEWAY6, 0);
    v6_default.family = IPFamily::IP_FAMILY_V6.into();
    let wanted = vec![route("", GATEWAY, 0), route("203.0.113.0/24", "", 0), v6_default];
    let routes: Vec<String> = update_routes(&agent, wanted).expect("UpdateRoutes").iter().map(show).collect();
    for want in [
        format!("default via {GATEWAY} dev eth0 scope 0"),
        "203.0.113.0/24 via  dev eth0 scope 253".to_string(),
        "198.51.100.0/24 via  dev eth0 scope 253".to_string(),
        format!("default via {GATEWAY6} dev eth0 scope 0"),
        "2001:db8:5::/64 via  dev eth0 scope 0".to_string(),
    ] {
        assert!(routes.contains(&want), "{want:?} not in {routes:?}");
    }
    assert!(!routes.iter().any(|r| r.starts_with("192.0.2.0/24")), "the stale route stayed: {routes:?}");
    assert_eq!(routes.len(), 5, "{routes:?}");

    add_neighbours(&agent, vec![neighbour("198.51.100.9", "02:00:00:00:00:09")]).expect("AddArpNeighbors");

    let listener = net.listener();
    let port = listener.local_addr().expect("local address").port();
    let server = std::thread::spawn(move || serve_once(listener));
    let script = format!(
        "cat /sys/class/net/eth0/address /sys/class/net/eth0/mtu; ip addr show dev eth0; ip route; ip -6 route; \
         ip neigh; \
         ping -c 1 -W 10 {GATEWAY} >/dev/null && echo ping ok; ping -c 1 -W 10 {GATEWAY6} >/dev/null && echo ping6 ok; \
         echo hello | nc {GATEWAY} {port}"
    );
    let rootfs = agent.rootfs("rootfs");
    let (status, out, err) = agent.run("c", &pod_spec(&agent, &rootfs, &["sh", "-c", &script]));
    assert_eq!(status, 0, "{out}\n{err}");
    let got = server.join().expect("server thread");
    assert_eq!(got, "hello", "what the container sent over TCP");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..2], [MAC, "1400"], "{out}");
    for want in [
        "inet 198.51.100.2/24",
        &format!("default via {GATEWAY} dev eth0"),
        "203.0.113.0/24 dev eth0",
        &format!("default via {GATEWAY6} dev eth0"),
        "ping ok",
        "ping6 ok",
        "world",
    ] {
        assert!(out.contains(want), "{want:?} not in the container's view:\n{out}\n{err}");
    }
    assert!(!out.contains("192.0.2.0"), "{out}");
    let neighbour = lines.iter().find(|l| l.starts_with("198.51.100.9 dev eth0 lladdr 02:00:00:00:00:09"));
    assert!(neighbour.is_some_and(|l| l.ends_with("PERMANENT")), "the neighbour entry: {out}");
}

/// Accepts one connection (bounded: the container's nc connects within seconds or the
/// test fails), reads a line, answers "world".
fn serve_once(listener: TcpListener) -> String {
    let mut poll = libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: poll on one pollfd we own.
    let ready = unsafe { libc::poll(&mut poll, 1, 60_000) };
    assert_eq!(ready, 1, "no connection from the container within 60 s");
    let (stream, _) = listener.accept().expect("accept");
    stream.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).expect("reading the container's line");
    (&stream).write_all(b"world\n").expect("answering");
    line.trim_end().to_string()
}

/// The pod's network as a process in it sees it: interfaces, routes and neighbours.
fn pod_view(pid: u32) -> String {
    let pid = pid.to_string();
    let mut all = String::new();
    // Not what the kernel changes by itself a moment after a link comes up: IPv6
    // link-local addresses (tentative, then not) and link states.
    let views: [&[&str]; 5] = [
        &["-o", "-4", "addr"],
        &["-o", "-6", "addr", "show", "scope", "global"],
        &["route"],
        &["-6", "route"],
        &["neigh"],
    ];
    for args in views {
        let mut cmd = vec!["nsenter", "-t", &pid, "-n", "ip"];
        cmd.extend_from_slice(args);
        all += &run(&cmd);
    }
    all
}

#[test]
fn bad_interfaces_are_refused_naming_the_field_and_change_nothing() {
    let net = TestNet::new();
    let agent = net.agent();
    let before = net.link(DEVICE).expect("the device");
    let early = update_interface(&agent, pod_interface());
    expect_code(early, ttrpc::Code::FAILED_PRECONDITION, "UpdateInterface: no sandbox yet");
    assert_eq!(net.link(DEVICE).as_ref(), Some(&before), "before CreateSandbox the device stays where it is");
    sandbox(&agent);

    type Change = fn(&mut Interface);
    let cases: [(Change, ttrpc::Code, &str); 12] = [
        (
            |i| i.hw_addr = "02:00:00:00:00".into(),
            ttrpc::Code::INVALID_ARGUMENT,
            "interface.hw_addr \"02:00:00:00:00\"",
        ),
        (|i| i.hw_addr = "01:00:5e:00:00:01".into(), ttrpc::Code::INVALID_ARGUMENT, "unicast"),
        (
            |i| i.addresses[0].address = "198.51.100.300".into(),
            ttrpc::Code::INVALID_ARGUMENT,
            "interface.addresses[0].address",
        ),
        (|i| i.addresses[1].prefix_len = 129, ttrpc::Code::INVALID_ARGUMENT, "interface.addresses[1].prefix_len 129"),
        (
            |i| i.addresses[0].family = IPFamily::IP_FAMILY_V6.into(),
            ttrpc::Code::INVALID_ARGUMENT,
            "interface.addresses[0].family",
        ),
        (|i| i.mtu = 67, ttrpc::Code::INVALID_ARGUMENT, "interface.mtu 67"),
        (|i| i.mtu = 65536, ttrpc::Code::INVALID_ARGUMENT, "interface.mtu 65536"),
        (
            |i| i.name = "much-too-long-name".into(),
            ttrpc::Code::INVALID_ARGUMENT,
            "interface.name \"much-too-long-name\"",
        ),
        (|i| i.name = "a/b".into(), ttrpc::Code::INVALID_ARGUMENT, "interface.name \"a/b\""),
        (|i| i.device = "nbt-none".into(), ttrpc::Code::NOT_FOUND, "no interface nbt-none"),
        // Host mode must name the device: the guest's rule would find the host's own card.
        (|i| i.device.clear(), ttrpc::Code::FAILED_PRECONDITION, "host mode: name the interface"),
        (|i| i.addresses.push(address("198.51.100.2", 25)), ttrpc::Code::INVALID_ARGUMENT, "listed twice"),
    ];
    for (change, code, text) in cases {
        let mut iface = pod_interface();
        change(&mut iface);
        expect_code(update_interface(&agent, iface), code, text);
        assert_eq!(net.link(DEVICE).as_ref(), Some(&before), "{text}: the device is as it was, where it was");
    }

    // Configured; a second interface cannot take its name; the same call again works.
    update_interface(&agent, pod_interface()).expect("UpdateInterface");
    net.ip(&["link", "add", "nbt-two", "type", "veth", "peer", "name", "nbt-three"]);
    let mut second = pod_interface();
    second.device = "nbt-two".into();
    expect_code(update_interface(&agent, second), ttrpc::Code::ALREADY_EXISTS, "already has an interface eth0");
    assert!(net.link("nbt-two").is_some(), "the second device stayed where it was");
    let again = update_interface(&agent, pod_interface()).expect("UpdateInterface again");
    assert_eq!(again.hw_addr, MAC);
}

#[test]
fn bad_routes_and_neighbours_are_refused_naming_the_field_and_change_nothing() {
    let net = TestNet::new();
    let agent = net.agent();
    sandbox(&agent);
    update_interface(&agent, pod_interface()).expect("UpdateInterface");
    update_routes(&agent, vec![route("", GATEWAY, 0)]).expect("UpdateRoutes");
    add_neighbours(&agent, vec![neighbour("198.51.100.9", "02:00:00:00:00:09")]).expect("AddArpNeighbors");
    let rootfs = agent.rootfs("rootfs");
    agent.create("pause", &pod_spec(&agent, &rootfs, &["sleep", "1000"]), Stdio::default()).expect("create");
    let pid = agent.start_container("pause").expect("start");
    let view = pod_view(pid);
    assert!(view.contains(GATEWAY) && view.contains("02:00:00:00:00:09"), "{view}");
    bad_routes(&agent, pid, &view);
    bad_neighbours(&agent, pid, &view);
    agent.remove("pause").expect("remove");
}

fn bad_routes(agent: &Agent, pid: u32, view: &str) {
    let v6 = |mut r: Route| {
        r.family = IPFamily::IP_FAMILY_V6.into();
        r
    };
    let bad_routes: Vec<(Vec<Route>, ttrpc::Code, &str)> = vec![
        (vec![route("", "198.51.100.1.1", 0)], ttrpc::Code::INVALID_ARGUMENT, "routes[0].gateway \"198.51.100.1.1\""),
        (vec![route("198.51.100.5/24", "", 253)], ttrpc::Code::INVALID_ARGUMENT, "bits set past the prefix"),
        (vec![route("198.51.100.0/33", "", 253)], ttrpc::Code::INVALID_ARGUMENT, "routes[0].dest \"198.51.100.0/33\""),
        (vec![route("198.51.100.0", "", 253)], ttrpc::Code::INVALID_ARGUMENT, "CIDR"),
        (vec![v6(route("203.0.113.0/24", "", 0))], ttrpc::Code::INVALID_ARGUMENT, "routes[0].dest"),
        (vec![route("", GATEWAY, 253)], ttrpc::Code::INVALID_ARGUMENT, "routes[0].scope 253"),
        (vec![route("203.0.113.0/24", "", 7)], ttrpc::Code::INVALID_ARGUMENT, "routes[0].scope 7"),
        (vec![route("", "", 0)], ttrpc::Code::INVALID_ARGUMENT, "needs its family"),
        (vec![route("", GATEWAY, 0), route("", "198.51.100.3", 0)], ttrpc::Code::INVALID_ARGUMENT, "routes[1]"),
        (
            vec![route("203.0.113.0/24", "", 0), Route { device: "eth9".into(), ..route("", GATEWAY, 0) }],
            ttrpc::Code::NOT_FOUND,
            "routes[1].device eth9",
        ),
        (vec![Route { device: "".into(), ..route("", GATEWAY, 0) }], ttrpc::Code::INVALID_ARGUMENT, "routes[0].device"),
    ];
    for (routes, code, text) in bad_routes {
        expect_code(update_routes(agent, routes), code, text);
        assert_eq!(pod_view(pid), view, "{text}: the pod's network is as it was");
    }
}

fn bad_neighbours(agent: &Agent, pid: u32, view: &str) {
    let mut no_ip = neighbour("198.51.100.7", "02:00:00:00:00:07");
    no_ip.to_ip = None.into();
    let bad_neighbours: Vec<(ARPNeighbor, ttrpc::Code, &str)> = vec![
        (neighbour("198.51.100.7", "zz:00:00:00:00:07"), ttrpc::Code::INVALID_ARGUMENT, "neighbors[1].lladdr"),
        (no_ip, ttrpc::Code::INVALID_ARGUMENT, "neighbors[1].to_ip: missing"),
        (neighbour("198.51.100.300", "02:00:00:00:00:07"), ttrpc::Code::INVALID_ARGUMENT, "neighbors[1].to_ip.address"),
        (
            ARPNeighbor { state: 2, ..neighbour("198.51.100.7", "02:00:00:00:00:07") },
            ttrpc::Code::INVALID_ARGUMENT,
            "neighbors[1].state 0x2",
        ),
        (
            ARPNeighbor { device: "eth9".into(), ..neighbour("198.51.100.7", "02:00:00:00:00:07") },
            ttrpc::Code::NOT_FOUND,
            "neighbors[1].device eth9",
        ),
    ];
    for (bad, code, text) in bad_neighbours {
        // A good entry first: it is not added either when a later one is bad.
        let entries = vec![neighbour("198.51.100.8", "02:00:00:00:00:08"), bad];
        expect_code(add_neighbours(agent, entries), code, text);
        assert_eq!(pod_view(pid), view, "{text}: the pod's network is as it was");
    }
}
