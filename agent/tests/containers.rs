//! Containers in host mode: the real agent binary (`--listen`), as root, running busybox
//! containers built in a temporary directory, through the real API and I/O sockets.
//!
//! cgroup features use whatever this host has: cgroup v2 with controllers where the
//! hierarchy is unified, the v1 controllers where they are bound to v1 (the project's
//! development machines). The guest always uses v2 (see docs/agent.md).

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio as ProcStdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nestbox_protocols::agent::*;
use nestbox_protocols::agent_ttrpc::AgentServiceClient;
use nestbox_protocols::stdio::{self, StreamHeader, StreamKind};
use nestbox_protocols::ttrpc;
use nestbox_protocols::types::Stdio;
use serde_json::{json, Value};

const AGENT: &str = env!("CARGO_BIN_EXE_nestbox-agent");
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(CALL_TIMEOUT.as_nanos() as i64)
}

struct Agent {
    child: Child,
    io_socket: PathBuf,
    client: AgentServiceClient,
    dir: tempfile::TempDir,
    _stdout: BufReader<ChildStdout>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child, not yet reaped. SIGTERM: the agent removes its
        // containers and cgroups before it exits.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

impl Agent {
    fn start() -> Agent {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("agent.sock");
        let mut child = Command::new(AGENT)
            .arg(format!("--listen=unix://{}", socket.display()))
            .stdin(ProcStdio::null())
            .stdout(ProcStdio::piped())
            .spawn()
            .expect("starting nestbox-agent");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("reading the agent's first line");
        assert!(line.contains("listening on unix://"), "unexpected first line {line:?}");
        let io_socket = dir.path().join("agent.sock.io");
        assert!(line.contains(&format!("I/O on unix://{}", io_socket.display())), "{line:?}");
        let stream = UnixStream::connect(&socket).expect("connecting to the agent");
        let client = nestbox_protocols::agent_client(stream).expect("ttrpc client");
        Agent { child, io_socket, client, dir, _stdout: stdout }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// A busybox root file system: the static busybox and a link per applet.
    fn rootfs(&self, name: &str) -> PathBuf {
        let root = self.dir.path().join(name);
        for d in ["bin", "proc", "dev", "sys", "tmp", "etc"] {
            std::fs::create_dir_all(root.join(d)).expect("mkdir");
        }
        std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("copying busybox");
        let list = Command::new("/bin/busybox").arg("--list").output().expect("busybox --list");
        for applet in String::from_utf8_lossy(&list.stdout).lines().filter(|a| *a != "busybox") {
            let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
        }
        std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n").expect("passwd");
        root
    }

    /// A spec like containerd's default, running `args` in `rootfs`.
    fn spec(&self, rootfs: &Path, args: &[&str]) -> Value {
        json!({
            "ociVersion": "1.0.2",
            "process": {
                "terminal": false,
                "user": {"uid": 0, "gid": 0},
                "args": args,
                "env": ["PATH=/bin", "TERM=xterm"],
                "cwd": "/",
                "capabilities": {
                    "bounding": DEFAULT_CAPS, "effective": DEFAULT_CAPS, "permitted": DEFAULT_CAPS
                },
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
                "noNewPrivileges": true
            },
            "root": {"path": rootfs, "readonly": false},
            "hostname": "box",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
                {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
                 "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
                {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
                {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
                {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
                {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]}
            ],
            "linux": {
                "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"}],
                "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware", "/proc/scsi"],
                "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
            }
        })
    }

    fn create(&self, id: &str, spec: &Value, stdio: Stdio) -> ttrpc::Result<()> {
        let req = CreateContainerRequest {
            container_id: id.into(),
            oci_spec_json: serde_json::to_vec(spec).expect("spec JSON"),
            stdio: Some(stdio).into(),
            ..Default::default()
        };
        self.client.create_container(ctx(), &req).map(drop)
    }

    fn start_container(&self, id: &str) -> ttrpc::Result<u32> {
        let req = StartContainerRequest { container_id: id.into(), ..Default::default() };
        self.client.start_container(ctx(), &req).map(|r| r.pid)
    }

    fn exec(&self, id: &str, exec_id: &str, process: &Value, stdio: Stdio) -> ttrpc::Result<u32> {
        let req = ExecProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            oci_process_json: serde_json::to_vec(process).expect("process JSON"),
            stdio: Some(stdio).into(),
            ..Default::default()
        };
        self.client.exec_process(ctx(), &req).map(|r| r.pid)
    }

