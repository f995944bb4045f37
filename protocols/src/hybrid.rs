//! The host side of hybrid vsock, as Firecracker and Cloud Hypervisor do it: the VMM
//! listens on a Unix socket (`vsock.sock`); the host connects, writes `CONNECT <port>\n`,
//! the VMM opens a vsock connection to the guest's listener on that port and answers
//! `OK <host-port>\n`, and from then on the Unix stream carries the vsock stream's bytes.
//!
//! While the guest boots nothing listens on the port yet: the VMM closes the connection
//! (or answers something other than `OK`), and before the VMM is up the socket is missing
//! or refuses. [`connect`] retries through all of that, with a short backoff, until its
//! deadline.
//!
//! ```no_run
//! use std::time::{Duration, Instant};
//! use nestbox_protocols::{agent, hybrid, ttrpc};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let deadline = Instant::now() + Duration::from_secs(30);
//! let client = hybrid::connect_agent("/run/nestbox/sandboxes/s1/vsock.sock", deadline)?;
//! let version = client.version(ttrpc::context::with_timeout(5_000_000_000), &agent::VersionRequest::new())?;
//! println!("agent {} on {}", version.agent_version, version.kernel_release);
//! # Ok(())
//! # }
//! ```

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::agent_ttrpc::AgentServiceClient;
use crate::AGENT_PORT;

/// First pause between attempts; it doubles up to [`MAX_BACKOFF`]. Short, because on
/// hardware KVM a guest's listener appears within milliseconds of boot.
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_millis(200);

/// The VMM's answer is `OK ` and a u32 (at most 14 bytes with the newline); a longer line
/// is not an answer, and reading stops there rather than consuming guest data.
const MAX_REPLY_LINE: usize = 32;

/// A byte stream to a guest vsock listener.
#[derive(Debug)]
pub struct HybridStream {
    /// Blocking, without timeouts: bytes written reach the guest's socket and the
    /// guest's bytes are read here.
    pub stream: UnixStream,
    /// The host-side vsock port the VMM gave the connection (from `OK <host-port>`).
    pub host_port: u32,
}

/// Why one connection attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    #[error("connecting to the socket: {0}")]
    Connect(#[source] io::Error),
    #[error("sending CONNECT: {0}")]
    Send(#[source] io::Error),
    #[error("reading the VMM's answer: {0}")]
    Receive(#[source] io::Error),
    #[error("the VMM closed the connection without answering (nothing listening on the guest port yet?)")]
    Closed,
    #[error("unexpected answer {0:?} (expected \"OK <host-port>\")")]
    BadReply(String),
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The deadline passed without a successful handshake. `last` says why the last
    /// attempt failed (it is in the message, not a `source`, so it is printed once).
    #[error(
        "hybrid vsock {socket}: guest port {port} not reachable, gave up after {waited:.1?} and {attempts} attempt(s); \
         last attempt: {last}",
        socket = socket.display()
    )]
    Deadline { socket: PathBuf, port: u32, waited: Duration, attempts: u32, last: AttemptError },
    /// The socket cannot be connected to for a reason waiting does not cure (permission,
    /// a path that is not a socket or too long for one).
    #[error("hybrid vsock {socket}: cannot connect (port {port}): {source}", socket = socket.display())]
    Socket { socket: PathBuf, port: u32, source: io::Error },
    #[error("hybrid vsock {socket}: starting a ttrpc client on port {port}: {source}", socket = socket.display())]
    Ttrpc { socket: PathBuf, port: u32, source: ttrpc::Error },
}

