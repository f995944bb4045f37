//! The agent API and the VMM's vsock device in a real guest: one boot, many checks.
//!
//! The guest runs nestbox-agent with `nestbox.vsock_test`, which adds test services next
//! to the agent API (see nestbox_protocols::vsock_test). Through the VM's hybrid vsock
//! socket the test calls Check and Version, runs 64 concurrent echo connections, moves
//! 4 MiB each way with checksums, accepts a guest-initiated connection, sees guest-side
//! and host-side closes and a reset, floods the VMM with more guest-opened connections than
//! it accepts (held to its bound, its memory within a stated bound, serving on afterwards),
//! and finally shuts the guest down through the API.
//! Throughput is printed, not asserted: this machine's guest kernel is emulated.
//!
//! `NESTBOX_VSOCK_BULK_MIB=<n>` moves n MiB each way instead (64 was the size before; at
//! this machine's 0.3-0.4 MiB/s that alone took six minutes of CI). Throughput proper is
//! measured by `cargo bench -p nestbox-tests --bench vsock` (docs/benchmarks.md).

use nestbox_protocols::agent::check_response::ServingStatus;
use nestbox_protocols::agent::{
    CheckRequest, CreateContainerRequest, ShutdownRequest, UpdateRoutesRequest, VersionRequest,
};
use nestbox_protocols::vsock_test::{self, fill_pattern};
use nestbox_protocols::{hybrid, ttrpc};
use nestbox_tests::{host_kernel_release, vmm_command, GUEST_DEADLINE};
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

const RPC_TIMEOUT_NS: i64 = 60_000_000_000;

/// The bulk checks' size each way, in MiB, unless `NESTBOX_VSOCK_BULK_MIB` says otherwise.
/// 4 MiB is 16 times the VMM's credit window (`BUF_ALLOC`, 256 KiB) and the guest's and the
/// Unix socket's buffers: credit updates, full buffers and the wake-ups after them happen
/// many times over each way, which is what proves the bulk path; more only measures speed.
const DEFAULT_BULK_MIB: usize = 4;

fn bulk_bytes() -> usize {
    let mib = match std::env::var("NESTBOX_VSOCK_BULK_MIB") {
        Ok(v) => v
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=4096).contains(n))
            .unwrap_or_else(|| panic!("NESTBOX_VSOCK_BULK_MIB={v:?}: expected a number of MiB from 1 to 4096")),
        Err(_) => DEFAULT_BULK_MIB,
    };
    mib << 20
}

struct Vm {
    child: Child,
    dir: PathBuf,
}

impl Vm {
    fn console(&self) -> String {
        std::fs::read_to_string(self.dir.join("console.log")).unwrap_or_default()
    }

