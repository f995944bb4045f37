//! OCI seccomp profiles compiled to classic BPF by the agent itself.
//!
//! libseccomp is what runc and youki use, but Debian builds it for glibc only and the
//! agent is a static musl binary (see docs/agent.md); seccompiler (rust-vmm) compiles a
//! filter with a single match action, while OCI profiles mix actions (ALLOW for most
//! calls, ERRNO with a chosen errno for some, KILL for others). So the agent has a small
//! compiler of its own: a linear program where the first matching rule wins, with full
//! 64-bit argument comparisons.
//!
//! Program layout: check the architecture (x86_64 only; any other audit arch, i386
//! `int 0x80` calls included, kills the process, as libseccomp's default bad-arch action
//! does), send x32 system calls (bit 30) to the default action, then one block per
//! (rule, system call) that loads the number, compares, checks the arguments, and returns
//! the rule's action; at the end the default action.

use oci_spec::runtime::{LinuxSeccomp, LinuxSeccompAction, LinuxSeccompOperator, LinuxSyscall};

use super::syscalls_x86_64::SYSCALLS;

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
    #[error("seccomp: the filter needs {0} instructions, more than the kernel's 4096")]
    TooLong(usize),
    #[error("seccomp: architecture {0} is not supported (only x86_64)")]
    Arch(String),
    #[error("seccomp: a rule's conditions need jumps longer than BPF allows")]
    JumpTooFar,
}

const BPF_LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const BPF_JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const BPF_JGT_K: u16 = (libc::BPF_JMP | libc::BPF_JGT | libc::BPF_K) as u16;
const BPF_JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
const BPF_JSET_K: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
const BPF_AND_K: u16 = (libc::BPF_ALU | libc::BPF_AND | libc::BPF_K) as u16;
const BPF_RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
const SECCOMP_RET_KILL_PROCESS: u32 = 0x8000_0000;
/// Offsets in `struct seccomp_data`.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const OFF_ARGS: u32 = 16;
const MAX_INSNS: usize = 4096;

fn stmt(code: u16, k: u32) -> Insn {
    Insn { code, jt: 0, jf: 0, k }
}

/// A jump target while a rule's block is assembled.
#[derive(Clone, Copy)]
enum Target {
    /// The next instruction.
    Next,
    /// The end of the current argument condition (it holds).
    Pass,
    /// The end of the rule block (the rule does not match).
    Fail,
}

struct Jump {
    code: u16,
    k: u32,
    jt: Target,
    jf: Target,
}

enum Item {
    Stmt(Insn),
    Jump(Jump),
    /// Marks the end of an argument condition (resolves `Pass`).
    CondEnd,
}

fn syscall_number(name: &str) -> Option<u32> {
    SYSCALLS.binary_search_by(|(n, _)| n.cmp(&name)).ok().map(|i| SYSCALLS[i].1)
}

fn action(action: LinuxSeccompAction, errno: Option<u32>) -> Result<u32, SeccompError> {
    match action {
        // User notification needs a seccomp agent on a socket; none exists here.
        LinuxSeccompAction::ScmpActNotify => Err(SeccompError::Action("SCMP_ACT_NOTIFY".into())),
        // ERRNO without errnoRet is EPERM (as runc does); as_u32 encodes that.
        other => Ok(other.as_u32(errno)),
    }
}

