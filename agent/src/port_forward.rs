//! The guest side of CRI port forwarding (`nestbox_protocols::port_forward`): each
//! connection to the port-forward port names a TCP port; the agent connects to it on the
//! pod's localhost, inside the pod's network namespace, and copies bytes both ways until
//! both directions have ended.
//!
//! Bounded: at most [`MAX_CONNECTIONS`] forwarded connections at once (more are refused
//! with an error line), a header must arrive within [`HEADER_TIMEOUT`] and fit
//! `MAX_LINE_LEN`, and each direction copies through one fixed buffer.

use nestbox_protocols::port_forward::{self as proto, MAX_LINE_LEN};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Forwarded connections at once; kubectl port-forward opens one per client connection.
pub const MAX_CONNECTIONS: usize = 64;
/// How long the host has to send the header after connecting.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connect to the pod's localhost may take (it is local: this is generous).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A duplicate of the pod's network namespace descriptor, or None while there is no pod
/// (then connections go to the agent's own namespace's localhost).
pub type PodNetns = Arc<dyn Fn() -> io::Result<Option<OwnedFd>> + Send + Sync>;

/// Serves port forwarding on vsock `port` (guest) on a thread of its own.
pub fn serve_vsock(port: u32, netns: PodNetns) -> io::Result<()> {
    let listener = crate::vsock::VsockListener::bind(crate::vsock::CID_ANY, port)?;
    spawn_acceptor(move || listener.accept_fd(), netns)
}

/// Serves port forwarding on the Unix socket `path` (host mode) on a thread of its own.
pub fn serve_unix(path: &std::path::Path, netns: PodNetns) -> io::Result<()> {
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    spawn_acceptor(move || listener.accept().map(|(s, _)| OwnedFd::from(s)), netns)
}

fn spawn_acceptor(accept: impl Fn() -> io::Result<OwnedFd> + Send + 'static, netns: PodNetns) -> io::Result<()> {
    let active = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new().name("port-forward".into()).spawn(move || loop {
        match accept() {
            // A vsock or Unix stream socket: UnixStream's methods (timeouts, shutdown,
            // read, write) are plain socket calls that work on either family.
            Ok(fd) => start_connection(UnixStream::from(fd), &netns, &active),
            Err(e) => {
                eprintln!("nestbox-agent: port-forward: accept: {e}");
                // accept fails persistently only when out of descriptors; do not spin.
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    })?;
    Ok(())
}

fn start_connection(host: UnixStream, netns: &PodNetns, active: &Arc<AtomicUsize>) {
    if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
        active.fetch_sub(1, Ordering::AcqRel);
        answer_error(&host, &format!("more than {MAX_CONNECTIONS} forwarded connections at once"));
        return;
    }
    let (netns, done) = (netns.clone(), active.clone());
    let spawned = std::thread::Builder::new().name("port-forward-conn".into()).spawn(move || {
        if let Err(e) = forward(&host, &netns) {
            answer_error(&host, &e);
        }
        done.fetch_sub(1, Ordering::AcqRel);
    });
    if let Err(e) = spawned {
        eprintln!("nestbox-agent: port-forward: no thread for a connection: {e}");
        active.fetch_sub(1, Ordering::AcqRel);
    }
}

fn answer_error(host: &UnixStream, reason: &str) {
    let mut line = format!("error {reason}");
    line.truncate(MAX_LINE_LEN - 1);
    let _ = (&*host).write_all(format!("{line}\n").as_bytes());
}

/// One forwarded connection, on its own thread (which enters the pod's namespace).
/// Errors before the `ok` answer are returned for the error line.
fn forward(host: &UnixStream, netns: &PodNetns) -> Result<(), String> {
    host.set_read_timeout(Some(HEADER_TIMEOUT)).map_err(|e| format!("setting a read timeout: {e}"))?;
    let port = proto::parse_header(&read_line(host)?)?;
    host.set_read_timeout(None).map_err(|e| format!("clearing the read timeout: {e}"))?;
    if let Some(ns) = netns().map_err(|e| format!("the pod's network namespace: {e}"))? {
        // SAFETY: setns on a namespace descriptor we own; it moves this thread only, which
        // serves this one connection and ends.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!("entering the pod's network namespace: {}", io::Error::last_os_error()));
        }
    }
    let pod = connect_localhost(port)?;
    (&*host).write_all(format!("{}\n", proto::OK).as_bytes()).map_err(|e| format!("answering: {e}"))?;
    splice(host, &pod);
    Ok(())
}

/// Reads the header line one byte at a time (nothing after it may be consumed here).
fn read_line(host: &UnixStream) -> Result<String, String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match (&*host).read(&mut byte) {
            Ok(0) => return Err("the host closed before a full header".into()),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() + 1 >= MAX_LINE_LEN => return Err(format!("header longer than {MAX_LINE_LEN} bytes")),
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("reading the header: {e}")),
        }
    }
    String::from_utf8(line).map_err(|_| "header is not UTF-8".to_string())
}

/// Connects to `port` on the pod's localhost: IPv4 first, then IPv6 (containerd's order).
fn connect_localhost(port: u16) -> Result<TcpStream, String> {
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&v4, CONNECT_TIMEOUT).or_else(|e4| {
        TcpStream::connect_timeout(&v6, CONNECT_TIMEOUT)
            .map_err(|e6| format!("connecting to localhost:{port} in the pod: IPv4: {e4}; IPv6: {e6}"))
    })
}

/// Copies both ways until both directions end; an EOF is passed on as a half-close.
fn splice(host: &UnixStream, pod: &TcpStream) {
    std::thread::scope(|s| {
        s.spawn(|| {
            let _ = io::copy(&mut &*host, &mut &*pod);
            let _ = pod.shutdown(Shutdown::Write);
        });
        let _ = io::copy(&mut &*pod, &mut &*host);
        let _ = host.shutdown(Shutdown::Write);
    });
}

/// The pod network namespace source of `sandbox`: its pod's, once CreateSandbox made it.
pub fn of_sandbox(sandbox: Arc<crate::sandbox::Sandbox>) -> PodNetns {
    Arc::new(move || match sandbox.pod_namespaces() {
        Some(ns) => ns.net().try_clone_to_owned().map(Some),
        None => Ok(None),
    })
}

/// Where host mode serves port forwarding: beside the API socket.
pub fn host_socket(api_socket: &std::path::Path) -> std::path::PathBuf {
    let mut path = api_socket.as_os_str().to_owned();
    path.push(".pf");
    path.into()
}
