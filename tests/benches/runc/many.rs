//! Many pods at once (`--figures many --many N`; by hand, not in scripts/bench's default
//! figures): N pods started together with `ctr run -d`, then N pods together through CRI
//! (`many-ctr`: the ctr half alone)
//! (RunPodSandbox, CreateContainer, StartContainer until the workload's first output is in its
//! log). Every start is timed from its own request; all must succeed, and the failures are
//! listed. For nestbox, where the time goes: each pod's start phases from the shim's log lines,
//! and, with all pods running, each VMM's CPU time and page faults and the host's CPU use over
//! the starts (concurrent guests compete for the host's cores, and a restored guest's first
//! touch of each page of its snapshot is a fault).

use crate::breakdown::{breakdown, START_PHASES};
use crate::measure::{log, Bench, Outcome};
use crate::procfs::summary;
use crate::workload::bench_namespaces;
use nestbox_tests::containerd::BUSYBOX;
use nestbox_tests::cri::{container_config, pod_config, Cri};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The start's phases up to its first process's start, then `last` until the start returned
/// (`ctr run -d`: once the task runs; a CRI pod: the pause container's start, then the
/// workload's).
fn phases_until_started(last: &'static str) -> Vec<(&'static str, &'static str, Option<&'static str>)> {
    let mut phases: Vec<_> = START_PHASES.iter().copied().take_while(|(_, _, m)| m.is_some()).collect();
    phases.truncate(phases.iter().position(|(n, _, _)| n.starts_with("process start")).map_or(phases.len(), |i| i + 1));
    phases.push((last, "mixed", None));
    phases
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// The host's (busy, all) CPU ticks so far, from /proc/stat's first line.
fn host_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> =
        stat.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    let all: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (all.saturating_sub(idle), all)
}

/// (CPU seconds, minor faults, major faults) of a process so far.
fn process_work(pid: i32) -> (f64, u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let field = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let ticks = crate::procfs::clock_ticks_per_second();
    ((field(11) + field(12)) as f64 / ticks, field(7), field(9))
}

/// Runs `work` for every item on a thread of its own, all at once; results in item order.
fn all_at_once<T: Sync, R: Send>(items: &[T], work: impl Fn(&T) -> R + Sync) -> Vec<R> {
    std::thread::scope(|s| {
        let work = &work;
        let handles: Vec<_> = items.iter().map(|item| s.spawn(move || work(item))).collect();
        handles.into_iter().map(|h| h.join().expect("a start thread panicked")).collect()
    })
}

/// What all starts did: p50/p95 of the successful ones, the failures, the window.
fn outcome(
    names: &[String],
    results: &[Result<(f64, f64), String>],
    window: f64,
    cpu: (u64, u64),
) -> Map<String, Value> {
    let times: Vec<f64> = results.iter().filter_map(|r| r.as_ref().ok().map(|(s, _)| *s)).collect();
    let failures: Vec<Value> = names
        .iter()
        .zip(results)
        .filter_map(|(n, r)| {
            r.as_ref().err().map(|e| json!({"pod": n, "error": e.chars().take(600).collect::<String>()}))
        })
        .collect();
    let mut m = Map::new();
    m.insert("n".into(), json!(names.len()));
    m.insert("ok".into(), json!(times.len()));
    m.insert("seconds".into(), summary(&times));
    m.insert("window_seconds".into(), json!(window));
    m.insert("host_cpu_busy_percent".into(), json!(100.0 * cpu.0 as f64 / cpu.1.max(1) as f64));
    m.insert("failures".into(), Value::Array(failures));
    m
}

/// The mean seconds of each phase label over the pods' breakdowns.
fn phase_means(breakdowns: &[Value]) -> Value {
    let mut sums: Vec<(String, f64, usize)> = Vec::new();
    for phase in breakdowns.iter().filter_map(|b| b.as_array()).flatten() {
        let (Some(label), Some(seconds)) = (phase[0].as_str(), phase[2].as_f64()) else { continue };
        match sums.iter_mut().find(|(l, _, _)| l == label) {
            Some(entry) => (entry.1, entry.2) = (entry.1 + seconds, entry.2 + 1),
            None => sums.push((label.to_string(), seconds, 1)),
        }
    }
    Value::Array(sums.into_iter().map(|(l, s, n)| json!([l, s / n as f64, n])).collect())
}

