//! Pod networking end to end: a private containerd with the CRI plugin in a network
//! namespace of the test's own, CNI from Debian's containernetworking-plugins (bridge,
//! host-local, portmap, loopback) giving every pod a network namespace on a bridge there;
//! test traffic never leaves that namespace. Three pods side by side: two nestbox pods
//! (`server`, `client`), each its own VM restored from the warm-start template (shared with
//! the other suites), and one runc pod. Checked:
//!
//! - the VM carries the pod's CNI network: the server's container sees eth0 with the pod IP
//!   CRI reports, CNI's MTU and the CNI veth's MAC, and a default route;
//! - two nestbox pods reach each other by pod IP (TCP), and a nestbox pod and a runc pod
//!   reach each other both ways;
//! - a server in a nestbox pod answers on its pod IP and on a hostPort (CNI's portmap, from
//!   the bridge's side);
//! - CRI PortForward's path: a connection to localhost:<port> inside the pod's network
//!   namespace on the host (what containerd makes) reaches the server in the guest;
//! - the pod's resolv.conf (PodSandboxConfig.dns_config) is what its container reads;
//! - after the pods are removed: no VMM, no sandbox directory, no mount, no CNI namespace.
//!
//! The programs (`net-probe`: server, client, interface list) are the test's own static
//! binary in a read-only volume: Debian's static busybox wget crashes in containers.

use nestbox_tests::containerd::{mounts_under, Containerd, Options, BUSYBOX};
use nestbox_tests::cri::{api, api::NamespaceMode, container_config, namespaces, pod_config};
use nestbox_tests::{guest_binary, run_with_deadline, GUEST_DEADLINE};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// One CRI call that does not start a VM.
const QUICK: Duration = Duration::from_secs(60);
/// The port every pod's server listens on, and the server pod's hostPort.
const PORT: u16 = 8080;
const HOST_PORT: u16 = 18080;
/// The bridge's address (CNI's gateway), where the test reaches host ports.
const BRIDGE_IP: &str = "10.99.0.1";
const DNS_SERVER: &str = "10.99.0.53";
const DNS_SEARCH: &str = "nbx.test";

struct Pods<'a> {
    c: &'a Containerd,
    logs: std::path::PathBuf,
    tools: std::path::PathBuf,
}

/// A running pod with one container serving `reply` on [`PORT`].
struct Pod {
    id: String,
    container: String,
    ip: String,
    handler: &'static str,
}