    fn wait_exit(&mut self, deadline: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn socket_for_port(uds: &Path, port: u32) -> PathBuf {
    let mut p = uds.as_os_str().to_owned();
    p.push(format!("_{port}"));
    PathBuf::from(p)
}

fn connect(uds: &Path, port: u32) -> std::os::unix::net::UnixStream {
    hybrid::connect(uds, port, Instant::now() + Duration::from_secs(60)).expect("hybrid connect").stream
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

fn mib_per_s(bytes: usize, took: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / took.as_secs_f64()
}

#[test]
fn agent_api_and_vsock_in_a_real_guest() {
    let dir = std::env::temp_dir().join(format!("nestbox-test-vsock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let uds = dir.join("vsock.sock");
    // The guest connects to host port 1100 once ready: listen before it boots.
    let guest_conns = UnixListener::bind(socket_for_port(&uds, vsock_test::HOST_PORT)).unwrap();

    let child = vmm_command(None)
        .args(["--vcpus", "1", "--memory-mib", "256", "--cmdline", vsock_test::PARAM])
        .arg("--vsock-socket")
        .arg(&uds)
        .arg("--console")
        .arg(dir.join("console.log"))
        .spawn()
        .expect("spawning nestbox-vmm");
    let mut vm = Vm { child, dir: dir.clone() };

    // The agent API: the client retries while the guest boots.
    let booted = Instant::now();
    let agent = hybrid::connect_agent(&uds, Instant::now() + GUEST_DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\nconsole:\n{}", vm.console()));
    eprintln!("agent reachable {:?} after VMM start", booted.elapsed());
    let ctx = || ttrpc::context::with_timeout(RPC_TIMEOUT_NS);
    let check = agent.check(ctx(), &CheckRequest::new()).expect("Check");
    assert_eq!(check.status.enum_value(), Ok(ServingStatus::SERVING));
    let version = agent.version(ctx(), &VersionRequest::new()).expect("Version");
    assert_eq!(version.agent_version, env!("CARGO_PKG_VERSION"));
    assert!(version.kernel_release.ends_with("-nestbox"), "{}", version.kernel_release);
    assert_ne!(version.kernel_release, host_kernel_release());
    assert!(version.init_daemon, "the agent is the guest's PID 1");
    // Network calls change only a pod's namespace: none before CreateSandbox.
    match agent.update_routes(ctx(), &UpdateRoutesRequest::new()) {
        Err(ttrpc::Error::RpcStatus(s)) => {
            assert_eq!(s.code(), ttrpc::Code::FAILED_PRECONDITION);
            assert!(s.message().contains("no sandbox yet"), "{}", s.message());
        }
        other => panic!("UpdateRoutes before CreateSandbox: expected FAILED_PRECONDITION, got {other:?}"),
    }
    // Container calls are served (the guest has no rootfs to run one yet: virtio-fs).
    match agent.create_container(ctx(), &CreateContainerRequest::new()) {
        Err(ttrpc::Error::RpcStatus(s)) => assert_eq!(s.code(), ttrpc::Code::INVALID_ARGUMENT, "{}", s.message()),
        other => panic!("empty CreateContainer: expected INVALID_ARGUMENT, got {other:?}"),
    }
    let rtt_start = Instant::now();
    const PINGS: u32 = 20;
    for _ in 0..PINGS {
        agent.check(ctx(), &CheckRequest::new()).expect("Check");
    }
    eprintln!("Check round trip: {:?} mean over {PINGS}", rtt_start.elapsed() / PINGS);

    // A guest-initiated connection arrives on <uds>_1100.
    let (mut from_guest, _) = guest_conns.accept().expect("guest connection");
    from_guest.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut greeting = vec![0u8; vsock_test::GREETING.len()];
    from_guest.read_exact(&mut greeting).unwrap();
    assert_eq!(greeting, vsock_test::GREETING);
    from_guest.write_all(b"echo me").unwrap();
    let mut back = [0u8; 7];
    from_guest.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"echo me");

    guest_flood(&uds, vm.child.id());

    // 64 concurrent connections, each echoing its own data.
    let echoes: Vec<_> = (0..64u8)
        .map(|i| {
            let uds = uds.clone();
            std::thread::spawn(move || {
                let mut s = connect(&uds, vsock_test::ECHO_PORT);
                let data: Vec<u8> = (0..16 * 1024).map(|j| (j as u8).wrapping_mul(31).wrapping_add(i)).collect();
                let writer = {
                    let mut s = s.try_clone().unwrap();
                    let data = data.clone();
                    std::thread::spawn(move || {
                        s.write_all(&data).unwrap();
                        s.shutdown(Shutdown::Write).unwrap();
                    })
                };
                let mut got = Vec::new();
                s.read_to_end(&mut got).unwrap();
                writer.join().unwrap();
                assert!(got == data, "connection {i}: echo differs ({} of {} bytes back)", got.len(), data.len());
            })
        })
        .collect();
    for e in echoes {
        e.join().expect("echo connection");
    }

    // The bulk size host to guest, checksummed by the guest.
    let bulk_len = bulk_bytes();
    let mut bulk = vec![0u8; bulk_len];
    fill_pattern(0, &mut bulk);
    let expected = sha256_hex(&bulk);
    let mut sink = connect(&uds, vsock_test::SINK_PORT);
    let t = Instant::now();
    sink.write_all(&bulk).unwrap();
    sink.shutdown(Shutdown::Write).unwrap();
    let mut answer = String::new();
    BufReader::new(&mut sink).read_line(&mut answer).unwrap();
    let h2g = t.elapsed();
    assert_eq!(answer.trim(), format!("{bulk_len} {expected}"), "guest's count and checksum");

    // The same size guest to host, checked here.
    let mut source = connect(&uds, vsock_test::SOURCE_PORT);
    let t = Instant::now();
    source.write_all(format!("{bulk_len}\n").as_bytes()).unwrap();
    let mut got = Vec::with_capacity(bulk_len);
    source.read_to_end(&mut got).unwrap();
    let g2h = t.elapsed();
    assert_eq!(got.len(), bulk_len);
    assert_eq!(sha256_hex(&got), expected);
    eprintln!(
        "{} MiB host->guest {:.1} MiB/s, guest->host {:.1} MiB/s",
        bulk_len >> 20,
        mib_per_s(bulk_len, h2g),
        mib_per_s(bulk_len, g2h)
    );

    // Guest-side close: the host sees EOF.
    let mut closed = connect(&uds, vsock_test::CLOSE_PORT);
    let mut rest = Vec::new();
    closed.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());

    // Nobody listens on the port: the guest resets, the VMM closes the host stream, and
    // the client gives up at its deadline naming the port.
    let err = hybrid::connect(&uds, 4999, Instant::now() + Duration::from_secs(3)).unwrap_err();
    assert!(err.to_string().contains("guest port 4999 not reachable"), "{err}");

    // Host-side close in the middle of an echo: the device stays healthy.
    let mut abandoned = connect(&uds, vsock_test::ECHO_PORT);
    abandoned.write_all(&[1u8; 100_000]).unwrap();
    drop(abandoned);
    let mut again = connect(&uds, vsock_test::ECHO_PORT);
    again.write_all(b"still here").unwrap();
    again.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    again.read_to_end(&mut back).unwrap();
    assert_eq!(back, b"still here");

    // Shutdown through the API ends the VM cleanly and the VMM removes its socket; no
    // safety-net bound is reached on the way (the agent's warning would be on the console).
    let asked = Instant::now();
    agent.shutdown(ctx(), &ShutdownRequest::new()).expect("Shutdown");
    let answered = asked.elapsed();
    let status = vm.wait_exit(Duration::from_secs(300)).expect("VMM still running after Shutdown");
    let console = vm.console();
    eprintln!("Shutdown answered in {answered:?}, VMM exit {:?} after it", asked.elapsed());
    assert!(status.success(), "VMM exit {status:?}\nconsole:\n{console}");
    assert!(!console.contains("safety-net bound reached"), "a shutdown bound was reached:\n{console}");
    assert!(!uds.exists(), "vsock socket left behind");
}

/// The VMM's resident memory in KiB (VmRSS).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the VMM's status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
    line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("a number")
}

/// A guest flooding the VMM's vsock: it opens [`FLOOD`] connections to a host port whose
/// listener accepts them all. The VMM takes at most its bound (the muxer's
/// `MAX_GUEST_CONNECTIONS`, 1024, counting every open connection) and resets the rest, its
/// resident memory grows by less than [`FLOOD_RSS_BOUND_KIB`], and it serves on afterwards.
fn guest_flood(uds: &Path, vmm_pid: u32) {
    const FLOOD: usize = 1500;
    const MAX_GUEST_CONNECTIONS: usize = 1024;
    const FLOOD_RSS_BOUND_KIB: u64 = 64 * 1024;
    let listener = UnixListener::bind(socket_for_port(uds, vsock_test::HOST_FLOOD_PORT)).expect("flood listener");
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let holder = held.clone();
    // Accepts for as long as the test runs, holding every connection open.
    std::thread::spawn(move || {
        while let Ok((conn, _)) = listener.accept() {
            holder.lock().unwrap_or_else(|e| e.into_inner()).push(conn);
        }
    });
    let before = rss_kib(vmm_pid);
    let mut control = connect(uds, vsock_test::FLOOD_PORT);
    control.set_read_timeout(Some(Duration::from_secs(600))).unwrap();
    let t = Instant::now();
    control.write_all(format!("{FLOOD}\n").as_bytes()).unwrap();
    let mut answer = String::new();
    BufReader::new(&mut control).read_line(&mut answer).expect("the flood's answer");
    let counts: Vec<usize> = answer.split_whitespace().filter_map(|n| n.parse().ok()).collect();
    let [opened, refused] = counts[..] else { panic!("flood answer {answer:?}") };
    let during = rss_kib(vmm_pid);
    eprintln!(
        "guest flood: {opened} connections held, {refused} refused in {:?}; VMM RSS {before} -> {during} KiB",
        t.elapsed()
    );
    assert_eq!(opened + refused, FLOOD, "{answer:?}");
    assert!(opened <= MAX_GUEST_CONNECTIONS, "the VMM holds at most its bound: {answer:?}");
    assert!(refused >= FLOOD - MAX_GUEST_CONNECTIONS, "the rest were reset: {answer:?}");
    assert!(during.saturating_sub(before) < FLOOD_RSS_BOUND_KIB, "VMM RSS grew {before} -> {during} KiB");
    control.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    control.read_to_end(&mut rest).expect("the guest closes the flood");
    // Serving goes on: a new connection echoes.
    let mut echo = connect(uds, vsock_test::ECHO_PORT);
    echo.write_all(b"after the flood").unwrap();
    echo.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    echo.read_to_end(&mut back).unwrap();
    assert_eq!(back, b"after the flood");
    // Every connection the guest got reached the host's listener (accepted by now, or soon).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let count = held.lock().unwrap_or_else(|e| e.into_inner()).len();
        if count == opened {
            break;
        }
        assert!(Instant::now() < deadline, "{count} of {opened} guest connections reached the listener");
        std::thread::sleep(Duration::from_millis(50));
    }
}
