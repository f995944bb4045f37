//! Standard I/O: the fifos containerd gives a process, copied to and from the process's
//! vsock streams (one connection per stream, see `nestbox_protocols::stdio`).
//!
//! Every copy runs on its own thread. Opening a fifo blocks until the other side opens it,
//! so opens happen on those threads too, never in an RPC; [`unblock_fifo`] releases a
//! thread still stuck in such an open when the process is deleted.

use nestbox_protocols::stdio::StreamKind;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The fifo paths containerd gave for a process (empty: no such stream).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IoPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

impl IoPaths {
    pub fn fifos(&self) -> impl Iterator<Item = &str> {
        [self.stdin.as_str(), self.stdout.as_str(), self.stderr.as_str()].into_iter().filter(|p| !p.is_empty())
    }
}

/// Counts copies still running, so the exit of a process can be reported after its last
/// output reached containerd.
#[derive(Default)]
struct Pending {
    count: Mutex<usize>,
    done: Condvar,
}

impl Pending {
    fn add(&self) {
        *self.count.lock().unwrap_or_else(|e| e.into_inner()) += 1;
    }

    fn finish(&self) {
        let mut n = self.count.lock().unwrap_or_else(|e| e.into_inner());
        *n = n.saturating_sub(1);
        self.done.notify_all();
    }

    fn wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut n = self.count.lock().unwrap_or_else(|e| e.into_inner());
        while *n > 0 {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            n = match self.done.wait_timeout(n, deadline - now) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        true
    }
}

/// The running copies of one process.
pub struct ProcessIo {
    paths: IoPaths,
    output: Arc<Pending>,
    input_done: Arc<Pending>,
    /// The stdin stream's write side, to end the process's input when containerd closes it.
    stdin: Option<UnixStream>,
}

impl ProcessIo {
    /// Starts copying between `paths` and the opened `streams`.
    pub fn start(name: &str, paths: &IoPaths, streams: Vec<(StreamKind, UnixStream)>) -> io::Result<ProcessIo> {
        let mut io =
            ProcessIo { paths: paths.clone(), output: Arc::default(), input_done: Arc::default(), stdin: None };
        for (kind, stream) in streams {
            match kind {
                StreamKind::Stdin => {
                    io.stdin = Some(stream.try_clone()?);
                    io.copy_in(name, &paths.stdin, stream, true)?;
                }
                StreamKind::Stdout => io.copy_out(name, &paths.stdout, stream)?,
                StreamKind::Stderr => io.copy_out(name, &paths.stderr, stream)?,
                StreamKind::Tty => {
                    if !paths.stdin.is_empty() {
                        // A terminal's input ends with the process, not with the fifo:
                        // the stream carries the output too.
                        io.copy_in(name, &paths.stdin, stream.try_clone()?, false)?;
                    }
                    io.copy_out(name, &paths.stdout, stream)?;
                }
            }
        }
        Ok(io)
    }

    fn copy_in(&mut self, name: &str, fifo: &str, mut stream: UnixStream, half_close: bool) -> io::Result<()> {
        let fifo = PathBuf::from(fifo);
        let done = self.input_done.clone();
        done.add();
        let name = name.to_string();
        spawn(&format!("stdin-{name}"), move || {
            match File::open(&fifo) {
                Ok(mut input) => {
                    if let Err(e) = copy(&mut input, &mut stream) {
                        log::debug!("{name}: stdin copy ended: {e}");
                    }
                }
                Err(e) => log::warn!("{name}: opening stdin fifo {}: {e}", fifo.display()),
            }
            if half_close {
                let _ = stream.shutdown(Shutdown::Write);
            }
            done.finish();
        })
    }

    fn copy_out(&mut self, name: &str, fifo: &str, mut stream: UnixStream) -> io::Result<()> {
        let fifo = PathBuf::from(fifo);
        let pending = self.output.clone();
        pending.add();
        let name = name.to_string();
        spawn(&format!("stdout-{name}"), move || {
            let opened = OpenOptions::new().write(true).open(&fifo);
            match opened {
                Ok(mut output) => {
                    if let Err(e) = copy(&mut stream, &mut output) {
                        log::debug!("{name}: output copy to {} ended: {e}", fifo.display());
                    }
                }
                Err(e) => log::warn!("{name}: opening output fifo {}: {e}", fifo.display()),
            }
            // Whoever stopped reading, the process must not block on a full stream: drain it.
            let _ = io::copy(&mut stream, &mut io::sink());
            pending.finish();
        })
    }

    /// Waits until every output stream has ended (the process and everything that
    /// inherited its streams closed them) and was copied, at most `timeout`.
    pub fn wait_output(&self, timeout: Duration) -> bool {
        self.output.wait(timeout)
    }

