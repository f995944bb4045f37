//! A container's process as the agent tracks it: its PID and exit (from the reaper), and
//! its standard I/O: pipes or a pseudo-terminal on the process's side, the host's streams
//! (see `streams`) on the other, and one copying thread per direction.
//!
//! Output is never lost: a process starts only after its streams are attached, and an
//! output copier runs until the pipe (or terminal) reports EOF, which happens after the
//! process and everything that inherited the descriptor have closed it, whatever the
//! process's exit. Should the host stop reading, the copier keeps draining and discards,
//! so the process never blocks on a full pipe.

pub mod streams;

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use nestbox_protocols::stdio::{StreamHeader, StreamKind};
use nestbox_protocols::types::Stdio;
use nix::sys::socket::Shutdown;

use crate::reaper::ExitCell;
use streams::{Conn, IoHub};

const COPY_BUF: usize = 32 * 1024;

/// The process's ends of its standard I/O, handed to the helper at spawn.
pub struct ChildIo {
    /// stdin, stdout, stderr (the same terminal slave three times for a tty).
    pub fds: [OwnedFd; 3],
}

impl ChildIo {
    pub fn raw(&self) -> [RawFd; 3] {
        [self.fds[0].as_raw_fd(), self.fds[1].as_raw_fd(), self.fds[2].as_raw_fd()]
    }
}

/// The agent's ends, kept until the process starts and its streams are attached.
enum AgentIo {
    Pipes { stdin: Option<File>, stdout: Option<File>, stderr: Option<File> },
    Tty { master: File },
}

#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("creating standard I/O: {0}")]
    Setup(#[source] io::Error),
    #[error("the {kind} stream of {who} was not opened on the I/O port within {waited:?}")]
    NotAttached { kind: StreamKind, who: String, waited: std::time::Duration },
    #[error("{0} has no terminal")]
    NoTerminal(String),
    #[error("resizing the terminal: {0}")]
    Resize(#[source] nix::Error),
}

/// Creates both ends of a process's standard I/O as `stdio` asks.
pub fn prepare(stdio: &Stdio, console_size: Option<(u16, u16)>) -> Result<(ChildIo, ProcessIo), IoError> {
    let null = || File::options().read(true).write(true).open("/dev/null").map(OwnedFd::from);
    if stdio.terminal {
        let winsize = console_size.map(|(rows, cols)| nix::pty::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        });
        let pty = nix::pty::openpty(winsize.as_ref(), None).map_err(|e| IoError::Setup(e.into()))?;
        set_cloexec(&pty.master).map_err(IoError::Setup)?;
        set_cloexec(&pty.slave).map_err(IoError::Setup)?;
        let slave = pty.slave;
        let fds = [slave.try_clone().map_err(IoError::Setup)?, slave.try_clone().map_err(IoError::Setup)?, slave];
        let resize = pty.master.try_clone().map_err(IoError::Setup)?;
        let io = ProcessIo::new(stdio, AgentIo::Tty { master: File::from(pty.master) }, Some(resize));
        return Ok((ChildIo { fds }, io));
    }
    let pipe = || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| IoError::Setup(e.into()));
    let (child_in, agent_in) = if stdio.stdin {
        let (r, w) = pipe()?;
        (r, Some(File::from(w)))
    } else {
        (null().map_err(IoError::Setup)?, None)
    };
    let out = |wanted: bool| -> Result<(OwnedFd, Option<File>), IoError> {
        if wanted {
            let (r, w) = pipe()?;
            Ok((w, Some(File::from(r))))
        } else {
            Ok((null().map_err(IoError::Setup)?, None))
        }
    };
    let (child_out, agent_out) = out(stdio.stdout)?;
    let (child_err, agent_err) = out(stdio.stderr)?;
    let agent = AgentIo::Pipes { stdin: agent_in, stdout: agent_out, stderr: agent_err };
    Ok((ChildIo { fds: [child_in, child_out, child_err] }, ProcessIo::new(stdio, agent, None)))
}

fn set_cloexec(fd: &OwnedFd) -> io::Result<()> {
    nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))?;
    Ok(())
}

/// The agent's side of a process's I/O.
pub struct ProcessIo {
    inner: Mutex<IoState>,
}

struct IoState {
    stdio: Stdio,
    /// Until the process starts.
    pending: Option<AgentIo>,
    /// The stream the host writes input on (stdin or the tty), once attached: shut down
    /// for reading to end the input copier (CloseStdin).
    input: Option<OwnedFd>,
    stdin_closed: bool,
    /// A copy of the terminal's master, for resizes.
    tty: Option<OwnedFd>,
}

impl ProcessIo {
    fn new(stdio: &Stdio, agent: AgentIo, tty: Option<OwnedFd>) -> Self {
        let state = IoState { stdio: stdio.clone(), pending: Some(agent), input: None, stdin_closed: false, tty };
        Self { inner: Mutex::new(state) }
    }