    fn wait(&self, id: &str, exec_id: &str) -> ttrpc::Result<u32> {
        let req = WaitProcessRequest { container_id: id.into(), exec_id: exec_id.into(), ..Default::default() };
        self.client.wait_process(ctx(), &req).map(|r| r.exit_status)
    }

    fn signal(&self, id: &str, exec_id: &str, signal: i32) -> ttrpc::Result<()> {
        let req = SignalProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            signal: signal as u32,
            ..Default::default()
        };
        self.client.signal_process(ctx(), &req).map(drop)
    }

    fn remove(&self, id: &str) -> ttrpc::Result<()> {
        let req = RemoveContainerRequest { container_id: id.into(), timeout_secs: 30, ..Default::default() };
        self.client.remove_container(ctx(), &req).map(drop)
    }

    fn stream(&self, kind: StreamKind, id: &str, exec_id: &str) -> UnixStream {
        stdio::connect_unix(&self.io_socket, &StreamHeader::new(kind, id, exec_id)).expect("opening a stream")
    }

    /// Runs `spec` to completion with stdout and stderr: (status, stdout, stderr).
    fn run(&self, id: &str, spec: &Value) -> (u32, String, String) {
        self.create(id, spec, out_err()).unwrap_or_else(|e| panic!("create {id}: {e:?}"));
        let out = read_all(self.stream(StreamKind::Stdout, id, ""));
        let err = read_all(self.stream(StreamKind::Stderr, id, ""));
        self.start_container(id).unwrap_or_else(|e| panic!("start {id}: {e:?}"));
        let status = self.wait(id, "").expect("wait");
        let (out, err) = (join(out), join(err));
        self.remove(id).expect("remove");
        (status, out, err)
    }

    /// The cgroup directories this agent makes for container `id` (v1: one per controller).
    fn cgroup_dirs(&self, id: &str) -> Vec<PathBuf> {
        let leaf = format!("nestbox-{}", self.pid());
        let mut found = Vec::new();
        let mut stack = vec![PathBuf::from("/sys/fs/cgroup")];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for e in entries.flatten() {
                let path = e.path();
                if !e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    continue;
                }
                if path.file_name().is_some_and(|n| n == leaf.as_str()) {
                    found.push(path.join(id));
                } else if path.components().count() < 12 {
                    stack.push(path);
                }
            }
        }
        assert!(!found.is_empty(), "no cgroup base nestbox-{} found", self.pid());
        found
    }

    /// The agent's child processes (as the reaper left them).
    fn children(&self) -> Vec<i32> {
        let mut out = Vec::new();
        for task in std::fs::read_dir(format!("/proc/{}/task", self.pid())).expect("tasks").flatten() {
            let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            out.extend(children.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
        }
        out
    }
}

const DEFAULT_CAPS: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

fn out_err() -> Stdio {
    Stdio { stdout: true, stderr: true, ..Default::default() }
}

fn read_all(mut stream: UnixStream) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = stream.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    })
}

fn join(h: JoinHandle<String>) -> String {
    h.join().expect("reader thread")
}

fn code(err: &ttrpc::Error) -> (ttrpc::Code, String) {
    match err {
        ttrpc::Error::RpcStatus(s) => (s.code(), s.message().to_string()),
        other => panic!("expected an RPC status, got {other:?}"),
    }
}

fn expect_code<T: std::fmt::Debug>(r: ttrpc::Result<T>, want: ttrpc::Code, text: &str) {
    let err = r.expect_err("the call should fail");
    let (got, msg) = code(&err);
    assert_eq!(got, want, "{msg}");
    assert!(msg.contains(text), "message {msg:?} lacks {text:?}");
}

macro_rules! root_only {
    () => {
        if !is_root() {
            eprintln!("skipped: containers need root");
            return;
        }
    };
}

