//! Containers in a real guest: the agent as PID 1 runs busybox containers whose rootfs the
//! host shares over virtio-fs, with the guest's cgroup v2 (the host-mode tests on this
//! project's machines can only use cgroup v1 controllers). One boot, then: output, exit
//! code, PID namespace and hostname; a terminal; an exec; a memory limit that OOM-kills, seen through
//! memory.events as an OOM event; pause/resume with cgroup.freeze; statistics from cgroup v2;
//! isolation as runc gives it (capabilities, no_new_privs, seccomp, users and groups, a
//! read-only root, masked and read-only paths, the device cgroup, pivot_root), checked from
//! inside a container and an exec with an added capability.
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
    for applet in ["sh", "echo", "hostname", "dd", "sleep", "cat", "stty", "mkdir", "mknod"] {
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

/// containerd's default capabilities (CapEff 0xa80425fb).
const DEFAULT_CAPS: &str = r#""CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD",
    "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE""#;

/// The isolation container's script: shell builtins where they do (every busybox applet run
/// costs seconds in an emulated guest). Reads its own status (capabilities, no_new_privs,
/// seccomp mode), makes a directory (the profile refuses mkdir), writes to the read-only
/// root and /proc/sys, reads the masked /proc/cmdline, makes the disk's node 8:0 (mknod is
/// allowed) and opens it (the device cgroup refuses), writes /dev/null, and lists the mounts
/// on / with their root and file system type; then waits for its standard input to close
/// (the exec runs meanwhile).
const ISOLATION_SCRIPT: &str = r#"exec 2>&1
while read k v; do case $k in CapEff:|CapBnd:|NoNewPrivs:|Seccomp:) echo $k $v;; esac; done < /proc/self/status
mkdir /tmp/d; echo mkdir=$?
echo > /x; echo root=$?
echo x > /proc/sys/kernel/domainname; echo procsys=$?
l=unread; read l < /proc/cmdline; echo cmdline=[$l]
mknod /dev/sda b 8 0; echo mknod=$?
read l < /dev/sda; echo sda=$?
echo x > /dev/null; echo null=$?
[ -e /.nestbox-root ] || [ -e /init ] || echo no-initramfs
while read id parent major root point opts rest; do [ "$point" = / ] && echo "on-root $root ${rest##*- }"; done < /proc/self/mountinfo
read l; echo stdin-closed
"#;

