//! CRI port forwarding (`nestbox_protocols::port_forward`): a connection to the agent's
//! port-forward socket reaches a TCP port on the pod's localhost, in the pod's network
//! namespace, not the agent's.

use nestbox_protocols::agent::CreateSandboxRequest;
use nestbox_protocols::pod::namespace_path;
use nestbox_protocols::types::Stdio;
use serde_json::json;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::harness::{ctx, Agent};

/// Opens a forwarded connection to `port` and returns the agent's answer line and the stream.
fn forward(agent: &Agent, port: u16) -> (String, BufReader<UnixStream>) {
    let socket = agent.dir.path().join("agent.sock.pf");
    let mut stream = UnixStream::connect(&socket).expect("connecting to the port-forward socket");
    stream.set_read_timeout(Some(Duration::from_secs(30))).expect("read timeout");
    stream.write_all(nestbox_protocols::port_forward::header(port).as_bytes()).expect("writing the header");
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    reader.read_line(&mut answer).expect("reading the answer");
    (answer.trim_end().to_string(), reader)
}

#[test]
fn port_forward_reaches_the_pods_localhost() {
    root_only!();
    let agent = Agent::start();
    let rootfs = agent.rootfs("rootfs");
    let req = CreateSandboxRequest { sandbox_id: "pod".into(), ..Default::default() };
    agent.client.create_sandbox(ctx(), &req).expect("CreateSandbox");
    // A listener on the agent's (the host's) localhost: forwarding must not reach it.
    let outside = std::net::TcpListener::bind("127.0.0.1:0").expect("a listener outside the pod");
    let outside_port = outside.local_addr().expect("its address").port();

    // An echo server on the pod's localhost.
    let mut spec = agent.spec(&rootfs, &["nc", "-ll", "-p", "7777", "-e", "/bin/cat"]);
    spec["linux"]["namespaces"] = json!([
        {"type": "pid"}, {"type": "mount"}, {"type": "network", "path": namespace_path("net")}
    ]);
    agent.create("echo", &spec, Stdio::default()).expect("create echo");
    agent.start_container("echo").expect("start echo");

    // The server may take a moment to listen: retry while the pod's port refuses.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (answer, mut stream) = loop {
        let (answer, stream) = forward(&agent, 7777);
        if answer == "ok" || Instant::now() > deadline {
            break (answer, stream);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(answer, "ok");
    stream.get_mut().write_all(b"ping\n").expect("writing through the forward");
    let mut echoed = String::new();
    stream.read_line(&mut echoed).expect("reading the echo");
    assert_eq!(echoed, "ping\n", "bytes reach the pod's server and come back");
    stream.get_mut().shutdown(std::net::Shutdown::Write).expect("half-close");
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).expect("the forward ends after the half-close");
    assert!(rest.is_empty(), "{rest:?}");

    let (answer, _) = forward(&agent, outside_port);
    assert!(
        answer.starts_with(&format!("error connecting to localhost:{outside_port} in the pod")),
        "the agent's own localhost is not the pod's: {answer}"
    );
    let socket = agent.dir.path().join("agent.sock.pf");
    let mut bad = UnixStream::connect(&socket).expect("connecting");
    bad.write_all(b"udp 53\n").expect("writing");
    let mut answer = String::new();
    BufReader::new(bad).read_line(&mut answer).expect("reading");
    assert!(answer.starts_with("error port-forward header \"udp 53\""), "{answer}");
    agent.signal("echo", "", libc::SIGKILL).expect("kill echo");
    agent.wait("echo", "").expect("wait echo");
    agent.remove("echo").expect("remove echo");
}
