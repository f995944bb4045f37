//! Pod-to-pod network benchmark (`cargo bench -p nestbox-tests --bench net`): TCP round-trip
//! latency and throughput between two pods on one CNI bridge, nestbox pods (each its own VM,
//! the VM's virtio-net tap redirected to CNI's veth) against runc pods, side by side in one
//! run under one private containerd (the end-to-end tests' harness, `Options::pod_network`).
//!
//! Each runtime gets a server pod (net-probe `echo` on one port, `sink` on another) and a
//! client pod; the client runs `net-probe rr` (one-byte round trips on one connection) and
//! `net-probe stream` (MiB sent to the sink), `--runs` times each, runtimes alternated run by
//! run so machine load touches both alike. Printed as Markdown: median and spread of the
//! runs' p50 round trip and of their throughput.
//!
//! Options (after `--`): `--runs N` (default 5), `--round-trips N` per run (default 2000),
//! `--mib N` per throughput run (default 64), `--binaries DIR` a folder with the
//! `containerd-shim-nestbox-v2` and `nestbox-vmm` to measure (e.g. `target/release` after
//! `cargo build --release`; default: the workspace's debug build).

use nestbox_tests::containerd::{Containerd, Options, BUSYBOX};
use nestbox_tests::cri::{api, api::NamespaceMode, container_config, namespaces, pod_config};
use nestbox_tests::{guest_binary, GUEST_DEADLINE};
use std::path::PathBuf;
use std::time::Duration;

const QUICK: Duration = Duration::from_secs(60);
const ECHO_PORT: &str = "7000";
const SINK_PORT: &str = "7001";

fn option(args: &[String], name: &str, default: usize) -> usize {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct Bench<'a> {
    c: &'a Containerd,
    logs: std::path::PathBuf,
    tools: std::path::PathBuf,
}

struct Pod {
    container: String,
    ip: String,
    deadline: Duration,
}

impl Bench<'_> {
    /// A pod of `handler` with one container running `script` (tools in /tools).
    fn pod(&self, name: &str, handler: &str, script: &str) -> Pod {
        let cri = self.c.cri();
        let deadline = if handler == "nestbox" { GUEST_DEADLINE } else { QUICK };
        let ns = namespaces(NamespaceMode::Pod, NamespaceMode::Pod, NamespaceMode::Container);
        let sandbox = pod_config(name, &std::process::id().to_string(), &self.logs, ns.clone());
        let id = cri.run_pod_sandbox(&sandbox, handler, deadline).unwrap_or_else(|e| panic!("{e}"));
        let mut config = container_config(name, BUSYBOX, &["/bin/sh", "-c", script], &format!("{name}.log"), ns);
        config.mounts = vec![api::Mount {
            container_path: "/tools".into(),
            host_path: self.tools.to_string_lossy().into_owned(),
            readonly: true,
            ..Default::default()
        }];
        let container = cri.create_container(&id, &config, &sandbox, deadline).unwrap_or_else(|e| panic!("{e}"));
        cri.start_container(&container, deadline).unwrap_or_else(|e| panic!("{e}"));
        let ip =
            cri.pod_sandbox_status(&id, QUICK).expect("PodSandboxStatus").network.map(|n| n.ip).unwrap_or_default();
        Pod { container, ip, deadline }
    }

    /// Runs net-probe in `pod` and returns the value of `key=` in its output line.
    fn probe(&self, pod: &Pod, args: &[&str], key: &str) -> f64 {
        let mut cmd = vec!["/tools/net-probe"];
        cmd.extend_from_slice(args);
        let out = self.c.cri().exec_sync(&pod.container, &cmd, 0, pod.deadline).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out.exit_code, 0, "{cmd:?}: {out:?}");
        let value = out.stdout.split_whitespace().find_map(|w| w.strip_prefix(&format!("{key}=")).map(str::to_string));
        value.and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no {key}= in {:?}", out.stdout))
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (runs, round_trips, mib) =
        (option(&args, "--runs", 5), option(&args, "--round-trips", 2000), option(&args, "--mib", 64));
    let binaries = args.iter().position(|a| a == "--binaries").and_then(|i| args.get(i + 1)).map(PathBuf::from);
    let options = Options { cri: true, pod_network: true, shared_templates: binaries.is_none(), binaries };
    let c = Containerd::start_with("netbench", "[agent]\nboot_timeout_secs = 900\n", options);
    c.import_busybox();
    let (logs, tools) = (c.dir.join("pod-logs"), c.dir.join("tools"));
    for dir in [&logs, &tools] {
        std::fs::create_dir_all(dir).expect("creating a bench folder");
    }
    std::fs::copy(guest_binary("net-probe"), tools.join("net-probe")).expect("copying net-probe");
    let bench = Bench { c: &c, logs, tools };
    let servers = format!("/tools/net-probe echo {ECHO_PORT} & exec /tools/net-probe sink {SINK_PORT}");
    let runtimes = ["runc", "nestbox"];
    let pairs: Vec<(Pod, Pod)> = runtimes
        .iter()
        .map(|rt| {
            (bench.pod(&format!("srv-{rt}"), rt, &servers), bench.pod(&format!("cli-{rt}"), rt, "exec sleep 100000"))
        })
        .collect();
    let mut rr: Vec<Vec<f64>> = vec![Vec::new(); runtimes.len()];
    let mut tput: Vec<Vec<f64>> = vec![Vec::new(); runtimes.len()];
    for run in 0..runs {
        for (i, (server, client)) in pairs.iter().enumerate() {
            let n = round_trips.to_string();
            rr[i].push(bench.probe(client, &["rr", &server.ip, ECHO_PORT, &n], "p50_us"));
            tput[i].push(bench.probe(client, &["stream", &server.ip, SINK_PORT, &mib.to_string()], "mib_per_s"));
            eprintln!("net bench: run {run} {}: rr p50 {} us, {} MiB/s", runtimes[i], rr[i][run], tput[i][run]);
        }
    }
    println!("| runtime | round trip p50 (µs), median of {runs} runs | range | throughput (MiB/s), median | range |");
    println!("|---|---|---|---|---|");
    for (i, rt) in runtimes.iter().enumerate() {
        let (lo_rr, hi_rr) =
            (rr[i].iter().copied().fold(f64::MAX, f64::min), rr[i].iter().copied().fold(0.0, f64::max));
        let (lo_t, hi_t) =
            (tput[i].iter().copied().fold(f64::MAX, f64::min), tput[i].iter().copied().fold(0.0, f64::max));
        let (m_rr, m_t) = (median(&mut rr[i]), median(&mut tput[i]));
        println!("| {rt} | {m_rr:.0} | {lo_rr:.0}-{hi_rr:.0} | {m_t:.1} | {lo_t:.1}-{hi_t:.1} |");
    }
    println!("\n{round_trips} one-byte round trips per run; {mib} MiB per throughput run; client and server pods of one runtime.");
}
