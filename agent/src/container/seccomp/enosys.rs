//! runc's -ENOSYS stub (`libcontainer/seccomp/patchbpf`), put in front of the filter: a
//! system call numbered above the highest number the profile names, per listed ABI,
//! fails with ENOSYS instead of the default action. Newer C libraries try a new call
//! first and fall back only on ENOSYS (glibc's fchmodat2, clone3); with EPERM from a
//! profile older than the call they would fail instead. runc adds the stub unless the
//! default action lets calls through (ALLOW, LOG, TRACE), and only for the ABIs the
//! profile lists; the highest number counts every entry's names, whatever the action.

use oci_spec::runtime::{Arch, LinuxSeccomp, LinuxSeccompAction};

use super::bpf::{JA, JEQ_K, JGT_K, JSET_K, LD_W_ABS, RET_K};
use super::{
    Abi, Insn, SeccompError, AUDIT_ARCH_I386, AUDIT_ARCH_X86_64, IPC_CALLS, RET_ERRNO, SOCKETCALLS, X32_SYSCALL_BIT,
};

const ENOSYS: u32 = 38;

fn insn(code: u16, jt: u8, jf: u8, k: u32) -> Insn {
    Insn { code, jt, jf, k }
}

/// The highest number of any name in the profile for `abi` (None: the profile names none).
/// On i386 libseccomp resolves the socket and IPC calls to its pseudo numbers for the
/// multiplexers (negative), so runc's search passes over them.
fn highest(profile: &LinuxSeccomp, abi: Abi) -> Option<u32> {
    let names = profile.syscalls().iter().flatten().flat_map(|s| s.names());
    let multiplexed = |n: &str| abi == Abi::I386 && SOCKETCALLS.iter().chain(IPC_CALLS).any(|(m, _)| *m == n);
    names.filter(|n| !multiplexed(n)).filter_map(|n| abi.number(n)).max()
}

/// The stub, ending where the filter begins (empty when runc would add none).
pub(crate) fn stub(profile: &LinuxSeccomp) -> Result<Vec<Insn>, SeccompError> {
    use LinuxSeccompAction::*;
    if matches!(profile.default_action(), ScmpActAllow | ScmpActLog | ScmpActTrace) {
        return Ok(Vec::new());
    }
    // SCMP_ARCH_NATIVE is x86_64 here, as for runc on an x86_64 host.
    let native = |a: &Arch| if *a == Arch::ScmpArchNative { Arch::ScmpArchX86_64 } else { *a };
    let listed = |arch: Arch| profile.architectures().iter().flatten().any(|a| native(a) == arch);
    let last = |abi: Abi, arch: Arch| if listed(arch) { highest(profile, abi) } else { None };
    let ret_enosys = insn(RET_K, 0, 0, RET_ERRNO | ENOSYS);
    // Each section starts with the number loaded and ends with a jump to the filter,
    // whose offset is filled in below.
    let mut sections: Vec<(u32, Vec<Insn>)> = Vec::new();
    let ld_nr = insn(LD_W_ABS, 0, 0, 0);
    let native = last(Abi::X86_64, Arch::ScmpArchX86_64);
    let x32 = last(Abi::X32, Arch::ScmpArchX32);
    let x86_64 = match (native, x32) {
        (Some(n), Some(x)) => Some(vec![
            ld_nr,
            insn(JSET_K, 0, 1, X32_SYSCALL_BIT),
            insn(JGT_K, 1, 2, x),
            insn(JGT_K, 0, 1, n),
            ret_enosys,
        ]),
        // The other mode goes straight to the filter.
        (Some(n), None) => Some(vec![ld_nr, insn(JSET_K, 2, 0, X32_SYSCALL_BIT), insn(JGT_K, 0, 1, n), ret_enosys]),
        (None, Some(x)) => Some(vec![ld_nr, insn(JSET_K, 0, 2, X32_SYSCALL_BIT), insn(JGT_K, 0, 1, x), ret_enosys]),
        (None, None) => None,
    };
    sections.extend(x86_64.map(|s| (AUDIT_ARCH_X86_64, s)));
    if let Some(n) = last(Abi::I386, Arch::ScmpArchX86) {
        sections.push((AUDIT_ARCH_I386, vec![ld_nr, insn(JGT_K, 0, 1, n), ret_enosys]));
    }
    if sections.is_empty() {
        return Ok(Vec::new());
    }
    // ld arch; per section a compare that jumps to it; a jump to the filter (other
    // architectures); the sections, each ending in a jump to the filter.
    let mut prog = vec![insn(LD_W_ABS, 0, 0, 4)];
    let body_start = 1 + sections.len() + 1;
    let mut at = body_start;
    for (i, (arch, body)) in sections.iter().enumerate() {
        let jt = u8::try_from(at - (1 + i) - 1).map_err(|_| SeccompError::JumpTooFar)?;
        prog.push(insn(JEQ_K, jt, 0, *arch));
        at += body.len() + 1;
    }
    let total = at;
    prog.push(insn(JA, 0, 0, (total - prog.len() - 1) as u32));
    for (_, body) in sections {
        prog.extend(body);
        prog.push(insn(JA, 0, 0, (total - prog.len() - 1) as u32));
    }
    Ok(prog)
}
