//! OCI seccomp profiles compiled to classic BPF by the agent itself, with the semantics
//! runc gets from libseccomp.
//!
//! Why an own compiler and not libseccomp: the agent is a static musl binary (see
//! docs/agent.md) and Debian builds libseccomp for glibc only; linking it would mean
//! building libseccomp (and a C toolchain for musl) from source as part of the guest
//! image, as Kata does. The semantics are what matters, and they are small enough to
//! restate here; `libseccomp_diff` checks them against the real libseccomp (the host's
//! libseccomp-dev) over every system call number of every ABI, for containerd's default
//! profile and hand-made edge cases. seccompiler (rust-vmm) was no option: it compiles a
//! filter with a single match action, while OCI profiles mix actions.
//!
//! The semantics, as runc drives libseccomp (`libcontainer/seccomp/seccomp_linux.go`):
//! - ABIs: x86_64 always (libseccomp's native architecture, which runc never removes),
//!   plus the profile's `architectures`: SCMP_ARCH_X86 (i386, `int 0x80`, with the i386
//!   numbers) and SCMP_ARCH_X32 (x86_64 numbers with bit 30, with the x32 numbers). Other
//!   architectures are ignored: an x86_64 kernel never reports them. A call from an ABI
//!   not in the filter gets libseccomp's bad-arch action, KILL_THREAD; so do x32 calls
//!   (nr >= bit 30 on AUDIT_ARCH_X86_64, but not -1) when X32 is not listed.
//! - Names: a name is looked up per ABI; where the ABI has no such call the rule is
//!   skipped for that ABI (runc and libseccomp do the same: profiles list calls of all
//!   ABIs and kernel versions). On i386 the socket and SysV IPC calls also get a rule on
//!   the multiplexers socketcall/ipc with argument 0 equal to the call's number, as
//!   libseccomp adds.
//! - Actions as runc maps them: KILL and KILL_THREAD kill the thread, ERRNO and TRACE
//!   without `errnoRet` use EPERM, the errno is cut to 16 bits and an ERRNO from 4095 on
//!   refused (libseccomp's limit), rules whose action equals the default are dropped.
//!   NOTIFY is refused: no seccomp agent listens here.
//! - Rules of one call: the first unconditional rule wins over every other rule of that
//!   call (libseccomp keeps a call without argument chains as is, and replaces chains by a
//!   later unconditional rule). Conditional rules are ORed, each rule's conditions ANDed;
//!   a rule whose conditions share an argument index becomes one rule per condition, as
//!   runc does. Rules with another action and the same conditions (or conditions that
//!   begin another rule's) are refused, as by libseccomp. Other conditional rules of one
//!   call with different actions that match the same arguments are resolved by profile
//!   order here, by libseccomp's tree order there (no known profile has such rules).
//! - Comparisons are 64-bit on x86_64, 32-bit (the low halves) on i386 and x32, which
//!   libseccomp takes for a 32-bit ABI.
//! - Numbers without a rule get the default action, as from libseccomp; in front of the
//!   filter runc puts a stub that fails numbers above the highest one the profile names
//!   with ENOSYS, and so does the agent (`enosys`).

use std::collections::BTreeMap;

use oci_spec::runtime::{Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompOperator, LinuxSyscall};

mod bpf;
mod enosys;
#[cfg(test)]
mod libseccomp_diff;
#[rustfmt::skip]
mod syscalls_i386;
#[rustfmt::skip]
mod syscalls_x32;
#[rustfmt::skip]
mod syscalls_x86_64;
#[cfg(test)]
mod tests;

/// A BPF instruction (`struct sock_filter`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SeccompError {
    #[error("seccomp action {0} is not supported")]
    Action(String),
    #[error("seccomp: argument index {0} is out of range (0-5)")]
    ArgIndex(usize),
    #[error("seccomp: errnoRet {0} is out of range (libseccomp takes 0 to 4094)")]
    Errno(u32),
    #[error("seccomp: rules for {0} with other actions have the same conditions (libseccomp refuses them)")]
    Conflict(String),
    #[error("seccomp: the filter needs {0} instructions, more than the kernel's 4096")]
    TooLong(usize),
    #[error("seccomp: a rule's conditions need jumps longer than BPF allows")]
    JumpTooFar,
}

pub(crate) const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
pub(crate) const AUDIT_ARCH_I386: u32 = 0x4000_0003;
pub(crate) const X32_SYSCALL_BIT: u32 = 0x4000_0000;
/// libseccomp's default bad-arch action (SCMP_ACT_KILL, the thread); runc keeps it.
pub(crate) const RET_KILL_THREAD: u32 = 0x0000_0000;
const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_TRAP: u32 = 0x0003_0000;
pub(crate) const RET_ERRNO: u32 = 0x0005_0000;
const RET_TRACE: u32 = 0x7ff0_0000;
const RET_LOG: u32 = 0x7ffc_0000;
const RET_ALLOW: u32 = 0x7fff_0000;
const EPERM: u32 = 1;
const MAX_ERRNO: u32 = 4095;

/// An x86 ABI the filter has rules for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Abi {
    X86_64,
    X32,
    I386,
}

