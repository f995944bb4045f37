//! The guest's serial console as the shim sees it: every line forwarded to the shim's log,
//! the last lines kept for error messages.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Console lines kept for error messages.
const CONSOLE_TAIL_LINES: usize = 25;

/// The last lines of the guest console, for error messages; every line also goes to the log.
#[derive(Clone, Default)]
pub struct ConsoleTail {
    lines: Arc<Mutex<VecDeque<String>>>,
    pub stop: Arc<AtomicBool>,
}

impl ConsoleTail {
    /// Follows `path` (written by the VMM) until stopped, then reads what is left.
    pub fn follow(&self, path: PathBuf, sandbox_id: String) {
        let tail = self.clone();
        let spawned = std::thread::Builder::new().name("console".into()).spawn(move || {
            let mut reader = loop {
                match std::fs::File::open(&path) {
                    Ok(f) => break BufReader::new(f),
                    Err(_) if !tail.stop.load(Ordering::Acquire) => std::thread::sleep(Duration::from_millis(100)),
                    Err(_) => return,
                }
            };
            let mut line = Vec::new();
            loop {
                let stopping = tail.stop.load(Ordering::Acquire);
                match reader.read_until(b'\n', &mut line) {
                    Ok(_) if line.ends_with(b"\n") => {
                        tail.push(&sandbox_id, &line);
                        line.clear();
                    }
                    // End of what is written so far (a partial line stays buffered).
                    Ok(_) if stopping => {
                        if !line.is_empty() {
                            tail.push(&sandbox_id, &line);
                        }
                        return;
                    }
                    Ok(_) => std::thread::sleep(Duration::from_millis(100)),
                    Err(_) => return,
                }
            }
        });
        if let Err(e) = spawned {
            log::warn!("not forwarding the guest console: {e}");
        }
    }

    fn push(&self, sandbox_id: &str, raw: &[u8]) {
        let text = String::from_utf8_lossy(raw).trim_end().to_string();
        log::info!("guest {sandbox_id}: {text}");
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        if lines.len() == CONSOLE_TAIL_LINES {
            lines.pop_front();
        }
        lines.push_back(text);
    }

    pub fn last_lines(&self) -> String {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        if lines.is_empty() {
            return String::new();
        }
        format!("; last guest console lines:\n  {}", lines.iter().cloned().collect::<Vec<_>>().join("\n  "))
    }
}