/// Connects to the guest's listener on vsock `port` through the VMM's hybrid vsock
/// socket, retrying until `deadline` while the socket is missing or refuses, or the
/// handshake fails. At least one attempt is made even if `deadline` has passed.
pub fn connect(socket: impl AsRef<Path>, port: u32, deadline: Instant) -> Result<HybridStream, Error> {
    let socket = socket.as_ref();
    let start = Instant::now();
    let mut backoff = FIRST_BACKOFF;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let last = match attempt(socket, port, deadline) {
            Ok(stream) => return Ok(stream),
            Err(AttemptError::Connect(e)) if !worth_retrying(&e) => {
                return Err(Error::Socket { socket: socket.to_path_buf(), port, source: e })
            }
            Err(e) => e,
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(Error::Deadline { socket: socket.to_path_buf(), port, waited: now - start, attempts, last });
        }
        std::thread::sleep(backoff.min(deadline - now));
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// [`connect`] to the agent's port ([`AGENT_PORT`]) and start a ttrpc client on the stream.
pub fn connect_agent(socket: impl AsRef<Path>, deadline: Instant) -> Result<AgentServiceClient, Error> {
    let socket = socket.as_ref();
    let conn = connect(socket, AGENT_PORT, deadline)?;
    crate::agent_client(conn.stream).map_err(|source| Error::Ttrpc {
        socket: socket.to_path_buf(),
        port: AGENT_PORT,
        source,
    })
}

/// Connection failures that may go away: the VMM has not created its socket yet
/// (NotFound), is not listening yet or left a stale one (ConnectionRefused), or its
/// accept queue is full (WouldBlock).
fn worth_retrying(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::Interrupted
    )
}

fn attempt(socket: &Path, port: u32, deadline: Instant) -> Result<HybridStream, AttemptError> {
    let mut stream = UnixStream::connect(socket).map_err(AttemptError::Connect)?;
    // Bound the handshake by the deadline, so a VMM that never answers cannot hold the
    // caller past it. (A zero timeout is invalid, hence the floor.)
    let remaining = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    stream.set_read_timeout(Some(remaining)).map_err(AttemptError::Receive)?;
    stream.set_write_timeout(Some(remaining)).map_err(AttemptError::Send)?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes()).map_err(AttemptError::Send)?;
    let host_port = parse_reply(&read_line(&mut stream)?)?;
    stream.set_read_timeout(None).map_err(AttemptError::Receive)?;
    stream.set_write_timeout(None).map_err(AttemptError::Send)?;
    Ok(HybridStream { stream, host_port })
}

/// Reads the VMM's answer line, one byte at a time: the guest may send right after the
/// `OK` line, and those bytes belong to the caller, so nothing past the newline is read.
fn read_line(stream: &mut UnixStream) -> Result<Vec<u8>, AttemptError> {
    let mut line = Vec::with_capacity(16);
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) if line.is_empty() => return Err(AttemptError::Closed),
            Ok(0) => return Err(AttemptError::BadReply(String::from_utf8_lossy(&line).into_owned())),
            Ok(_) if byte[0] == b'\n' => return Ok(line),
            Ok(_) if line.len() >= MAX_REPLY_LINE => {
                line.push(byte[0]);
                return Err(AttemptError::BadReply(format!("{}...", String::from_utf8_lossy(&line))));
            }
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // The VMM resetting the connection is its way of saying "not yet", like a close.
            Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe) => {
                return Err(AttemptError::Closed)
            }
            Err(e) => return Err(AttemptError::Receive(e)),
        }
    }
}

