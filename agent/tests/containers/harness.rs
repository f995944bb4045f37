//! The agent under test and the calls the tests make: one agent in host mode per test,
//! busybox root file systems, a containerd-like spec, and the API calls with a timeout.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio as ProcStdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nestbox_protocols::agent::*;
use nestbox_protocols::agent_ttrpc::AgentServiceClient;
use nestbox_protocols::stdio::{self, StreamHeader, StreamKind};
use nestbox_protocols::ttrpc;
use nestbox_protocols::types::Stdio;
use serde_json::{json, Value};

pub const AGENT: &str = env!("CARGO_BIN_EXE_nestbox-agent");
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);

pub fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(CALL_TIMEOUT.as_nanos() as i64)
}

pub struct Agent {
    child: Child,
    pub io_socket: PathBuf,
    pub client: AgentServiceClient,
    pub dir: tempfile::TempDir,
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

pub fn is_root() -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

impl Agent {
    pub fn start() -> Agent {
        Agent::start_in(&[])
    }

    /// The agent run by `wrapper` (e.g. `ip netns exec NAME`), which ends by executing it.
    pub fn start_in(wrapper: &[&str]) -> Agent {
        Agent::launch(wrapper, &[], ProcStdio::inherit())
    }

    /// The agent run by `wrapper`, with `env` added and its stderr (its log) to `stderr`.
    pub fn launch(wrapper: &[&str], env: &[(&str, &str)], stderr: ProcStdio) -> Agent {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("agent.sock");
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(AGENT);
                c
            }
            None => Command::new(AGENT),
        };
        let mut child = command
            .arg(format!("--listen=unix://{}", socket.display()))
            .envs(env.iter().copied())
            .stdin(ProcStdio::null())
            .stdout(ProcStdio::piped())
            .stderr(stderr)
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

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// A busybox root file system: the static busybox and a link per applet.
    pub fn rootfs(&self, name: &str) -> PathBuf {
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
    pub fn spec(&self, rootfs: &Path, args: &[&str]) -> Value {
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

    pub fn create(&self, id: &str, spec: &Value, stdio: Stdio) -> ttrpc::Result<()> {
        let req = CreateContainerRequest {
            container_id: id.into(),
            oci_spec_json: serde_json::to_vec(spec).expect("spec JSON"),
            stdio: Some(stdio).into(),
            ..Default::default()
        };
        self.client.create_container(ctx(), &req).map(drop)
    }

    pub fn start_container(&self, id: &str) -> ttrpc::Result<u32> {
        let req = StartContainerRequest { container_id: id.into(), ..Default::default() };
        self.client.start_container(ctx(), &req).map(|r| r.pid)
    }

    pub fn exec(&self, id: &str, exec_id: &str, process: &Value, stdio: Stdio) -> ttrpc::Result<u32> {
        let req = ExecProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            oci_process_json: serde_json::to_vec(process).expect("process JSON"),
            stdio: Some(stdio).into(),
            ..Default::default()
        };
        self.client.exec_process(ctx(), &req).map(|r| r.pid)
    }

    pub fn wait(&self, id: &str, exec_id: &str) -> ttrpc::Result<u32> {
        let req = WaitProcessRequest { container_id: id.into(), exec_id: exec_id.into(), ..Default::default() };
        self.client.wait_process(ctx(), &req).map(|r| r.exit_status)
    }

    pub fn signal(&self, id: &str, exec_id: &str, signal: i32) -> ttrpc::Result<()> {
        let req = SignalProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            signal: signal as u32,
            ..Default::default()
        };
        self.client.signal_process(ctx(), &req).map(drop)
    }

    pub fn remove(&self, id: &str) -> ttrpc::Result<()> {
        let req = RemoveContainerRequest { container_id: id.into(), timeout_secs: 30, ..Default::default() };
        self.client.remove_container(ctx(), &req).map(drop)
    }

    pub fn stream(&self, kind: StreamKind, id: &str, exec_id: &str) -> UnixStream {
        stdio::connect_unix(&self.io_socket, &StreamHeader::new(kind, id, exec_id)).expect("opening a stream")
    }

    /// Runs `spec` to completion with stdout and stderr: (status, stdout, stderr).
    pub fn run(&self, id: &str, spec: &Value) -> (u32, String, String) {
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
    pub fn cgroup_dirs(&self, id: &str) -> Vec<PathBuf> {
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
    pub fn children(&self) -> Vec<i32> {
        let mut out = Vec::new();
        for task in std::fs::read_dir(format!("/proc/{}/task", self.pid())).expect("tasks").flatten() {
            let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            out.extend(children.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
        }
        out
    }
}

pub const DEFAULT_CAPS: [&str; 14] = [
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

pub fn out_err() -> Stdio {
    Stdio { stdout: true, stderr: true, ..Default::default() }
}

pub fn read_all(mut stream: UnixStream) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = stream.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    })
}

pub fn join(h: JoinHandle<String>) -> String {
    h.join().expect("reader thread")
}

pub fn code(err: &ttrpc::Error) -> (ttrpc::Code, String) {
    match err {
        ttrpc::Error::RpcStatus(s) => (s.code(), s.message().to_string()),
        other => panic!("expected an RPC status, got {other:?}"),
    }
}

pub fn expect_code<T: std::fmt::Debug>(r: ttrpc::Result<T>, want: ttrpc::Code, text: &str) {
    let err = r.expect_err("the call should fail");
    let (got, msg) = code(&err);
    assert_eq!(got, want, "{msg}");
    assert!(msg.contains(text), "message {msg:?} lacks {text:?}");
}