#[test]
fn output_exit_codes_pid_namespace_and_hostname() {
    root_only!();
    let agent = Agent::start();
    let rootfs = agent.rootfs("rootfs");
    // Output written just before exit (here 50000 lines, then exit at once) is all there.
    let script = "echo out; echo err >&2; echo pid=$$; hostname; seq 1 50000; exit 3";
    let (status, out, err) = agent.run("c1", &agent.spec(&rootfs, &["sh", "-c", script]));
    assert_eq!(status, 3);
    assert_eq!(err, "err\n");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(&lines[..3], &["out", "pid=1", "box"], "own PID namespace and hostname");
    assert_eq!(lines.len(), 3 + 50000, "every line of output arrives");
    assert_eq!(lines.last(), Some(&"50000"));

    // A program that is not there: the create fails and says so (bad_input_... has more).
    expect_code(
        agent.create("c2", &agent.spec(&rootfs, &["no-such-program"]), Stdio::default()),
        ttrpc::Code::FAILED_PRECONDITION,
        "\"no-such-program\" not found",
    );
}

#[test]
fn signals_reach_init_and_exec_processes() {
    root_only!();
    let agent = Agent::start();
    let rootfs = agent.rootfs("rootfs");
    // A shell as PID 1 of its namespace only gets signals it handles (the kernel drops the
    // rest for a namespace's init), so the trap is what makes TERM count.
    let script = "trap 'echo got TERM; exit 42' TERM; echo ready; while :; do sleep 0.05; done";
    agent.create("c", &agent.spec(&rootfs, &["sh", "-c", script]), out_err()).expect("create");
    let mut out = BufReader::new(agent.stream(StreamKind::Stdout, "c", ""));
    let _err = agent.stream(StreamKind::Stderr, "c", "");
    agent.start_container("c").expect("start");
    let mut line = String::new();
    out.read_line(&mut line).expect("ready line");
    assert_eq!(line, "ready\n");

    let sleeper = json!({"args": ["sleep", "1000"], "cwd": "/", "user": {"uid": 0, "gid": 0}, "env": ["PATH=/bin"]});
    agent.exec("c", "e1", &sleeper, Stdio::default()).expect("exec");
    agent.signal("c", "e1", libc::SIGTERM).expect("TERM to the exec");
    assert_eq!(agent.wait("c", "e1").expect("wait exec"), 128 + libc::SIGTERM as u32);

    agent.signal("c", "", libc::SIGTERM).expect("TERM to init");
    assert_eq!(agent.wait("c", "").expect("wait"), 42);
    let mut rest = String::new();
    out.read_to_string(&mut rest).expect("rest of the output");
    assert_eq!(rest, "got TERM\n");
    // Asked twice, the same status; a signal now is refused.
    assert_eq!(agent.wait("c", "").expect("wait again"), 42);
    expect_code(agent.signal("c", "", libc::SIGKILL), ttrpc::Code::FAILED_PRECONDITION, "already exited");
    agent.remove("c").expect("remove");

    // SIGKILL: 128 + 9.
    agent.create("k", &agent.spec(&rootfs, &["sleep", "1000"]), Stdio::default()).expect("create");
    agent.start_container("k").expect("start");
    agent.signal("k", "", libc::SIGKILL).expect("KILL");
    assert_eq!(agent.wait("k", "").expect("wait"), 137);
    agent.remove("k").expect("remove");
}

