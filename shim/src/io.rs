//! Standard I/O: the fifos containerd gives a process, copied to and from the process's
//! vsock streams (one connection per stream, see `nestbox_protocols::stdio`).
//!
//! Every copy runs on its own thread. Opening a fifo blocks until the other side opens it,
//! so opens happen on those threads too, never in an RPC; [`unblock_fifo`] releases a
//! thread still stuck in such an open when the process is deleted.
//!
//! Nothing here waits on a timer: output copies end at the stream's EOF (the guest closes
//! it once the process and everything that inherited its output closed it), and stdin ends
//! when the fifo's writers close or at once when containerd calls CloseIO (see
//! [`ProcessIo::close_stdin`]).

use nestbox_protocols::stdio::StreamKind;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The stable start of the warning logged when a safety-net bound of the process path is
/// reached (the same words as the agent's, `nestbox-agent`'s serve.rs): the end-to-end
/// tests fail on it, since a normal start, exec or stop never waits that long.
pub const BOUND_WARNING: &str = "safety-net bound reached";

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
    /// The stdin stream's write side, to end the process's input when containerd closes it.
    stdin: Option<UnixStream>,
    /// Written once at CloseIO (never read, so it stays readable): wakes the input copies.
    closing: UnixStream,
    /// The input copies' end of `closing`.
    closing_rx: UnixStream,
    /// Whether the stdin copy has opened its fifo (then it, not CloseIO, ends the stream).
    stdin_opened: Arc<AtomicBool>,
}

