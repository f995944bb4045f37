//! vsock benchmark (`cargo bench -p nestbox-tests --bench vsock`): one real guest with the
//! agent's vsock test services, measured through nestbox-vmm's hybrid vsock, next to the
//! same operations over a plain Unix socket on the host (the ceiling):
//! - round trip of the agent's Check RPC: in the guest over vsock, and against the agent
//!   in host mode over a Unix socket;
//! - throughput host to guest and guest to host (the sink and source test services),
//!   and the same byte stream through a host Unix socket pair.
//!
//! Options (after `--`): `--mib N` bytes per direction (default 16), `--pings N` (200).

use nestbox_protocols::agent::CheckRequest;
use nestbox_protocols::vsock_test::{self, fill_pattern};
use nestbox_protocols::{agent_client, hybrid, ttrpc};
use nestbox_tests::{binary, vmm_command, GUEST_DEADLINE};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn option(args: &[String], name: &str, default: usize) -> usize {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn check_rtt(client: &nestbox_protocols::agent_ttrpc::AgentServiceClient, pings: usize) -> Duration {
    let ctx = || ttrpc::context::with_timeout(60_000_000_000);
    client.check(ctx(), &CheckRequest::new()).expect("Check");
    let t = Instant::now();
    for _ in 0..pings {
        client.check(ctx(), &CheckRequest::new()).expect("Check");
    }
    t.elapsed() / pings as u32
}

/// Sends `data` and half-closes, reading the other direction to its end meanwhile;
/// returns (seconds until the reply is complete, reply).
fn push(mut stream: UnixStream, data: &[u8]) -> (f64, Vec<u8>) {
    let t = Instant::now();
    let mut reader = stream.try_clone().unwrap();
    let collector = std::thread::spawn(move || {
        let mut reply = Vec::new();
        reader.read_to_end(&mut reply).unwrap();
        reply
    });
    stream.write_all(data).unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let reply = collector.join().unwrap();
    (t.elapsed().as_secs_f64(), reply)
}

fn mib_s(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / (1 << 20) as f64 / secs
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bytes = option(&args, "--mib", 16) << 20;
    let pings = option(&args, "--pings", 200);
    let dir = std::env::temp_dir().join(format!("nestbox-bench-vsock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut data = vec![0u8; bytes];
    fill_pattern(0, &mut data);

    // Ceiling: the agent in host mode, and a Unix socket pair on the host.
    let agent_sock = dir.join("agent.sock");
    let mut host_agent = Command::new(binary("nestbox-agent", "nestbox-agent"))
        .arg(format!("--listen=unix://{}", agent_sock.display()))
        .stdout(Stdio::null())
        .spawn()
        .expect("host-mode agent");
    let deadline = Instant::now() + Duration::from_secs(30);
    let host_client = loop {
        if let Ok(s) = UnixStream::connect(&agent_sock) {
            break agent_client(s).expect("ttrpc client");
        }
        assert!(Instant::now() < deadline, "host-mode agent did not listen");
        std::thread::sleep(Duration::from_millis(20));
    };
    let host_rtt = check_rtt(&host_client, pings);
    drop(host_client);
    let _ = host_agent.kill();
    let _ = host_agent.wait();
    let (a, mut b) = UnixStream::pair().unwrap();
    let drain = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        while b.read(&mut buf).unwrap() > 0 {}
    });
    let (unix_secs, _) = push(a, &data);
    drain.join().unwrap();

    // The guest.
    let uds = dir.join("vsock.sock");
    let mut vm = vmm_command(None)
        .args(["--vcpus", "1", "--memory-mib", "256", "--cmdline", vsock_test::PARAM, "--console", "/dev/null"])
        .arg("--vsock-socket")
        .arg(&uds)
        .spawn()
        .expect("nestbox-vmm");
    eprintln!("booting the guest (about a minute on software-nested KVM)");
    let client = hybrid::connect_agent(&uds, Instant::now() + GUEST_DEADLINE).expect("agent");
    let guest_rtt = check_rtt(&client, pings);

    let connect = |port| hybrid::connect(&uds, port, Instant::now() + Duration::from_secs(60)).expect("connect").stream;
    let (h2g_secs, reply) = push(connect(vsock_test::SINK_PORT), &data);
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with(&format!("{bytes} ")), "sink answered {reply:?}");

    let mut source = connect(vsock_test::SOURCE_PORT);
    let t = Instant::now();
    source.write_all(format!("{bytes}\n").as_bytes()).unwrap();
    let mut got = Vec::with_capacity(bytes);
    source.read_to_end(&mut got).unwrap();
    let g2h_secs = t.elapsed().as_secs_f64();
    assert!(got == data, "guest-to-host stream differs");
    let _ = vm.kill();
    let _ = vm.wait();
    let _ = std::fs::remove_dir_all(&dir);

    println!("| figure | nestbox vsock (guest) | host Unix socket (ceiling) | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| agent Check round trip ({pings} calls) | {:.2} ms | {:.3} ms | {:.0}x |",
        guest_rtt.as_secs_f64() * 1e3,
        host_rtt.as_secs_f64() * 1e3,
        guest_rtt.as_secs_f64() / host_rtt.as_secs_f64()
    );
    let unix = mib_s(bytes, unix_secs);
    for (name, secs) in [("host to guest", h2g_secs), ("guest to host", g2h_secs)] {
        let v = mib_s(bytes, secs);
        println!("| throughput {name} ({} MiB) | {v:.2} MiB/s | {unix:.0} MiB/s | 1/{:.0} |", bytes >> 20, unix / v);
    }
}
