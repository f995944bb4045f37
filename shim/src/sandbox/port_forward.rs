//! The host side of CRI port forwarding (`nestbox_protocols::port_forward`).
//!
//! containerd serves PortForward by connecting to `localhost:<port>` inside the pod's
//! network namespace on the host. A nestbox pod's localhost is in the guest, so the shim
//! catches those connections: one listener on 127.0.0.1 in that namespace, and an
//! iptables REDIRECT there that sends every other TCP connection to 127.0.0.1 to it. For
//! each connection the shim reads the port it was meant for (SO_ORIGINAL_DST), opens a
//! connection to the agent's port-forward port through the VMM's hybrid vsock, and copies
//! both ways; the agent connects to that port on the pod's localhost in the guest.
//!
//! The rule and the listener live in the pod's namespace only (nothing on the host's own),
//! and go with it. iptables is run as a program: no maintained Rust library speaks the
//! kernel's iptables interface (the `iptables` crate runs the program too), and CNI's own
//! portmap plugin, which every CRI pod network here uses, needs it anyway.

use nestbox_protocols::port_forward::{self as proto, MAX_LINE_LEN};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Forwarded connections at once (the agent has the same bound).
const MAX_CONNECTIONS: usize = 64;
/// How long the guest has to answer a forwarded connection.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// netfilter's getsockopt for the destination a REDIRECT replaced (linux/netfilter_ipv4.h).
const SO_ORIGINAL_DST: libc::c_int = 80;

#[derive(Debug, thiserror::Error)]
pub enum PortForwardError {
    #[error("port forwarding for pod {pod}: {step}: {reason}")]
    Setup { pod: String, step: &'static str, reason: String },
}

/// The pod's forwarder; dropping it stops accepting and deletes its rule.
pub struct PortForwarder {
    listener: Arc<TcpListener>,
    netns: OwnedFd,
    port: u16,
}

impl Drop for PortForwarder {
    fn drop(&mut self) {
        // Ends the accept loop: accept(2) on a listener shut down for reading fails.
        // SAFETY: shutdown on a descriptor the Arc keeps open.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        let deleted = std::thread::scope(|s| {
            s.spawn(|| in_netns(self.netns.as_fd(), || iptables("-D", self.port)))
                .join()
                .unwrap_or_else(|_| Err(("deleting the REDIRECT rule", "the thread panicked".to_string())))
        });
        if let Err((step, reason)) = deleted {
            log::warn!("port forwarding: {step}: {reason}");
        }
    }
}

/// Starts forwarding for pod `pod` whose network namespace is `netns` and whose VMM
/// serves hybrid vsock on `vsock_socket`.
pub fn start(pod: &str, netns: BorrowedFd<'_>, vsock_socket: &Path) -> Result<PortForwarder, PortForwardError> {
    let fail = |step: &'static str| {
        let pod = pod.to_string();
        move |reason: String| PortForwardError::Setup { pod, step, reason }
    };
    let netns = netns.try_clone_to_owned().map_err(|e| fail("holding the network namespace")(e.to_string()))?;
    let listener = std::thread::scope(|s| {
        s.spawn(|| in_netns(netns.as_fd(), listen))
            .join()
            .unwrap_or_else(|_| Err(("entering the pod's network namespace", "the thread panicked".to_string())))
    })
    .map_err(|(step, reason)| fail(step)(reason))?;
    let port = listener.local_addr().map_err(|e| fail("reading the listener's port")(e.to_string()))?.port();
    let listener = Arc::new(listener);
    let forwarder = PortForwarder { listener: listener.clone(), netns, port };
    let (socket, pod_id) = (vsock_socket.to_path_buf(), pod.to_string());
    std::thread::Builder::new()
        .name("port-forward".into())
        .spawn(move || accept_loop(&listener, &socket, &pod_id))
        .map_err(|e| fail("starting the accept thread")(e.to_string()))?;
    Ok(forwarder)
}

