//! Starting a container process: the agent clones a child into the container's new
//! namespaces and the child at once re-executes the agent binary as the *helper*
//! (`nestbox-agent --container-helper`, see `helper`), which sets the container up and
//! finally executes the container's program. The helper talks to the agent over a
//! control socket (fd 3): the agent sends a [`HelperConfig`], the helper answers
//! [`Report::Ready`] once everything but the final exec is done, waits for the start byte,
//! and executes the program; the socket is close-on-exec, so EOF tells the agent the exec
//! succeeded and a [`Report::Failed`] tells it why not.
//!
//! Why a re-exec rather than running the setup in the forked child: the agent is
//! multi-threaded (ttrpc, I/O copies), and after fork only async-signal-safe calls are
//! sound in the child (another thread may have held the allocator's or stdio's lock at the
//! fork). The child here only moves descriptors and calls execveat(2); the helper then
//! runs as a fresh single-threaded process where the setup code (allocation, mount,
//! setns into a mount namespace, which a multi-threaded process cannot do) is safe. runc
//! (`runc init`) and Kata's agent do the same.

use std::ffi::CString;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::reaper::{ExitCell, Reaper};

/// The argument that makes the agent binary run as a container helper.
pub const HELPER_ARG: &str = "--container-helper";

/// Descriptor numbers in the helper.
pub const CONTROL_FD: RawFd = 3;
/// The container's init process as a pidfd, for an exec to join its namespaces.
pub const PIDFD_FD: RawFd = 4;

/// The largest control message accepted (a spec is a few KiB; this bounds a bad peer).
const MAX_MESSAGE: u32 = 16 << 20;

#[derive(Debug, Serialize, Deserialize)]
pub enum Mode {
    /// A new container: the whole spec (rootfs, mounts, hostname, ...).
    Create,
    /// A process joining a running container's namespaces (through the pidfd on
    /// [`PIDFD_FD`]); `namespaces` are the clone flags to join besides the PID one,
    /// which the agent joined before cloning.
    Exec { namespaces: i32 },
}

/// What the helper is told. The OCI documents travel as the JSON the agent received (the
/// helper parses them itself): re-serialising oci-spec's types would only add code to the
/// agent binary, which every guest boot pays for.
#[derive(Debug, Serialize, Deserialize)]
pub struct HelperConfig {
    pub container_id: String,
    pub mode: Mode,
    /// The container's spec (its process, mounts, seccomp profile, ...).
    pub spec_json: String,
    /// For an exec: the process to run instead of the spec's.
    pub process_json: Option<String>,
    /// Turn glibc's AVX functions off in the program's environment (`avx_quirk`).
    pub glibc_avx_off: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Report {
    Ready,
    Failed(String),
}

/// Writes one length-prefixed JSON message.
pub fn send<T: Serialize>(w: &mut impl Write, message: &T) -> io::Result<()> {
    let body = serde_json::to_vec(message).map_err(io::Error::other)?;
    let len = u32::try_from(body.len()).map_err(|_| io::Error::other("control message too large"))?;
    let mut frame = len.to_le_bytes().to_vec();
    frame.extend_from_slice(&body);
    w.write_all(&frame)
}

/// Reads one length-prefixed JSON message; `Ok(None)` at EOF before a message.
pub fn recv<T: for<'de> Deserialize<'de>>(r: &mut impl Read) -> io::Result<Option<T>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        other => other?,
    }
    let len = u32::from_le_bytes(len);
    if len > MAX_MESSAGE {
        return Err(io::Error::other(format!("control message of {len} bytes is too large")));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body)?;
    serde_json::from_slice(&body).map(Some).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// The descriptors the helper gets: stdio (0, 1, 2), the control socket (3), and for an
/// exec the container's pidfd (4).
pub struct ChildFds<'a> {
    pub stdio: [RawFd; 3],
    pub control: &'a OwnedFd,
    pub pidfd: Option<&'a OwnedFd>,
}

