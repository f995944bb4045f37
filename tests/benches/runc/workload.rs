//! Figures taken inside a running container (file and stdio throughput) and through CRI
//! (pod sandboxes, pods with a workload container).

use crate::measure::{log, Bench, Outcome};
use crate::procfs::summary;
use nestbox_tests::containerd::BUSYBOX;
use nestbox_tests::cri::{api, api::NamespaceMode, container_config, namespaces, pod_config};
use serde_json::json;
use std::time::{Duration, Instant};

/// The pods' namespaces, the same for every runtime: kubelet's defaults, a network and an
/// IPC namespace of the pod (CNI's, in the harness's own network namespace: nestbox
/// refuses the host's) and a PID namespace per container.
pub(crate) fn bench_namespaces() -> api::NamespaceOption {
    namespaces(NamespaceMode::Pod, NamespaceMode::Pod, NamespaceMode::Container)
}

impl Bench<'_> {
    /// Seconds of a shell script inside the container, by busybox `time` (10 ms resolution).
    fn timed_in_container(&mut self, cid: &str, script: &str) -> Outcome<f64> {
        let done = self.exec_timed_with(cid, &["/bin/busybox", "time", "/bin/busybox", "sh", "-c", script])?;
        let real = done.lines().find_map(|l| l.trim().strip_prefix("real")).map(str::trim);
        let parse = |r: &str| -> Option<f64> {
            let (minutes, seconds) = r.strip_suffix('s')?.split_once('m')?;
            Some(minutes.trim().parse::<f64>().ok()? * 60.0 + seconds.trim().parse::<f64>().ok()?)
        };
        real.and_then(parse).ok_or_else(|| format!("busybox time sh -c {script:?}: no time in {done:?}"))
    }

    /// An exec with four times the usual deadline; its stderr (where busybox time writes).
    fn exec_timed_with(&mut self, cid: &str, command: &[&str]) -> Outcome<String> {
        let exec_id = self.name("time");
        let mut args = vec!["task", "exec", "--exec-id", &exec_id, cid];
        args.extend(command);
        let done = self.c.run(&args, self.deadline * 4);
        if done.status.success() {
            Ok(done.stderr)
        } else {
            Err(format!("ctr {}: {}", args.join(" "), done.stderr.trim()))
        }
    }

    /// MiB/s of `repeat` busybox dd runs of `mib` MiB, less the same runs of 0 MiB (starting
    /// dd costs seconds in an emulated guest kernel, and is not what is measured).
    fn dd_rate(&mut self, cid: &str, path: &str, mib: u64, write: bool) -> Outcome<(f64, f64)> {
        let repeat = self.plan.repeat;
        let script = |count: u64| {
            let dd = if write {
                format!("/bin/busybox dd if=/dev/zero of={path} bs=1M count={count} conv=fsync")
            } else {
                format!("/bin/busybox dd if={path} of=/dev/null bs=1M count={count}")
            };
            format!("i=0; while [ $i -lt {repeat} ]; do {dd} 2>/dev/null || exit 1; i=$((i+1)); done")
        };
        // A write of 0 MiB truncates the file: it runs first, so the file is full for the reads.
        let (empty, full) = if write {
            let empty = self.timed_in_container(cid, &script(0))?;
            (empty, self.timed_in_container(cid, &script(mib))?)
        } else {
            let full = self.timed_in_container(cid, &script(mib))?;
            (self.timed_in_container(cid, &script(0))?, full)
        };
        let net = full - empty;
        Ok(((mib * repeat) as f64 / net.max(0.01), net))
    }

    pub fn throughput(&mut self, cid: &str) -> Outcome<()> {
        let mut files = serde_json::Map::new();
        let repeat = self.plan.repeat;
        for (place, path, mib) in
            [("rootfs", "/bench.dat", self.plan.rootfs_mib), ("tmpfs", "/dev/shm/bench.dat", self.plan.tmpfs_mib)]
        {
            let (write, write_s) = self.dd_rate(cid, path, mib, true)?;
            let (read, read_s) = self.dd_rate(cid, path, mib, false)?;
            // The file stays: the pod is deleted next, and in a guest every exec costs seconds.
            files.insert(
                place.into(),
                json!({"mib": mib, "repeat": repeat, "write_mib_s": write, "read_mib_s": read,
                       "write_seconds": write_s, "read_seconds": read_s}),
            );
            log(&format!(
                "{}: {place}: write {write:.1} MiB/s, read {read:.1} MiB/s ({repeat} x {mib} MiB)",
                self.runtime
            ));
        }
        self.result.insert("files".into(), files.into());
        self.stdio(cid)
    }

    /// stdio: the exec's wall time with N MiB on stdout, less an exec printing nothing.
    fn stdio(&mut self, cid: &str) -> Outcome<()> {
        let mib = self.plan.stdio_mib;
        let bytes = mib * (1 << 20);
        let base = self.exec_stdout(cid, &["/bin/busybox", "head", "-c", "0", "/dev/zero"])?.0;
        let (seconds, got) = self.exec_stdout(cid, &["/bin/busybox", "head", "-c", &bytes.to_string(), "/dev/zero"])?;
        if got != bytes {
            return Err(format!("stdio: {got} bytes arrived of {bytes}"));
        }
        let rate = mib as f64 / (seconds - base).max(1e-3);
        self.result
            .insert("stdio".into(), json!({"mib": mib, "seconds": seconds, "base_seconds": base, "mib_s": rate}));
        log(&format!("{}: stdio out: {rate:.1} MiB/s ({mib} MiB)", self.runtime));
        Ok(())
    }

    /// Seconds of an exec and how many bytes it wrote to stdout.
    fn exec_stdout(&mut self, cid: &str, command: &[&str]) -> Outcome<(f64, u64)> {
        let exec_id = self.name("exec");
        let mut args = vec!["task", "exec", "--exec-id", &exec_id, cid];
        args.extend(command);
        let done = self.c.run(&args, self.deadline);
        if !done.status.success() {
            return Err(format!("ctr {}: {}", args.join(" "), done.stderr.trim()));
        }
        Ok((done.elapsed.as_secs_f64(), done.stdout.len() as u64))
    }

    /// A warm pod must not pay for the template: make it first when no start made it.
    pub(crate) fn make_template_first(&mut self) -> Outcome<()> {
        let made = std::fs::read_dir(&self.c.templates).map(|mut d| d.next().is_some()).unwrap_or(false);
        if self.runtime == "nestbox-warm" && !made {
            log(&format!("{}: making the template (one start, not counted)", self.runtime));
            let cid = self.name("template");
            let args = ["run", "--rm", "--runtime", nestbox_tests::containerd::RUNTIME, BUSYBOX, &cid, "/bin/true"];
            let done = self.c.run(&args, self.deadline);
            if !done.status.success() {
                return Err(format!("making the template: {}", done.stderr.trim()));
            }
        }
        Ok(())
    }

    /// CRI pods, `plan.cri` of them: with `workload`, RunPodSandbox, CreateContainer and
    /// StartContainer until the workload's first output is in its log; without, the sandbox
    /// alone (RunPodSandbox returns with the pause container running). Then StopPodSandbox
    /// and RemovePodSandbox, timed apart.
    pub fn cri_pods(&mut self, workload: bool) -> Outcome<()> {
        self.make_template_first()?;
        let (mut running, mut teardown) = (Vec::new(), Vec::new());
        let what = if workload { "CRI pod" } else { "CRI sandbox" };
        for i in 0..self.plan.cri {
            let name = self.name("cri");
            let (r, t) = self.cri_lifecycle(&name, workload)?;
            running.push(r);
            teardown.push(t);
            log(&format!(
                "{}: {what} {}/{}: running after {r:.3} s, teardown {t:.3} s",
                self.runtime,
                i + 1,
                self.plan.cri
            ));
        }
        let prefix = if workload { "cri" } else { "cri_sandbox" };
        self.result.insert(format!("{prefix}_running"), summary(&running));
        self.result.insert(format!("{prefix}_teardown"), summary(&teardown));
        Ok(())
    }

    /// One pod: seconds to running, seconds of the teardown.
    fn cri_lifecycle(&mut self, name: &str, workload: bool) -> Outcome<(f64, f64)> {
        let logs = self.c.dir.join("pod-logs").join(name);
        std::fs::create_dir_all(&logs).map_err(|e| format!("creating {}: {e}", logs.display()))?;
        let sandbox = pod_config(name, &std::process::id().to_string(), &logs, bench_namespaces());
        let cri = self.c.cri();
        let start = Instant::now();
        let pod = cri.run_pod_sandbox(&sandbox, self.cri_handler(), self.deadline).map_err(|e| e.to_string())?;
        let running =
            if workload { self.start_workload(&pod, &sandbox, &logs, start) } else { Ok(Bench::elapsed_since(start)) };
        let teardown = self.teardown(&pod);
        Ok((running?, teardown?))
    }

    fn start_workload(
        &self,
        pod: &str,
        sandbox: &api::PodSandboxConfig,
        logs: &std::path::Path,
        start: Instant,
    ) -> Outcome<f64> {
        let cri = self.c.cri();
        let command = ["/bin/sh", "-c", "echo workload-running; exec sleep 2147483647"];
        let config = container_config("work", BUSYBOX, &command, "work.log", bench_namespaces());
        let container = cri.create_container(pod, &config, sandbox, self.deadline).map_err(|e| e.to_string())?;
        cri.start_container(&container, self.deadline).map_err(|e| e.to_string())?;
        let log = logs.join("work.log");
        while !std::fs::read_to_string(&log).unwrap_or_default().contains("workload-running") {
            if start.elapsed() > self.deadline {
                return Err(format!("CRI pod {pod}: the workload's output never reached {}", log.display()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(Bench::elapsed_since(start))
    }

    fn teardown(&self, pod: &str) -> Outcome<f64> {
        let cri = self.c.cri();
        let start = Instant::now();
        cri.stop_pod_sandbox(pod, self.deadline).map_err(|e| e.to_string())?;
        cri.remove_pod_sandbox(pod, self.deadline).map_err(|e| e.to_string())?;
        Ok(Bench::elapsed_since(start))
    }
}