type StepResult<T> = Result<T, (&'static str, String)>;

/// Runs `f` after entering `netns`; on a thread of its own (the caller's scoped thread),
/// which ends after: setns(2) moves only the calling thread, and children it spawns (iptables)
/// start in its namespace.
fn in_netns<T>(netns: BorrowedFd<'_>, f: impl FnOnce() -> StepResult<T>) -> StepResult<T> {
    // SAFETY: setns on a namespace descriptor the caller holds; only this thread moves.
    if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(("entering the pod's network namespace", io::Error::last_os_error().to_string()));
    }
    f()
}

/// Binds the listener and adds the REDIRECT rule to it, in the current thread's namespace.
fn listen() -> StepResult<TcpListener> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| ("listening on 127.0.0.1", e.to_string()))?;
    let port = listener.local_addr().map_err(|e| ("reading the listener's port", e.to_string()))?.port();
    iptables("-A", port)?;
    Ok(listener)
}

/// `iptables -t nat <op> <the rule for port>` (op: -A to add, -D to delete).
fn iptables(op: &str, port: u16) -> StepResult<()> {
    let rule = redirect_rule(port);
    let out = Command::new("iptables")
        .args(["-w", "-t", "nat", op])
        .args(&rule)
        .output()
        .map_err(|e| ("running iptables (apt-get install iptables)", e.to_string()))?;
    if !out.status.success() {
        let reason =
            format!("iptables -t nat {op} {}: {}", rule.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        return Err(("changing the REDIRECT rule", reason));
    }
    Ok(())
}

/// Every TCP connection to 127.0.0.1 made in the namespace, but those to the listener's own
/// `port`, goes to the listener.
fn redirect_rule(port: u16) -> Vec<String> {
    let port = port.to_string();
    [
        "OUTPUT",
        "-p",
        "tcp",
        "-d",
        "127.0.0.1/32",
        "-m",
        "tcp",
        "!",
        "--dport",
        &port,
        "-j",
        "REDIRECT",
        "--to-ports",
        &port,
    ]
    .map(String::from)
    .to_vec()
}

fn accept_loop(listener: &TcpListener, vsock_socket: &Path, pod: &str) {
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let client = match listener.accept() {
            Ok((client, _)) => client,
            // Shut down by the forwarder's drop (or the descriptor is gone): stop.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::EBADF)) => return,
            Err(e) => {
                log::warn!("pod {pod}: port forward: accept: {e}");
                continue;
            }
        };
        if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::AcqRel);
            log::warn!("pod {pod}: port forward: more than {MAX_CONNECTIONS} connections at once, one refused");
            continue;
        }
        let (done, socket, pod_id) = (active.clone(), vsock_socket.to_path_buf(), pod.to_string());
        let spawned = std::thread::Builder::new().name("port-forward-conn".into()).spawn(move || {
            if let Err(e) = forward(&client, &socket) {
                log::warn!("pod {pod_id}: port forward: {e}");
            }
            done.fetch_sub(1, Ordering::AcqRel);
        });
        if let Err(e) = spawned {
            log::warn!("pod {pod}: port forward: no thread for a connection: {e}");
            active.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

fn forward(client: &TcpStream, vsock_socket: &PathBuf) -> Result<(), String> {
    let port = original_port(client).map_err(|e| format!("reading the connection's original port: {e}"))?;
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    let guest = nestbox_protocols::hybrid::connect(vsock_socket, nestbox_protocols::PORT_FORWARD_PORT, deadline)
        .map_err(|e| format!("port {port}: {e}"))?
        .stream;
    guest.set_read_timeout(Some(ANSWER_TIMEOUT)).map_err(|e| e.to_string())?;
    (&guest).write_all(proto::header(port).as_bytes()).map_err(|e| format!("port {port}: sending the header: {e}"))?;
    let mut reader = BufReader::new((&guest).take(MAX_LINE_LEN as u64));
    let mut answer = String::new();
    reader.read_line(&mut answer).map_err(|e| format!("port {port}: reading the guest's answer: {e}"))?;
    // The answer is read a byte past nothing: BufReader may hold stream bytes after it.
    let early = reader.buffer().to_vec();
    proto::parse_answer(answer.trim_end()).map_err(|e| format!("port {port}: the guest: {e}"))?;
    guest.set_read_timeout(None).map_err(|e| e.to_string())?;
    (&*client).write_all(&early).map_err(|e| e.to_string())?;
    std::thread::scope(|s| {
        s.spawn(|| {
            let _ = io::copy(&mut &*client, &mut &guest);
            let _ = guest.shutdown(Shutdown::Write);
        });
        let _ = io::copy(&mut &guest, &mut &*client);
        let _ = client.shutdown(Shutdown::Write);
    });
    Ok(())
}

/// The port a REDIRECTed connection was made to.
fn original_port(stream: &TcpStream) -> io::Result<u16> {
    // SAFETY: a zeroed sockaddr_in is valid; getsockopt writes at most `len` bytes into it.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_IP,
            SO_ORIGINAL_DST,
            (&mut addr as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u16::from_be(addr.sin_port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::network::tests::TestNetns;
    use std::os::unix::net::UnixListener;

    /// A namespace of the test's with its loopback up, as CNI's loopback plugin leaves a pod's.
    fn test_netns() -> TestNetns {
        let netns = TestNetns::empty("pf");
        let up = Command::new("ip").args(["-n", &netns.name, "link", "set", "lo", "up"]).status().expect("ip");
        assert!(up.success(), "lo up in {}", netns.name);
        netns
    }

    /// Plays the VMM's hybrid vsock and the agent's port-forward port: answers one
    /// connection, reports the header it got, then echoes.
    fn fake_guest(socket: &Path) -> std::thread::JoinHandle<String> {
        let listener = UnixListener::bind(socket).expect("binding the fake vsock socket");
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            let mut reader = BufReader::new(&stream);
            let mut line = String::new();
            reader.read_line(&mut line).expect("CONNECT line");
            assert_eq!(line, format!("CONNECT {}\n", nestbox_protocols::PORT_FORWARD_PORT));
            (&stream).write_all(b"OK 1\n").expect("OK");
            let mut header = String::new();
            reader.read_line(&mut header).expect("header");
            (&stream).write_all(b"ok\n").expect("answer");
            let mut buf = [0u8; 64];
            let n = reader.read(&mut buf).expect("data");
            (&stream).write_all(&buf[..n]).expect("echo");
            header
        })
    }

    #[test]
    fn connections_to_the_pods_localhost_reach_the_guest() {
        let netns = test_netns();
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("vsock.sock");
        let guest = fake_guest(&socket);
        let file = std::fs::File::open(netns.path()).expect("opening the test netns");
        let forwarder = start("pod1", file.as_fd(), &socket).expect("starting the forwarder");
        // What containerd does: connect to localhost:<port> from inside the namespace.
        let echoed = std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on a descriptor we hold; this scoped thread ends after.
                assert_eq!(unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
                let mut conn = TcpStream::connect("127.0.0.1:4242").expect("connecting to the pod's localhost:4242");
                conn.write_all(b"hello").expect("write");
                let mut got = [0u8; 5];
                conn.read_exact(&mut got).expect("the echo");
                got
            })
            .join()
            .expect("client thread")
        });
        assert_eq!(&echoed, b"hello");
        assert_eq!(guest.join().expect("fake guest"), "tcp 4242\n", "the guest is asked for the original port");
        let rules = || {
            let out = Command::new("ip")
                .args(["netns", "exec", &netns.name, "iptables", "-t", "nat", "-S", "OUTPUT"])
                .output()
                .expect("iptables -S");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        assert!(rules().contains("REDIRECT"), "the rule is in the pod's namespace: {}", rules());
        drop(forwarder);
        assert!(!rules().contains("REDIRECT"), "the rule goes with the forwarder: {}", rules());
    }

    #[test]
    fn a_missing_namespace_is_named() {
        let not_netns = std::fs::File::open("/proc/self/stat").expect("a file that is no namespace");
        let err = start("pod2", not_netns.as_fd(), Path::new("/nonexistent")).err().expect("refused").to_string();
        assert!(err.contains("pod pod2") && err.contains("entering the pod's network namespace"), "{err}");
    }

    #[test]
    fn the_rule_spares_the_listener() {
        let rule = redirect_rule(40001).join(" ");
        assert_eq!(rule, "OUTPUT -p tcp -d 127.0.0.1/32 -m tcp ! --dport 40001 -j REDIRECT --to-ports 40001");
    }
}
