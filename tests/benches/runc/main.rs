//! nestbox against plain runc, side by side, under a private containerd: the measuring half
//! of `scripts/bench`, which runs this and then renders its JSON into
//! docs/benchmarks-runc.md and .png.
//!
//!     cargo bench -p nestbox-tests --bench runc -- --out FILE.json [--runtimes runc,nestbox-warm,nestbox-cold]
//!         [--quick] [--figures start,memory,exec,throughput,crisandbox,cri] [--binaries DIR]
//!         [--figures many --many N,...] [--agent-log-level debug] [--vcpus N] [--shared-templates]
//!
//! containerd runs with its own root, state and sockets in a temporary folder and the CRI
//! plugin on (CNI's bridge in the harness's own network namespace for the pods), with the busybox image built locally
//! (tests/src/containerd.rs, the harness the tests use). Runtimes:
//!
//!   runc          io.containerd.runc.v2
//!   nestbox-cold  nestbox with `[runtime] warm_start = false`: every pod boots its guest kernel
//!   nestbox-warm  nestbox with `warm_start = true`: pods restore a template (a snapshot of a
//!                 booted guest); the first pod of the run makes it, reported apart
//!   nestbox-host  the shim's test-only `host-agent` build (DIR/containerd-shim-nestbox-host-v2
//!                 with DIR/nestbox-agent beside it): the same shim, agent, protocol and
//!                 streams with the agent on the host, i.e. everything but the guest kernel
//!                 (docs/benchmarks-host.md). Not in the
//!                 default list: `--runtimes runc,nestbox-host`.
//!
//! DIR holds the shim, the VMM and the guest image (DIR/guest/vmlinux, initramfs.cpio) to
//! measure: scripts/bench's copies of a release build, so that a rebuild in the work tree
//! during the run changes nothing under test. FILE.json gets `{"results": {runtime: {...}}}`
//! after each runtime, in the schema of docs/benchmarks-runc.json. A figure that fails is
//! recorded under the runtime's `errors` and the others are still measured.
//!
//! `--figures many` (by hand, not among the default figures): N pods (`--many N`, default 4;
//! a list runs each) started at once with ctr and then through CRI (`many-ctr`: with ctr
//! only; many.rs, docs/guest-work.md). `--agent-log-level debug` makes the guests' agents log what each call
//! costs them (the lines go into the runtime's results as `guest_work`); `--vcpus N` sizes the
//! nestbox pods' VMs; `--shared-templates` keeps the warm-start templates in the tests' shared
//! folder (target/nestbox-test-templates), so a second run restores rather than boots. containerd's log (with the shims' and guests' lines) is kept beside
//! FILE.json as FILE.json.containerd.log.

mod breakdown;
mod many;
mod measure;
mod procfs;
mod workload;

use measure::{log, Bench, Outcome, Plan};
use nestbox_tests::containerd::{Containerd, Options};
use serde_json::{json, Map, Value};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::time::Instant;

const RUNTIMES: [&str; 4] = ["runc", "nestbox-warm", "nestbox-cold", "nestbox-host"];
const ALL_FIGURES: &str = "start,memory,exec,throughput,crisandbox,cri";
/// Figures measured only when asked for by name.
const EXTRA_FIGURES: &str = "many,many-ctr";

struct Args {
    runtimes: Vec<String>,
    figures: Vec<String>,
    quick: bool,
    /// Pods started at once by the `many` figure, one run per number.
    many: Vec<usize>,
    /// nestbox's `agent.log_level` and `hypervisor.vcpus`, when given.
    agent_log_level: Option<String>,
    vcpus: Option<u8>,
    shared_templates: bool,
    binaries: Option<PathBuf>,
    out: PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let (mut runtimes, mut figures) = (RUNTIMES[..3].join(","), ALL_FIGURES.to_string());
    let (mut quick, mut binaries, mut out, mut many) = (false, None, None, "4".to_string());
    let (mut agent_log_level, mut vcpus, mut shared_templates) = (None, None, false);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--runtimes" => runtimes = value()?,
            "--figures" => figures = value()?,
            "--binaries" => binaries = Some(PathBuf::from(value()?)),
            "--out" => out = Some(PathBuf::from(value()?)),
            "--quick" => quick = true,
            "--shared-templates" => shared_templates = true,
            "--many" => many = value()?,
            "--agent-log-level" => agent_log_level = Some(value()?),
            "--vcpus" => vcpus = Some(value()?.parse().map_err(|e| format!("--vcpus: {e}"))?),
            "--bench" => {} // cargo bench passes it to every bench target
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let split = |s: &str| s.split(',').filter(|x| !x.is_empty()).map(String::from).collect::<Vec<_>>();
    let runtimes = split(&runtimes);
    if let Some(unknown) = runtimes.iter().find(|r| !RUNTIMES.contains(&r.as_str())) {
        return Err(format!("unknown runtime {unknown}; known: {}", RUNTIMES.join(", ")));
    }
    let figures = split(&figures);
    let known = |f: &String| ALL_FIGURES.split(',').chain(EXTRA_FIGURES.split(',')).any(|k| k == f.as_str());
    if let Some(unknown) = figures.iter().find(|f| !known(f)) {
        return Err(format!("unknown figure {unknown}; known: {ALL_FIGURES},{EXTRA_FIGURES}"));
    }
    let out = out.ok_or("--out FILE.json is needed")?;
    let many = split(&many)
        .iter()
        .map(|n| n.parse::<usize>().map_err(|e| format!("--many {n}: {e}")))
        .collect::<Result<_, _>>()?;
    Ok(Args { runtimes, figures, quick, many, agent_log_level, vcpus, shared_templates, binaries, out })
}

