//! CRI pods as kubelet drives them, under a private containerd with the CRI plugin, with
//! runc (the reference) and with nestbox as the runtime handler. One pod per runtime
//! carries every check (a nestbox pod start costs half a minute and more here):
//!
//! - a pod asking for the host's network namespace is refused by nestbox at
//!   RunPodSandbox, naming the namespace, and leaves nothing behind;
//! - the pod (its own network namespace from CNI, pod IPC, a shared PID namespace, a
//!   hostname) with three busybox containers: `one` and `two` in the pod's PID namespace,
//!   `three` in one of its own; an emptyDir (a host folder) in all three;
//! - all three see one kernel (nestbox: the guest's, not the host's) and the pod's hostname,
//!   network, IPC and UTS namespaces; a SysV shm segment and a /dev/shm file made in `one`
//!   are seen in `two` and `three`; `one` and `two` see each other's processes and the pause
//!   process as PID 1, `three` sees neither; a file `one` writes to the emptyDir is read by
//!   `two` and on the host;
//! - the pod's sysctls (an IPC and a network one) are seen in every container;
//! - ExecSync output and exit codes, an ExecSync past its timeout killed and reported in
//!   time, non-zero ContainerStats, UpdateContainerResources (nestbox: the new memory limit
//!   in the container's cgroup in the guest), ContainerStatus, ListContainers;
//! - StopContainer honours its timeout: a process that dies of SIGTERM stops well inside
//!   it, one that ignores SIGTERM (a PID 1) is killed at the deadline and the call returns
//!   soon after;
//! - RemoveContainer, StopPodSandbox, RemovePodSandbox, and then nothing left: no pod, no
//!   sandbox directory, no VMM, no shim, no mount (the pod's network namespace included);
//! - nestbox: what the running pod costs the host beside its guest's memory (the shim and
//!   the VMM's own memory) fits in the RuntimeClass overhead `nestbox config` prints;
//! - nestbox: the hostile guest (`hostile_share/`, issue 15): `one` gets CAP_SYS_ADMIN (no
//!   more: no privileged pod) and runs `share-racer`, which mounts the pod's virtio-fs share
//!   a second time and, while the host creates `two` and `three` with their volumes, races
//!   symlink swaps, renames and removals where the host creates and mounts, files, setuid
//!   files, device nodes, hard links and capability/trusted xattrs; every attempt aimed at
//!   the host-only tree must fail, while its own rootfs and the emptyDir take files, setuid
//!   files and links (device nodes and those xattrs refused by the virtio-fs guard); `three`
//!   sees its volumes as asked; the host then finds its canary directory (the racer's
//!   symlink target), the tools volume and `/` unchanged, no new mount outside the sandbox
//!   (again once the pod is gone), only the shim's own entries in the host-only tree, and
//!   every setuid file or device node in the sandbox tree on a nosuid/nodev mount;
//! - nestbox: a pod with resources (PodSandboxConfig.linux.resources) gets a VM sized as
//!   Kata sizes it, the default plus the limits, seen in a container as CPUs and MemTotal.
//!
//! The pod's network itself is checked by `cri_network`. The nestbox pod is restored from
//! the warm-start template shared by the CRI suites (the first pod of the run makes it: one
//! guest boot, minutes here).

use nestbox_tests::containerd::{mounts_under, Containerd, Options, BUSYBOX};
use nestbox_tests::cri::{api, api::ContainerState, api::NamespaceMode, container_config, namespaces, pod_config};
use nestbox_tests::procmem::{largest_mapping_kib, rss_kib};
use nestbox_tests::{binary, guest_binary, host_kernel_release, GUEST_DEADLINE};
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

mod hostile_share;

/// One CRI call that does not start a VM.
const QUICK: Duration = Duration::from_secs(60);
/// The pod's hostname (PodSandboxConfig.hostname).
const HOSTNAME: &str = "nbx-pod";
/// The SysV shm key `one` makes a segment with.
const SHM_KEY: &str = "4242";
/// What each container runs: a sleep with an argument of its own, so `ps` tells them apart.
const WORKLOADS: [(&str, &str); 3] = [("one", "3601"), ("two", "3602"), ("three", "3603")];
/// Facts a container reports about itself, one `key=value` line each.
const FACTS: &str = "echo kernel=$(uname -r); echo hostname=$(hostname); \
    for n in net ipc uts pid; do echo $n=$(/bin/busybox readlink /proc/self/ns/$n); done; \
    echo pid1=$(cat /proc/1/cmdline | /bin/busybox tr '\\0' ' '); \
    echo sysctls=$(cat /proc/sys/fs/mqueue/msg_max /proc/sys/net/ipv4/ip_unprivileged_port_start)";