impl ProcessIo {
    /// Starts copying between `paths` and the opened `streams`.
    pub fn start(name: &str, paths: &IoPaths, streams: Vec<(StreamKind, UnixStream)>) -> io::Result<ProcessIo> {
        let (closing, closing_rx) = UnixStream::pair()?;
        let mut io = ProcessIo {
            paths: paths.clone(),
            output: Arc::default(),
            stdin: None,
            closing,
            closing_rx,
            stdin_opened: Arc::default(),
        };
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
        let closing = self.closing_rx.try_clone()?;
        let opened = self.stdin_opened.clone();
        let name = name.to_string();
        spawn(&format!("stdin-{name}"), move || {
            match File::open(&fifo) {
                Ok(input) => {
                    opened.store(true, Ordering::Release);
                    if let Err(e) = copy_input(&input, &mut stream, closing.as_fd()) {
                        log::debug!("{name}: stdin copy ended: {e}");
                    }
                }
                Err(e) => log::warn!("{name}: opening stdin fifo {}: {e}", fifo.display()),
            }
            if half_close {
                let _ = stream.shutdown(Shutdown::Write);
            }
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

    /// containerd closed the process's stdin (CloseIO): what the client wrote before is in
    /// the fifo already (its writes returned), so the copy forwards what the fifo holds
    /// and ends the stream at once, whether or not a writer keeps the fifo open.
    pub fn close_stdin(&self) {
        let _ = (&self.closing).write_all(&[1]);
        if self.stdin_opened.load(Ordering::Acquire) {
            return;
        }
        // The client never opened the fifo: release the copy's open, and end the process's
        // input here should the copy not have reached its open yet (nothing was copied).
        if !self.paths.stdin.is_empty() {
            unblock_fifo(Path::new(&self.paths.stdin));
        }
        if let Some(stream) = &self.stdin {
            let _ = stream.shutdown(Shutdown::Write);
        }
    }

    /// Releases copy threads still waiting in a fifo open (the client never came).
    pub fn release(&self) {
        let _ = (&self.closing).write_all(&[1]);
        for fifo in self.paths.fifos() {
            unblock_fifo(Path::new(fifo));
        }
        if let Some(stream) = &self.stdin {
            let _ = stream.shutdown(Shutdown::Write);
        }
    }
}

/// Copies a stdin fifo to the process's stream until the fifo's writers all closed it or
/// `closing` becomes readable (CloseIO); then what the fifo still holds is forwarded
/// without waiting for more.
fn copy_input(from: &File, to: &mut impl Write, closing: BorrowedFd<'_>) -> io::Result<()> {
    let mut buf = vec![0u8; 32 * 1024];
    let mut reader = from;
    loop {
        if wait_input(from.as_fd(), closing)? {
            set_nonblocking(from)?;
            loop {
                match reader.read(&mut buf) {
                    Ok(0) => return Ok(()),
                    Ok(n) => to.write_all(&buf[..n])?,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
        }
        match reader.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => to.write_all(&buf[..n])?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Blocks until `input` can be read (data, or EOF) or `closing` is readable; true for
/// `closing`.
fn wait_input(input: BorrowedFd<'_>, closing: BorrowedFd<'_>) -> io::Result<bool> {
    let mut fds = [
        libc::pollfd { fd: input.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: closing.as_raw_fd(), events: libc::POLLIN, revents: 0 },
    ];
    loop {
        // SAFETY: poll(2) reads and writes only the two pollfd entries of `fds`, which
        // live across the call; the descriptors are borrowed, so they stay open.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc >= 0 {
            return Ok(fds[1].revents != 0);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn set_nonblocking(file: &File) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(file.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(file.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
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

    /// CloseIO while the client still holds its fifo open: what it wrote reaches the
    /// process and then EOF, at once (no grace period); later writes go nowhere.
    #[test]
    fn close_stdin_ends_the_input_at_once_with_the_fifo_still_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = IoPaths { stdin: dir.path().join("in").to_string_lossy().into(), ..Default::default() };
        mkfifo(Path::new(&paths.stdin));
        let (shim_in, mut guest_in) = UnixStream::pair().expect("pair");
        let io = ProcessIo::start("c3", &paths, vec![(StreamKind::Stdin, shim_in)]).expect("start");
        let mut client = OpenOptions::new().write(true).open(&paths.stdin).expect("open stdin fifo");
        client.write_all(b"before close\n").expect("write stdin");
        let mut first = [0u8; 13];
        guest_in.read_exact(&mut first).expect("the first bytes arrive before CloseIO");
        client.write_all(b"just before").expect("write stdin");

        let closed = Instant::now();
        io.close_stdin();
        guest_in.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut rest = Vec::new();
        guest_in.read_to_end(&mut rest).expect("EOF on the process's stdin");
        assert_eq!(rest, b"just before");
        assert!(closed.elapsed() < Duration::from_secs(1), "EOF took {:?}", closed.elapsed());
        drop(client);
    }

    /// CloseIO for a stdin the client never opened: the process sees EOF at once.
    #[test]
    fn close_stdin_of_a_fifo_never_opened_ends_the_input() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = IoPaths { stdin: dir.path().join("in").to_string_lossy().into(), ..Default::default() };
        mkfifo(Path::new(&paths.stdin));
        let (shim_in, mut guest_in) = UnixStream::pair().expect("pair");
        let io = ProcessIo::start("c4", &paths, vec![(StreamKind::Stdin, shim_in)]).expect("start");
        io.close_stdin();
        guest_in.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut rest = Vec::new();
        guest_in.read_to_end(&mut rest).expect("EOF on the process's stdin");
        assert!(rest.is_empty());
    }

    /// An output stream whose writer closes is drained and done without delay: the exit
    /// report waits for the EOF, not for a timer.
    #[test]
    fn output_closed_by_the_guest_is_done_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = IoPaths { stdout: dir.path().join("out").to_string_lossy().into(), ..Default::default() };
        mkfifo(Path::new(&paths.stdout));
        let (shim_out, mut guest_out) = UnixStream::pair().expect("pair");
        let io = ProcessIo::start("c5", &paths, vec![(StreamKind::Stdout, shim_out)]).expect("start");
        let out = PathBuf::from(&paths.stdout);
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            File::open(out).expect("open").read_to_string(&mut s).expect("read");
            s
        });
        guest_out.write_all(b"last words").expect("write");
        let closed = Instant::now();
        drop(guest_out);
        // The bound only catches a copy that never ends; it takes milliseconds.
        assert!(io.wait_output(Duration::from_secs(10)), "output still pending");
        assert!(closed.elapsed() < Duration::from_secs(1), "done {:?} after EOF", closed.elapsed());
        assert_eq!(reader.join().expect("reader"), "last words");
    }
}