/// Clones a child with `clone_flags` (namespaces) and executes the helper in it; the child
/// is registered with the reaper before it can exit. With namespaces to `enter` (a
/// descriptor of each and its clone flag: a pidfd for a PID namespace, a namespace file
/// for the others), the child is created in them: the clone runs on a short-lived thread
/// that entered them first (setns changes only the calling thread, and for a PID namespace
/// only that thread's future children), so the agent's own threads stay where they are.
pub fn spawn_helper(
    reaper: &Reaper,
    exe: &OwnedFd,
    clone_flags: libc::c_int,
    fds: &ChildFds<'_>,
    enter: &[(BorrowedFd<'_>, libc::c_int)],
) -> io::Result<(i32, Arc<ExitCell>)> {
    let sources =
        [fds.stdio[0], fds.stdio[1], fds.stdio[2], fds.control.as_raw_fd(), fds.pidfd.map_or(-1, |f| f.as_raw_fd())];
    let exe = exe.as_raw_fd();
    if enter.is_empty() {
        return reaper.spawn(|| clone_exec(clone_flags, &sources, exe));
    }
    std::thread::scope(|s| {
        s.spawn(|| {
            for (fd, flag) in enter {
                // SAFETY: setns on this thread only, with a valid open descriptor.
                if unsafe { libc::setns(fd.as_raw_fd(), *flag) } != 0 {
                    let e = io::Error::last_os_error();
                    return Err(io::Error::new(e.kind(), format!("entering the {} namespace: {e}", flag_name(*flag))));
                }
            }
            reaper.spawn(|| clone_exec(clone_flags, &sources, exe))
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the spawning thread panicked")))
    })
}

/// A namespace clone flag's name, for errors.
pub fn flag_name(flag: libc::c_int) -> &'static str {
    match flag {
        libc::CLONE_NEWPID => "PID",
        libc::CLONE_NEWNET => "network",
        libc::CLONE_NEWIPC => "IPC",
        libc::CLONE_NEWUTS => "UTS",
        libc::CLONE_NEWNS => "mount",
        libc::CLONE_NEWCGROUP => "cgroup",
        _ => "unknown",
    }
}

/// The stack the cloned child runs on until its exec: `exec_child` is a few frames of
/// fcntl and dup2.
const CHILD_STACK_BYTES: usize = 64 * 1024;

/// What the cloned child needs, prepared before the clone.
struct ChildArgs<'a> {
    sources: &'a [RawFd; 5],
    exe: RawFd,
    empty: *const libc::c_char,
    argv: &'a [*const libc::c_char; 3],
    envp: &'a [*const libc::c_char; 1],
}

/// Clones the child and has it execute the helper; returns the child's PID.
///
/// The clone shares the agent's memory (CLONE_VM) and suspends this thread until the
/// child has executed the helper or died (CLONE_VFORK), as posix_spawn does: a fork-like
/// clone would copy the agent's page tables only for the exec to throw them away, and the
/// child's first writes would each take a copy-on-write fault. Both are guest-kernel work,
/// which a software-nested host emulates (docs/agent.md, "How a container process is
/// made"). The child runs on a stack of its own, so it never writes into this thread's.
fn clone_exec(clone_flags: libc::c_int, sources: &[RawFd; 5], exe: RawFd) -> io::Result<i32> {
    let argv0 = CString::new("nestbox-agent").map_err(io::Error::other)?;
    let argv1 = CString::new(HELPER_ARG).map_err(io::Error::other)?;
    let empty = CString::default();
    let argv = [argv0.as_ptr(), argv1.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null()];
    let args = ChildArgs { sources, exe, empty: empty.as_ptr(), argv: &argv, envp: &envp };
    let mut stack = vec![0u8; CHILD_STACK_BYTES];
    // The stack grows down from its top, which the x86_64 ABI wants 16-byte aligned.
    let top = (stack.as_mut_ptr() as usize + CHILD_STACK_BYTES) & !0xf;
    let flags = clone_flags | libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD;
    // SAFETY: `child` runs on `stack` (alive until clone returns, which CLONE_VFORK delays
    // until the child has executed or exited) with `args` (alive as long). The child shares
    // this memory, so it only calls the async-signal-safe fcntl, dup2, execveat and _exit
    // on data prepared above; this thread is suspended meanwhile, so nothing races it.
    let pid =
        unsafe { libc::clone(child, top as *mut libc::c_void, flags, &args as *const ChildArgs as *mut libc::c_void) };
    drop(stack);
    match pid {
        -1 => Err(io::Error::last_os_error()),
        pid => Ok(pid),
    }
}

/// The cloned child's entry point (see `clone_exec`).
extern "C" fn child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `ChildArgs` that clone_exec passed, alive while this runs.
    let a = unsafe { &*(arg as *const ChildArgs) };
    // SAFETY: in the child of clone_exec's clone, with pointers prepared before it.
    unsafe { exec_child(a.sources, a.exe, a.empty, a.argv, a.envp) }
}

/// In the cloned child: descriptors into place, then the helper. Never returns.
///
/// # Safety
/// Only in the child of `clone_exec`'s clone; all pointers valid (they point into the
/// parent's memory, which the child shares while the parent waits).
unsafe fn exec_child(
    sources: &[RawFd; 5],
    exe: RawFd,
    empty: *const libc::c_char,
    argv: &[*const libc::c_char; 3],
    envp: &[*const libc::c_char; 1],
) -> ! {
    // First out of the way (>= 10), so that placing one descriptor never overwrites
    // another that is still to be placed, nor the executable's.
    let exe = libc::fcntl(exe, libc::F_DUPFD_CLOEXEC, 10);
    if exe < 0 {
        libc::_exit(126);
    }
    let mut moved = [-1; 5];
    for (i, &fd) in sources.iter().enumerate() {
        if fd >= 0 {
            moved[i] = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10);
            if moved[i] < 0 {
                libc::_exit(126);
            }
        }
    }
    for (target, &fd) in moved.iter().enumerate() {
        // dup2 clears close-on-exec on the target: exactly these reach the helper.
        if fd >= 0 && libc::dup2(fd, target as RawFd) < 0 {
            libc::_exit(126);
        }
    }
    libc::syscall(libc::SYS_execveat, exe, empty, argv.as_ptr(), envp.as_ptr(), libc::AT_EMPTY_PATH);
    libc::_exit(127)
}

