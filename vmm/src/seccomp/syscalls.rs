//! The system calls each thread kind may make (x86_64, glibc, Rust std), found by tracing
//! the VMM through the real suites (boot, restore, snapshot, vsock, virtio-fs, net, the
//! control API), and the diagnostic SIGSYS handler of [`super::Mode::Log`].

use super::kind::{self, ThreadKind};
use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI32, Ordering};

/// The call the control API's self-test makes: no thread's list has it.
pub const FORBIDDEN: i64 = libc::SYS_personality;

/// Every thread: memory, locks, signals, time, exit, its name, stderr.
const BASE: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_getrandom,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_restart_syscall,
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_fcntl,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_newfstatat,
    libc::SYS_lseek,
];

/// Creating a thread (the new thread runs its start-up under its creator's filter).
const SPAWN: &[i64] = &[libc::SYS_clone, libc::SYS_clone3];

/// Device workers: event loops, eventfds, sockets (vsock's host side), the tap, and the
/// host files virtio-fs serves (with the guest's credentials per request).
const DEVICE: &[i64] = &[
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    libc::SYS_readv,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_accept4,
    libc::SYS_shutdown,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_openat,
    libc::SYS_getdents64,
    libc::SYS_readlinkat,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_unlinkat,
    libc::SYS_symlinkat,
    libc::SYS_linkat,
    libc::SYS_renameat2,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_utimensat,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fstatfs,
    libc::SYS_flock,
    libc::SYS_fadvise64,
    libc::SYS_copy_file_range,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_umask,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_getxattr,
    libc::SYS_lgetxattr,
    libc::SYS_fgetxattr,
    libc::SYS_setxattr,
    libc::SYS_lsetxattr,
    libc::SYS_fsetxattr,
    libc::SYS_listxattr,
    libc::SYS_llistxattr,
    libc::SYS_flistxattr,
    libc::SYS_removexattr,
    libc::SYS_lremovexattr,
    libc::SYS_fremovexattr,
];

/// The control API: accept a connection, read a line, answer.
const API: &[i64] = &[libc::SYS_accept4, libc::SYS_accept, libc::SYS_recvfrom, libc::SYS_sendto, libc::SYS_shutdown];

/// The main thread after start-up: KVM state for snapshots, the snapshot's files, the
/// sockets it removes at the end.
const MAIN: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_pwrite64,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_getdents64,
];

/// ioctl request types (bits 8-15 of the request): KVM's, and 'T' (the tap's TUNSET*,
/// and FIONBIO/FIOCLEX).
const IOCTL_KVM: u64 = 0xAE;
const IOCTL_TUN: u64 = b'T' as u64;

fn ioctl_types(types: &[u64]) -> Result<Vec<SeccompRule>, String> {
    types
        .iter()
        .map(|t| {
            let cond = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::MaskedEq(0xff00), t << 8)
                .map_err(|e| e.to_string())?;
            SeccompRule::new(vec![cond]).map_err(|e| e.to_string())
        })
        .collect()
}

/// prctl only to name the thread (PR_SET_NAME) or read the name, and for the launcher,
/// whose new threads install their filter under its own, PR_SET_NO_NEW_PRIVS (which only
/// takes privileges away).
fn prctl_ops(kind: ThreadKind) -> Result<Vec<SeccompRule>, String> {
    let mut ops = vec![libc::PR_SET_NAME, libc::PR_GET_NAME];
    if kind == ThreadKind::Launcher {
        ops.push(libc::PR_SET_NO_NEW_PRIVS);
    }
    ops.iter()
        .map(|op| {
            let cond = SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, *op as u64)
                .map_err(|e| e.to_string())?;
            SeccompRule::new(vec![cond]).map_err(|e| e.to_string())
        })
        .collect()
}

/// The rules of `kind`: calls allowed whatever their arguments, and ioctl and prctl
/// allowed only for some requests.
pub fn rules(kind: ThreadKind) -> Result<BTreeMap<i64, Vec<SeccompRule>>, String> {
    let (lists, ioctls): (Vec<&[i64]>, &[u64]) = match kind {
        ThreadKind::Main => (vec![BASE, MAIN], &[IOCTL_KVM]),
        ThreadKind::Vcpu => (vec![BASE], &[IOCTL_KVM]),
        ThreadKind::Device => (vec![BASE, DEVICE], &[IOCTL_TUN]),
        ThreadKind::Launcher => (vec![BASE, DEVICE, SPAWN], &[IOCTL_TUN]),
        ThreadKind::Api => (vec![BASE, API], &[]),
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = lists.into_iter().flatten().map(|nr| (*nr, Vec::new())).collect();
    if !ioctls.is_empty() {
        rules.insert(libc::SYS_ioctl, ioctl_types(ioctls)?);
    }
    rules.insert(libc::SYS_prctl, prctl_ops(kind)?);
    if kind == ThreadKind::Launcher {
        // Adding a filter only narrows what the thread may do.
        rules.insert(libc::SYS_seccomp, Vec::new());
    }
    Ok(rules)
}

/// Where the diagnostic handler writes: stderr, or a file opened before the jail.
static LOG_FD: AtomicI32 = AtomicI32::new(2);

/// Installs the SIGSYS handler of the diagnostic mode, writing to `log` (else stderr).
pub fn install_log_handler(log: Option<std::fs::File>) {
    if let Some(file) = log {
        LOG_FD.store(std::os::fd::IntoRawFd::into_raw_fd(file), Ordering::Relaxed);
    }
    // SAFETY: a plain sigaction with a handler that only calls write(2) and edits the
    // interrupted context it is given.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = log_forbidden as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut());
    }
}

/// Writes `nestbox-vmm: seccomp: <kind> thread made system call <nr>` and makes the call
/// fail with ENOSYS. Async-signal-safe: no allocation, no lock.
extern "C" fn log_forbidden(_: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: for SIGSYS the kernel fills siginfo's _sigsys member: the call's address
    // (8 bytes at offset 16), then its number (4 bytes at offset 24).
    let nr = unsafe { std::ptr::read_unaligned((info as *const u8).add(24) as *const i32) };
    let kind = kind::current().map_or("unfiltered", ThreadKind::name);
    let mut buf = [0u8; 128];
    let mut len = 0;
    for part in [b"nestbox-vmm: seccomp: ".as_slice(), kind.as_bytes(), b" thread made system call ".as_slice()] {
        buf[len..len + part.len()].copy_from_slice(part);
        len += part.len();
    }
    let mut digits = [0u8; 12];
    let mut n = nr.unsigned_abs();
    let mut d = digits.len();
    loop {
        d -= 1;
        digits[d] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &b in &digits[d..] {
        buf[len] = b;
        len += 1;
    }
    buf[len] = b'\n';
    len += 1;
    // SAFETY: write(2) of our own buffer; the context is the interrupted thread's, whose
    // RAX holds the call's return value.
    unsafe {
        libc::write(LOG_FD.load(Ordering::Relaxed), buf.as_ptr().cast(), len);
        let uc = context as *mut libc::ucontext_t;
        (*uc).uc_mcontext.gregs[libc::REG_RAX as usize] = -(libc::ENOSYS as i64);
    }
}
