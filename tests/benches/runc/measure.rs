//! The figures of one runtime: `ctr run --rm` start latency (and, for nestbox, where it
//! goes), host memory and idle CPU with 1 and N pods, `ctr task exec` latency, throughput
//! inside a container, and CRI pods (sandbox alone, and with a workload container).

use crate::breakdown::{breakdown, lines_about, EXEC_PHASES, START_PHASES};
use crate::procfs::{clock_ticks_per_second, cpu_ticks, descendants, mem_available_kib, pss_kib, summary};
use nestbox_tests::containerd::{Containerd, BUSYBOX, RUNC, RUNTIME, RUNTIME_HOST};
use nestbox_tests::procmem::largest_mapping_kib;
use serde_json::{json, Map, Value};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub type Outcome<T> = Result<T, String>;

/// Runs and sizes per runtime. A cold nestbox start boots a guest kernel (one to three
/// minutes on a software-nested host), so it gets few runs and two pods for the memory figure.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub start: usize,
    pub exec: usize,
    pub cri: usize,
    pub pods: usize,
    pub rootfs_mib: u64,
    pub tmpfs_mib: u64,
    pub repeat: u64,
    pub stdio_mib: u64,
}

impl Plan {
    pub fn of(runtime: &str, quick: bool) -> Plan {
        let p = |start, exec, cri, pods, rootfs_mib, tmpfs_mib, repeat, stdio_mib| Plan {
            start,
            exec,
            cri,
            pods,
            rootfs_mib,
            tmpfs_mib,
            repeat,
            stdio_mib,
        };
        match (runtime, quick) {
            ("runc" | "nestbox-host", false) => p(20, 20, 10, 10, 32, 32, 32, 64),
            ("runc" | "nestbox-host", true) => p(3, 3, 2, 3, 8, 8, 4, 4),
            ("nestbox-warm", false) => p(20, 5, 5, 10, 4, 8, 1, 2),
            ("nestbox-warm", true) => p(2, 2, 1, 2, 1, 4, 1, 1),
            (_, false) => p(3, 5, 1, 2, 4, 8, 1, 2),
            (_, true) => p(1, 2, 1, 1, 1, 4, 1, 1),
        }
    }

    fn json(&self) -> Value {
        json!({"start": self.start, "exec": self.exec, "cri": self.cri, "pods": self.pods,
               "rootfs_mib": self.rootfs_mib, "tmpfs_mib": self.tmpfs_mib, "repeat": self.repeat,
               "stdio_mib": self.stdio_mib})
    }
}

pub fn log(msg: &str) {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (h, m, s) = (secs / 3600 % 24, secs / 60 % 60, secs % 60);
    eprintln!("[{h:02}:{m:02}:{s:02} UTC] {msg}");
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

pub struct Bench<'a> {
    pub c: &'a Containerd,
    pub runtime: &'a str,
    pub plan: Plan,
    pub result: Map<String, Value>,
    /// A deadline for one ctr or CRI call: a cold boot under load has been seen at ~170 s.
    pub deadline: Duration,
    seq: usize,
}