/// Opens the running agent's own executable, to re-execute it as the helper even from
/// inside another mount namespace where its path does not exist.
pub fn own_executable() -> io::Result<OwnedFd> {
    let path = CString::new("/proc/self/exe").map_err(io::Error::other)?;
    // SAFETY: open(2) with a valid NUL-terminated path.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: open just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A pidfd for `pid` (which must be a child not yet reaped, see `Reaper::hold`).
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open has no memory arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// A connected pair of close-on-exec stream sockets (agent end, helper end).
pub fn control_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    Ok(socketpair(AddressFamily::Unix, SockType::Stream, None, SockFlag::SOCK_CLOEXEC)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_eof_is_none() {
        let mut buf = Vec::new();
        send(&mut buf, &Report::Failed("no such file".into())).expect("send");
        send(&mut buf, &Report::Ready).expect("send");
        let mut r = &buf[..];
        assert!(matches!(recv::<Report>(&mut r), Ok(Some(Report::Failed(m))) if m == "no such file"));
        assert!(matches!(recv::<Report>(&mut r), Ok(Some(Report::Ready))));
        assert!(matches!(recv::<Report>(&mut r), Ok(None)));
        let huge = (MAX_MESSAGE + 1).to_le_bytes();
        assert!(recv::<Report>(&mut &huge[..]).is_err());
        assert!(recv::<Report>(&mut &[2, 0, 0, 0, b'{', b'x'][..]).is_err());
    }
}
