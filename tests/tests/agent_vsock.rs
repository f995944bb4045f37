//! The agent API and the vsock test services over the VMM's hybrid vsock, on a real guest:
//! one boot with `nestbox.vsock_test`, then Check, Version, an unimplemented call, every
//! test service (many connections at once), the guest-initiated connection, and Shutdown,
//! which must end the VMM with exit code 0.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nestbox_protocols::agent::{self, check_response::ServingStatus};
use nestbox_protocols::vsock_test::{
    fill_pattern, CLOSE_PORT, ECHO_PORT, GREETING, HOST_PORT, PARAM, SINK_PORT, SOURCE_PORT,
};
use nestbox_protocols::{hybrid, ttrpc};
use nestbox_tests::{binary, guest_image, GUEST_DEADLINE};
use sha2::{Digest, Sha256};

/// Once the agent answers, each exchange should be quick even here; this catches a hang.
const EXCHANGE_DEADLINE: Duration = Duration::from_secs(120);

struct Vm {
    child: Child,
    console: Option<thread::JoinHandle<String>>,
}

impl Vm {
    fn console(&mut self) -> String {
        self.console.take().and_then(|h| h.join().ok()).unwrap_or_default()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn boot(vsock: &Path) -> Vm {
    let vmm = binary("nestbox-vmm", "nestbox-vmm");
    let (kernel, initramfs) = guest_image();
    let mut child = Command::new(vmm)
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initramfs")
        .arg(&initramfs)
        .args(["--vcpus", "2", "--memory-mib", "128", "--cmdline", PARAM, "--vsock-socket"])
        .arg(vsock)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting nestbox-vmm");
    let mut stdout = child.stdout.take().expect("piped stdout");
    let console = thread::spawn(move || {
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    });
    Vm { child, console: Some(console) }
}

fn connect(vsock: &Path, port: u32) -> UnixStream {
    let conn = hybrid::connect(vsock, port, Instant::now() + EXCHANGE_DEADLINE).expect("connecting to a test service");
    conn.stream.set_read_timeout(Some(EXCHANGE_DEADLINE)).expect("read timeout");
    conn.stream
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

fn echo_roundtrip(vsock: &Path, data: Vec<u8>) {
    let mut stream = connect(vsock, ECHO_PORT);
    let mut writer = stream.try_clone().expect("cloning");
    let sent = data.clone();
    let w = thread::spawn(move || {
        writer.write_all(&sent).expect("writing to echo");
        writer.shutdown(Shutdown::Write).expect("half-closing");
    });
    let mut back = Vec::new();
    stream.read_to_end(&mut back).expect("reading the echo");
    w.join().expect("writer");
    assert!(back == data, "echo: sent {} bytes, got {} back (or different)", data.len(), back.len());
}

fn check_services(vsock: &Path) {
    // Echo, several connections at once with different data.
    let echoes: Vec<_> = (0..6u8)
        .map(|i| {
            let vsock = vsock.to_path_buf();
            thread::spawn(move || {
                echo_roundtrip(&vsock, (0..100_000 + usize::from(i)).map(|j| (j % 253) as u8 ^ i).collect())
            })
        })
        .collect();
    for e in echoes {
        e.join().expect("echo connection");
    }

    // Sink: count and checksum.
    let data: Vec<u8> = (0..300_007u32).map(|i| (i * 7 % 256) as u8).collect();
    let mut stream = connect(vsock, SINK_PORT);
    stream.write_all(&data).expect("writing to sink");
    stream.shutdown(Shutdown::Write).expect("half-closing");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("reading the sink's answer");
    assert_eq!(answer, format!("{} {}\n", data.len(), sha256_hex(&data)));

    // Source: the shared pattern.
    let count = 500_000usize;
    let mut stream = connect(vsock, SOURCE_PORT);
    stream.write_all(format!("{count}\n").as_bytes()).expect("asking the source");
    let mut got = Vec::new();
    stream.read_to_end(&mut got).expect("reading the source");
    let mut want = vec![0u8; count];
    fill_pattern(0, &mut want);
    assert!(got == want, "source: {} bytes received of {count} (or different)", got.len());

    // Close: the guest closes at once.
    let mut stream = connect(vsock, CLOSE_PORT);
    let mut got = Vec::new();
    stream.read_to_end(&mut got).expect("end of stream from the guest's close");
    assert!(got.is_empty());
}

/// The guest's own connection to host port 1100 (the VMM forwards it to `<vsock>_1100`).
fn check_guest_initiated(listener: UnixListener) {
    listener.set_nonblocking(true).expect("nonblocking");
    let start = Instant::now();
    let mut stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && start.elapsed() < EXCHANGE_DEADLINE => {
                thread::sleep(Duration::from_millis(50))
            }
            Err(e) => panic!("no connection from the guest to host port {HOST_PORT}: {e}"),
        }
    };
    stream.set_nonblocking(false).expect("blocking");
    stream.set_read_timeout(Some(EXCHANGE_DEADLINE)).expect("read timeout");
    let mut greeting = vec![0u8; GREETING.len()];
    stream.read_exact(&mut greeting).expect("reading the greeting");
    assert_eq!(greeting, GREETING);
    stream.write_all(b"hello from host").expect("writing");
    stream.shutdown(Shutdown::Write).expect("half-closing");
    let mut back = Vec::new();
    stream.read_to_end(&mut back).expect("reading the echo");
    assert_eq!(back, b"hello from host");
}

#[test]
fn agent_api_and_test_services_over_hybrid_vsock() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vsock: PathBuf = dir.path().join("vsock.sock");
    // Listening before the boot: the guest connects as soon as it is ready.
    let host_listener = UnixListener::bind(format!("{}_{HOST_PORT}", vsock.display())).expect("binding host port");
    let mut vm = boot(&vsock);
    let start = Instant::now();