/// Compiles a profile. System call names this kernel's table does not know are skipped,
/// as runc does (profiles list calls of newer and older kernels alike).
pub fn compile(profile: &LinuxSeccomp) -> Result<Vec<Insn>, SeccompError> {
    if let Some(archs) = profile.architectures() {
        for arch in archs {
            let name = serde_json::to_string(arch).unwrap_or_default();
            // Listing the 32-bit x86 ABIs is normal (Docker's profile does); their calls
            // are refused by the architecture check, so they need no rules.
            if !matches!(name.trim_matches('"'), "SCMP_ARCH_X86_64" | "SCMP_ARCH_X86" | "SCMP_ARCH_X32") {
                return Err(SeccompError::Arch(name));
            }
        }
    }
    let default = action(profile.default_action(), profile.default_errno_ret())?;
    let mut prog = vec![
        stmt(BPF_LD_W_ABS, OFF_ARCH),
        Insn { code: BPF_JEQ_K, jt: 1, jf: 0, k: AUDIT_ARCH_X86_64 },
        stmt(BPF_RET_K, SECCOMP_RET_KILL_PROCESS),
        stmt(BPF_LD_W_ABS, OFF_NR),
        Insn { code: BPF_JSET_K, jt: 0, jf: 1, k: X32_SYSCALL_BIT },
        stmt(BPF_RET_K, default),
    ];
    for rule in profile.syscalls().iter().flatten() {
        let ret = action(rule.action(), rule.errno_ret())?;
        for name in rule.names() {
            let Some(nr) = syscall_number(name) else { continue };
            prog.extend(rule_block(rule, nr, ret)?);
            if prog.len() > MAX_INSNS {
                return Err(SeccompError::TooLong(prog.len()));
            }
        }
    }
    prog.push(stmt(BPF_RET_K, default));
    if prog.len() > MAX_INSNS {
        return Err(SeccompError::TooLong(prog.len()));
    }
    Ok(prog)
}

/// One rule for one system call: `nr` compared, arguments checked, `ret` returned; the
/// block ends by reloading the number for the next block (the argument checks overwrite
/// the accumulator).
fn rule_block(rule: &LinuxSyscall, nr: u32, ret: u32) -> Result<Vec<Insn>, SeccompError> {
    let mut items = vec![Item::Jump(Jump { code: BPF_JEQ_K, k: nr, jt: Target::Next, jf: Target::Fail })];
    for arg in rule.args().iter().flatten() {
        if arg.index() > 5 {
            return Err(SeccompError::ArgIndex(arg.index()));
        }
        let lo_off = OFF_ARGS + 8 * arg.index() as u32;
        let hi_off = lo_off + 4;
        let (v_hi, v_lo) = ((arg.value() >> 32) as u32, arg.value() as u32);
        let ld = |off| Item::Stmt(stmt(BPF_LD_W_ABS, off));
        let j = |code, k, jt, jf| Item::Jump(Jump { code, k, jt, jf });
        use Target::*;
        match arg.op() {
            LinuxSeccompOperator::ScmpCmpEq => {
                items.extend([ld(hi_off), j(BPF_JEQ_K, v_hi, Next, Fail), ld(lo_off), j(BPF_JEQ_K, v_lo, Pass, Fail)])
            }
            LinuxSeccompOperator::ScmpCmpNe => {
                items.extend([ld(hi_off), j(BPF_JEQ_K, v_hi, Next, Pass), ld(lo_off), j(BPF_JEQ_K, v_lo, Fail, Pass)])
            }
            LinuxSeccompOperator::ScmpCmpGt => items.extend([
                ld(hi_off),
                j(BPF_JGT_K, v_hi, Pass, Next),
                j(BPF_JEQ_K, v_hi, Next, Fail),
                ld(lo_off),
                j(BPF_JGT_K, v_lo, Pass, Fail),
            ]),
            LinuxSeccompOperator::ScmpCmpGe => items.extend([
                ld(hi_off),
                j(BPF_JGT_K, v_hi, Pass, Next),
                j(BPF_JEQ_K, v_hi, Next, Fail),
                ld(lo_off),
                j(BPF_JGE_K, v_lo, Pass, Fail),
            ]),
            LinuxSeccompOperator::ScmpCmpLt => items.extend([
                ld(hi_off),
                j(BPF_JGE_K, v_hi, Next, Pass),
                j(BPF_JEQ_K, v_hi, Next, Fail),
                ld(lo_off),
                j(BPF_JGE_K, v_lo, Fail, Pass),
            ]),
            LinuxSeccompOperator::ScmpCmpLe => items.extend([
                ld(hi_off),
                j(BPF_JGE_K, v_hi, Next, Pass),
                j(BPF_JEQ_K, v_hi, Next, Fail),
                ld(lo_off),
                j(BPF_JGT_K, v_lo, Fail, Pass),
            ]),
            LinuxSeccompOperator::ScmpCmpMaskedEq => {
                // OCI: value is the mask, valueTwo the value the masked argument must equal.
                let mask = arg.value();
                let want = arg.value_two().unwrap_or(0);
                items.extend([
                    ld(hi_off),
                    Item::Stmt(stmt(BPF_AND_K, (mask >> 32) as u32)),
                    j(BPF_JEQ_K, (want >> 32) as u32, Next, Fail),
                    ld(lo_off),
                    Item::Stmt(stmt(BPF_AND_K, mask as u32)),
                    j(BPF_JEQ_K, want as u32, Pass, Fail),
                ])
            }
        }
        items.push(Item::CondEnd);
    }
    items.push(Item::Stmt(stmt(BPF_RET_K, ret)));
    assemble(items)
}