#[test]
fn exec_into_a_running_container_sees_its_namespaces() {
    root_only!();
    let agent = Agent::start();
    let rootfs = agent.rootfs("rootfs");
    agent.create("c", &agent.spec(&rootfs, &["sleep", "1000"]), Stdio::default()).expect("create");
    let init_pid = agent.start_container("c").expect("start");
    assert!(init_pid > 1);

    let process = json!({
        "args": ["sh", "-c", "echo pid=$$; tr '\\0' ' ' < /proc/1/cmdline; echo; hostname; ls /proc | grep -c '^[0-9]'; echo oops >&2; exit 7"],
        "cwd": "/tmp", "user": {"uid": 0, "gid": 0}, "env": ["PATH=/bin"]
    });
    // ExecProcess starts the process once its streams are there: they are opened first
    // (or from another thread while the call waits).
    let out = read_all(agent.stream(StreamKind::Stdout, "c", "e1"));
    let err = read_all(agent.stream(StreamKind::Stderr, "c", "e1"));
    agent.exec("c", "e1", &process, out_err()).expect("exec");
    assert_eq!(agent.wait("c", "e1").expect("wait"), 7);
    let out = join(out);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("pid=") && lines[0] != "pid=1", "{out}");
    assert_eq!(lines[1].trim(), "sleep 1000", "the container's PID 1 is its init: {out}");
    assert_eq!(lines[2], "box");
    // Only the container's processes: init, the shell, and ls.
    assert!(lines[3].parse::<u32>().is_ok_and(|n| n <= 4), "{out}");
    assert_eq!(join(err), "oops\n");
    // Delivered once: the exec is gone afterwards.
    expect_code(agent.wait("c", "e1"), ttrpc::Code::NOT_FOUND, "no exec e1");

    // A stream opened while ExecProcess waits for it.
    let late = {
        let io_socket = agent.io_socket.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let header = StreamHeader::new(StreamKind::Stdout, "c", "e2");
            join(read_all(stdio::connect_unix(io_socket, &header).expect("opening a stream")))
        })
    };
    let echo = json!({"args": ["echo", "late"], "cwd": "/", "user": {"uid": 0, "gid": 0}});
    agent.exec("c", "e2", &echo, Stdio { stdout: true, ..Default::default() }).expect("exec");
    assert_eq!(agent.wait("c", "e2").expect("wait"), 0);
    assert_eq!(late.join().expect("reader"), "late\n");

    // A duplicate exec id while the first runs.
    let sleeper = json!({"args": ["sleep", "100"], "cwd": "/", "user": {"uid": 0, "gid": 0}});
    agent.exec("c", "e3", &sleeper, Stdio::default()).expect("exec");
    expect_code(agent.exec("c", "e3", &sleeper, Stdio::default()), ttrpc::Code::ALREADY_EXISTS, "exec e3 exists");
    // Removal kills every process, execs included.
    agent.remove("c").expect("remove");
    assert!(agent.children().is_empty(), "children left: {:?}", agent.children());
}