impl<'a> Bench<'a> {
    pub fn new(c: &'a Containerd, runtime: &'a str, plan: Plan) -> Bench<'a> {
        let deadline = Duration::from_secs(match runtime {
            "runc" | "nestbox-host" => 60,
            "nestbox-warm" => 300,
            _ => 900,
        });
        let mut result = Map::new();
        result.insert("plan".into(), plan.json());
        Bench { c, runtime, plan, result, deadline, seq: 0 }
    }

    pub(crate) fn nestbox(&self) -> bool {
        self.runtime.starts_with("nestbox")
    }

    pub(crate) fn containerd_runtime(&self) -> &'static str {
        match self.runtime {
            "nestbox-host" => RUNTIME_HOST,
            _ if self.nestbox() => RUNTIME,
            _ => RUNC,
        }
    }

    pub fn cri_handler(&self) -> &'static str {
        match self.runtime {
            "nestbox-host" => "nestbox-host",
            _ if self.nestbox() => "nestbox",
            _ => "runc",
        }
    }

    pub fn name(&mut self, what: &str) -> String {
        self.seq += 1;
        format!("{}-{what}-{}", self.runtime, self.seq)
    }

    fn set(&mut self, key: &str, value: Value) {
        self.result.insert(key.into(), value);
    }

    /// Runs `ctr args` and fails with its stderr and containerd's log when it fails; the
    /// seconds it took and its start as Unix time.
    fn ctr(&self, args: &[&str], deadline: Duration) -> Outcome<(nestbox_tests::Finished, f64)> {
        let wall = unix_now();
        let done = self.c.run(args, deadline);
        if !done.status.success() {
            return Err(format!(
                "ctr {} failed ({}): {}\ncontainerd log tail:\n{}",
                args.join(" "),
                done.status,
                done.stderr.trim(),
                self.c.log_tail(40)
            ));
        }
        Ok((done, wall))
    }

    fn run_rm(&self, cid: &str, command: &[&str]) -> Outcome<(f64, f64)> {
        let mut args = vec!["run", "--rm", "--runtime", self.containerd_runtime(), BUSYBOX, cid];
        args.extend(command);
        let (done, wall) = self.ctr(&args, self.deadline)?;
        Ok((done.elapsed.as_secs_f64(), wall))
    }

    /// One timed start with its log lines, for the template start and the measured ones.
    fn start_once(&mut self, what: &str) -> Outcome<(String, f64, f64, Vec<String>)> {
        let cid = self.name(what);
        let offset = self.c.log_offset();
        let (seconds, wall) = self.run_rm(&cid, &["/bin/true"])?;
        Ok((cid, seconds, wall, self.c.log_since(offset)))
    }

    pub fn start_latency(&mut self) -> Outcome<()> {
        if matches!(self.runtime, "runc" | "nestbox-host") {
            self.start_once("warmup")?; // the first use of the snapshot and of runc
        }
        if self.runtime == "nestbox-warm" {
            log(&format!("{}: first start (makes the template)", self.runtime));
            let (cid, seconds, wall, lines) = self.start_once("template")?;
            let phases = breakdown(&lines, START_PHASES, &cid, "", wall, seconds);
            self.set(
                "template_start",
                json!({"seconds": seconds, "phases": phases, "lines": lines_about(&lines, &cid)}),
            );
        }
        let (mut times, mut phases, mut remade) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..self.plan.start {
            let (cid, seconds, wall, lines) = self.start_once("start")?;
            let progress = format!("{}: start {}/{}: {seconds:.3} s", self.runtime, i + 1, self.plan.start);
            if self.runtime == "nestbox-warm" && lines.iter().any(|l| l.contains("making template")) {
                // The shim found its template stale and made a new one: not a warm start.
                remade.push(seconds);
                log(&format!("{progress} (made a template: not counted)"));
                continue;
            }
            times.push(seconds);
            if self.nestbox() {
                phases.push(breakdown(&lines, START_PHASES, &cid, "", wall, seconds));
                if i == 0 {
                    self.set("start_lines", lines_about(&lines, &cid));
                }
            }
            log(&progress);
        }
        self.set("start", summary(&times));
        if !remade.is_empty() {
            self.set("starts_that_made_a_template", json!(remade));
        }
        if !phases.is_empty() {
            self.set("start_phases", Value::Array(phases));
        }
        Ok(())
    }

    fn run_pod(&self, cid: &str) -> Outcome<()> {
        let args = ["run", "-d", "--runtime", self.containerd_runtime(), BUSYBOX, cid, "/bin/sleep", "2147483647"];
        self.ctr(&args, self.deadline).map(drop)
    }

    /// (shims, VMMs, container processes) of this runtime's running pods `cids`.
    fn pod_processes(&self, cids: &[String]) -> Outcome<(Vec<i32>, Vec<i32>, Vec<i32>)> {
        if self.nestbox() {
            return Ok((self.c.shims_of(self.cri_handler()), self.c.vmm_pids(), Vec::new()));
        }
        let (listed, _) = self.ctr(&["task", "ls"], self.deadline)?;
        let mut containers = Vec::new();
        for line in listed.stdout.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if let (Some(id), Some(Ok(pid))) = (fields.first(), fields.get(1).map(|p| p.parse::<i32>())) {
                if cids.iter().any(|c| c == id) {
                    containers.push(pid);
                    containers.extend(descendants(pid));
                }
            }
        }
        Ok((self.c.shims_of("runc"), Vec::new(), containers))
    }

    fn memory_sample(&self, cids: &[String]) -> Outcome<Value> {
        // Let the guests settle after their start.
        std::thread::sleep(Duration::from_secs(if self.nestbox() { 20 } else { 5 }));
        let (shims, vmms, containers) = self.pod_processes(cids)?;
        let sum = |pids: &[i32], f: fn(i32) -> u64| pids.iter().map(|p| f(*p)).sum::<u64>();
        let (shim, vmm, work) = (sum(&shims, pss_kib), sum(&vmms, pss_kib), sum(&containers, pss_kib));
        let guest = sum(&vmms, |pid| largest_mapping_kib(pid, "Pss:"));
        let all: Vec<i32> = shims.iter().chain(&vmms).chain(&containers).copied().collect();
        let before: Vec<u64> = all.iter().map(|p| cpu_ticks(*p)).collect();
        let idle = Duration::from_secs(10);
        std::thread::sleep(idle);
        let ticks: u64 = all.iter().zip(&before).map(|(p, t)| cpu_ticks(*p).saturating_sub(*t)).sum();
        let n = cids.len() as f64;
        let total = shim + vmm + work;
        Ok(json!({
            "pods": cids.len(),
            "processes": {"shims": shims.len(), "vmms": vmms.len(), "containers": containers.len()},
            "shim_kib": shim, "vmm_kib": vmm.saturating_sub(guest), "guest_kib": guest, "container_kib": work,
            "total_kib": total, "per_pod_kib": total as f64 / n,
            "idle_cpu_percent_per_pod": 100.0 * ticks as f64 / clock_ticks_per_second() / idle.as_secs_f64() / n,
        }))
    }

    /// Pod 1 (kept for exec and throughput), memory with 1 pod, then with N pods. Returns
    /// pod 1's name.
    pub fn memory_and_pods(&mut self) -> Outcome<String> {
        let n = self.plan.pods;
        let available = mem_available_kib();
        let mut pods = vec![format!("{}-pod-1", self.runtime)];
        log(&format!("{}: pod 1 of {n}", self.runtime));
        self.run_pod(&pods[0])?;
        let one = self.memory_sample(&pods)?;
        self.set("memory_1", one.clone());
        for i in 2..=n {
            log(&format!("{}: pod {i} of {n}", self.runtime));
            pods.push(format!("{}-pod-{i}", self.runtime));
            self.run_pod(&pods[i - 1])?;
        }
        if n > 1 {
            let many = self.memory_sample(&pods)?;
            let kib = |v: &Value, k: &str| v[k].as_f64().unwrap_or(0.0);
            let marginal = (kib(&many, "total_kib") - kib(&one, "total_kib")) / (n - 1) as f64;
            let idle = kib(&many, "idle_cpu_percent_per_pod");
            let cores = std::thread::available_parallelism().map(|c| c.get()).unwrap_or(1) as f64;
            let fit_by_memory = (available as f64 / marginal.max(kib(&many, "per_pod_kib")).max(1.0)) as u64;
            let fit_by_cpu = (idle > 0.0).then(|| (100.0 * cores / idle) as u64);
            self.set(
                "density",
                json!({"mem_available_kib": available, "marginal_pod_kib": marginal, "reached": n,
                       "fit_by_memory": fit_by_memory, "fit_by_idle_cpu": fit_by_cpu}),
            );
            self.set("memory_n", many);
        }
        for cid in &pods[1..] {
            self.remove_container(cid);
        }
        Ok(pods.swap_remove(0))
    }

    /// Kills and deletes one container started with ctr; best effort.
    pub fn remove_container(&self, cid: &str) {
        let _ = self.c.run(&["task", "kill", "-s", "KILL", cid], self.deadline);
        let _ = self.c.run(&["task", "delete", "-f", cid], self.deadline);
        let _ = self.c.run(&["containers", "delete", cid], self.deadline);
    }

    /// Kills and deletes every container of the bench's namespace.
    pub fn remove_all(&self) {
        let listed = self.c.run(&["containers", "ls", "-q"], self.deadline);
        for cid in listed.stdout.split_whitespace() {
            self.remove_container(cid);
        }
    }

    fn exec_timed(&mut self, cid: &str, command: &[&str], exec_id: Option<String>) -> Outcome<nestbox_tests::Finished> {
        let exec_id = exec_id.unwrap_or_else(|| self.name("exec"));
        let mut args = vec!["task", "exec", "--exec-id", &exec_id, cid];
        args.extend(command);
        self.ctr(&args, self.deadline).map(|(done, _)| done)
    }

    pub fn exec_latency(&mut self, cid: &str) -> Outcome<()> {
        let (mut times, mut phases) = (Vec::new(), Vec::new());
        for i in 0..self.plan.exec {
            let exec_id = self.name("exec");
            let (offset, wall) = (self.c.log_offset(), unix_now());
            let seconds = self.exec_timed(cid, &["/bin/true"], Some(exec_id.clone()))?.elapsed.as_secs_f64();
            times.push(seconds);
            if self.nestbox() {
                phases.push(breakdown(&self.c.log_since(offset), EXEC_PHASES, cid, &exec_id, wall, seconds));
            }
            log(&format!("{}: exec {}/{}: {seconds:.3} s", self.runtime, i + 1, self.plan.exec));
        }
        self.set("exec", summary(&times));
        if !phases.is_empty() {
            self.set("exec_phases", Value::Array(phases));
        }
        Ok(())
    }

    pub fn elapsed_since(start: Instant) -> f64 {
        start.elapsed().as_secs_f64()
    }
}
