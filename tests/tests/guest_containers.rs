//! Containers in a real guest: the agent as PID 1 runs busybox containers whose rootfs the
//! host shares over virtio-fs, with the guest's cgroup v2 (the host-mode tests on this
//! project's machines can only use cgroup v1 controllers). One boot, then: output, exit
//! code, PID namespace and hostname; a terminal; an exec; a memory limit that OOM-kills, seen through
//! memory.events as an OOM event; pause/resume with cgroup.freeze; statistics from cgroup v2.
//!
//! Each busybox command costs seconds in this project's emulated guests: the checks are few.

use nestbox_protocols::agent::*;
use nestbox_protocols::stdio::{self, StreamHeader, StreamKind};
use nestbox_protocols::types::{Stdio, Storage};
use nestbox_protocols::{hybrid, ttrpc};
use nestbox_tests::{vmm_command, GUEST_DEADLINE};
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Where the agent mounts the shared directory in the guest.
const GUEST_SHARED: &str = "/run/nestbox/shared";
/// A generous bound for one call: container setup runs dozens of emulated system calls.
const CALL_TIMEOUT: Duration = Duration::from_secs(300);

struct Vm {
    child: Child,
    dir: PathBuf,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Vm {
    fn console(&self) -> String {
        std::fs::read_to_string(self.dir.join("console.log")).unwrap_or_default()
    }
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(CALL_TIMEOUT.as_nanos() as i64)
}

/// A busybox rootfs in the shared directory (what the shim will put there).
fn rootfs(shared: &Path, id: &str) {
    let root = shared.join(id).join("rootfs");
    for d in ["bin", "proc", "dev", "tmp"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for applet in ["sh", "echo", "hostname", "dd", "sleep", "cat", "stty"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
}

/// An OCI spec (JSON written by hand: the tests crate needs no JSON library for this).
fn spec(id: &str, args: &[&str], memory_limit: Option<i64>) -> Vec<u8> {
    let args: Vec<String> = args.iter().map(|a| format!("{a:?}")).collect();
    let resources = memory_limit.map_or(String::new(), |l| format!(r#", "resources": {{"memory": {{"limit": {l}}}}}"#));
    format!(
        r#"{{"ociVersion": "1.0.2",
            "process": {{"user": {{"uid": 0, "gid": 0}}, "args": [{args}], "env": ["PATH=/bin"], "cwd": "/",
                         "noNewPrivileges": true}},
            "root": {{"path": "{GUEST_SHARED}/{id}/rootfs"}},
            "hostname": "{id}",
            "mounts": [{{"destination": "/proc", "type": "proc", "source": "proc"}},
                       {{"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]}}],
            "linux": {{"namespaces": [{{"type": "pid"}}, {{"type": "mount"}}, {{"type": "uts"}}, {{"type": "ipc"}}]
                      {resources}}}}}"#,
        args = args.join(", ")
    )
    .into_bytes()
}

fn read_all(mut stream: UnixStream) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = stream.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    })
}

#[test]
fn containers_in_a_real_guest() {
    let dir = std::env::temp_dir().join(format!("nestbox-test-containers-{}", std::process::id()));
    let shared = dir.join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    for id in ["c1", "tty", "oom", "busy"] {
        rootfs(&shared, id);
    }
    let uds = dir.join("vsock.sock");
    let child = vmm_command(None)
        .args(["--vcpus", "1", "--memory-mib", "256"])
        .arg("--vsock-socket")
        .arg(&uds)
        .arg("--shared-dir")
        .arg(&shared)
        .arg("--console")
        .arg(dir.join("console.log"))
        .spawn()
        .expect("spawning nestbox-vmm");
    let vm = Vm { child, dir: dir.clone() };
    let start = Instant::now();
    let agent = hybrid::connect_agent(&uds, start + GUEST_DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\nconsole:\n{}", vm.console()));
    let fail = |what: &str, e: ttrpc::Error| -> ! { panic!("{what}: {e:?}\nconsole:\n{}", vm.console()) };
    eprintln!("agent reachable after {:?}", start.elapsed());

    let sandbox = CreateSandboxRequest {
        sandbox_id: "pod".into(),
        storages: vec![Storage {
            driver: "virtiofs".into(),
            source: "nestbox".into(),
            fstype: "virtiofs".into(),
            mount_point: GUEST_SHARED.into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    agent.create_sandbox(ctx(), &sandbox).unwrap_or_else(|e| fail("CreateSandbox", e));
    let stream = |kind, id: &str, exec: &str| {
        let header = StreamHeader::new(kind, id, exec);
        stdio::connect_hybrid(&uds, &header, Instant::now() + CALL_TIMEOUT).expect("opening a stream")
    };
    let create = |id: &str, spec: Vec<u8>, stdio: Stdio| {
        let req = CreateContainerRequest {
            container_id: id.into(),
            oci_spec_json: spec,
            stdio: Some(stdio).into(),
            ..Default::default()
        };
        agent.create_container(ctx(), &req).unwrap_or_else(|e| fail("CreateContainer", e));
    };
    let start_container = |id: &str| {
        let req = StartContainerRequest { container_id: id.into(), ..Default::default() };
        agent.start_container(ctx(), &req).unwrap_or_else(|e| fail("StartContainer", e))
    };
    let wait = |id: &str, exec: &str| {
        let req = WaitProcessRequest { container_id: id.into(), exec_id: exec.into(), ..Default::default() };
        agent.wait_process(ctx(), &req).unwrap_or_else(|e| fail("WaitProcess", e)).exit_status
    };
    let remove = |id: &str| {
        let req = RemoveContainerRequest { container_id: id.into(), timeout_secs: 120, ..Default::default() };
        agent.remove_container(ctx(), &req).unwrap_or_else(|e| fail("RemoveContainer", e));
    };
    let out_only = Stdio { stdout: true, ..Default::default() };

    // Output, exit code, own PID namespace and hostname.
    let t = Instant::now();
    create("c1", spec("c1", &["sh", "-c", "echo pid=$$; hostname; exit 3"], None), out_only.clone());
    let out = read_all(stream(StreamKind::Stdout, "c1", ""));
    start_container("c1");
    assert_eq!(wait("c1", ""), 3);
    assert_eq!(out.join().unwrap(), "pid=1\nc1\n");
    remove("c1");
    eprintln!("c1: create, run, remove in {:?}", t.elapsed());

    // A terminal (the guest's devpts) with the spec's size.
    let t = Instant::now();
    let mut tty_spec: String = String::from_utf8(spec("tty", &["stty", "size"], None)).unwrap();
    tty_spec = tty_spec.replacen(
        r#""process": {"#,
        r#""process": {"terminal": true, "consoleSize": {"height": 30, "width": 90}, "#,
        1,
    );
    create("tty", tty_spec.into_bytes(), Stdio { terminal: true, ..Default::default() });
    let out = read_all(stream(StreamKind::Tty, "tty", ""));
    start_container("tty");
    assert_eq!(wait("tty", ""), 0);
    assert_eq!(out.join().unwrap(), "30 90\r\n");
    remove("tty");
    eprintln!("tty: {:?}", t.elapsed());

    // A memory limit (cgroup v2 memory.max) kills; memory.events reports it.
    let t = Instant::now();
    let dd = ["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"];
    create("oom", spec("oom", &dd, Some(16 << 20)), Stdio::default());
    start_container("oom");
    assert_eq!(wait("oom", ""), 137, "OOM-killed\nconsole:\n{}", vm.console());
    let event = agent.get_oom_event(ctx(), &GetOOMEventRequest::new()).unwrap_or_else(|e| fail("GetOOMEvent", e));
    assert_eq!(event.container_id, "oom");
    remove("oom");
    eprintln!("oom: {:?}", t.elapsed());

    // Exec, pause (cgroup.freeze), stats, resume.
    let t = Instant::now();
    create("busy", spec("busy", &["sh", "-c", "while :; do :; done"], None), Stdio::default());
    start_container("busy");
    let out = read_all(stream(StreamKind::Stdout, "busy", "e1"));
    let exec = ExecProcessRequest {
        container_id: "busy".into(),
        exec_id: "e1".into(),
        oci_process_json: br#"{"args": ["hostname"], "cwd": "/", "user": {"uid": 0, "gid": 0}}"#.to_vec(),
        stdio: Some(out_only).into(),
        ..Default::default()
    };
    agent.exec_process(ctx(), &exec).unwrap_or_else(|e| fail("ExecProcess", e));
    assert_eq!(wait("busy", "e1"), 0);
    assert_eq!(out.join().unwrap(), "busy\n");
    let id = || "busy".to_string();
    agent
        .pause_container(ctx(), &PauseContainerRequest { container_id: id(), ..Default::default() })
        .unwrap_or_else(|e| fail("PauseContainer", e));
    let stats = |what| {
        let req = StatsContainerRequest { container_id: id(), ..Default::default() };
        let s = agent.stats_container(ctx(), &req).unwrap_or_else(|e| fail(what, e)).cgroup_stats;
        s.cpu.clone().unwrap_or_default().usage_usec
    };
    let paused = stats("StatsContainer");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(stats("StatsContainer"), paused, "CPU used while paused");
    agent
        .resume_container(ctx(), &ResumeContainerRequest { container_id: id(), ..Default::default() })
        .unwrap_or_else(|e| fail("ResumeContainer", e));
    std::thread::sleep(Duration::from_secs(2));
    let resumed = stats("StatsContainer");
    assert!(resumed > paused, "no CPU used after resume ({paused} then {resumed} µs)");
    let req = StatsContainerRequest { container_id: id(), ..Default::default() };
    let memory = agent.stats_container(ctx(), &req).unwrap_or_else(|e| fail("StatsContainer", e));
    assert!(memory.cgroup_stats.memory.clone().unwrap_or_default().usage > 0);
    remove("busy");
    eprintln!("busy: {:?}", t.elapsed());

    agent.destroy_sandbox(ctx(), &DestroySandboxRequest::new()).unwrap_or_else(|e| fail("DestroySandbox", e));
    agent.shutdown(ctx(), &ShutdownRequest::new()).unwrap_or_else(|e| fail("Shutdown", e));
    drop(vm);
}
