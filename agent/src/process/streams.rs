//! The I/O port: where the host opens processes' standard streams (see
//! `nestbox_protocols::stdio` for the protocol). Streams are held here, by header, until
//! their process claims them when it starts.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nestbox_protocols::stdio::{StreamHeader, MAX_HEADER_LEN};

use crate::vsock::{VsockListener, CID_ANY};

/// How long a stream waits for its process to claim it before it is closed: a host that
/// opens streams for a process it never starts must not pin descriptors for good. Not on
/// any wait path (expired streams are dropped when the next one arrives).
pub const PARK_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a host may take to send a stream's header: a safety net against a connection
/// that never sends one, which would otherwise hold its header thread for good. A real
/// host sends it with the connect.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// One stream: a connected socket (vsock or Unix), read and written as a file.
pub type Conn = File;

/// Shuts down one direction of a stream (the other end sees EOF, or our reads do).
pub fn shutdown(conn: &impl AsRawFd, how: nix::sys::socket::Shutdown) {
    let _ = nix::sys::socket::shutdown(conn.as_raw_fd(), how);
}

struct Parked {
    conn: Conn,
    since: Instant,
}

#[derive(Default)]
pub struct IoHub {
    parked: Mutex<HashMap<StreamHeader, Parked>>,
    arrived: Condvar,
}

impl IoHub {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<StreamHeader, Parked>> {
        self.parked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serves the I/O port on a Unix socket (host mode).
    pub fn serve_unix(self: &Arc<Self>, path: &Path) -> io::Result<()> {
        let listener = UnixListener::bind(path)?;
        let hub = self.clone();
        spawn("io-listener", move || accept_loop(hub, || listener.accept().map(|(s, _)| OwnedFd::from(s))))
    }

    /// Serves the I/O port on vsock (the guest).
    pub fn serve_vsock(self: &Arc<Self>, port: u32) -> io::Result<()> {
        let listener = VsockListener::bind(CID_ANY, port)?;
        let hub = self.clone();
        spawn("io-listener", move || accept_loop(hub, || listener.accept_fd()))
    }

    /// A new connection: its header is read on a thread of its own (a slow host must not
    /// hold up the others), then it is parked.
    fn arrive(self: Arc<Self>, fd: OwnedFd) {
        let _ = spawn("io-header", move || {
            let mut conn = File::from(fd);
            let header = match read_header(&mut conn) {
                Ok(h) => h,
                Err(e) => {
                    eprintln!("nestbox-agent: I/O port: closing a stream: {e}");
                    return;
                }
            };
            let mut parked = self.lock();
            let now = Instant::now();
            parked.retain(|_, p| now.duration_since(p.since) < PARK_TIMEOUT);
            if parked.contains_key(&header) {
                eprintln!("nestbox-agent: I/O port: a {} stream is already waiting; closing the new one", header.kind);
                return;
            }
            parked.insert(header, Parked { conn, since: now });
            self.arrived.notify_all();
        });
    }

    /// Takes the stream `header` names, waiting for it until `deadline`.
    pub fn take(&self, header: &StreamHeader, deadline: Instant) -> Option<Conn> {
        let mut parked = self.lock();
        loop {
            if let Some(p) = parked.remove(header) {
                return Some(p.conn);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            parked = self.arrived.wait_timeout(parked, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Closes every waiting stream of a container (removed).
    pub fn forget_container(&self, container_id: &str) {
        self.lock().retain(|h, _| h.container_id != container_id);
    }
}

/// How long the listener pauses after an accept failed for want of descriptors or memory.
/// The connection that could not be accepted keeps the listener readable, so poll(2)
/// would return at once and the loop would spin; nothing signals that a descriptor was
/// freed, so the loop gives the streams in use a moment to close. Never reached otherwise.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Accepts streams for as long as the listener works: each accept blocks in the kernel
/// until a host connects, so an idle port costs nothing.
fn accept_loop(hub: Arc<IoHub>, accept: impl Fn() -> io::Result<OwnedFd>) {
    loop {
        let e = match accept() {
            Ok(fd) => {
                hub.clone().arrive(fd);
                continue;
            }
            Err(e) => e,
        };
        match e.raw_os_error() {
            // A signal, or a connection that went away before it was accepted: the next
            // accept is unaffected.
            Some(libc::EINTR | libc::ECONNABORTED | libc::EPROTO) => {}
            // The listener itself is unusable: no accept will ever succeed again.
            Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EOPNOTSUPP) => {
                eprintln!("nestbox-agent: I/O port: accept: {e}; no more streams can be opened");
                return;
            }
            _ => {
                eprintln!("nestbox-agent: I/O port: accept: {e}; retrying in {ACCEPT_BACKOFF:?}");
                std::thread::sleep(ACCEPT_BACKOFF);
            }
        }
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> io::Result<()> {
    std::thread::Builder::new().name(name.into()).spawn(f).map(|_| ())
}

/// Reads the header line byte by byte: nothing after the newline (the host's first stdin
/// bytes) may be consumed here.
fn read_header(conn: &mut File) -> io::Result<StreamHeader> {
    let timeout = nix::sys::time::TimeVal::new(HEADER_TIMEOUT.as_secs() as _, 0);
    let _ = nix::sys::socket::setsockopt(&*conn, nix::sys::socket::sockopt::ReceiveTimeout, &timeout);
    let mut line = Vec::with_capacity(64);
    let mut byte = [0u8; 1];
    loop {
        if conn.read(&mut byte)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed before the end of the header"));
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
        if line.len() >= MAX_HEADER_LEN {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "header too long"));
        }
    }
    let zero = nix::sys::time::TimeVal::new(0, 0);
    let _ = nix::sys::socket::setsockopt(&*conn, nix::sys::socket::sockopt::ReceiveTimeout, &zero);
    StreamHeader::parse(&line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nestbox_protocols::stdio::{self, StreamKind};
    use std::io::Write;

    #[test]
    fn streams_wait_for_their_process_and_keep_their_first_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("io.sock");
        let hub = IoHub::new();
        hub.serve_unix(&path).expect("serving");
        let header = StreamHeader::new(StreamKind::Stdin, "c1", "e1");
        let mut host = stdio::connect_unix(&path, &header).expect("connecting");
        host.write_all(b"first bytes").expect("writing");

        let other = StreamHeader::new(StreamKind::Stdout, "c1", "e1");
        assert!(hub.take(&other, Instant::now() + Duration::from_millis(50)).is_none(), "never opened");
        let mut conn = hub.take(&header, Instant::now() + Duration::from_secs(10)).expect("the stream arrives");
        let mut buf = [0u8; 11];
        conn.read_exact(&mut buf).expect("reading");
        assert_eq!(&buf, b"first bytes");

        // A malformed header is closed by the agent.
        let mut bad = std::os::unix::net::UnixStream::connect(&path).expect("connecting");
        bad.write_all(b"stdio c1\n").expect("writing");
        let mut rest = Vec::new();
        bad.read_to_end(&mut rest).expect("EOF from the agent");
    }
}
