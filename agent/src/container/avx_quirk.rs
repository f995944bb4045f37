//! A guest that cannot keep its processes' AVX registers apart, and the glibc tunables
//! that keep container programs off them.
//!
//! On a software-nested KVM host (kvm_pvm, docs/host-notes in the design notes; the VMM's
//! `pvm` CPU template) the guest kernel runs with `noxsave`: its own XSAVE would have to be
//! emulated, which the host's emulator cannot do. So it saves only the x87/SSE state when
//! it switches tasks. Guest user space, though, runs on the real CPU, sees the host's CPUID
//! and XCR0 (AVX enabled) and cannot be told otherwise (the VMM's KVM_SET_XCRS is not what
//! user space reads there: measured). glibc picks AVX string functions from that CPUID, so
//! two glibc processes in a guest clobber each other's upper YMM halves at task switches:
//! rare, random segfaults and bad data (seen as busybox crashing inside strtol in critest).
//! musl (the agent) uses no AVX.
//!
//! Where exactly that holds (the CPU says AVX state is enabled, and the kernel was booted
//! with `noxsave`; decided once when the agent starts, from the command line it has read),
//! the helper adds glibc's own switch, `GLIBC_TUNABLES` with these
//! features turned off, to the container process's environment: glibc then uses its SSE
//! functions, whose registers the kernel does save. Static glibc binaries read it too.
//! Hardware KVM boots without `noxsave`, so nothing changes there. A `GLIBC_TUNABLES` the
//! spec already sets is kept after ours (later settings win in glibc's parser).

/// The glibc 2.26+ tunable that turns off AVX use in its string and math functions.
pub const AVX_OFF: &str = "glibc.cpu.hwcaps=-AVX,-AVX2,-AVX_Fast_Unaligned_Load,-FMA,-FMA4";

const TUNABLES_VAR: &str = "GLIBC_TUNABLES=";
/// XCR0 bits of the SSE and AVX (upper YMM) register states.
const XCR0_SSE_AVX: u64 = 0b110;

/// Whether this guest's kernel leaves the AVX state that its CPU enables unsaved:
/// `cmdline` (the kernel's, /proc/cmdline) has `noxsave` while the CPU reports AVX with
/// OS-enabled XSAVE and XCR0 has the AVX state on.
pub fn ymm_unsaved(cmdline: &str) -> bool {
    cmdline.split_whitespace().any(|p| p == "noxsave") && cpu_enables_avx_state()
}

fn cpu_enables_avx_state() -> bool {
    let leaf1 = std::arch::x86_64::__cpuid(1);
    let (osxsave, avx) = (leaf1.ecx & (1 << 27) != 0, leaf1.ecx & (1 << 28) != 0);
    if !(osxsave && avx) {
        return false;
    }
    let (lo, hi): (u32, u32);
    // SAFETY: XGETBV with ECX = 0 reads XCR0; it is valid because CPUID reports OSXSAVE
    // (the OS has enabled XSAVE and XGETBV), and it touches no memory.
    unsafe { std::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    (u64::from(hi) << 32 | u64::from(lo)) & XCR0_SSE_AVX == XCR0_SSE_AVX
}

/// `env` with [`AVX_OFF`] in front of any `GLIBC_TUNABLES` it has (or as a new one).
pub fn with_avx_off(mut env: Vec<String>) -> Vec<String> {
    match env.iter_mut().find(|e| e.starts_with(TUNABLES_VAR)) {
        Some(var) => {
            let theirs = &var[TUNABLES_VAR.len()..];
            *var = if theirs.is_empty() {
                format!("{TUNABLES_VAR}{AVX_OFF}")
            } else {
                format!("{TUNABLES_VAR}{AVX_OFF}:{theirs}")
            };
        }
        None => env.push(format!("{TUNABLES_VAR}{AVX_OFF}")),
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tunable_is_added_or_put_in_front_of_the_specs_own() {
        let added = with_avx_off(vec!["PATH=/bin".into()]);
        assert_eq!(added, ["PATH=/bin".to_string(), format!("GLIBC_TUNABLES={AVX_OFF}")]);
        let theirs = with_avx_off(vec!["GLIBC_TUNABLES=glibc.malloc.check=3".into(), "A=b".into()]);
        assert_eq!(theirs, [format!("GLIBC_TUNABLES={AVX_OFF}:glibc.malloc.check=3"), "A=b".to_string()]);
        assert_eq!(with_avx_off(vec!["GLIBC_TUNABLES=".into()]), [format!("GLIBC_TUNABLES={AVX_OFF}")]);
    }

    #[test]
    fn only_a_noxsave_kernel_counts() {
        assert!(!ymm_unsaved("console=ttyS0 quiet"), "a kernel that saves XSAVE state");
        assert!(!ymm_unsaved("xnoxsave"), "a word, not a substring");
        // With noxsave it depends on this CPU: it must agree with what CPUID says here.
        let cpu_has_avx = std::arch::is_x86_feature_detected!("avx");
        assert_eq!(ymm_unsaved("console=ttyS0 noxsave"), cpu_has_avx);
    }
}