fn parse_reply(line: &[u8]) -> Result<u32, AttemptError> {
    let bad = || AttemptError::BadReply(String::from_utf8_lossy(line).into_owned());
    let text = std::str::from_utf8(line).map_err(|_| bad())?;
    let port = text.strip_suffix('\r').unwrap_or(text).strip_prefix("OK ").ok_or_else(bad)?;
    port.trim().parse().map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;
    use std::thread;

    /// Accepts one connection, checks the CONNECT line, and answers `reply`.
    fn answer(listener: &UnixListener, port: u32, reply: &[u8]) -> UnixStream {
        let (stream, _) = listener.accept().expect("accepting");
        let mut reader = io::BufReader::new(stream.try_clone().expect("cloning"));
        let mut line = String::new();
        reader.read_line(&mut line).expect("reading CONNECT");
        assert_eq!(line, format!("CONNECT {port}\n"));
        (&stream).write_all(reply).expect("answering");
        stream
    }

    fn socket_in(dir: &tempfile::TempDir) -> PathBuf {
        dir.path().join("vsock.sock")
    }

    #[test]
    fn handshake_then_byte_stream() {
        let dir = tempfile::tempdir().expect("tempdir");
        let listener = UnixListener::bind(socket_in(&dir)).expect("binding");
        let server = thread::spawn(move || {
            // The guest's first bytes arrive in the same read as the answer: they must
            // reach the caller, not be eaten by the handshake.
            let stream = answer(&listener, 1025, b"OK 1073741824\nhello");
            let mut buf = [0u8; 4];
            (&stream).read_exact(&mut buf).expect("reading from the host");
            (&stream).write_all(&buf).expect("echoing");
        });
        let mut conn =
            connect(socket_in(&dir), 1025, Instant::now() + Duration::from_secs(10)).expect("handshake succeeds");
        assert_eq!(conn.host_port, 1073741824);
        let mut hello = [0u8; 5];
        conn.stream.read_exact(&mut hello).expect("reading the guest's bytes");
        assert_eq!(&hello, b"hello");
        conn.stream.write_all(b"ping").expect("writing");
        let mut echo = [0u8; 4];
        conn.stream.read_exact(&mut echo).expect("reading the echo");
        assert_eq!(&echo, b"ping");
        server.join().expect("server thread");
    }

    #[test]
    fn garbage_answer_is_retried_then_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let listener = UnixListener::bind(socket_in(&dir)).expect("binding");
        thread::spawn(move || loop {
            // Every attempt gets the same wrong answer; the thread ends with the test process.
            let _ = answer(&listener, 1024, b"ERR no listener\n");
        });
        let start = Instant::now();
        let err = connect(socket_in(&dir), 1024, start + Duration::from_millis(300)).expect_err("no OK, no stream");
        let Error::Deadline { attempts, ref last, .. } = err else { panic!("expected a deadline error, got {err}") };
        assert!(attempts > 1, "retried only {attempts} time(s)");
        assert!(matches!(last, AttemptError::BadReply(r) if r == "ERR no listener"), "{last:?}");
        let msg = err.to_string();
        assert!(msg.contains(&socket_in(&dir).display().to_string()) && msg.contains("port 1024"), "{msg}");
        assert!(msg.contains("\"ERR no listener\""), "{msg}");
        assert!(start.elapsed() >= Duration::from_millis(300));
    }

    #[test]
    fn never_listening_ends_at_the_deadline_with_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let start = Instant::now();
        let err = connect(socket_in(&dir), 1024, start + Duration::from_millis(250)).expect_err("no socket");
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(250) && waited < Duration::from_secs(5), "waited {waited:?}");
        let msg = err.to_string();
        assert!(msg.starts_with(&format!("hybrid vsock {}: guest port 1024", socket_in(&dir).display())), "{msg}");
        assert!(msg.contains("gave up after") && msg.contains("No such file"), "{msg}");
        assert!(matches!(err, Error::Deadline { last: AttemptError::Connect(_), .. }), "{err:?}");
    }

    #[test]
    fn stale_socket_file_is_retried_as_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Bound and dropped: the file stays, nobody listens, connect() is refused.
        drop(UnixListener::bind(socket_in(&dir)).expect("binding"));
        let err = connect(socket_in(&dir), 1024, Instant::now() + Duration::from_millis(100)).expect_err("refused");
        assert!(err.to_string().contains("refused"), "{err}");
    }

    #[test]
    fn closed_connections_while_booting_then_success() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = socket_in(&dir);
        let server = thread::spawn(move || {
            // The VMM appears only after a while...
            thread::sleep(Duration::from_millis(100));
            let listener = UnixListener::bind(&path).expect("binding");
            // ...then closes the first connections as the guest is not listening yet,
            // once without even reading the request, once after reading it...
            drop(listener.accept().expect("accepting"));
            drop(answer(&listener, 1024, b""));
            // ...and finally the guest answers.
            let stream = answer(&listener, 1024, b"OK 7\n");
            (&stream).write_all(b"ready").expect("writing");
        });
        let start = Instant::now();
        let mut conn = connect(socket_in(&dir), 1024, start + Duration::from_secs(10)).expect("eventually connects");
        assert_eq!(conn.host_port, 7);
        let mut buf = String::new();
        conn.stream.read_to_string(&mut buf).expect("reading");
        assert_eq!(buf, "ready");
        server.join().expect("server thread");
    }

    #[test]
    fn permanent_socket_errors_fail_at_once() {
        // Longer than sun_path: no amount of waiting makes that connectable.
        let path = PathBuf::from(format!("/tmp/{}", "x".repeat(200)));
        let start = Instant::now();
        let err = connect(&path, 1024, start + Duration::from_secs(30)).expect_err("path too long");
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(matches!(err, Error::Socket { port: 1024, .. }), "{err:?}");
    }

    /// The whole host path: hybrid handshake, then a ttrpc call on the same stream, with
    /// a fake VMM that splices the stream to a ttrpc server standing in for the guest.
    #[test]
    fn connect_agent_speaks_ttrpc_after_the_handshake() {
        use crate::agent_ttrpc::{create_agent_service, AgentService};
        use crate::{agent, ttrpc};
        use std::sync::Arc;

        struct Guest;
        impl AgentService for Guest {
            fn version(
                &self,
                _ctx: &ttrpc::TtrpcContext,
                _req: agent::VersionRequest,
            ) -> ttrpc::Result<agent::VersionResponse> {
                Ok(agent::VersionResponse { agent_version: "fake".into(), ..Default::default() })
            }
        }

        let dir = tempfile::tempdir().expect("tempdir");
        let guest_socket = dir.path().join("guest.sock");
        let mut server = ttrpc::Server::new()
            .bind(&format!("unix://{}", guest_socket.display()))
            .expect("binding the guest's server")
            .register_service(create_agent_service(Arc::new(Guest)));
        server.start().expect("starting the guest's server");

        let listener = UnixListener::bind(socket_in(&dir)).expect("binding");
        thread::spawn(move || {
            let host = answer(&listener, AGENT_PORT, b"OK 1073741825\n");
            let guest = UnixStream::connect(&guest_socket).expect("connecting to the guest");
            let splice = |mut from: UnixStream, mut to: UnixStream| {
                thread::spawn(move || {
                    let _ = io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Write);
                })
            };
            splice(host.try_clone().expect("cloning"), guest.try_clone().expect("cloning"));
            splice(guest, host);
        });

        let client = connect_agent(socket_in(&dir), Instant::now() + Duration::from_secs(10)).expect("connecting");
        let version = client
            .version(ttrpc::context::with_timeout(10_000_000_000), &agent::VersionRequest::new())
            .expect("Version through the fake VMM");
        assert_eq!(version.agent_version, "fake");
        // What the generated default says for a call the service does not implement.
        let err = client.check(ttrpc::context::with_timeout(10_000_000_000), &agent::CheckRequest::new());
        assert!(matches!(err, Err(ttrpc::Error::RpcStatus(ref s)) if s.code() == ttrpc::Code::NOT_FOUND), "{err:?}");
        server.shutdown();
    }

    #[test]
    fn replies_are_parsed_strictly() {
        assert_eq!(parse_reply(b"OK 1024").ok(), Some(1024));
        assert_eq!(parse_reply(b"OK 5\r").ok(), Some(5));
        for bad in [&b"OK"[..], b"OK x", b"ok 5", b"OK 99999999999", b"\xffOK 1", b""] {
            assert!(matches!(parse_reply(bad), Err(AttemptError::BadReply(_))), "{bad:?}");
        }
    }
}
