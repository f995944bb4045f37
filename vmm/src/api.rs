//! The control API: a Unix socket where each connection sends one request line and gets
//! one answer line (`OK` or `ERROR <reason>`). Requests: `pause`, `resume`,
//! `snapshot <dir>` (the VMM ends after writing it), `shutdown`, and `metrics`, answered
//! `OK name=value ...` (the net device's counters; a bare `OK` without one).
//!
//! Deliberately small (no HTTP): its only client is the shim on the same host, and every
//! request is one verb. This module is the top of the crate: it parses the protocol and
//! reaches the VM only through a [`VmControl`].

use crate::seccomp::{self, ThreadKind};
use crate::vmm::{ControlError, Request, VmControl};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Longest request line accepted.
const MAX_LINE: u64 = 4096;

/// A hidden request, for tests: the API thread makes a system call no seccomp filter
/// allows, which kills a jailed VMM with SIGSYS. Harmless: whoever can reach the socket
/// can end the VMM anyway (`shutdown`).
pub const SELFTEST_SECCOMP: &str = "selftest-seccomp";

fn selftest_seccomp() -> String {
    let result = seccomp::forbidden_syscall();
    format!("{SELFTEST_SECCOMP}: the forbidden call returned {result}: this VMM has no seccomp filter")
}

/// Parses one line of the control protocol.
pub fn parse_request(line: &str) -> Result<Request, String> {
    let mut words = line.split_whitespace();
    let request = match (words.next(), words.next()) {
        (Some("pause"), None) => Request::Pause,
        (Some("resume"), None) => Request::Resume,
        (Some("snapshot"), Some(dir)) => Request::Snapshot(PathBuf::from(dir)),
        (Some("shutdown"), None) => Request::Shutdown,
        (Some("metrics"), None) => Request::Metrics,
        _ => return Err(format!("unknown request {line:?} (pause, resume, snapshot DIR, shutdown, metrics)")),
    };
    match words.next() {
        None => Ok(request),
        Some(extra) => Err(format!("unexpected {extra:?} after the request")),
    }
}

/// Binds `path` and serves requests on a thread of their own.
pub fn serve(path: &Path, vm: VmControl) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::thread::Builder::new().name("api".into()).spawn(move || {
        seccomp::install_or_exit(ThreadKind::Api);
        for stream in listener.incoming().flatten() {
            if !answer(stream, &vm) {
                return;
            }
        }
    })?;
    Ok(())
}

/// Serves one connection; false once the VMM no longer takes requests.
fn answer(stream: UnixStream, vm: &VmControl) -> bool {
    let mut line = String::new();
    let mut reader = BufReader::new((&stream).take(MAX_LINE));
    if reader.read_line(&mut line).is_err() {
        return true;
    }
    let result = match parse_request(&line) {
        _ if line.trim() == SELFTEST_SECCOMP => Err(selftest_seccomp()),
        Ok(request) => match vm.request(request) {
            Err(ControlError::Closed) => return false,
            Err(ControlError::Failed(reason)) => Err(reason),
            Err(stopping @ ControlError::Stopping) => Err(stopping.to_string()),
            Ok(text) => Ok(text),
        },
        Err(e) => Err(e),
    };
    let text = match result {
        Ok(text) if text.is_empty() => "OK\n".to_string(),
        Ok(text) => format!("OK {}\n", text.replace('\n', " ")),
        Err(e) => format!("ERROR {}\n", e.replace('\n', " ")),
    };
    let _ = (&stream).write_all(text.as_bytes());
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse() {
        assert_eq!(parse_request("pause\n"), Ok(Request::Pause));
        assert_eq!(parse_request(" resume "), Ok(Request::Resume));
        assert_eq!(parse_request("snapshot /tmp/t"), Ok(Request::Snapshot("/tmp/t".into())));
        assert_eq!(parse_request("shutdown"), Ok(Request::Shutdown));
        assert_eq!(parse_request("metrics\n"), Ok(Request::Metrics));
        assert!(parse_request("snapshot").is_err());
        assert!(parse_request("pause now").is_err());
        assert!(parse_request("reboot").is_err());
        assert!(parse_request("").is_err());
    }
}
