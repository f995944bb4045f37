//! Boot benchmark of nestbox-vmm (run with `cargo bench -p nestbox-vmm --bench boot`).
//!
//! Measures, and prints as a Markdown table:
//! 1. VMM process start to the first KVM_RUN (spawn to the VMM's own CLOCK_MONOTONIC
//!    timestamp), over many runs: the VMM's start-up cost, no guest involved.
//! 2. VMM resident memory beyond guest memory, once the guest is ready.
//! 3. Boot to agent-ready of nestbox-vmm against `qemu-system-x86_64 -M microvm` on the
//!    same kernel, initramfs and command line, alternated in the same run, as a ratio.
//!    On a software-nested host the guest kernel dominates the absolute times; only the
//!    ratio says something about the VMM.
//!
//! Options (after `--`): `--runs N` start-up runs (default 20, then as many jailed), `--boots N`
//! boots of each VMM (default 2; 0: start-up figures only), `--no-qemu`.

use nestbox_vmm::arch::x86_64::{boot::kernel_cmdline, cpuid::CpuTemplate};
use nestbox_vmm::util::monotonic_ns;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const VMM: &str = env!("CARGO_BIN_EXE_nestbox-vmm");
const MEMORY_MIB: u64 = 128;
const READY_MARK: &str = ": ready, guest kernel ";