    /// containerd closed the process's stdin: once what was written is forwarded, the
    /// process reads EOF. The copy ends by itself when the fifo's writer closes; if the
    /// writer keeps it open, the stream is closed after a grace period.
    pub fn close_stdin(&self) {
        let Some(stream) = self.stdin.as_ref().and_then(|s| s.try_clone().ok()) else { return };
        let done = self.input_done.clone();
        let _ = spawn("stdin-close", move || {
            if !done.wait(Duration::from_secs(2)) {
                let _ = stream.shutdown(Shutdown::Write);
            }
        });
    }

    /// Releases copy threads still waiting in a fifo open (the client never came).
    pub fn release(&self) {
        for fifo in self.paths.fifos() {
            unblock_fifo(Path::new(fifo));
        }
        if let Some(stream) = &self.stdin {
            let _ = stream.shutdown(Shutdown::Write);
        }
    }
}

/// Copies until EOF or an error, retrying interrupted calls.
fn copy(from: &mut impl Read, to: &mut impl Write) -> io::Result<u64> {
    let mut buf = vec![0u8; 32 * 1024];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// Opens the other end of a fifo without blocking and closes it again: a thread blocked
/// opening its end returns (a reader then sees EOF, a writer EPIPE).
pub fn unblock_fifo(path: &Path) {
    for write in [true, false] {
        let _ = OpenOptions::new().read(!write).write(write).custom_flags(libc::O_NONBLOCK).open(path);
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> io::Result<()> {
    std::thread::Builder::new().name(name.chars().take(15).collect()).spawn(f).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mkfifo(path: &Path) {
        nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    }

    /// The whole path of one process: stdin fifo → stream, stream → stdout/stderr fifos,
    /// EOF both ways, and output complete before `wait_output` returns.
    #[test]
    fn fifos_and_streams_are_copied_both_ways() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = IoPaths {
            stdin: dir.path().join("in").to_string_lossy().into(),
            stdout: dir.path().join("out").to_string_lossy().into(),
            stderr: dir.path().join("err").to_string_lossy().into(),
            terminal: false,
        };
        for p in paths.fifos() {
            mkfifo(Path::new(p));
        }
        let (shim_in, mut guest_in) = UnixStream::pair().expect("pair");
        let (shim_out, mut guest_out) = UnixStream::pair().expect("pair");
        let (shim_err, mut guest_err) = UnixStream::pair().expect("pair");
        let io = ProcessIo::start(
            "c1",
            &paths,
            vec![(StreamKind::Stdin, shim_in), (StreamKind::Stdout, shim_out), (StreamKind::Stderr, shim_err)],
        )
        .expect("start");

        // The client (containerd's side) opens its ends.
        let stdin_path = PathBuf::from(&paths.stdin);
        let client_in = std::thread::spawn(move || {
            let mut w = OpenOptions::new().write(true).open(stdin_path).expect("open stdin fifo");
            w.write_all(b"input line\n").expect("write stdin");
        });
        let read_fifo = |p: &str| {
            let p = PathBuf::from(p);
            std::thread::spawn(move || {
                let mut s = String::new();
                File::open(p).expect("open").read_to_string(&mut s).expect("read");
                s
            })
        };
        let out = read_fifo(&paths.stdout);
        let err = read_fifo(&paths.stderr);

        let mut got = String::new();
        guest_in.read_to_string(&mut got).expect("guest reads stdin to EOF");
        assert_eq!(got, "input line\n");
        client_in.join().expect("client stdin");

        guest_out.write_all(b"hello out").expect("write");
        guest_err.write_all(b"hello err").expect("write");
        assert!(!io.wait_output(Duration::from_millis(100)), "streams still open");
        drop(guest_out);
        drop(guest_err);
        assert!(io.wait_output(Duration::from_secs(10)));
        assert_eq!(out.join().expect("out"), "hello out");
        assert_eq!(err.join().expect("err"), "hello err");
    }

    /// A client that never opens its fifo ends does not pin the copy threads.
    #[test]
    fn release_unblocks_fifo_opens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = IoPaths {
            stdin: dir.path().join("in").to_string_lossy().into(),
            stdout: dir.path().join("out").to_string_lossy().into(),
            ..Default::default()
        };
        for p in paths.fifos() {
            mkfifo(Path::new(p));
        }
        let (shim_in, mut guest_in) = UnixStream::pair().expect("pair");
        let (shim_out, mut guest_out) = UnixStream::pair().expect("pair");
        let io = ProcessIo::start("c2", &paths, vec![(StreamKind::Stdin, shim_in), (StreamKind::Stdout, shim_out)])
            .expect("start");
        guest_out.write_all(b"nobody reads this").expect("write");
        drop(guest_out);
        assert!(!io.wait_output(Duration::from_millis(200)));
        io.release();
        assert!(io.wait_output(Duration::from_secs(10)), "output thread still stuck");
        let mut got = Vec::new();
        guest_in.read_to_end(&mut got).expect("stdin EOF");
        assert!(got.is_empty());
    }
}