    let client = hybrid::connect_agent(&vsock, start + GUEST_DEADLINE).expect("the agent answers on vsock 1024");
    eprintln!("agent reachable {:?} after VMM start", start.elapsed());
    let ctx = || ttrpc::context::with_timeout(EXCHANGE_DEADLINE.as_nanos() as i64);

    let health = client.check(ctx(), &agent::CheckRequest::new()).expect("Check");
    assert_eq!(health.status.enum_value(), Ok(ServingStatus::SERVING));
    let version = client.version(ctx(), &agent::VersionRequest::new()).expect("Version");
    assert_eq!(version.agent_version, env!("CARGO_PKG_VERSION"));
    assert!(version.kernel_release.ends_with("-nestbox"), "guest kernel {:?}", version.kernel_release);
    assert!(version.init_daemon);
    match client.create_container(ctx(), &agent::CreateContainerRequest::new()) {
        Err(ttrpc::Error::RpcStatus(s)) => {
            assert_eq!(s.code(), ttrpc::Code::UNIMPLEMENTED);
            assert_eq!(s.message(), "CreateContainer is not implemented yet");
        }
        other => panic!("CreateContainer: expected UNIMPLEMENTED, got {other:?}"),
    }

    check_services(&vsock);
    check_guest_initiated(host_listener);
    eprintln!("services checked {:?} after VMM start", start.elapsed());

    client.shutdown(ctx(), &agent::ShutdownRequest::new()).expect("Shutdown answers before the VM ends");
    let stop = Instant::now();
    let status = loop {
        if let Some(status) = vm.child.try_wait().expect("waiting for the VMM") {
            break status;
        }
        assert!(stop.elapsed() < EXCHANGE_DEADLINE, "VMM still running after Shutdown");
        thread::sleep(Duration::from_millis(100));
    };
    let console = vm.console();
    assert!(status.success(), "VMM exit {status:?} after Shutdown; console:\n{console}");
    assert!(console.contains("serving the agent API on vsock port 1024"), "{console}");
    assert!(console.contains("shutdown: rebooting the VM"), "{console}");
}
