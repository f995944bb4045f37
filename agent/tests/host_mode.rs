//! The real agent binary in host mode (`--listen unix://...`): the agent API over ttrpc
//! on a Unix socket, without a VM.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nestbox_protocols::agent::{self, check_response::ServingStatus};
use nestbox_protocols::agent_ttrpc::AgentServiceClient;
use nestbox_protocols::ttrpc;

const AGENT: &str = env!("CARGO_BIN_EXE_nestbox-agent");
const DEADLINE: Duration = Duration::from_secs(30);

/// An agent process that is killed if the test ends without it having exited.
struct Agent {
    child: Child,
    socket: PathBuf,
    _stdout: BufReader<ChildStdout>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    /// Starts the agent on `dir/agent.sock` and waits for its "listening" line.
    fn start(dir: &Path) -> Agent {
        let socket = dir.join("agent.sock");
        let mut child = Command::new(AGENT)
            .arg(format!("--listen=unix://{}", socket.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting nestbox-agent");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("reading the agent's first line");
        let agent = Agent { child, socket, _stdout: stdout };
        assert!(line.contains("listening on unix://"), "unexpected first line {line:?}");
        assert!(line.contains(&format!("I/O on unix://{}.io", agent.socket.display())), "{line:?}");
        assert!(agent.socket.exists(), "{} missing after the listening line", agent.socket.display());
        agent
    }

    fn client(&self) -> AgentServiceClient {
        let stream = std::os::unix::net::UnixStream::connect(&self.socket).expect("connecting to the agent");
        nestbox_protocols::agent_client(stream).expect("starting a ttrpc client")
    }

    fn wait_exit(&mut self) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for the agent") {
                return status;
            }
            assert!(start.elapsed() < DEADLINE, "agent still running {DEADLINE:?} after shutdown");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(DEADLINE.as_nanos() as i64)
}

#[test]
fn check_version_a_refused_call_and_shutdown() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut agent = Agent::start(dir.path());
    let client = agent.client();

    let health = client.check(ctx(), &agent::CheckRequest::new()).expect("Check");
    assert_eq!(health.status.enum_value(), Ok(ServingStatus::SERVING));

    let version = client.version(ctx(), &agent::VersionRequest::new()).expect("Version");
    assert_eq!(version.agent_version, env!("CARGO_PKG_VERSION"));
    let host_release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("reading osrelease");
    assert_eq!(version.kernel_release, host_release.trim());
    assert!(!version.init_daemon, "host mode is not the guest's init");

    // Calls from several threads at once share one connection.
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                let v = client.version(ctx(), &agent::VersionRequest::new()).expect("concurrent Version");
                assert_eq!(v.agent_version, env!("CARGO_PKG_VERSION"));
            });
        }
    });

    let err = client.update_routes(ctx(), &agent::UpdateRoutesRequest::new()).expect_err("no sandbox yet");
    let ttrpc::Error::RpcStatus(status) = err else { panic!("expected an RPC status, got {err:?}") };
    assert_eq!(status.code(), ttrpc::Code::FAILED_PRECONDITION);
    assert!(status.message().contains("UpdateRoutes: no sandbox yet"), "{}", status.message());
    // An empty CreateContainer is a clear error, not a crash.
    let err = client.create_container(ctx(), &agent::CreateContainerRequest::new()).expect_err("empty request");
    let ttrpc::Error::RpcStatus(status) = err else { panic!("expected an RPC status, got {err:?}") };
    assert_eq!(status.code(), ttrpc::Code::INVALID_ARGUMENT);
    assert_eq!(status.message(), "container id is empty");

    let status = client.shutdown(ctx(), &agent::ShutdownRequest::new());
    assert!(status.is_ok(), "Shutdown answers before the agent ends: {status:?}");
    let exit = agent.wait_exit();
    assert_eq!(exit.code(), Some(0), "agent exit after Shutdown: {exit:?}");
    assert!(!agent.socket.exists(), "{} left behind", agent.socket.display());
}

fn refused(result: ttrpc::Result<()>, want: ttrpc::Code, text: &str) {
    match result.expect_err(text) {
        ttrpc::Error::RpcStatus(s) => {
            assert_eq!(s.code(), want, "{}", s.message());
            assert!(s.message().contains(text), "{:?} lacks {text:?}", s.message());
        }
        other => panic!("{text}: expected an RPC status, got {other:?}"),
    }
}