impl Bench<'_> {
    /// N pods at once with ctr, then (`cri`) N through CRI.
    pub fn many(&mut self, n: usize, cri: bool) -> Outcome<()> {
        self.make_template_first()?;
        let ctr = self.many_ctr(n);
        self.remove_all();
        if !cri {
            return ctr;
        }
        let cri = self.many_cri(n);
        ctr.and(cri)
    }

    /// A deadline for one of n concurrent starts: the starts share the host's cores.
    fn many_deadline(&self, n: usize) -> Duration {
        self.deadline * u32::try_from(1 + n / 4).unwrap_or(u32::MAX)
    }

    /// (CPU seconds, minor faults, major faults) of every VMM, as summaries.
    fn vmm_work(&self) -> Value {
        let work: Vec<(f64, u64, u64)> = self.c.vmm_pids().into_iter().map(process_work).collect();
        let col = |f: &dyn Fn(&(f64, u64, u64)) -> f64| summary(&work.iter().map(f).collect::<Vec<_>>());
        json!({"vmms": work.len(), "cpu_seconds": col(&|w| w.0), "minor_faults": col(&|w| w.1 as f64),
               "major_faults": col(&|w| w.2 as f64)})
    }

    /// For nestbox: the VMMs' work, and the phases of each pod that started (`started`: its
    /// id, start seconds and wall-clock start) up to phase `last`, from containerd's log since
    /// `offset`, with their means.
    fn add_nestbox_work<'a>(
        &self,
        m: &mut Map<String, Value>,
        offset: u64,
        last: &'static str,
        started: impl Iterator<Item = (&'a str, f64, f64)>,
    ) {
        if !self.nestbox() {
            return;
        }
        m.insert("vmm".into(), self.vmm_work());
        let lines = self.c.log_since(offset);
        let phases = phases_until_started(last);
        let breakdowns: Vec<Value> = started.map(|(id, s, wall)| breakdown(&lines, &phases, id, "", wall, s)).collect();
        m.insert("phase_means".into(), phase_means(&breakdowns));
        m.insert("phases".into(), Value::Array(breakdowns));
    }

    fn many_ctr(&mut self, n: usize) -> Outcome<()> {
        let names: Vec<String> = (0..n).map(|_| self.name("many")).collect();
        let (socket, namespace, runtime, deadline) =
            (self.c.socket.clone(), self.c.namespace.clone(), self.containerd_runtime(), self.many_deadline(n));
        log(&format!("{}: {n} pods at once with ctr run -d", self.runtime));
        let (offset, cpu_before, started) = (self.c.log_offset(), host_ticks(), Instant::now());
        let results = all_at_once(&names, |cid| {
            let wall = unix_now();
            let mut cmd = Command::new("ctr");
            cmd.arg("--address").arg(&socket).arg("--namespace").arg(&namespace);
            cmd.args(["run", "-d", "--runtime", runtime, BUSYBOX, cid, "/bin/sleep", "2147483647"]);
            match nestbox_tests::run_bounded(&mut cmd, deadline) {
                Ok(done) if done.status.success() => Ok((done.elapsed.as_secs_f64(), wall)),
                Ok(done) => Err(format!("ctr run ({}): {}", done.status, done.stderr.trim())),
                Err(killed) => Err(format!("ctr run: no answer within {deadline:?}: {}", killed.stderr.trim())),
            }
        });
        let window = started.elapsed().as_secs_f64();
        let cpu_after = host_ticks();
        let mut m = outcome(&names, &results, window, (cpu_after.0 - cpu_before.0, cpu_after.1 - cpu_before.1));
        let started_ok =
            names.iter().zip(&results).filter_map(|(cid, r)| r.as_ref().ok().map(|(s, w)| (cid.as_str(), *s, *w)));
        self.add_nestbox_work(&mut m, offset, "start reported, ctr exit", started_ok);
        self.report(&format!("many_ctr_{n}"), m)?;
        let removed = all_at_once(&names, |cid| self.remove_container(cid));
        log(&format!("{}: removed {} pods", self.runtime, removed.len()));
        Ok(())
    }

    fn many_cri(&mut self, n: usize) -> Outcome<()> {
        let names: Vec<String> = (0..n).map(|_| self.name("manycri")).collect();
        let (socket, handler, deadline, dir) =
            (self.c.socket.clone(), self.cri_handler(), self.many_deadline(n), self.c.dir.join("pod-logs"));
        log(&format!("{}: {n} CRI pods at once", self.runtime));
        let (offset, cpu_before, started) = (self.c.log_offset(), host_ticks(), Instant::now());
        let results = all_at_once(&names, |name| {
            let wall = unix_now();
            let start = Instant::now();
            let pod = cri_pod(&socket, &dir.join(name), name, handler, deadline)?;
            Ok::<_, String>((start.elapsed().as_secs_f64(), wall, pod))
        });
        let window = started.elapsed().as_secs_f64();
        let cpu_after = host_ticks();
        let times: Vec<Result<(f64, f64), String>> =
            results.iter().map(|r| r.as_ref().map(|(s, w, _)| (*s, *w)).map_err(Clone::clone)).collect();
        let mut m = outcome(&names, &times, window, (cpu_after.0 - cpu_before.0, cpu_after.1 - cpu_before.1));
        let started_ok = results.iter().filter_map(|r| r.as_ref().ok().map(|(s, w, pod)| (pod.as_str(), *s, *w)));
        self.add_nestbox_work(&mut m, offset, "the workload container: create, start, first output", started_ok);
        let reported = self.report(&format!("many_cri_{n}"), m);
        let pods: Vec<String> = results.into_iter().filter_map(|r| r.ok().map(|(_, _, pod)| pod)).collect();
        let torn: Vec<Result<(), String>> = all_at_once(&pods, |pod| {
            let cri = Cri::connect(&socket).map_err(|e| e.to_string())?;
            cri.stop_pod_sandbox(pod, deadline).map_err(|e| e.to_string())?;
            cri.remove_pod_sandbox(pod, deadline).map_err(|e| e.to_string())
        });
        let failed: Vec<&String> = torn.iter().filter_map(|r| r.as_ref().err()).collect();
        if !failed.is_empty() {
            log(&format!("{}: {} CRI teardowns failed: {failed:?}", self.runtime, failed.len()));
        }
        // Pods whose container failed were not in the list.
        if let Err(e) = self.c.cri().remove_all_pods(deadline) {
            log(&format!("{}: removing the CRI pods left: {e}", self.runtime));
        }
        reported
    }

    /// Stores one figure and logs it; an error when any start failed.
    fn report(&mut self, key: &str, m: Map<String, Value>) -> Outcome<()> {
        let (ok, n) = (m["ok"].as_u64().unwrap_or(0), m["n"].as_u64().unwrap_or(0));
        let p = |q: &str| m["seconds"][q].as_f64().unwrap_or(f64::NAN);
        log(&format!(
            "{}: {key}: {ok}/{n} started, p50 {:.2} s, p95 {:.2} s, max {:.2} s, window {:.1} s, host CPU {:.0}% busy",
            self.runtime,
            p("p50"),
            p("p95"),
            p("max"),
            m["window_seconds"].as_f64().unwrap_or(0.0),
            m["host_cpu_busy_percent"].as_f64().unwrap_or(0.0)
        ));
        let failures = m["failures"].clone();
        self.result.insert(key.into(), Value::Object(m));
        if ok == n {
            Ok(())
        } else {
            Err(format!("{key}: {} of {n} starts failed: {failures}", n - ok))
        }
    }
}

/// One CRI pod on a connection of its own (the harness's client is not shared across
/// threads): RunPodSandbox, then a workload container until its first output is in its log.
/// Returns the pod's id.
fn cri_pod(socket: &Path, logs: &PathBuf, name: &str, handler: &str, deadline: Duration) -> Outcome<String> {
    let start = Instant::now();
    let cri = Cri::connect(socket).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(logs).map_err(|e| format!("creating {}: {e}", logs.display()))?;
    let sandbox = pod_config(name, &std::process::id().to_string(), logs, bench_namespaces());
    let pod = cri.run_pod_sandbox(&sandbox, handler, deadline).map_err(|e| e.to_string())?;
    let command = ["/bin/sh", "-c", "echo workload-running; exec sleep 2147483647"];
    let config = container_config("work", BUSYBOX, &command, "work.log", bench_namespaces());
    let container = cri.create_container(&pod, &config, &sandbox, deadline).map_err(|e| format!("{pod}: {e}"))?;
    cri.start_container(&container, deadline).map_err(|e| format!("{pod}: {e}"))?;
    let log = logs.join("work.log");
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("workload-running") {
        if start.elapsed() > deadline {
            return Err(format!("CRI pod {pod}: the workload's output never reached {}", log.display()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(pod)
}