fn guest_dir() -> PathBuf {
    std::env::var_os("NESTBOX_GUEST_DIR").map(PathBuf::from).unwrap_or_else(|| "/usr/local/share/nestbox".into())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn kill(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Spawn to first KVM_RUN, in milliseconds, and the VMM's resident KiB then. Jailed
/// (`--jail` with a cgroup of its own, `docs/jail.md`) if `jail` names a directory for
/// its files, the way the shim starts pods' VMMs.
fn start_to_first_run(jail: Option<&std::path::Path>) -> (f64, u64) {
    let t0 = monotonic_ns();
    let mut cmd = Command::new(VMM);
    cmd.args(["--boot-timestamps", "--memory-mib", &MEMORY_MIB.to_string()]);
    match jail {
        None => cmd.args(["--console", "/dev/null"]),
        Some(dir) => cmd.arg("--console").arg(dir.join("console.log")).args([
            "--jail",
            "--jail-cgroup",
            &format!("nestbox-bench/{}", std::process::id()),
        ]),
    };
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawning nestbox-vmm");
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut at = None;
    for line in stderr.lines().map_while(Result::ok) {
        if let Some(ns) = line.strip_prefix("nestbox-vmm: timestamp first_kvm_run ") {
            at = ns.trim().parse::<u128>().ok();
            break;
        }
    }
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    kill(child);
    if jail.is_some() {
        remove_bench_cgroup();
    }
    let at = at.expect("the VMM printed no first_kvm_run timestamp");
    ((at - t0) as f64 / 1e6, rss)
}

fn remove_bench_cgroup() {
    let leaf = format!("nestbox-bench/{}", std::process::id());
    for hierarchy in ["", "memory/", "pids/", "cpu/"] {
        let _ = std::fs::remove_dir(format!("/sys/fs/cgroup/{hierarchy}{leaf}"));
    }
}

/// Runs `runs` starts; sorted milliseconds and the median resident MiB.
fn measure_starts(runs: usize, jail: Option<&std::path::Path>) -> (Vec<f64>, f64) {
    let (mut ms, mut rss): (Vec<f64>, Vec<u64>) = (0..runs).map(|_| start_to_first_run(jail)).unzip();
    ms.sort_by(f64::total_cmp);
    rss.sort();
    (ms, rss[rss.len() / 2] as f64 / 1024.0)
}

struct Boot {
    seconds: f64,
    /// (VMM's own resident KiB, guest RAM resident KiB), nestbox-vmm only.
    memory: Option<(u64, u64)>,
}

/// Runs `cmd` until the agent's ready line appears on its stdout.
fn boot_to_ready(cmd: &mut Command, measure_memory: bool) -> Boot {
    let start = Instant::now();
    let mut child =
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("spawning VMM");
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut ready = false;
    for line in stdout.lines().map_while(Result::ok) {
        if line.contains(READY_MARK) {
            ready = true;
            break;
        }
        if start.elapsed() > Duration::from_secs(900) {
            break;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let memory = (ready && measure_memory).then(|| resident_kib(child.id()));
    kill(child);
    assert!(ready, "{cmd:?}: no ready line");
    Boot { seconds, memory }
}

/// Resident KiB of process `pid` outside and inside its guest RAM mapping (the anonymous
/// mapping exactly the size of guest memory).
fn resident_kib(pid: u32) -> (u64, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("reading smaps");
    let (mut own, mut guest) = (0u64, 0u64);
    let mut in_guest = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((start, end)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
            let size = u64::from_str_radix(end, 16).unwrap_or(0) - u64::from_str_radix(start, 16).unwrap_or(0);
            in_guest = size == MEMORY_MIB << 20 && line.split_whitespace().count() == 5;
        } else if let Some(rss) = line.strip_prefix("Rss:") {
            let kib: u64 = rss.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
            if in_guest {
                guest += kib;
            } else {
                own += kib;
            }
        }
    }
    (own, guest)
}

/// The host line of the report: CPU model, CPU count, kernel, kind of KVM.
fn print_host(template: CpuTemplate) {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    println!(
        "Host: {cpu}, {} CPUs, kernel {}, KVM {}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        if template == CpuTemplate::Pvm { "software-nested (kvm_pvm)" } else { "hardware" }
    );
}

/// The start-up rows: unjailed and jailed (sorted milliseconds, median resident MiB).
fn print_starts(runs: usize, (starts, start_rss): (&[f64], f64), (jailed, jailed_rss): (&[f64], f64)) {
    println!(
        "| VMM start to first KVM_RUN ({runs} runs) | p50 {:.2} ms, p95 {:.2} ms, min {:.2} ms | < 10 ms |",
        percentile(starts, 0.5),
        percentile(starts, 0.95),
        starts[0]
    );
    println!(
        "| the same, jailed (`--jail`, own cgroup; docs/jail.md) | p50 {:.2} ms, p95 {:.2} ms, min {:.2} ms | |",
        percentile(jailed, 0.5),
        percentile(jailed, 0.95),
        jailed[0]
    );
    println!("| VMM resident memory at first KVM_RUN, unjailed / jailed (median) | {start_rss:.1} MiB / {jailed_rss:.1} MiB | |");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let option = |name: &str, default: usize| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let runs = option("--runs", 20);
    let boots = option("--boots", 2);
    let with_qemu = !args.iter().any(|a| a == "--no-qemu");
    let (kernel, initramfs) = (guest_dir().join("vmlinux"), guest_dir().join("initramfs.cpio"));
    let template = CpuTemplate::Auto.resolve();
    let cmdline = kernel_cmdline(template, &[], "").unwrap().as_cstring().unwrap().into_string().unwrap();

    eprintln!("start-up: {runs} runs, then {runs} jailed");
    let (starts, start_rss) = measure_starts(runs, None);
    let jail_dir = std::env::temp_dir().join(format!("nestbox-bench-jail-{}", std::process::id()));
    std::fs::create_dir_all(&jail_dir).expect("a directory for the jailed VMM's files");
    let (jailed, jailed_rss) = measure_starts(runs, Some(&jail_dir));
    let _ = std::fs::remove_dir_all(&jail_dir);

    let ours = || {
        let mut cmd = Command::new(VMM);
        cmd.arg("--kernel").arg(&kernel).arg("--initramfs").arg(&initramfs);
        cmd.args(["--memory-mib", &MEMORY_MIB.to_string(), "--vcpus", "1"]);
        cmd
    };
    let qemu = || {
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-M", "microvm,acpi=off", "-enable-kvm", "-cpu", "qemu64,-cx16,+xsaveerptr"]);
        cmd.args(["-m", &MEMORY_MIB.to_string(), "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none"]);
        cmd.args(["-serial", "stdio", "-no-reboot"]);
        cmd.arg("-kernel").arg(&kernel).arg("-initrd").arg(&initramfs).arg("-append").arg(&cmdline);
        cmd
    };
    let (mut ours_s, mut qemu_s, mut memory) = (Vec::new(), Vec::new(), None);
    for round in 0..boots {
        eprintln!("boot round {}/{boots}: nestbox-vmm", round + 1);
        let boot = boot_to_ready(&mut ours(), true);
        ours_s.push(boot.seconds);
        memory = memory.or(boot.memory);
        if with_qemu {
            eprintln!("boot round {}/{boots}: qemu microvm", round + 1);
            qemu_s.push(boot_to_ready(&mut qemu(), false).seconds);
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;

    print_host(template);
    println!("Guest: 1 vCPU, {MEMORY_MIB} MiB, cmdline `{cmdline}`\n");
    println!("| figure | value | target |");
    println!("|---|---|---|");
    print_starts(runs, (&starts, start_rss), (&jailed, jailed_rss));
    if let Some((own, guest)) = memory {
        println!(
            "| VMM resident memory beyond guest memory (guest ready) | {:.1} MiB (guest RAM resident: {:.1} MiB) | < 5 MiB |",
            own as f64 / 1024.0,
            guest as f64 / 1024.0
        );
    }
    let fmt = |v: &[f64]| v.iter().map(|s| format!("{s:.1}")).collect::<Vec<_>>().join(", ");
    if boots == 0 {
        return;
    }
    println!("| boot to agent ready, nestbox-vmm ({boots} boots) | mean {:.1} s ({}) | |", mean(&ours_s), fmt(&ours_s));
    if with_qemu {
        println!(
            "| boot to agent ready, QEMU microvm ({boots} boots) | mean {:.1} s ({}) | |",
            mean(&qemu_s),
            fmt(&qemu_s)
        );
        println!("| ratio nestbox-vmm / QEMU | {:.3} | <= 1 |", mean(&ours_s) / mean(&qemu_s));
    }
}