/// The pod's sysctls (PodSandboxConfig.linux.sysctls: an IPC one and a network one, neither
/// the kernel's default) and how FACTS prints them.
const SYSCTLS: [(&str, &str); 2] = [("fs.mqueue.msg_max", "97"), ("net.ipv4.ip_unprivileged_port_start", "999")];
const SYSCTLS_SEEN: &str = "97 999";

struct Pod<'a> {
    c: &'a Containerd,
    deadline: Duration,
}

impl Pod<'_> {
    fn context(&self) -> String {
        format!("containerd log tail:\n{}", self.c.log_tail(60))
    }

    /// ExecSync of `cmd` in `container`, which must succeed; its stdout.
    fn exec(&self, container: &str, cmd: &[&str]) -> String {
        let out = self
            .c
            .cri()
            .exec_sync(container, cmd, 0, self.deadline)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.context()));
        assert_eq!(out.exit_code, 0, "{cmd:?} in {container}: {out:?}");
        out.stdout
    }

    fn facts(&self, container: &str) -> HashMap<String, String> {
        let out = self.exec(container, &["sh", "-c", FACTS]);
        out.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.trim().to_string())).collect()
    }

    /// Which of the workloads' sleeps `container` sees in its PID namespace.
    fn sees(&self, container: &str) -> Vec<&'static str> {
        let ps = self.exec(container, &["ps"]);
        WORKLOADS.iter().filter(|(_, arg)| ps.contains(&format!("sleep {arg}"))).map(|(name, _)| *name).collect()
    }
}

/// A pod on the host's network: nestbox refuses it by name, before any VM, and nothing of
/// it stays (containerd removes the sandbox; the shim it started ends).
fn host_network_is_refused(c: &Containerd, logs: &Path) {
    let ns = namespaces(NamespaceMode::Node, NamespaceMode::Pod, NamespaceMode::Container);
    let config = pod_config("hostnet", &std::process::id().to_string(), logs, ns);
    let started = Instant::now();
    let err = c.cri().run_pod_sandbox(&config, "nestbox", GUEST_DEADLINE).expect_err("a host-network pod");
    let message = err.to_string();
    assert!(message.contains("asks for the host's network namespace"), "{message}");
    assert!(message.contains("cannot share the host kernel's namespaces"), "{message}");
    assert!(started.elapsed() < QUICK, "refused before any VM: {:?}", started.elapsed());
    assert!(c.cri().list_pod_sandbox(QUICK).expect("ListPodSandbox").is_empty(), "the refused pod is gone");
    c.assert_clean();
    wait_for_no_shims(c);
}

