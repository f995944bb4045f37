//! Restore benchmark (`cargo bench -p nestbox-tests --bench restore`): nestbox-vmm's
//! restore from a snapshot against QEMU's (`-incoming`), on the same guest.
//!
//! The guest is the installed kernel with a test initramfs whose /init prints `tick N`
//! every 10 ms (tests/src/bin/guest-ticker.rs). Each VMM boots it once, is snapshotted
//! while it ticks (nestbox-vmm: `snapshot DIR` on its control API; QEMU: `migrate` to a
//! file on its monitor), and is then restored `--runs` times; a restore is timed from
//! spawning the VMM to the first tick line on its serial console: the VMM has rebuilt the
//! machine and the guest runs again. Also measured: the PSS of one restored VMM once the
//! guest ticks (for nestbox-vmm, guest memory is mapped private from the snapshot and
//! shared through the page cache; QEMU reads the stream into anonymous memory).
//!
//! Both VMMs run the same kernel, initramfs, command line, memory size and vCPU count,
//! alternated run by run so machine load affects both alike. Printed as Markdown.
//!
//! Options (after `--`): `--runs N` restores of each VMM (default 10), `--memory-mib M`
//! (default 256, the shim's default pod size).

use nestbox_tests::{binary, guest_binary, guest_image, test_initramfs, GUEST_DEADLINE};
use nestbox_vmm::arch::x86_64::{boot::kernel_cmdline, cpuid::CpuTemplate};
use nestbox_vmm::util::monotonic_ns;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

const READY: &str = "ticker: ready";
const TICK: &str = "tick ";

fn option(args: &[String], name: &str, default: usize) -> usize {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct Vm(Child);

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads console lines until one starts with `prefix`; panics after `deadline`.
fn wait_line(lines: &mut impl Iterator<Item = std::io::Result<String>>, prefix: &str, deadline: Duration) {
    let start = Instant::now();
    for line in lines {
        let line = line.expect("reading the console");
        if line.trim_start_matches(|c: char| c.is_control()).starts_with(prefix) {
            return;
        }
        assert!(start.elapsed() < deadline, "no {prefix:?} line within {deadline:?}");
    }
    panic!("the console ended before a {prefix:?} line");
}

fn console(child: &mut Child) -> std::io::Lines<BufReader<ChildStdout>> {
    BufReader::new(child.stdout.take().expect("piped stdout")).lines()
}

/// PSS of a process in KiB.
fn pss_kib(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A restore's times: to the first tick, and (nestbox-vmm with `--boot-timestamps`) to the
/// VMM's first KVM_RUN.
struct Restored {
    seconds: f64,
    first_run_seconds: Option<f64>,
    pss_kib: u64,
}

/// Spawns a restore and times it to the first tick. With `timestamps` (nestbox-vmm only)
/// also to vCPU 0's first KVM_RUN (the VMM's `--boot-timestamps` line): the VMM's own
/// restore work, which a hardware-KVM host does as this one does, apart from the guest's
/// own resumption, which this host emulates.
fn time_restore(mut cmd: Command, timestamps: bool) -> Restored {
    let (t0, start) = (monotonic_ns(), Instant::now());
    cmd.stdout(Stdio::piped()).stdin(Stdio::null());
    cmd.stderr(if timestamps { Stdio::piped() } else { Stdio::null() });
    let mut vm = Vm(cmd.spawn().expect("spawn"));
    let first_run = vm.0.stderr.take().map(|stderr| {
        // Read to the end, so the VMM never writes to a closed pipe.
        std::thread::spawn(move || {
            let mut at = None;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let ns = line.strip_prefix("nestbox-vmm: timestamp first_kvm_run ");
                at = at.or_else(|| ns.and_then(|ns| ns.trim().parse::<u128>().ok()));
            }
            at
        })
    });
    let mut lines = console(&mut vm.0);
    wait_line(&mut lines, TICK, Duration::from_secs(120));
    let seconds = start.elapsed().as_secs_f64();
    let pss_kib = pss_kib(vm.0.id());
    drop(vm);
    let first_run_seconds = first_run.map(|t| {
        let at = t.join().expect("stderr reader").expect("the VMM printed no first_kvm_run timestamp");
        at.saturating_sub(t0) as f64 / 1e9
    });
    Restored { seconds, first_run_seconds, pss_kib }
}

fn ours_snapshot(dir: &Path, kernel: &Path, initramfs: &Path, memory_mib: usize) -> PathBuf {
    let api = dir.join("api.sock");
    let snapshot = dir.join("ours");
    let mut vm = Vm(Command::new(binary("nestbox-vmm", "nestbox-vmm"))
        .arg("--kernel")
        .arg(kernel)
        .arg("--initramfs")
        .arg(initramfs)
        .args(["--memory-mib", &memory_mib.to_string(), "--vcpus", "1"])
        .arg("--api-socket")
        .arg(&api)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawning nestbox-vmm"));
    let mut lines = console(&mut vm.0);
    wait_line(&mut lines, READY, GUEST_DEADLINE);
    wait_line(&mut lines, TICK, Duration::from_secs(60));
    // Keep draining the console so the guest never blocks on a full pipe.
    let drain = std::thread::spawn(move || lines.count());
    let mut stream = UnixStream::connect(&api).expect("API socket");
    stream.write_all(format!("snapshot {}\n", snapshot.display()).as_bytes()).expect("snapshot request");
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).expect("snapshot answer");
    assert_eq!(answer.trim(), "OK", "nestbox-vmm snapshot");
    assert!(vm.0.wait().expect("VMM exit").success(), "the VMM ends after a snapshot");
    let _ = drain.join();
    snapshot
}

fn qemu_command(kernel: &Path, initramfs: &Path, cmdline: &str, memory_mib: usize) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    // The CPU model the boot benchmark uses on this host (kvm_pvm hides CX16 and needs
    // xsaveerptr), so both VMMs give the guest the same kind of CPU.
    cmd.args(["-M", "microvm,acpi=off", "-enable-kvm", "-cpu", "qemu64,-cx16,+xsaveerptr"]);
    cmd.args(["-m", &memory_mib.to_string(), "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none"]);
    cmd.args(["-serial", "stdio", "-no-reboot"]);
    cmd.arg("-kernel").arg(kernel).arg("-initrd").arg(initramfs).arg("-append").arg(cmdline);
    cmd
}

