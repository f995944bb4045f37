//! Standard I/O streams: every stream of every process is its own connection to the
//! agent's I/O port ([`crate::IO_PORT`], vsock in a guest, a Unix socket in host mode),
//! opened by the host. No RPC carries process data.
//!
//! The host connects and writes one header line, [`StreamHeader`]:
//!
//! ```text
//! <kind> <container-id>[ <exec-id>]\n
//! ```
//!
//! `kind` is `stdin`, `stdout`, `stderr`, or `tty` (a terminal: both directions on one
//! stream); the exec id is left out for the container's init process. After the header
//! the stream carries the process's bytes: the host writes stdin (and the terminal's
//! input) and half-closes or calls CloseStdin for EOF; the agent writes stdout, stderr
//! and the terminal's output and closes its side once the process and everything that
//! inherited the stream have closed it, after the last byte.
//!
//! Order: a stream may be opened before or after the call that creates its process
//! (CreateContainer, ExecProcess); the agent holds an early one until the process
//! exists. A process is started (StartContainer, ExecProcess) only once every stream its
//! `Stdio` asked for is attached, so no output is written before the host can read it.
//! The agent does not answer the header: a malformed header, a second stream of the same
//! kind for a process, or a stream no process claims in time is closed.

use std::fmt;

/// The longest header line the agent reads, newline included.
pub const MAX_HEADER_LEN: usize = 512;

/// The longest container or exec id the agent accepts.
pub const MAX_ID_LEN: usize = 128;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StreamKind {
    Stdin,
    Stdout,
    Stderr,
    /// A pseudo-terminal: input from the host and output to it on one stream.
    Tty,
}

impl StreamKind {
    pub const ALL: [StreamKind; 4] = [StreamKind::Stdin, StreamKind::Stdout, StreamKind::Stderr, StreamKind::Tty];

    pub fn as_str(self) -> &'static str {
        match self {
            StreamKind::Stdin => "stdin",
            StreamKind::Stdout => "stdout",
            StreamKind::Stderr => "stderr",
            StreamKind::Tty => "tty",
        }
    }
}

impl fmt::Display for StreamKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a stream connection is for: its first line.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StreamHeader {
    pub kind: StreamKind,
    pub container_id: String,
    /// Empty for the container's init process.
    pub exec_id: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("stream header is not one line of at most {MAX_HEADER_LEN} bytes")]
    TooLong,
    #[error("stream header is not UTF-8")]
    NotUtf8,
    #[error("stream header {0:?}: expected \"<stdin|stdout|stderr|tty> <container-id>[ <exec-id>]\"")]
    Malformed(String),
    #[error("stream header {line:?}: {reason}")]
    BadId { line: String, reason: String },
}

impl StreamHeader {
    pub fn new(kind: StreamKind, container_id: &str, exec_id: &str) -> Self {
        Self { kind, container_id: container_id.to_string(), exec_id: exec_id.to_string() }
    }

    /// The header line, newline included.
    pub fn encode(&self) -> String {
        if self.exec_id.is_empty() {
            format!("{} {}\n", self.kind, self.container_id)
        } else {
            format!("{} {} {}\n", self.kind, self.container_id, self.exec_id)
        }
    }

    /// Parses a header line (with or without its newline).
    pub fn parse(line: &[u8]) -> Result<Self, HeaderError> {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        if line.len() >= MAX_HEADER_LEN || line.contains(&b'\n') {
            return Err(HeaderError::TooLong);
        }
        let text = std::str::from_utf8(line).map_err(|_| HeaderError::NotUtf8)?;
        let malformed = || HeaderError::Malformed(text.to_string());
        let mut words = text.split(' ');
        let kind = match words.next() {
            Some("stdin") => StreamKind::Stdin,
            Some("stdout") => StreamKind::Stdout,
            Some("stderr") => StreamKind::Stderr,
            Some("tty") => StreamKind::Tty,
            _ => return Err(malformed()),
        };
        let container_id = words.next().ok_or_else(malformed)?;
        let exec_id = words.next().unwrap_or("");
        if words.next().is_some() {
            return Err(malformed());
        }
        let bad = |reason: String| HeaderError::BadId { line: text.to_string(), reason };
        validate_id("container id", container_id).map_err(bad)?;
        if !exec_id.is_empty() {
            validate_id("exec id", exec_id).map_err(bad)?;
        }
        Ok(Self::new(kind, container_id, exec_id))
    }
}