/// Resolves the targets of a block into relative jumps. The block's last instruction
/// (appended here) reloads the system call number: `Fail` jumps there.
fn assemble(items: Vec<Item>) -> Result<Vec<Insn>, SeccompError> {
    // Instruction index of each item, and of each condition's end.
    let mut index = Vec::with_capacity(items.len());
    let mut cond_ends = Vec::new();
    let mut n = 0usize;
    for item in &items {
        index.push(n);
        match item {
            Item::CondEnd => cond_ends.push(n),
            _ => n += 1,
        }
    }
    let fail = n; // the reload appended below
    let mut out = Vec::with_capacity(n + 1);
    let mut cond = 0;
    for (i, item) in items.iter().enumerate() {
        match item {
            Item::Stmt(insn) => out.push(*insn),
            Item::CondEnd => cond += 1,
            Item::Jump(jump) => {
                let at = index[i];
                let resolve = |t: Target| -> Result<u8, SeccompError> {
                    let to = match t {
                        Target::Next => at + 1,
                        Target::Pass => *cond_ends.get(cond).ok_or(SeccompError::JumpTooFar)?,
                        Target::Fail => fail,
                    };
                    u8::try_from(to - at - 1).map_err(|_| SeccompError::JumpTooFar)
                };
                out.push(Insn { code: jump.code, jt: resolve(jump.jt)?, jf: resolve(jump.jf)?, k: jump.k });
            }
        }
    }
    out.push(stmt(BPF_LD_W_ABS, OFF_NR));
    Ok(out)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A classic-BPF interpreter for what `compile` emits, to check the programs' meaning.
    fn run(prog: &[Insn], arch: u32, nr: u32, args: [u64; 6]) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_le_bytes());
        data[4..8].copy_from_slice(&arch.to_le_bytes());
        for (i, a) in args.iter().enumerate() {
            data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
        }
        let (mut pc, mut acc) = (0usize, 0u32);
        loop {
            let insn = prog[pc];
            pc += 1;
            let jump = |cond: bool| if cond { insn.jt as usize } else { insn.jf as usize };
            match insn.code {
                BPF_LD_W_ABS => {
                    let k = insn.k as usize;
                    acc = u32::from_le_bytes(data[k..k + 4].try_into().unwrap());
                }
                BPF_AND_K => acc &= insn.k,
                BPF_JEQ_K => pc += jump(acc == insn.k),
                BPF_JGT_K => pc += jump(acc > insn.k),
                BPF_JGE_K => pc += jump(acc >= insn.k),
                BPF_JSET_K => pc += jump(acc & insn.k != 0),
                BPF_RET_K => return insn.k,
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    fn profile(json: &str) -> LinuxSeccomp {
        serde_json::from_str(json).expect("profile JSON")
    }

    const ALLOW: u32 = 0x7fff_0000;
    const EPERM: u32 = 0x0005_0001;

    #[test]
    fn names_actions_and_default() {
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_X86_64","SCMP_ARCH_X86"],
                "syscalls":[{"names":["mkdir","mkdirat","no_such_call"],"action":"SCMP_ACT_ERRNO"},
                            {"names":["getpid"],"action":"SCMP_ACT_ERRNO","errnoRet":38},
                            {"names":["kill"],"action":"SCMP_ACT_KILL_PROCESS"}]}"#,
        );
        let prog = compile(&p).expect("compiles");
        let nr = |n| syscall_number(n).expect("known call");
        assert_eq!(run(&prog, AUDIT_ARCH_X86_64, nr("mkdir"), [0; 6]), EPERM);
        assert_eq!(run(&prog, AUDIT_ARCH_X86_64, nr("mkdirat"), [0; 6]), EPERM);
        assert_eq!(run(&prog, AUDIT_ARCH_X86_64, nr("getpid"), [0; 6]), 0x0005_0000 | 38);
        assert_eq!(run(&prog, AUDIT_ARCH_X86_64, nr("kill"), [0; 6]), SECCOMP_RET_KILL_PROCESS);
        assert_eq!(run(&prog, AUDIT_ARCH_X86_64, nr("read"), [0; 6]), ALLOW);
        assert_eq!(run(&prog, 0x4000_0003, nr("mkdir"), [0; 6]), SECCOMP_RET_KILL_PROCESS, "i386 is refused");
        assert_eq!(run(&prog, AUDIT_ARCH_X86_64, nr("mkdir") | X32_SYSCALL_BIT, [0; 6]), ALLOW, "x32: default");
    }

    #[test]
    fn argument_comparisons_are_64_bit() {
        let big = 0x1_0000_0005u64;
        for (op, value, cases) in [
            ("SCMP_CMP_EQ", big, vec![(big, true), (5, false), (big + 1, false)]),
            ("SCMP_CMP_NE", big, vec![(big, false), (5, true), (0x2_0000_0005, true)]),
            ("SCMP_CMP_GT", big, vec![(big, false), (big + 1, true), (0x2_0000_0000, true), (0xffff_ffff, false)]),
            ("SCMP_CMP_GE", big, vec![(big, true), (big - 1, false), (0x2_0000_0000, true), (6, false)]),
            ("SCMP_CMP_LT", big, vec![(big, false), (big - 1, true), (0xffff_ffff, true), (0x2_0000_0000, false)]),
            ("SCMP_CMP_LE", big, vec![(big, true), (big + 1, false), (0, true), (0x1_0000_0006, false)]),
        ] {
            let p = profile(&format!(
                r#"{{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{{"names":["personality"],
                    "action":"SCMP_ACT_ERRNO","args":[{{"index":1,"value":{value},"op":"{op}"}}]}}]}}"#
            ));
            let prog = compile(&p).expect("compiles");
            for (arg, denied) in cases {
                let got = run(&prog, AUDIT_ARCH_X86_64, syscall_number("personality").unwrap(), [0, arg, 0, 0, 0, 0]);
                assert_eq!(got == EPERM, denied, "{op} {value:#x} against {arg:#x}");
            }
        }
        // Masked equality, and two conditions that must both hold.
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[{"names":["clone"],"action":"SCMP_ACT_ALLOW",
                "args":[{"index":0,"value":2114060288,"valueTwo":0,"op":"SCMP_CMP_MASKED_EQ"},
                        {"index":2,"value":7,"op":"SCMP_CMP_EQ"}]}]}"#,
        );
        let prog = compile(&p).expect("compiles");
        let clone = syscall_number("clone").unwrap();
        assert_eq!(run(&prog, AUDIT_ARCH_X86_64, clone, [0x11, 0, 7, 0, 0, 0]), ALLOW);
        assert_eq!(run(&prog, AUDIT_ARCH_X86_64, clone, [0x1000_0000, 0, 7, 0, 0, 0]), EPERM, "CLONE_NEWUSER");
        assert_eq!(run(&prog, AUDIT_ARCH_X86_64, clone, [0x11, 0, 8, 0, 0, 0]), EPERM);
    }

    #[test]
    fn unsupported_profiles_are_errors() {
        let notify = profile(r#"{"defaultAction":"SCMP_ACT_NOTIFY"}"#);
        assert!(matches!(compile(&notify), Err(SeccompError::Action(_))));
        let arm = profile(r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_AARCH64"]}"#);
        assert!(matches!(compile(&arm), Err(SeccompError::Arch(_))));
        let bad_index = profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["read"],"action":"SCMP_ACT_ERRNO",
                "args":[{"index":6,"value":1,"op":"SCMP_CMP_EQ"}]}]}"#,
        );
        assert_eq!(compile(&bad_index), Err(SeccompError::ArgIndex(6)));
        assert_eq!(syscall_number("read"), Some(0));
        assert_eq!(syscall_number("openat2"), Some(437));
    }
}