fn host_routes() -> String {
    let out = Command::new("ip").args(["route", "show", "table", "all"]).output().expect("ip route");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The network calls work in the pod's network namespace only: before CreateSandbox they
/// refuse, and a host-mode agent (this one, in the host's namespace) does not look for the
/// guest's virtio_net interface, which would be the host's own card; the host's routes stay
/// as they were.
#[test]
fn network_calls_refuse_before_a_sandbox_and_in_the_hosts_namespace() {
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start(dir.path());
    let c = agent.client();
    let routes_before = host_routes();
    let iface =
        nestbox_protocols::types::Interface { name: "eth0".into(), device: "nbt-none".into(), ..Default::default() };
    let req = agent::UpdateInterfaceRequest { interface: Some(iface).into(), ..Default::default() };
    let no_sandbox = ttrpc::Code::FAILED_PRECONDITION;
    refused(c.update_interface(ctx(), &req).map(drop), no_sandbox, "UpdateInterface: no sandbox yet");
    refused(c.update_routes(ctx(), &Default::default()).map(drop), no_sandbox, "UpdateRoutes: no sandbox yet");
    refused(c.add_arp_neighbors(ctx(), &Default::default()).map(drop), no_sandbox, "AddArpNeighbors: no sandbox yet");
    let empty = agent::UpdateInterfaceRequest::default();
    refused(c.update_interface(ctx(), &empty).map(drop), ttrpc::Code::INVALID_ARGUMENT, "without an interface");

    let sandbox = agent::CreateSandboxRequest { sandbox_id: "pod".into(), ..Default::default() };
    c.create_sandbox(ctx(), &sandbox).expect("CreateSandbox");
    let mut unnamed = req.clone();
    unnamed.interface.as_mut().expect("set").device.clear();
    refused(
        c.update_interface(ctx(), &unnamed).map(drop),
        ttrpc::Code::FAILED_PRECONDITION,
        "host mode: name the interface",
    );
    // The pod's table: nothing of the host's, and emptying it leaves the host's alone.
    let pod_routes = c.update_routes(ctx(), &Default::default()).expect("UpdateRoutes in the pod");
    assert!(pod_routes.routes.is_empty(), "the pod's new namespace has only its loopback: {pod_routes:?}");
    assert_eq!(host_routes(), routes_before, "the host's routes are untouched");
}

#[test]
fn sigterm_ends_the_agent_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut agent = Agent::start(dir.path());
    // SAFETY: kill(2) on the PID of our own child, which has not been reaped yet.
    let rc = unsafe { libc::kill(agent.child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    assert_eq!(agent.wait_exit().code(), Some(0));
    assert!(!agent.socket.exists(), "{} left behind", agent.socket.display());
}

fn run_agent(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(AGENT).args(args).stdin(Stdio::null()).output().expect("running nestbox-agent");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bad_listen_arguments_are_named() {
    for (args, expected) in [
        (
            &["--listen", "tcp://127.0.0.1:1024"][..],
            "--listen \"tcp://127.0.0.1:1024\": expected unix:///path/to/agent.sock",
        ),
        (&["--listen", "/tmp/agent.sock"], "expected unix:///path/to/agent.sock"),
        (&["--listen"], "--listen needs a value"),
        (&["--listen", "unix://"], "no socket path after unix://"),
        (&["--listne", "unix:///tmp/a.sock"], "unknown argument \"--listne\""),
    ] {
        let (code, stderr) = run_agent(args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: stderr {stderr:?} lacks {expected:?}");
        assert!(stderr.contains("usage:"), "{args:?}: {stderr}");
    }
}

#[test]
fn unusable_socket_paths_fail_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = format!("--listen=unix://{}/no/such/dir/agent.sock", dir.path().display());
    let (code, stderr) = run_agent(&[&missing]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("does not exist"), "{stderr}");

    let file = dir.path().join("file");
    std::fs::write(&file, "").expect("writing");
    let (code, stderr) = run_agent(&[&format!("--listen=unix://{}", file.display())]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("is not a socket"), "{stderr}");
}

#[test]
fn without_arguments_outside_a_guest_it_explains() {
    let (code, stderr) = run_agent(&[]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("not PID 1") && stderr.contains("--listen"), "{stderr}");
    let out = Command::new(AGENT).arg("--version").output().expect("running nestbox-agent");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("nestbox-agent {}", env!("CARGO_PKG_VERSION")));
}