/// Container and exec ids name cgroups and header words, so they are kept to what
/// containerd itself allows: letters, digits, `.`, `_`, `-`, not starting with a
/// punctuation character, at most [`MAX_ID_LEN`] bytes.
pub fn validate_id(what: &str, id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(format!("{what} is longer than {MAX_ID_LEN} bytes"));
    }
    if !id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
        return Err(format!("{what} {id:?} has characters other than letters, digits, '.', '_' and '-'"));
    }
    if !id.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(format!("{what} {id:?} must start with a letter or digit"));
    }
    Ok(())
}

/// Host side, host mode: opens a stream to an agent's Unix I/O socket.
pub fn connect_unix(
    io_socket: impl AsRef<std::path::Path>,
    header: &StreamHeader,
) -> std::io::Result<std::os::unix::net::UnixStream> {
    use std::io::Write;
    let mut stream = std::os::unix::net::UnixStream::connect(io_socket)?;
    stream.write_all(header.encode().as_bytes())?;
    Ok(stream)
}

/// Host side, a guest: opens a stream through the VMM's hybrid vsock socket.
pub fn connect_hybrid(
    vsock_socket: impl AsRef<std::path::Path>,
    header: &StreamHeader,
    deadline: std::time::Instant,
) -> Result<std::os::unix::net::UnixStream, crate::hybrid::Error> {
    use std::io::Write;
    let socket = vsock_socket.as_ref();
    let mut conn = crate::hybrid::connect(socket, crate::IO_PORT, deadline)?;
    conn.stream.write_all(header.encode().as_bytes()).map_err(|source| crate::hybrid::Error::Socket {
        socket: socket.to_path_buf(),
        port: crate::IO_PORT,
        source,
    })?;
    Ok(conn.stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        for h in [
            StreamHeader::new(StreamKind::Stdout, "c1", ""),
            StreamHeader::new(StreamKind::Tty, "abc.def-1", "exec_2"),
            StreamHeader::new(StreamKind::Stdin, &"x".repeat(MAX_ID_LEN), &"y".repeat(MAX_ID_LEN)),
        ] {
            assert_eq!(StreamHeader::parse(h.encode().as_bytes()), Ok(h.clone()));
        }
        assert_eq!(StreamHeader::new(StreamKind::Stderr, "c", "").encode(), "stderr c\n");
        assert_eq!(StreamHeader::new(StreamKind::Stdin, "c", "e").encode(), "stdin c e\n");
    }

    #[test]
    fn bad_headers_are_refused() {
        for bad in [&b"stdout"[..], b"stdout ", b"stdio c1", b"stdout c1 e1 x", b"stdout  c1", b"STDOUT c1", b"\xff c"]
        {
            assert!(StreamHeader::parse(bad).is_err(), "{bad:?}");
        }
        assert!(matches!(StreamHeader::parse(b"stdout ../etc"), Err(HeaderError::BadId { .. })));
        assert!(matches!(StreamHeader::parse(b"stdout -c"), Err(HeaderError::BadId { .. })));
        assert!(matches!(StreamHeader::parse(&[b'a'; MAX_HEADER_LEN]), Err(HeaderError::TooLong)));
        assert!(validate_id("id", &"x".repeat(MAX_ID_LEN + 1)).is_err());
        assert!(validate_id("id", "").is_err());
    }
}