impl Abi {
    /// The number of a system call by name, as the kernel sees it in `seccomp_data.nr`.
    pub(crate) fn number(self, name: &str) -> Option<u32> {
        let (table, bit) = match self {
            Abi::X86_64 => (syscalls_x86_64::SYSCALLS, 0),
            Abi::X32 => (syscalls_x32::SYSCALLS, X32_SYSCALL_BIT),
            Abi::I386 => (syscalls_i386::SYSCALLS, 0),
        };
        table.binary_search_by(|(n, _)| n.cmp(&name)).ok().map(|i| table[i].1 | bit)
    }

    /// libseccomp takes i386 and x32 as 32-bit ABIs and compares only the low halves of
    /// arguments there (x32 passes 64-bit registers, but its pointers and longs are 32-bit).
    pub(crate) fn is_32bit(self) -> bool {
        matches!(self, Abi::I386 | Abi::X32)
    }
}

/// One argument condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Cond {
    pub index: u32,
    pub op: LinuxSeccompOperator,
    pub value: u64,
    /// MASKED_EQ's wanted value (`value` is the mask there).
    pub value_two: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Rule {
    pub conds: Vec<Cond>,
    pub ret: u32,
}

/// One ABI's rules: per system call number, the rules that apply, in profile order.
pub(crate) struct AbiRules {
    pub abi: Abi,
    pub calls: BTreeMap<u32, Vec<Rule>>,
}

/// A profile resolved to numbers: what `bpf::emit` turns into a program.
pub(crate) struct Filter {
    pub default: u32,
    /// x86_64 first; X32 and I386 when the profile lists them.
    pub abis: Vec<AbiRules>,
}

/// i386 socket calls multiplexed through socketcall(2) (arg 0: the call's number), as
/// libseccomp's x86 support adds them next to the direct calls (Linux 4.3 and later).
const SOCKETCALLS: &[(&str, u64)] = &[
    ("socket", 1),
    ("bind", 2),
    ("connect", 3),
    ("listen", 4),
    ("accept", 5),
    ("getsockname", 6),
    ("getpeername", 7),
    ("socketpair", 8),
    ("send", 9),
    ("recv", 10),
    ("sendto", 11),
    ("recvfrom", 12),
    ("shutdown", 13),
    ("setsockopt", 14),
    ("getsockopt", 15),
    ("sendmsg", 16),
    ("recvmsg", 17),
    ("accept4", 18),
    ("recvmmsg", 19),
    ("sendmmsg", 20),
];
/// i386 SysV IPC calls multiplexed through ipc(2) (arg 0: the call's number).
const IPC_CALLS: &[(&str, u64)] = &[
    ("semop", 1),
    ("semget", 2),
    ("semctl", 3),
    ("semtimedop", 4),
    ("msgsnd", 11),
    ("msgrcv", 12),
    ("msgget", 13),
    ("msgctl", 14),
    ("shmat", 21),
    ("shmdt", 22),
    ("shmget", 23),
    ("shmctl", 24),
];

impl AbiRules {
    /// Adds a rule for a call by name: nothing where this ABI has no such call.
    fn add_named(&mut self, name: &str, rule: &Rule) -> Result<(), SeccompError> {
        if let Some(nr) = self.abi.number(name) {
            self.add(name, nr, rule.clone())?;
        }
        if self.abi != Abi::I386 {
            return Ok(());
        }
        for (mux, calls) in [("socketcall", SOCKETCALLS), ("ipc", IPC_CALLS)] {
            if let Some(&(_, call)) = calls.iter().find(|(n, _)| *n == name) {
                // libseccomp rewrites argument 0 and keeps the rule's other conditions.
                let mut conds: Vec<Cond> = rule.conds.iter().filter(|c| c.index != 0).copied().collect();
                conds.push(Cond { index: 0, op: LinuxSeccompOperator::ScmpCmpEq, value: call, value_two: 0 });
                let nr = self.abi.number(mux).expect("the i386 table has socketcall and ipc");
                self.add(name, nr, Rule { conds, ret: rule.ret })?;
            }
        }
        Ok(())
    }

    /// libseccomp's merge for one call: a call that has an unconditional rule keeps it
    /// and ignores later rules; an unconditional rule replaces conditional ones. A
    /// conditional rule whose conditions equal, or begin, those of a rule with another
    /// action is refused (libseccomp: EEXIST, and runc fails the container).
    fn add(&mut self, name: &str, nr: u32, mut rule: Rule) -> Result<(), SeccompError> {
        rule.conds.sort_by_key(|c| c.index);
        if self.abi.is_32bit() {
            for c in &mut rule.conds {
                (c.value, c.value_two) = (c.value & 0xffff_ffff, c.value_two & 0xffff_ffff);
            }
        }
        let rules = self.calls.entry(nr).or_default();
        if rules.first().is_some_and(|r| r.conds.is_empty()) {
            return Ok(());
        }
        if rule.conds.is_empty() {
            rules.clear();
        } else if rules.iter().any(|r| r.ret != rule.ret && r.conds.starts_with(&rule.conds)) {
            return Err(SeccompError::Conflict(name.to_string()));
        }
        rules.push(rule);
        Ok(())
    }
}