/// A spec like containerd's for an unprivileged container: default capabilities,
/// no_new_privs, a seccomp profile (allow all but mkdir, refused with EPERM), a read-only
/// root, masked and read-only paths, and containerd's device rules (deny all, then the
/// standard devices).
fn isolation_spec(id: &str) -> Vec<u8> {
    let script = format!("{ISOLATION_SCRIPT:?}");
    let mut devices = String::from(r#"{"allow": false, "access": "rwm"}"#);
    for (major, minor) in [(1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 2)] {
        devices += &format!(r#", {{"allow": true, "type": "c", "major": {major}, "minor": {minor}, "access": "rwm"}}"#);
    }
    format!(
        r#"{{"ociVersion": "1.0.2",
            "process": {{"user": {{"uid": 0, "gid": 0}}, "args": ["sh", "-c", {script}], "env": ["PATH=/bin"],
                         "cwd": "/", "noNewPrivileges": true,
                         "capabilities": {{"bounding": [{DEFAULT_CAPS}], "effective": [{DEFAULT_CAPS}],
                                           "permitted": [{DEFAULT_CAPS}]}}}},
            "root": {{"path": "{GUEST_SHARED}/{id}/rootfs", "readonly": true}},
            "hostname": "{id}",
            "mounts": [{{"destination": "/proc", "type": "proc", "source": "proc"}},
                       {{"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]}},
                       {{"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]}}],
            "linux": {{"namespaces": [{{"type": "pid"}}, {{"type": "mount"}}, {{"type": "uts"}}, {{"type": "ipc"}}],
                      "resources": {{"devices": [{devices}]}},
                      "maskedPaths": ["/proc/kcore", "/proc/cmdline"],
                      "readonlyPaths": ["/proc/sys"],
                      "seccomp": {{"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
                                   "syscalls": [{{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO",
                                                  "errnoRet": 1}}]}}}}}}"#
    )
    .into_bytes()
}

/// An exec into the isolation container as user 1000 (group 1000, groups 10 and 20) with
/// the default capabilities and CAP_SYS_ADMIN in every set (ambient: kept by a non-root
/// user across its exec): prints its ids and capabilities.
fn isolation_exec() -> Vec<u8> {
    let script = r#"while read k v; do case $k in Uid:|Gid:|Groups:|CapEff:|CapBnd:) echo $k $v;; esac; done < /proc/self/status"#;
    let caps = format!(r#"[{DEFAULT_CAPS}, "CAP_SYS_ADMIN"]"#);
    format!(
        r#"{{"args": ["sh", "-c", {script:?}], "cwd": "/", "env": ["PATH=/bin"], "noNewPrivileges": true,
            "user": {{"uid": 1000, "gid": 1000, "additionalGids": [10, 20]}},
            "capabilities": {{"bounding": {caps}, "effective": {caps}, "permitted": {caps}, "inheritable": {caps},
                              "ambient": {caps}}}}}"#
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
    for id in ["c1", "tty", "oom", "busy", "iso"] {
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
        stdio: Some(out_only.clone()).into(),
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

    // Isolation at runc's level. The container exists at all only through pivot_root: the
    // agent has no chroot fallback any more (see docs/agent.md).
    let t = Instant::now();
    create("iso", isolation_spec("iso"), Stdio { stdin: true, stdout: true, ..Default::default() });
    let _input = stream(StreamKind::Stdin, "iso", "");
    let out = read_all(stream(StreamKind::Stdout, "iso", ""));
    start_container("iso");
    let exec_out = read_all(stream(StreamKind::Stdout, "iso", "e2"));
    let exec = ExecProcessRequest {
        container_id: "iso".into(),
        exec_id: "e2".into(),
        oci_process_json: isolation_exec(),
        stdio: Some(out_only.clone()).into(),
        ..Default::default()
    };
    agent.exec_process(ctx(), &exec).unwrap_or_else(|e| fail("ExecProcess", e));
    assert_eq!(wait("iso", "e2"), 0);
    let exec_out = exec_out.join().unwrap();
    let with_admin = "00000000a82425fb";
    assert_eq!(
        exec_out,
        format!(
            "Uid: 1000 1000 1000 1000\nGid: 1000 1000 1000 1000\nGroups: 10 20\nCapEff: {with_admin}\n\
             CapBnd: {with_admin}\n"
        ),
        "an exec as user 1000 with CAP_SYS_ADMIN added"
    );
    // The init ends once its standard input is closed.
    let close = CloseStdinRequest { container_id: "iso".into(), ..Default::default() };
    agent.close_stdin(ctx(), &close).unwrap_or_else(|e| fail("CloseStdin", e));
    assert_eq!(wait("iso", ""), 0, "console:\n{}", vm.console());
    let out = out.join().unwrap();
    eprintln!("iso:\n{out}");
    let lines: Vec<&str> = out.lines().collect();
    let caps = "00000000a80425fb";
    assert_eq!(
        lines[..4],
        [&*format!("CapEff: {caps}"), &*format!("CapBnd: {caps}"), "NoNewPrivs: 1", "Seccomp: 2"],
        "{out}"
    );
    assert!(lines[4].contains("Operation not permitted") && lines[5] == "mkdir=1", "seccomp: {out}");
    assert!(lines[6].contains("Read-only file system") && lines[7] == "root=1", "read-only root: {out}");
    assert!(lines[8].contains("Read-only file system") && lines[9] == "procsys=1", "read-only path: {out}");
    assert_eq!(lines[10], "cmdline=[]", "masked path: {out}");
    assert_eq!(lines[11], "mknod=0", "mknod is allowed (runc's default): {out}");
    assert!(lines[12].contains("/dev/sda") && lines[12].contains("Operation not permitted"), "device: {out}");
    assert_eq!(lines[13..16], ["sda=1", "null=0", "no-initramfs"], "{out}");
    assert_eq!(lines.last(), Some(&"stdin-closed"), "{out}");
    // One mount on /: the container's rootfs (virtio-fs), nothing of the initramfs's.
    let on_root: Vec<&&str> = lines.iter().filter(|l| l.starts_with("on-root ")).collect();
    assert_eq!(on_root.len(), 1, "{out}");
    assert!(on_root[0].contains("virtiofs") && !out.contains("rootfs rootfs"), "{out}");
    remove("iso");
    eprintln!("iso: {:?}", t.elapsed());

    agent.destroy_sandbox(ctx(), &DestroySandboxRequest::new()).unwrap_or_else(|e| fail("DestroySandbox", e));
    agent.shutdown(ctx(), &ShutdownRequest::new()).unwrap_or_else(|e| fail("Shutdown", e));
    drop(vm);
}