impl Pods<'_> {
    fn context(&self) -> String {
        format!("containerd log tail:\n{}", self.c.log_tail(80))
    }

    fn start(&self, name: &str, handler: &'static str, config: impl FnOnce(&mut api::PodSandboxConfig)) -> Pod {
        let cri = self.c.cri();
        let deadline = if handler == "nestbox" { GUEST_DEADLINE } else { QUICK };
        let ns = namespaces(NamespaceMode::Pod, NamespaceMode::Pod, NamespaceMode::Container);
        let mut sandbox = pod_config(name, &std::process::id().to_string(), &self.logs, ns.clone());
        config(&mut sandbox);
        let id = cri.run_pod_sandbox(&sandbox, handler, deadline).unwrap_or_else(|e| panic!("{e}\n{}", self.context()));
        let reply = format!("from-{name}");
        let command = ["/tools/net-probe", "serve", &PORT.to_string(), &reply];
        let mut container_cfg = container_config(name, BUSYBOX, &command, &format!("{name}.log"), ns);
        container_cfg.mounts = vec![api::Mount {
            container_path: "/tools".into(),
            host_path: self.tools.to_string_lossy().into_owned(),
            readonly: true,
            ..Default::default()
        }];
        let container = cri
            .create_container(&id, &container_cfg, &sandbox, deadline)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.context()));
        cri.start_container(&container, deadline).unwrap_or_else(|e| panic!("{e}\n{}", self.context()));
        let status = cri.pod_sandbox_status(&id, QUICK).expect("PodSandboxStatus");
        let ip = status.network.map(|n| n.ip).unwrap_or_default();
        assert!(ip.starts_with("10.99."), "pod {name} has a CNI address: {ip:?}");
        Pod { id, container, ip, handler }
    }

    /// `cmd` in `pod`'s container, which must succeed; its stdout.
    fn exec(&self, pod: &Pod, cmd: &[&str]) -> String {
        let deadline = if pod.handler == "nestbox" { GUEST_DEADLINE } else { QUICK };
        let out = self
            .c
            .cri()
            .exec_sync(&pod.container, cmd, 0, deadline)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.context()));
        assert_eq!(out.exit_code, 0, "{cmd:?} in {}: {out:?}\n{}", pod.container, self.context());
        out.stdout
    }

    /// What `from`'s container gets from the server at `to`:PORT.
    fn get(&self, from: &Pod, to: &str) -> String {
        self.exec(from, &["/tools/net-probe", "get", to, &PORT.to_string()]).trim().to_string()
    }

    fn stop(&self, pod: &Pod) {
        let cri = self.c.cri();
        let deadline = if pod.handler == "nestbox" { GUEST_DEADLINE } else { QUICK };
        cri.stop_container(&pod.container, 10, deadline).unwrap_or_else(|e| panic!("{e}\n{}", self.context()));
        cri.remove_container(&pod.container, deadline).expect("RemoveContainer");
        cri.stop_pod_sandbox(&pod.id, deadline).unwrap_or_else(|e| panic!("{e}\n{}", self.context()));
        cri.remove_pod_sandbox(&pod.id, deadline).expect("RemovePodSandbox");
    }
}

/// The CNI network namespaces containerd made for pods: files `cni-<uuid>` in the CRI
/// plugin's state folder (the harness sets `netns_mounts_under_state_dir`).
fn cni_namespaces(c: &Containerd) -> Vec<PathBuf> {
    let state = c.dir.join("state/io.containerd.grpc.v1.cri/netns");
    let Ok(entries) = std::fs::read_dir(&state) else { return Vec::new() };
    entries.filter_map(|e| e.ok()).map(|e| e.path()).collect()
}

/// `ip args...` inside network namespace `ns`.
fn ip_in(ns: &Path, args: &[&str]) -> String {
    let out = Command::new("nsenter").arg(format!("--net={}", ns.display())).arg("--").arg("ip").args(args).output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
}

/// The CNI network namespace whose eth0 has address `ip`.
fn cni_netns_of(c: &Containerd, ip: &str) -> Option<PathBuf> {
    let has_ip = |ns: &PathBuf| ip_in(ns, &["-o", "addr", "show", "dev", "eth0"]).contains(&format!(" {ip}/"));
    cni_namespaces(c).into_iter().find(has_ip)
}

/// The MAC of eth0 (CNI's veth) in network namespace `ns`.
fn cni_mac(ns: &Path) -> Option<String> {
    let link = ip_in(ns, &["-o", "link", "show", "dev", "eth0"]);
    link.split_whitespace().skip_while(|w| *w != "link/ether").nth(1).map(str::to_string)
}

