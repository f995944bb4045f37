//! The control API: a Unix socket where each connection sends one request line and gets
//! one answer line (`OK` or `ERROR <reason>`). Requests: `pause`, `resume`,
//! `snapshot <dir>` (the VMM ends after writing it), `shutdown`.
//!
//! Deliberately small (no HTTP): its only client is the shim on the same host, and every
//! request is one verb.

use crate::machine::{Request, VmEvent};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc::{channel, Sender};

/// Longest request line accepted.
const MAX_LINE: u64 = 4096;

/// Binds `path` and serves requests on a thread of their own.
pub fn serve(path: &Path, events: Sender<VmEvent>) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::thread::Builder::new().name("api".into()).spawn(move || {
        for stream in listener.incoming().flatten() {
            if !answer(stream, &events) {
                return;
            }
        }
    })?;
    Ok(())
}

/// Serves one connection; false once the VMM no longer takes requests.
fn answer(stream: UnixStream, events: &Sender<VmEvent>) -> bool {
    let mut line = String::new();
    let mut reader = BufReader::new((&stream).take(MAX_LINE));
    if reader.read_line(&mut line).is_err() {
        return true;
    }
    let result = match Request::parse(&line) {
        Ok(request) => {
            let (reply, answer) = channel();
            if events.send(VmEvent::Request(request, reply)).is_err() {
                return false;
            }
            answer.recv().unwrap_or_else(|_| Err("the VMM is stopping".into()))
        }
        Err(e) => Err(e),
    };
    let text = match result {
        Ok(()) => "OK\n".to_string(),
        Err(e) => format!("ERROR {}\n", e.replace('\n', " ")),
    };
    let _ = (&stream).write_all(text.as_bytes());
    true
}