    fn lock(&self) -> MutexGuard<'_, IoState> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The streams this process needs.
    fn wanted(stdio: &Stdio) -> Vec<StreamKind> {
        if stdio.terminal {
            return vec![StreamKind::Tty];
        }
        [(stdio.stdin, StreamKind::Stdin), (stdio.stdout, StreamKind::Stdout), (stdio.stderr, StreamKind::Stderr)]
            .into_iter()
            .filter_map(|(w, k)| w.then_some(k))
            .collect()
    }

    /// Waits (until `deadline`) for every stream the process needs, then starts copying.
    pub fn attach(&self, hub: &IoHub, container_id: &str, exec_id: &str, deadline: Instant) -> Result<(), IoError> {
        let stdio = self.lock().stdio.clone();
        let start = Instant::now();
        let mut conns = Vec::new();
        for kind in Self::wanted(&stdio) {
            let header = StreamHeader::new(kind, container_id, exec_id);
            let conn = hub.take(&header, deadline).ok_or_else(|| IoError::NotAttached {
                kind,
                who: who(container_id, exec_id),
                waited: start.elapsed(),
            })?;
            conns.push((kind, conn));
        }
        let mut state = self.lock();
        let Some(agent) = state.pending.take() else { return Ok(()) };
        let name = who(container_id, exec_id);
        match agent {
            AgentIo::Tty { master } => {
                let Some((_, conn)) = conns.pop() else { return Ok(()) };
                let input = conn.try_clone().map_err(IoError::Setup)?;
                let master_in = master.try_clone().map_err(IoError::Setup)?;
                state.input = Some(input.try_clone().map_err(IoError::Setup)?.into());
                if state.stdin_closed {
                    streams::shutdown(&input, Shutdown::Read);
                }
                copy_thread(&name, "tty-out", master, conn, true)?;
                copy_thread(&name, "tty-in", input, master_in, false)?;
            }
            AgentIo::Pipes { stdin, stdout, stderr } => {
                for (kind, conn) in conns {
                    match (kind, &stdin, &stdout, &stderr) {
                        (StreamKind::Stdin, Some(pipe), _, _) => {
                            state.input = Some(conn.try_clone().map_err(IoError::Setup)?.into());
                            if state.stdin_closed {
                                streams::shutdown(&conn, Shutdown::Read);
                            }
                            copy_thread(&name, "stdin", conn, pipe.try_clone().map_err(IoError::Setup)?, false)?;
                        }
                        (StreamKind::Stdout, _, Some(pipe), _) | (StreamKind::Stderr, _, _, Some(pipe)) => {
                            copy_thread(&name, kind.as_str(), pipe.try_clone().map_err(IoError::Setup)?, conn, true)?;
                        }
                        _ => {}
                    }
                }
                // The copiers hold their own copies; these close here, so the process's
                // stdin sees EOF once its copier ends.
            }
        }
        Ok(())
    }

    /// Ends the process's input: EOF on its stdin (the terminal stops forwarding input).
    pub fn close_stdin(&self) {
        let mut state = self.lock();
        state.stdin_closed = true;
        if let Some(input) = &state.input {
            streams::shutdown(input, Shutdown::Read);
        }
    }

    pub fn resize(&self, name: &str, rows: u16, cols: u16) -> Result<(), IoError> {
        let state = self.lock();
        let Some(tty) = &state.tty else { return Err(IoError::NoTerminal(name.to_string())) };
        let size = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCSWINSZ reads a winsize, valid for the call, on our pty master.
        let rc = unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        if rc != 0 {
            return Err(IoError::Resize(nix::Error::last()));
        }
        Ok(())
    }

    /// The process is gone: stop waiting for input it can no longer read.
    pub fn process_exited(&self) {
        let state = self.lock();
        if let Some(input) = &state.input {
            streams::shutdown(input, Shutdown::Read);
        }
    }
}

fn who(container_id: &str, exec_id: &str) -> String {
    if exec_id.is_empty() {
        format!("container {container_id}")
    } else {
        format!("exec {exec_id} of container {container_id}")
    }
}

/// Copies `from` to `to` until EOF on `from`. An output copier (`output`) half-closes the
/// host stream at the end and keeps draining if the host stopped reading; an input copier
/// closes the process's pipe at the end (EOF for the process).
fn copy_thread(name: &str, what: &str, mut from: File, mut to: Conn, output: bool) -> Result<(), IoError> {
    let label = format!("{what}-{name}");
    std::thread::Builder::new()
        .name(what.into())
        .spawn(move || {
            let mut buf = vec![0u8; COPY_BUF];
            let mut sink_ok = true;
            loop {
                let n = match from.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    // A terminal's master reads EIO once every slave descriptor is closed.
                    Err(_) => break,
                };
                if sink_ok {
                    if let Err(e) = to.write_all(&buf[..n]) {
                        if !output {
                            break; // the process closed its stdin
                        }
                        eprintln!("nestbox-agent: {label}: host stream failed ({e}); discarding the rest");
                        sink_ok = false;
                    }
                }
            }
            if output {
                streams::shutdown(&to, Shutdown::Write);
            }
        })
        .map(|_| ())
        .map_err(IoError::Setup)
}

/// A process of a container.
pub struct Process {
    pub exec_id: String,
    pub pid: i32,
    pub exit: Arc<ExitCell>,
    pub io: ProcessIo,
}