#[test]
fn pod_network() {
    let options = Options { cri: true, pod_network: true, shared_templates: true, ..Default::default() };
    let c = Containerd::start_with("net", "[agent]\nboot_timeout_secs = 900\n", options);
    c.import_busybox();
    let logs = c.dir.join("pod-logs");
    let tools = c.dir.join("tools");
    for dir in [&logs, &tools] {
        std::fs::create_dir_all(dir).expect("creating a test folder");
    }
    let probe = guest_binary("net-probe");
    std::fs::copy(&probe, tools.join("net-probe")).expect("copying net-probe");
    let pods = Pods { c: &c, logs, tools };

    let server = pods.start("server", "nestbox", |config| {
        config.port_mappings = vec![api::PortMapping {
            protocol: api::Protocol::Tcp as i32,
            container_port: PORT.into(),
            host_port: HOST_PORT.into(),
            host_ip: String::new(),
        }];
        config.dns_config = Some(api::DnsConfig {
            servers: vec![DNS_SERVER.into()],
            searches: vec![DNS_SEARCH.into()],
            options: vec![],
        });
    });
    let client = pods.start("client", "nestbox", |_| {});
    let runc = pods.start("runc", "runc", |_| {});

    // The VM carries the pod's network: CNI's address, MTU and MAC on eth0, a default route.
    let ifaces = pods.exec(&server, &["/tools/net-probe", "ifaces"]);
    let eth0 =
        ifaces.lines().find(|l| l.starts_with("eth0 ")).unwrap_or_else(|| panic!("no eth0 in the guest: {ifaces}"));
    assert!(eth0.contains(&format!(" {}/16 ", server.ip)), "eth0 has the pod IP {}: {eth0}", server.ip);
    assert!(eth0.contains(" mtu=1500 "), "CNI's MTU: {eth0}");
    let server_netns = cni_netns_of(&c, &server.ip)
        .unwrap_or_else(|| panic!("the server pod's CNI network namespace among {:?}", cni_namespaces(&c)));
    let mac = cni_mac(&server_netns).expect("the MAC of eth0 in the server pod's CNI namespace");
    assert!(eth0.ends_with(&format!("mac={mac}")), "the guest's eth0 has the CNI veth's MAC {mac}: {eth0}");
    let routes = pods.exec(&server, &["cat", "/proc/net/route"]);
    assert!(
        routes.lines().any(|l| l.split_whitespace().nth(1) == Some("00000000")),
        "a default route in the guest: {routes}"
    );

    // By pod IP: nestbox to nestbox, nestbox to runc and back.
    assert_eq!(pods.get(&client, &server.ip), "from-server", "client (nestbox) -> server (nestbox)");
    assert_eq!(pods.get(&runc, &server.ip), "from-server", "runc -> server (nestbox)");
    assert_eq!(pods.get(&server, &runc.ip), "from-runc", "server (nestbox) -> runc");
    assert_eq!(pods.get(&runc, &client.ip), "from-client", "runc -> client (nestbox)");

    // hostPort through CNI's portmap, from the bridge's side (containerd's namespace).
    let mut host_get = c.in_pod_network(&probe);
    host_get.args(["get", BRIDGE_IP, &HOST_PORT.to_string()]);
    let got = run_with_deadline(&mut host_get, QUICK);
    assert!(got.status.success(), "hostPort {HOST_PORT}: {got:?}\n{}", pods.context());
    assert_eq!(got.stdout.trim(), "from-server", "the hostPort reaches the nestbox pod");

    // PortForward: containerd connects to localhost:<port> inside the pod's network
    // namespace on the host; the shim carries that into the guest's pod namespace.
    let mut forward = Command::new("nsenter");
    forward.arg(format!("--net={}", server_netns.display())).arg("--").arg(&probe);
    forward.args(["get", "127.0.0.1", &PORT.to_string()]);
    let got = run_with_deadline(&mut forward, QUICK);
    assert!(got.status.success(), "port forward to {PORT}: {got:?}\n{}", pods.context());
    assert_eq!(got.stdout.trim(), "from-server", "localhost in the pod's host namespace reaches the guest's");

    // DNS: the pod's resolv.conf is the one its container reads.
    let resolv = pods.exec(&server, &["cat", "/etc/resolv.conf"]);
    assert!(resolv.contains(&format!("nameserver {DNS_SERVER}")), "{resolv}");
    assert!(resolv.contains(&format!("search {DNS_SEARCH}")), "{resolv}");

    for pod in [&runc, &client, &server] {
        pods.stop(pod);
    }
    assert!(c.cri().list_pod_sandbox(QUICK).expect("ListPodSandbox").is_empty(), "pods left");
    c.assert_clean();
    let mounts = mounts_under(&c.dir);
    assert!(mounts.is_empty(), "mounts left: {mounts:?}");
    let left = cni_namespaces(&c);
    assert!(left.is_empty(), "CNI network namespaces left: {left:?}");
}