/// The return value of an action, as runc maps OCI actions to libseccomp's.
fn action(action: LinuxSeccompAction, errno: Option<u32>) -> Result<u32, SeccompError> {
    // runc passes the errno as an int16 (the low 16 bits, SECCOMP_RET_DATA); libseccomp
    // refuses an ERRNO action whose errno is not below MAX_ERRNO (4095).
    let data = errno.unwrap_or(EPERM) & 0xffff;
    Ok(match action {
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => RET_KILL_THREAD,
        LinuxSeccompAction::ScmpActKillProcess => RET_KILL_PROCESS,
        LinuxSeccompAction::ScmpActTrap => RET_TRAP,
        LinuxSeccompAction::ScmpActErrno if data >= MAX_ERRNO => {
            return Err(SeccompError::Errno(errno.unwrap_or(EPERM)))
        }
        LinuxSeccompAction::ScmpActErrno => RET_ERRNO | data,
        LinuxSeccompAction::ScmpActTrace => RET_TRACE | data,
        LinuxSeccompAction::ScmpActLog => RET_LOG,
        LinuxSeccompAction::ScmpActAllow => RET_ALLOW,
        // User notification needs a seccomp agent on a socket; none exists here.
        LinuxSeccompAction::ScmpActNotify => return Err(SeccompError::Action("SCMP_ACT_NOTIFY".into())),
    })
}

/// A profile entry's conditions: one rule with all of them, or, when two share an
/// argument index, one rule per condition (runc's rule for libseccomp, which cannot
/// chain two comparisons of one argument).
fn rule_conditions(entry: &LinuxSyscall) -> Result<Vec<Vec<Cond>>, SeccompError> {
    let mut conds = Vec::new();
    for arg in entry.args().iter().flatten() {
        if arg.index() > 5 {
            return Err(SeccompError::ArgIndex(arg.index()));
        }
        conds.push(Cond {
            index: arg.index() as u32,
            op: arg.op(),
            value: arg.value(),
            value_two: arg.value_two().unwrap_or(0),
        });
    }
    let shared = conds.iter().enumerate().any(|(i, c)| conds[..i].iter().any(|d| d.index == c.index));
    Ok(if shared { conds.into_iter().map(|c| vec![c]).collect() } else { vec![conds] })
}

/// Resolves a profile to per-ABI rules by system call number.
pub(crate) fn resolve(profile: &LinuxSeccomp) -> Result<Filter, SeccompError> {
    let default = action(profile.default_action(), profile.default_errno_ret())?;
    let mut abis = vec![AbiRules { abi: Abi::X86_64, calls: BTreeMap::new() }];
    for arch in profile.architectures().iter().flatten() {
        let abi = match arch {
            Arch::ScmpArchNative | Arch::ScmpArchX86_64 => Abi::X86_64,
            Arch::ScmpArchX86 => Abi::I386,
            Arch::ScmpArchX32 => Abi::X32,
            // Rules for other architectures could never match on an x86_64 kernel.
            _ => continue,
        };
        if !abis.iter().any(|a| a.abi == abi) {
            abis.push(AbiRules { abi, calls: BTreeMap::new() });
        }
    }
    for entry in profile.syscalls().iter().flatten() {
        let ret = action(entry.action(), entry.errno_ret())?;
        let rules = rule_conditions(entry)?;
        if ret == default {
            // runc drops these (libseccomp refuses a rule with the default action).
            continue;
        }
        for name in entry.names() {
            for abi in &mut abis {
                for conds in &rules {
                    abi.add_named(name, &Rule { conds: conds.clone(), ret })?;
                }
            }
        }
    }
    Ok(Filter { default, abis })
}

/// Compiles a profile to a BPF program for `install`: runc's ENOSYS stub, then the
/// filter libseccomp would make.
pub fn compile(profile: &LinuxSeccomp) -> Result<Vec<Insn>, SeccompError> {
    let mut prog = enosys::stub(profile)?;
    prog.append(&mut libseccomp_equivalent(profile)?);
    if prog.len() > bpf::MAX_INSNS {
        return Err(SeccompError::TooLong(prog.len()));
    }
    Ok(prog)
}

/// The filter alone, as libseccomp compiles the profile under runc.
pub(crate) fn libseccomp_equivalent(profile: &LinuxSeccomp) -> Result<Vec<Insn>, SeccompError> {
    bpf::emit(&resolve(profile)?)
}

/// Installs the filter on the calling process (which must have no_new_privs set or
/// CAP_SYS_ADMIN).
pub fn install(prog: &[Insn]) -> std::io::Result<()> {
    let filters: Vec<libc::sock_filter> =
        prog.iter().map(|i| libc::sock_filter { code: i.code, jt: i.jt, jf: i.jf, k: i.k }).collect();
    let fprog = libc::sock_fprog {
        len: u16::try_from(filters.len()).map_err(|_| std::io::Error::other("filter too long"))?,
        filter: filters.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: fprog points at `filters`, alive for the call; the kernel copies the program.
    let rc = unsafe {
        libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, 0, &fprog as *const libc::sock_fprog)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