fn wait_for_no_shims(c: &Containerd) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(c.shim_pids().is_empty() && c.shims_of("runc").is_empty()) {
        assert!(Instant::now() < deadline, "shims left: {:?} {:?}", c.shim_pids(), c.shims_of("runc"));
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn pod_lifecycle(handler: &str, nestbox_config: &str, deadline: Duration) {
    let options = Options { cri: true, pod_network: true, shared_templates: true, ..Default::default() };
    let c = Containerd::start_with(&format!("cri-{handler}"), nestbox_config, options);
    c.import_busybox();
    let cri = c.cri();
    let logs = c.dir.join("pod-logs");
    std::fs::create_dir_all(&logs).expect("creating the pod's log folder");
    if handler == "nestbox" {
        host_network_is_refused(&c, &logs);
    }
    // The emptyDir, and the static SysV shm tool (busybox has no ipcmk) in a read-only one.
    let (empty_dir, tools) = (c.dir.join("empty-dir"), c.dir.join("tools"));
    for dir in [&empty_dir, &tools] {
        std::fs::create_dir_all(dir).expect("creating a volume folder");
    }
    std::fs::copy(guest_binary("sysv-shm"), tools.join("sysv-shm")).expect("copying sysv-shm");
    if handler == "nestbox" {
        hostile_share::prepare_volumes(&empty_dir, &tools);
    }
    let volume = |host: &Path, path: &str, readonly| api::Mount {
        container_path: path.into(),
        host_path: host.to_string_lossy().into_owned(),
        readonly,
        ..Default::default()
    };

    let shared_pid = namespaces(NamespaceMode::Pod, NamespaceMode::Pod, NamespaceMode::Pod);
    let mut sandbox = pod_config(&format!("ns-{handler}"), &std::process::id().to_string(), &logs, shared_pid);
    sandbox.hostname = HOSTNAME.into();
    if let Some(linux) = sandbox.linux.as_mut() {
        linux.sysctls = SYSCTLS.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    }
    let p = Pod { c: &c, deadline };
    let pod = cri.run_pod_sandbox(&sandbox, handler, deadline).unwrap_or_else(|e| panic!("{e}\n{}", p.context()));
    let mounts = vec![volume(&empty_dir, "/shared", false), volume(&tools, "/tools", true)];
    let (ids, host_before) = start_workloads(&p, handler, (&pod, &sandbox), &mounts, (&empty_dir, &tools));
    let [one, two, three] = ["one", "two", "three"].map(|n| ids[n].as_str());
    for id in [one, two, three] {
        let status = cri.container_status(id, QUICK).expect("ContainerStatus");
        assert_eq!(status.state, ContainerState::ContainerRunning as i32, "{status:?}");
    }

    check_namespaces(&p, handler, [one, two, three]);
    if handler == "nestbox" {
        check_host_cost(&c);
    }
    check_sharing(&p, [one, two, three], &empty_dir);

    let hi = cri.exec_sync(one, &["echo", "hi"], 0, deadline).unwrap_or_else(|e| panic!("{e}\n{}", p.context()));
    assert_eq!((hi.stdout.as_str(), hi.exit_code), ("hi\n", 0), "{hi:?}");
    let failing = cri.exec_sync(one, &["sh", "-c", "echo oops >&2; exit 3"], 0, deadline).expect("ExecSync");
    assert_eq!((failing.stderr.as_str(), failing.exit_code), ("oops\n", 3), "{failing:?}");
    check_exec_timeout(&p, one);
    check_stats(&p, one);
    check_update(&p, handler, two);
    let mut listed: Vec<String> =
        cri.list_containers(Some(&pod), QUICK).expect("ListContainers").into_iter().map(|c| c.id).collect();
    listed.sort();
    let mut want: Vec<String> = ids.values().cloned().collect();
    want.sort();
    assert_eq!(listed, want);

    // three's sleep is PID 1 of its own PID namespace: SIGTERM (no handler) does nothing to
    // it, so it lives until the SIGKILL at the deadline. two's and one's die of SIGTERM.
    for (id, grace, bound) in
        [(three, STOP_GRACE, STOP_GRACE + STOP_SLACK), (two, 60, STOP_SLACK), (one, 60, STOP_SLACK)]
    {
        let started = Instant::now();
        cri.stop_container(id, grace, deadline).unwrap_or_else(|e| panic!("{e}\n{}", p.context()));
        let took = started.elapsed();
        assert!(took < Duration::from_secs(bound as u64), "StopContainer({grace} s) took {took:?}\n{}", p.context());
        let status = cri.container_status(id, QUICK).expect("ContainerStatus");
        assert_eq!(status.state, ContainerState::ContainerExited as i32, "{status:?}");
        cri.remove_container(id, deadline).expect("RemoveContainer");
    }
    cri.stop_pod_sandbox(&pod, deadline).unwrap_or_else(|e| panic!("{e}\n{}", p.context()));
    cri.remove_pod_sandbox(&pod, deadline).expect("RemovePodSandbox");

    assert!(cri.list_pod_sandbox(QUICK).expect("ListPodSandbox").is_empty(), "pods left");
    assert!(cri.list_containers(None, QUICK).expect("ListContainers").is_empty(), "containers left");
    c.assert_clean();
    wait_for_no_shims(&c);
    let mounts = mounts_under(&c.dir);
    assert!(mounts.is_empty(), "mounts left (rootfs, the pod's network namespace): {mounts:?}");
    if let Some(before) = host_before {
        before.assert_unchanged("after the pod's removal");
    }
    if handler == "nestbox" {
        check_sized_pod(&c, &logs);
    }
}

/// Creates and starts the three workloads. With nestbox, `one` (with CAP_SYS_ADMIN added)
/// plays the hostile guest, racing in the pod's share while the host creates `two` and
/// `three` with their volumes (see `hostile_share`); the host's state from before it, for a
/// last look once the pod is gone.
fn start_workloads(
    p: &Pod,
    handler: &str,
    (pod, sandbox): (&str, &api::PodSandboxConfig),
    mounts: &[api::Mount],
    (empty_dir, tools): (&Path, &Path),
) -> (HashMap<&'static str, String>, Option<hostile_share::HostState>) {
    let cri = p.c.cri();
    let mut ids = HashMap::new();
    let mut race = None;
    for (name, arg) in WORKLOADS {
        let pid = if name == "three" { NamespaceMode::Container } else { NamespaceMode::Pod };
        let ns = namespaces(NamespaceMode::Pod, NamespaceMode::Pod, pid);
        let script = format!("echo started; exec sleep {arg}");
        let mut config = container_config(name, BUSYBOX, &["/bin/sh", "-c", &script], &format!("{name}.log"), ns);
        config.mounts = mounts.to_vec();
        let hostile = handler == "nestbox" && name == "one";
        if hostile {
            let context = config.linux.as_mut().and_then(|l| l.security_context.as_mut()).expect("security context");
            context.capabilities =
                Some(api::Capability { add_capabilities: vec!["SYS_ADMIN".into()], ..Default::default() });
        }
        let id =
            cri.create_container(pod, &config, sandbox, p.deadline).unwrap_or_else(|e| panic!("{e}\n{}", p.context()));
        cri.start_container(&id, p.deadline).unwrap_or_else(|e| panic!("{e}\n{}", p.context()));
        if hostile {
            race = Some(hostile_share::start(p.c, pod, &id, empty_dir, tools));
        }
        ids.insert(name, id);
    }
    let before = race.map(|race| {
        hostile_share::check_volumes(cri, &ids["three"], empty_dir);
        let containers = [pod, &ids["one"], &ids["two"], &ids["three"]];
        race.finish(&containers, &[&ids["two"], &ids["three"]])
    });
    (ids, before)
}

/// What the running pod costs the host beside its guest's memory: the shim's RSS and the
/// VMM's without the guest RAM mapping (whose size is the configured guest memory). The
/// RuntimeClass overhead `nestbox config` prints is the guest memory plus an allowance for
/// these two; the allowance must cover what they take.
fn check_host_cost(c: &Containerd) {
    let (shims, vmms) = (c.shim_pids(), c.vmm_pids());
    assert_eq!((shims.len(), vmms.len()), (1, 1), "one shim and one VMM for the pod");
    let (shim, vmm, guest) = (rss_kib(shims[0]), rss_kib(vmms[0]), largest_mapping_kib(vmms[0], "Rss:"));
    let out = Command::new(binary("nestbox-shim", "nestbox"))
        .arg("config")
        .env("NESTBOX_CONFIG", &c.nestbox_config)
        .output()
        .expect("running nestbox config");
    let printed = String::from_utf8_lossy(&out.stdout);
    let allowance = printed
        .lines()
        .find_map(|l| l.split_once("VMM and shim: ")?.1.split_once(" MiB")?.0.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("the VMM and shim allowance in nestbox config's output:\n{printed}"));
    let host_side_kib = shim + vmm.saturating_sub(guest);
    eprintln!(
        "host cost of the running pod: shim {shim} KiB, VMM {} KiB beside {guest} KiB of guest RAM touched; \
         allowance {allowance} MiB",
        vmm.saturating_sub(guest)
    );
    assert!(shim > 0 && vmm > guest, "the shim's and the VMM's memory read: {shim} {vmm} {guest}");
    assert!(
        host_side_kib <= allowance * 1024,
        "the pod's host side ({host_side_kib} KiB) exceeds the overhead's allowance"
    );
}

/// A pod with resources, one CPU and 64 MiB: containerd passes them to the runtime as
/// sandbox annotations and nestbox sizes the VM the way Kata does, the default (1 vCPU,
/// 256 MiB) plus the limits. A shape of its own, so its first pod boots a guest here.
fn check_sized_pod(c: &Containerd, logs: &Path) {
    let cri = c.cri();
    let ns = namespaces(NamespaceMode::Pod, NamespaceMode::Pod, NamespaceMode::Container);
    let mut sandbox = pod_config("sized", &std::process::id().to_string(), logs, ns.clone());
    let resources = api::LinuxContainerResources {
        cpu_period: 100_000,
        cpu_quota: 100_000,
        memory_limit_in_bytes: 64 << 20,
        ..Default::default()
    };
    sandbox.linux.as_mut().expect("the pod's linux config").resources = Some(resources);
    let context = || format!("containerd log tail:\n{}", c.log_tail(60));
    let pod = cri.run_pod_sandbox(&sandbox, "nestbox", GUEST_DEADLINE).unwrap_or_else(|e| panic!("{e}\n{}", context()));
    let config = container_config("sizes", BUSYBOX, &["sleep", "3600"], "sizes.log", ns.clone());
    let id =
        cri.create_container(&pod, &config, &sandbox, GUEST_DEADLINE).unwrap_or_else(|e| panic!("{e}\n{}", context()));
    cri.start_container(&id, GUEST_DEADLINE).unwrap_or_else(|e| panic!("{e}\n{}", context()));
    let script = "grep -c ^processor /proc/cpuinfo; grep MemTotal /proc/meminfo";
    let out =
        cri.exec_sync(&id, &["sh", "-c", script], 0, GUEST_DEADLINE).unwrap_or_else(|e| panic!("{e}\n{}", context()));
    let mut lines = out.stdout.lines();
    let cpus: u32 = lines.next().and_then(|l| l.trim().parse().ok()).unwrap_or(0);
    let mem_kib: u64 = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap_or(0);
    assert_eq!(cpus, 2, "1 vCPU + the pod's one CPU: {out:?}");
    // MemTotal is the VM's memory less what the kernel keeps: above the default 256 MiB,
    // within the 320 MiB of the sized VM.
    assert!(mem_kib > 256 * 1024 && mem_kib <= 320 * 1024, "256 MiB + the pod's 64 MiB: {out:?}");
    cri.stop_container(&id, 2, GUEST_DEADLINE).expect("StopContainer");
    cri.remove_container(&id, GUEST_DEADLINE).expect("RemoveContainer");
    cri.stop_pod_sandbox(&pod, GUEST_DEADLINE).expect("StopPodSandbox");
    cri.remove_pod_sandbox(&pod, GUEST_DEADLINE).expect("RemovePodSandbox");
    c.assert_clean();
    wait_for_no_shims(c);
}

/// StopContainer's timeout for a process that ignores SIGTERM, and what a stop may take
/// beyond the signal that ends the process (the exit's way out of the guest, containerd).
const STOP_GRACE: i64 = 2;
const STOP_SLACK: i64 = 30;

/// An ExecSync past its timeout: the process is killed, the call fails naming the timeout,
/// and it returns soon after the deadline, not when the process would have ended.
fn check_exec_timeout(p: &Pod, container: &str) {
    let started = Instant::now();
    let err = p.c.cri().exec_sync(container, &["sleep", "600"], STOP_GRACE, p.deadline).expect_err("past its timeout");
    let took = started.elapsed();
    assert!(err.to_string().contains("timeout"), "{err}");
    assert!(took < Duration::from_secs((STOP_GRACE + STOP_SLACK) as u64), "ExecSync took {took:?}\n{}", p.context());
    assert!(!p.exec(container, &["ps"]).contains("sleep 600"), "the timed-out exec was killed");
}

/// ContainerStats of a running container: CPU time and memory in use, both non-zero.
fn check_stats(p: &Pod, container: &str) {
    let stats = p.c.cri().container_stats(container, QUICK).unwrap_or_else(|e| panic!("{e}\n{}", p.context()));
    let cpu = stats.cpu.as_ref().and_then(|c| c.usage_core_nano_seconds.as_ref()).map_or(0, |v| v.value);
    let memory = stats.memory.as_ref().and_then(|m| m.working_set_bytes.as_ref()).map_or(0, |v| v.value);
    assert!(cpu > 0 && memory > 0, "non-zero CPU and memory: {stats:?}");
}

/// UpdateContainerResources with a new memory limit: containerd accepts it and, for nestbox,
/// the container's cgroup in the guest (cgroup v2) has it. (runc here runs on the host's
/// cgroup v1, whose files the container sees differently: only the call is checked.)
fn check_update(p: &Pod, handler: &str, container: &str) {
    let limit: i64 = 96 << 20;
    let resources = api::LinuxContainerResources { memory_limit_in_bytes: limit, ..Default::default() };
    p.c.cri()
        .update_container_resources(container, resources, p.deadline)
        .unwrap_or_else(|e| panic!("{e}\n{}", p.context()));
    if handler == "nestbox" {
        let script = "cat /sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)/memory.max";
        assert_eq!(p.exec(container, &["sh", "-c", script]).trim(), limit.to_string(), "memory.max in the guest");
    }
}

/// One kernel, the pod's hostname and namespaces; PID namespaces as asked.
fn check_namespaces(p: &Pod, handler: &str, [one, two, three]: [&str; 3]) {
    let facts = [one, two, three].map(|id| p.facts(id));
    let host_kernel = host_kernel_release();
    for f in &facts {
        assert_eq!(f["kernel"], facts[0]["kernel"], "one kernel for the pod: {facts:?}");
        assert_eq!(f["hostname"], HOSTNAME, "the pod's hostname: {facts:?}");
        assert_eq!(f["sysctls"], SYSCTLS_SEEN, "the pod's sysctls: {facts:?}");
        for ns in ["net", "ipc", "uts"] {
            assert_eq!(f[ns], facts[0][ns], "the pod's {ns} namespace: {facts:?}");
        }
    }
    match handler {
        "nestbox" => {
            assert_ne!(facts[0]["kernel"], host_kernel, "the guest's kernel, not the host's");
            assert!(facts[0]["kernel"].contains("nestbox"), "{facts:?}");
        }
        _ => assert_eq!(facts[0]["kernel"], host_kernel, "runc: the host's kernel"),
    }
    assert_eq!(facts[0]["pid"], facts[1]["pid"], "one and two share the pod's PID namespace");
    assert_ne!(facts[0]["pid"], facts[2]["pid"], "three has its own");
    assert!(facts[0]["pid1"].contains("sleep 2147483647"), "PID 1 of the pod's namespace is the pause: {facts:?}");
    assert!(facts[2]["pid1"].contains("sleep 3603"), "PID 1 of three's own namespace is its sleep: {facts:?}");
    assert_eq!(p.sees(one), ["one", "two"], "one sees the pod's processes");
    assert_eq!(p.sees(two), ["one", "two"], "two sees the pod's processes");
    assert_eq!(p.sees(three), ["three"], "three sees only its own");
}

/// SysV shm, /dev/shm and an emptyDir written in `one`, read in the others.
fn check_sharing(p: &Pod, [one, two, three]: [&str; 3], empty_dir: &Path) {
    p.exec(one, &["/tools/sysv-shm", "make", SHM_KEY]);
    p.exec(one, &["sh", "-c", "echo from-one > /dev/shm/note && echo from-one > /shared/note"]);
    for other in [two, three] {
        p.exec(other, &["/tools/sysv-shm", "find", SHM_KEY]);
        assert_eq!(p.exec(other, &["cat", "/dev/shm/note", "/shared/note"]), "from-one\nfrom-one\n", "in {other}");
    }
    let on_host = std::fs::read_to_string(empty_dir.join("note")).expect("the emptyDir's file on the host");
    assert_eq!(on_host, "from-one\n");
}

#[test]
fn runc_pod_lifecycle() {
    pod_lifecycle("runc", "", QUICK);
}

#[test]
fn nestbox_pod_lifecycle() {
    pod_lifecycle("nestbox", "[agent]\nboot_timeout_secs = 900\n", GUEST_DEADLINE);
}