/// Runs one figure; a failure (an error, or a panic of the harness) is recorded under the
/// runtime's `errors` and what the figure left is removed, so the next figure starts clean.
fn guarded<T>(bench: &mut Bench, label: &str, step: impl FnOnce(&mut Bench) -> Outcome<T>) -> Option<T> {
    let error = match catch_unwind(AssertUnwindSafe(|| step(bench))) {
        Ok(Ok(value)) => return Some(value),
        Ok(Err(e)) => e,
        Err(panic) => panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic without a message".into()),
    };
    log(&format!("{}: {label} FAILED: {error}", bench.runtime));
    let first_line: String = error.lines().next().unwrap_or("").chars().take(600).collect();
    let errors = bench.result.entry("errors").or_insert_with(|| json!({}));
    errors[label] = json!(first_line);
    bench.remove_all();
    None
}

/// The figures asked for, in the order that lets one pod serve exec and throughput.
fn measure(bench: &mut Bench, figures: &[String], many: &[usize]) {
    let wants = |f: &str| figures.iter().any(|x| x == f);
    if wants("start") {
        guarded(bench, "start latency", |b| b.start_latency());
    }
    if wants("memory") || wants("exec") || wants("throughput") {
        if let Some(pod) = guarded(bench, "memory", |b| b.memory_and_pods()) {
            if wants("exec") {
                guarded(bench, "exec latency", |b| b.exec_latency(&pod));
            }
            if wants("throughput") {
                guarded(bench, "throughput", |b| b.throughput(&pod));
            }
            bench.remove_all();
        }
    }
    if wants("crisandbox") {
        guarded(bench, "CRI sandboxes", |b| b.cri_pods(false));
    }
    if wants("cri") {
        guarded(bench, "CRI pods", |b| b.cri_pods(true));
    }
    if wants("many") || wants("many-ctr") {
        for &n in many {
            guarded(bench, &format!("{n} at once"), |b| b.many(n, wants("many")));
        }
    }
}

/// Points the shims at the run's copy of the guest image, warm start on or off.
fn configure_nestbox(c: &Containerd, runtime: &str, args: &Args) -> Result<(), String> {
    let guest = args.binaries.as_ref().ok_or("nestbox runtimes need --binaries DIR")?.join("guest");
    let warm = runtime == "nestbox-warm";
    let vcpus = args.vcpus.map(|n| format!("vcpus = {n}\n")).unwrap_or_default();
    let log_level = args.agent_log_level.as_ref().map(|l| format!("log_level = {l:?}\n")).unwrap_or_default();
    c.write_nestbox_config_with(
        &format!("warm_start = {warm}\n"),
        &format!(
            "kernel = \"{}\"\ninitramfs = \"{}\"\n{vcpus}[agent]\nboot_timeout_secs = 900\n{log_level}",
            guest.join("vmlinux").display(),
            guest.join("initramfs.cpio").display()
        ),
    );
    Ok(())
}

fn run(args: &Args) -> Result<(), String> {
    log("starting a private containerd with the CRI plugin");
    let c = Containerd::start_with(
        "bench",
        "",
        Options {
            cri: true,
            pod_network: true,
            binaries: args.binaries.clone(),
            shared_templates: args.shared_templates,
        },
    );
    c.import_busybox();
    let mut results = Map::new();
    for runtime in &args.runtimes {
        if runtime.starts_with("nestbox") {
            configure_nestbox(&c, runtime, args)?;
        }
        log(&format!("=== {runtime}"));
        let started = Instant::now();
        let mut bench = Bench::new(&c, runtime, Plan::of(runtime, args.quick));
        measure(&mut bench, &args.figures, &args.many);
        let mut result = std::mem::take(&mut bench.result);
        result.insert("seconds".into(), json!(started.elapsed().as_secs_f64()));
        let log = c.log();
        let work: Vec<&str> = log.lines().filter(|l| l.contains("nestbox-agent: guest work")).collect();
        if !work.is_empty() {
            result.insert("guest_work".into(), json!(work));
        }
        results.insert(runtime.clone(), Value::Object(result));
        // Written after each runtime, so that an interrupted run keeps what it measured.
        let text = serde_json::to_string_pretty(&json!({ "results": results })).map_err(|e| e.to_string())?;
        std::fs::write(&args.out, text).map_err(|e| format!("writing {}: {e}", args.out.display()))?;
    }
    let kept = PathBuf::from(format!("{}.containerd.log", args.out.display()));
    std::fs::write(&kept, c.log()).map_err(|e| format!("writing {}: {e}", kept.display()))?;
    log("cleaning up: pods, containers, containerd, shims, VMMs, mounts, the temporary folder");
    Ok(())
}

fn main() {
    let outcome = parse_args().and_then(|args| run(&args));
    if let Err(e) = outcome {
        eprintln!("bench runc: {e}");
        std::process::exit(1);
    }
}