/// One HMP command on QEMU's monitor socket; returns what the monitor printed until its
/// next prompt.
fn hmp(stream: &mut UnixStream, command: &str) -> String {
    stream.write_all(format!("{command}\n").as_bytes()).expect("monitor write");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&out).trim_end().ends_with("(qemu)") {
        let n = stream.read(&mut buf).expect("monitor read");
        assert!(n > 0, "QEMU's monitor closed");
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn qemu_snapshot(dir: &Path, base: Command) -> PathBuf {
    let monitor = dir.join("qemu-monitor.sock");
    let state = dir.join("qemu.state");
    let mut cmd = base;
    cmd.arg("-monitor").arg(format!("unix:{},server,nowait", monitor.display()));
    let mut vm = Vm(cmd.stdin(Stdio::null()).stdout(Stdio::piped()).spawn().expect("spawning QEMU"));
    let mut lines = console(&mut vm.0);
    wait_line(&mut lines, READY, GUEST_DEADLINE);
    wait_line(&mut lines, TICK, Duration::from_secs(60));
    let drain = std::thread::spawn(move || lines.count());
    let mut mon = UnixStream::connect(&monitor).expect("QEMU monitor");
    mon.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
    let mut banner = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&banner).contains("(qemu)") {
        let n = mon.read(&mut buf).expect("monitor banner");
        banner.extend_from_slice(&buf[..n]);
    }
    // Live migration to a file: QEMU stops the guest once the last pages are sent, and the
    // destination starts it (a guest paused before `migrate` would stay paused there).
    hmp(&mut mon, &format!("migrate \"exec:cat > {}\"", state.display()));
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let info = hmp(&mut mon, "info migrate");
        if info.contains("Migration status: completed") {
            break;
        }
        assert!(!info.contains("Migration status: failed"), "QEMU migration failed: {info}");
        assert!(Instant::now() < deadline, "QEMU migration did not complete: {info}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = mon.write_all(b"quit\n");
    let _ = vm.0.wait();
    let _ = drain.join();
    state
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runs = option(&args, "--runs", 10).max(1);
    let memory_mib = option(&args, "--memory-mib", 256);
    let dir = std::env::temp_dir().join(format!("nestbox-bench-restore-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bench dir");
    let (kernel, _) = guest_image();
    let initramfs = dir.join("ticker.cpio");
    test_initramfs(&guest_binary("guest-ticker"), &initramfs);
    let template = CpuTemplate::Auto.resolve();
    let cmdline = kernel_cmdline(template, &[], "").expect("cmdline").as_cstring().expect("cstring");
    let cmdline = cmdline.into_string().expect("utf-8");

    eprintln!("booting nestbox-vmm once and snapshotting it");
    let ours = ours_snapshot(&dir, &kernel, &initramfs, memory_mib);
    eprintln!("booting QEMU once and migrating it to a file");
    let qemu_state = qemu_snapshot(&dir, qemu_command(&kernel, &initramfs, &cmdline, memory_mib));
    let snapshot_size = |p: &Path| {
        let du = Command::new("du").arg("-sk").arg(p).output().expect("du");
        String::from_utf8_lossy(&du.stdout).split_whitespace().next().unwrap_or("0").parse::<u64>().unwrap_or(0)
    };

    let (mut ours_s, mut qemu_s, mut ours_pss, mut qemu_pss) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut ours_first_run = Vec::new();
    for run in 0..runs {
        eprintln!("restore {}/{runs}", run + 1);
        let mut cmd = Command::new(binary("nestbox-vmm", "nestbox-vmm"));
        cmd.arg("--restore").arg(&ours).arg("--boot-timestamps");
        let r = time_restore(cmd, true);
        ours_s.push(r.seconds);
        ours_first_run.extend(r.first_run_seconds);
        ours_pss.push(r.pss_kib);
        let mut cmd = qemu_command(&kernel, &initramfs, &cmdline, memory_mib);
        cmd.arg("-incoming").arg(format!("exec:cat {}", qemu_state.display()));
        let r = time_restore(cmd, false);
        qemu_s.push(r.seconds);
        qemu_pss.push(r.pss_kib);
    }
    ours_s.sort_by(f64::total_cmp);
    ours_first_run.sort_by(f64::total_cmp);
    qemu_s.sort_by(f64::total_cmp);
    let mean = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len() as f64 / 1024.0;
    println!(
        "| figure ({runs} restores each, {memory_mib} MiB guest, 1 vCPU) | nestbox-vmm | QEMU -incoming | ratio |"
    );
    println!("|---|---|---|---|");
    for (name, p) in [("spawn to guest running again, p50", 0.5), ("spawn to guest running again, p95", 0.95)] {
        let (a, b) = (percentile(&ours_s, p), percentile(&qemu_s, p));
        println!("| {name} | {:.1} ms | {:.1} ms | {:.2} |", a * 1e3, b * 1e3, a / b);
    }
    for (name, p) in
        [("nestbox-vmm spawn to first KVM_RUN, p50", 0.5), ("nestbox-vmm spawn to first KVM_RUN, p95", 0.95)]
    {
        println!("| {name} | {:.1} ms | – | – |", percentile(&ours_first_run, p) * 1e3);
    }
    let (a, b) = (mean(&ours_pss), mean(&qemu_pss));
    println!("| PSS of one restored VMM (guest ticking) | {a:.1} MiB | {b:.1} MiB | {:.2} |", a / b);
    let (a, b) = (snapshot_size(&ours) as f64 / 1024.0, snapshot_size(&qemu_state) as f64 / 1024.0);
    println!("| snapshot on disk | {a:.1} MiB | {b:.1} MiB | {:.2} |", a / b);
    let _ = std::fs::remove_dir_all(&dir);
}