#[test]
fn terminal_with_resize() {
    root_only!();
    let agent = Agent::start();
    let rootfs = agent.rootfs("rootfs");
    let mut spec = agent.spec(&rootfs, &["sh", "-c", "stty size; [ -t 0 ] && echo is-a-tty; read line; stty size"]);
    spec["process"]["terminal"] = json!(true);
    spec["process"]["consoleSize"] = json!({"height": 24, "width": 80});
    agent.create("t", &spec, Stdio { terminal: true, ..Default::default() }).expect("create");
    let tty = agent.stream(StreamKind::Tty, "t", "");
    let mut input = tty.try_clone().expect("clone");
    let output = Arc::new(Mutex::new(String::new()));
    let reader = {
        let output = output.clone();
        let mut tty = tty;
        std::thread::spawn(move || {
            let mut buf = [0u8; 1024];
            while let Ok(n) = tty.read(&mut buf) {
                if n == 0 {
                    break;
                }
                output.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    agent.start_container("t").expect("start");
    let wait_for = |text: &str| {
        let start = Instant::now();
        while !output.lock().unwrap().contains(text) {
            assert!(start.elapsed() < CALL_TIMEOUT, "no {text:?} in {:?}", output.lock().unwrap());
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_for("24 80");
    wait_for("is-a-tty");
    let resize = TtyWinResizeRequest { container_id: "t".into(), rows: 40, columns: 100, ..Default::default() };
    agent.client.tty_win_resize(ctx(), &resize).expect("resize");
    input.write_all(b"go\n").expect("typing");
    wait_for("40 100");
    assert_eq!(agent.wait("t", "").expect("wait"), 0);
    reader.join().expect("reader");
    // Resizing a process without a terminal is refused.
    agent.create("p", &agent.spec(&rootfs, &["true"]), Stdio::default()).expect("create");
    let resize = TtyWinResizeRequest { container_id: "p".into(), rows: 1, columns: 1, ..Default::default() };
    expect_code(agent.client.tty_win_resize(ctx(), &resize), ttrpc::Code::FAILED_PRECONDITION, "no terminal");
    agent.remove("p").expect("remove");
    agent.remove("t").expect("remove");
}

#[test]
fn stdin_eof_by_close_stdin_and_by_half_close() {
    root_only!();
    let agent = Agent::start();
    let rootfs = agent.rootfs("rootfs");
    let with_stdin = Stdio { stdin: true, stdout: true, ..Default::default() };
    agent.create("c", &agent.spec(&rootfs, &["sh", "-c", "cat; echo done"]), with_stdin.clone()).expect("create");
    let mut input = agent.stream(StreamKind::Stdin, "c", "");
    let out = read_all(agent.stream(StreamKind::Stdout, "c", ""));
    agent.start_container("c").expect("start");
    input.write_all(b"hello\n").expect("writing stdin");
    let close = CloseStdinRequest { container_id: "c".into(), ..Default::default() };
    agent.client.close_stdin(ctx(), &close).expect("CloseStdin");
    assert_eq!(agent.wait("c", "").expect("wait"), 0);
    assert_eq!(join(out), "hello\ndone\n");
    agent.remove("c").expect("remove");

    agent.create("d", &agent.spec(&rootfs, &["sh", "-c", "wc -c"]), with_stdin).expect("create");
    let mut input = agent.stream(StreamKind::Stdin, "d", "");
    let out = read_all(agent.stream(StreamKind::Stdout, "d", ""));
    agent.start_container("d").expect("start");
    input.write_all(&[b'x'; 100_000]).expect("writing stdin");
    input.shutdown(std::net::Shutdown::Write).expect("half-close");
    assert_eq!(agent.wait("d", "").expect("wait"), 0);
    assert_eq!(join(out).trim(), "100000");
    agent.remove("d").expect("remove");
}

#[test]
fn memory_limit_triggers_an_oom_event() {
    root_only!();
    let agent = Agent::start();
    let rootfs = agent.rootfs("rootfs");
    let mut spec = agent.spec(&rootfs, &["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"]);
    spec["linux"]["resources"] = json!({"memory": {"limit": 16 << 20, "swap": 16 << 20}});
    agent.create("oom", &spec, Stdio::default()).expect("create");
    agent.start_container("oom").expect("start");
    assert_eq!(agent.wait("oom", "").expect("wait"), 137, "killed by the OOM killer");
    let event = agent
        .client
        .get_oom_event(ttrpc::context::with_timeout(10_000_000_000), &GetOOMEventRequest::new())
        .expect("an OOM event");
    assert_eq!(event.container_id, "oom");
    let stats = agent
        .client
        .stats_container(ctx(), &StatsContainerRequest { container_id: "oom".into(), ..Default::default() })
        .expect("stats");
    let memory = stats.cgroup_stats.memory.clone().unwrap_or_default();
    assert_eq!(memory.limit, 16 << 20);
    assert!(memory.oom_kill_events >= 1, "{memory:?}");
    agent.remove("oom").expect("remove");
}

#[test]
fn pids_limit_stops_forks() {
    root_only!();
    let agent = Agent::start();
    let rootfs = agent.rootfs("rootfs");
    let script = "for i in 1 2 3 4 5 6 7 8; do sleep 5 & done; echo started; kill $(jobs -p) 2>/dev/null; exit 0";
    let mut spec = agent.spec(&rootfs, &["sh", "-c", script]);
    spec["linux"]["resources"] = json!({"pids": {"limit": 4}});
    let (_, out, err) = agent.run("p", &spec);
    assert!(err.contains("fork") || err.contains("Resource temporarily unavailable"), "stderr {err:?}; stdout {out:?}");
}

#[test]
fn seccomp_profile_denies_a_syscall() {
    root_only!();
    let agent = Agent::start();
    let rootfs = agent.rootfs("rootfs");
    let mut spec = agent.spec(&rootfs, &["sh", "-c", "touch /tmp/file && echo touched; mkdir /tmp/dir; echo $?"]);
    spec["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EPERM}]
    });
    let (status, out, err) = agent.run("s", &spec);
    assert_eq!(status, 0);
    assert_eq!(out, "touched\n1\n");
    assert!(err.contains("Operation not permitted"), "{err}");

    // Without no_new_privs the filter is installed while still privileged: same effect.
    spec["process"]["noNewPrivileges"] = json!(false);
    let (_, out, _) = agent.run("s2", &spec);
    assert_eq!(out, "touched\n1\n");

    // A profile the agent cannot honour is refused at create, not ignored.
    spec["linux"]["seccomp"]["defaultAction"] = json!("SCMP_ACT_NOTIFY");
    expect_code(agent.create("s3", &spec, Stdio::default()), ttrpc::Code::INVALID_ARGUMENT, "SCMP_ACT_NOTIFY");
}

#[test]
fn dropped_capabilities_are_really_dropped() {
    root_only!();
    let agent = Agent::start();
    let rootfs = agent.rootfs("rootfs");
    let keep = ["CAP_KILL", "CAP_SETUID"];
    let mut spec =
        agent.spec(&rootfs, &["sh", "-c", "grep -E '^Cap(Eff|Bnd)' /proc/self/status; touch /tmp/f; chown 1 /tmp/f"]);
    spec["process"]["capabilities"] = json!({"bounding": keep, "effective": keep, "permitted": keep});
    let (status, out, err) = agent.run("caps", &spec);
    let want = format!("{:016x}", 1u64 << 5 | 1 << 7);
    assert_eq!(out, format!("CapEff:\t{want}\nCapBnd:\t{want}\n"));
    assert_ne!(status, 0);
    assert!(err.contains("Operation not permitted"), "chown without CAP_CHOWN: {err}");

    // A non-root user with additional groups.
    let mut spec = agent.spec(&rootfs, &["id"]);
    spec["process"]["user"] = json!({"uid": 1000, "gid": 1000, "additionalGids": [10, 20]});
    let (status, out, _) = agent.run("user", &spec);
    assert_eq!(status, 0);
    assert!(out.starts_with("uid=1000 gid=1000 groups=10,20"), "{out}");
}

#[test]
fn read_only_rootfs_masked_and_read_only_paths() {
    root_only!();
    let agent = Agent::start();
    let rootfs = agent.rootfs("rootfs");
    let script = "exec 2>&1; touch /x; touch /tmp/ok && echo tmp-writable; wc -c < /proc/cmdline; \
                  echo x > /proc/sys/kernel/domainname; ls /sys/firmware | wc -l";
    let mut spec = agent.spec(&rootfs, &["sh", "-c", script]);
    spec["root"]["readonly"] = json!(true);
    spec["linux"]["maskedPaths"].as_array_mut().unwrap().push(json!("/proc/cmdline"));
    let (_, out, _) = agent.run("ro", &spec);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].contains("Read-only file system"), "{out}");
    assert_eq!(lines[1], "tmp-writable", "{out}");
    assert_eq!(lines[2].trim(), "0", "masked /proc/cmdline reads empty: {out}");
    assert!(lines[3].contains("Read-only file system"), "{out}");
    assert_eq!(lines[4].trim(), "0", "masked /sys/firmware is empty: {out}");
    assert!(!rootfs.join("x").exists());
}

#[test]
fn pause_freezes_resume_thaws_and_stats_report_usage() {
    root_only!();
    let agent = Agent::start();
    let rootfs = agent.rootfs("rootfs");
    let script = "i=0; while :; do i=$((i+1)); [ $((i % 2000)) = 0 ] && echo tick; done";
    agent
        .create("c", &agent.spec(&rootfs, &["sh", "-c", script]), Stdio { stdout: true, ..Default::default() })
        .expect("create");
    let mut stream = agent.stream(StreamKind::Stdout, "c", "");
    let ticks = Arc::new(Mutex::new(0usize));
    let counter = {
        let ticks = ticks.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 {
                    break;
                }
                *ticks.lock().unwrap() += buf[..n].iter().filter(|b| **b == b'\n').count();
            }
        })
    };
    agent.start_container("c").expect("start");
    let count = || *ticks.lock().unwrap();
    let start = Instant::now();
    while count() < 3 {
        assert!(start.elapsed() < CALL_TIMEOUT, "no output");
        std::thread::sleep(Duration::from_millis(10));
    }
    let id = || "c".to_string();
    agent
        .client
        .pause_container(ctx(), &PauseContainerRequest { container_id: id(), ..Default::default() })
        .expect("pause");
    std::thread::sleep(Duration::from_millis(200));
    let frozen = count();
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(count(), frozen, "output while paused");
    let t = json!({"args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0}});
    expect_code(agent.exec("c", "e", &t, Stdio::default()), ttrpc::Code::FAILED_PRECONDITION, "paused");
    agent
        .client
        .resume_container(ctx(), &ResumeContainerRequest { container_id: id(), ..Default::default() })
        .expect("resume");
    let resumed = Instant::now();
    while count() <= frozen {
        assert!(resumed.elapsed() < CALL_TIMEOUT, "no output after resume");
        std::thread::sleep(Duration::from_millis(10));
    }

    let stats = agent
        .client
        .stats_container(ctx(), &StatsContainerRequest { container_id: id(), ..Default::default() })
        .expect("stats");
    let (cpu, memory, pids) = (
        stats.cgroup_stats.cpu.clone().unwrap_or_default(),
        stats.cgroup_stats.memory.clone().unwrap_or_default(),
        stats.cgroup_stats.pids.clone().unwrap_or_default(),
    );
    assert!(cpu.usage_usec > 10_000, "a busy loop used CPU: {cpu:?}");
    assert!(memory.usage > 0, "{memory:?}");
    assert!(pids.current >= 1, "{pids:?}");
    agent.remove("c").expect("remove");
    counter.join().expect("counter");
}

#[test]
fn bad_input_gets_clear_errors_and_leaves_nothing_behind() {
    root_only!();
    let agent = Agent::start();
    let rootfs = agent.rootfs("rootfs");
    let before: HashSet<i32> = agent.children().into_iter().collect();

    let missing = agent.spec(&agent.dir.path().join("no-rootfs"), &["true"]);
    expect_code(agent.create("c", &missing, Stdio::default()), ttrpc::Code::INVALID_ARGUMENT, "does not exist");
    for dir in agent.cgroup_dirs("c") {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
    let req =
        CreateContainerRequest { container_id: "c".into(), oci_spec_json: b"{not json".to_vec(), ..Default::default() };
    expect_code(
        agent.client.create_container(ctx(), &req).map(drop),
        ttrpc::Code::INVALID_ARGUMENT,
        "invalid OCI spec JSON",
    );
    expect_code(
        agent.create("../x", &agent.spec(&rootfs, &["true"]), Stdio::default()),
        ttrpc::Code::INVALID_ARGUMENT,
        "container id",
    );
    let mut no_args = agent.spec(&rootfs, &[]);
    no_args["process"]["args"] = json!([]);
    expect_code(agent.create("c", &no_args, Stdio::default()), ttrpc::Code::INVALID_ARGUMENT, "process.args is empty");
    let mut userns = agent.spec(&rootfs, &["true"]);
    userns["linux"]["namespaces"].as_array_mut().unwrap().push(json!({"type": "user"}));
    expect_code(agent.create("c", &userns, Stdio::default()), ttrpc::Code::INVALID_ARGUMENT, "not supported");
    // A setup failure inside the helper (a bind mount of a missing source) is reported and undone.
    let mut bad_mount = agent.spec(&rootfs, &["true"]);
    bad_mount["mounts"]
        .as_array_mut()
        .unwrap()
        .push(json!({"destination": "/data", "type": "bind", "source": "/no/such/dir", "options": ["rbind"]}));
    expect_code(agent.create("c", &bad_mount, Stdio::default()), ttrpc::Code::FAILED_PRECONDITION, "/no/such/dir");
    for dir in agent.cgroup_dirs("c") {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
    // A program the rootfs does not have fails the create, as with runc, by path or by name.
    for missing in ["/no/such/program", "no-such-program"] {
        expect_code(
            agent.create("c", &agent.spec(&rootfs, &[missing]), Stdio::default()),
            ttrpc::Code::FAILED_PRECONDITION,
            missing,
        );
    }
    // The id is free again after every failure.
    agent.create("c", &agent.spec(&rootfs, &["true"]), Stdio::default()).expect("create after failures");
    expect_code(
        agent.create("c", &agent.spec(&rootfs, &["true"]), Stdio::default()),
        ttrpc::Code::ALREADY_EXISTS,
        "already exists",
    );
    expect_code(
        agent.exec("c", "e", &json!({"args": ["true"], "cwd": "/"}), Stdio::default()),
        ttrpc::Code::FAILED_PRECONDITION,
        "not started",
    );
    agent.start_container("c").expect("start");
    assert_eq!(agent.wait("c", "").expect("wait"), 0);
    expect_code(agent.start_container("c"), ttrpc::Code::FAILED_PRECONDITION, "already started");
    expect_code(
        agent.exec("c", "e", &json!({"args": ["true"], "cwd": "/"}), Stdio::default()),
        ttrpc::Code::FAILED_PRECONDITION,
        "not running",
    );
    expect_code(agent.signal("c", "", libc::SIGTERM), ttrpc::Code::FAILED_PRECONDITION, "already exited");
    expect_code(agent.signal("c", "nope", libc::SIGTERM), ttrpc::Code::NOT_FOUND, "no exec nope");
    expect_code(agent.wait("c", "nope"), ttrpc::Code::NOT_FOUND, "no exec nope");
    let close = CloseStdinRequest { container_id: "c".into(), exec_id: "nope".into(), ..Default::default() };
    expect_code(agent.client.close_stdin(ctx(), &close), ttrpc::Code::NOT_FOUND, "no exec nope");
    agent.remove("c").expect("remove");
    for dir in agent.cgroup_dirs("c") {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }

    // Every call on an unknown container.
    let c = &agent.client;
    let id = || "ghost".to_string();
    let nf = ttrpc::Code::NOT_FOUND;
    expect_code(agent.start_container("ghost"), nf, "no container ghost");
    expect_code(agent.exec("ghost", "e", &json!({"args": ["true"]}), Stdio::default()), nf, "no container ghost");
    expect_code(agent.signal("ghost", "", 9), nf, "no container ghost");
    expect_code(agent.wait("ghost", ""), nf, "no container ghost");
    expect_code(agent.remove("ghost"), nf, "no container ghost");
    expect_code(
        c.pause_container(ctx(), &PauseContainerRequest { container_id: id(), ..Default::default() }),
        nf,
        "ghost",
    );
    expect_code(
        c.resume_container(ctx(), &ResumeContainerRequest { container_id: id(), ..Default::default() }),
        nf,
        "ghost",
    );
    expect_code(
        c.update_container(ctx(), &UpdateContainerRequest { container_id: id(), ..Default::default() }),
        nf,
        "ghost",
    );
    expect_code(
        c.stats_container(ctx(), &StatsContainerRequest { container_id: id(), ..Default::default() }),
        nf,
        "ghost",
    );
    expect_code(
        c.tty_win_resize(ctx(), &TtyWinResizeRequest { container_id: id(), ..Default::default() }),
        nf,
        "ghost",
    );
    expect_code(c.close_stdin(ctx(), &CloseStdinRequest { container_id: id(), ..Default::default() }), nf, "ghost");

    // No process of ours is left, zombie or not.
    let after: HashSet<i32> = agent.children().into_iter().collect();
    assert!(after.is_subset(&before), "children left: {:?}", after.difference(&before).collect::<Vec<_>>());
}

#[test]
fn every_exit_status_arrives_once_and_orphans_are_reaped() {
    root_only!();
    let agent = Agent::start();
    let rootfs = agent.rootfs("rootfs");
    // No PID namespace: what a process leaves behind is re-parented to the agent (a
    // subreaper in host mode, PID 1 in a guest), which must reap it.
    let mut spec = agent.spec(&rootfs, &["sleep", "1000"]);
    spec["linux"]["namespaces"] = json!([{"type": "mount"}, {"type": "uts"}, {"type": "ipc"}]);
    agent.create("c", &spec, Stdio::default()).expect("create");
    agent.start_container("c").expect("start");

    // Many short processes at once, each with its own exit code, each leaving an orphan.
    std::thread::scope(|s| {
        for i in 0..16u32 {
            let agent = &agent;
            s.spawn(move || {
                let exec_id = format!("e{i}");
                let script = format!("sleep 0.3 & exit {}", i + 1);
                let process = json!({"args": ["sh", "-c", script], "cwd": "/", "user": {"uid": 0, "gid": 0}});
                agent.exec("c", &exec_id, &process, Stdio::default()).expect("exec");
                assert_eq!(agent.wait("c", &exec_id).expect("wait"), i + 1, "{exec_id}");
            });
        }
    });
    // The orphans end after 0.3 s and nothing of them stays: no zombie among the agent's
    // children, only the container's init.
    let start = Instant::now();
    loop {
        let zombies: Vec<i32> = agent
            .children()
            .into_iter()
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')))
            })
            .collect();
        let children = agent.children();
        if zombies.is_empty() && children.len() == 1 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "children {children:?}, zombies {zombies:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    agent.remove("c").expect("remove");
    assert!(agent.children().is_empty(), "children left: {:?}", agent.children());
}
