//! The CPUID a guest sees: KVM's supported set, normalised so every vCPU reports its own
//! APIC ID and a consistent topology, minus what the VMM does not emulate; and CPU
//! templates that hide more where the host's KVM cannot run some instructions.

use kvm_bindings::kvm_cpuid_entry2;
use std::path::Path;

/// Which features to hide from the guest beyond the normalisation every guest gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CpuTemplate {
    /// `pvm` where the host's KVM is software-nested (kvm_pvm), otherwise `none`.
    Auto,
    /// Everything KVM supports.
    None,
    /// For software-nested KVM (kvm_pvm), which runs guest ring 0 in an instruction
    /// emulator: hides the instructions that emulator cannot run.
    Pvm,
}

impl CpuTemplate {
    /// Resolves `Auto` by looking at the host.
    pub fn resolve(self) -> CpuTemplate {
        match self {
            CpuTemplate::Auto if host_kvm_is_pvm() => CpuTemplate::Pvm,
            CpuTemplate::Auto => CpuTemplate::None,
            other => other,
        }
    }

    /// Kernel parameters the template needs. Some features cannot be hidden through
    /// KVM_SET_CPUID2 on kvm_pvm (leaf 7 and several leaf 1 bits come from the host
    /// whatever the VMM sets), so the guest kernel is told to ignore them as well.
    /// `nopvspin`: no halting on contended spinlocks (see the PV_UNHALT note below).
    /// RCU stall warnings are suppressed: the emulated kernel is slow enough to trip them
    /// in long initcalls, and a warning's NMI backtrace of the other vCPUs only makes a
    /// slow boot slower.
    pub fn kernel_params(self) -> &'static str {
        match self {
            CpuTemplate::Pvm => {
                "noxsave clearcpuid=cx16,smap,smep,popcnt,fsgsbase,rdpid,pcid,invpcid,rdrand,rdseed,umip \
                 mitigations=off nopvspin rcupdate.rcu_cpu_stall_suppress=1"
            }
            _ => "",
        }
    }
}

/// kvm_pvm is the module that provides /dev/kvm without hardware virtualization.
pub fn host_kvm_is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

// Leaf 1
const LEAF1_ECX_CX16: u32 = 1 << 13;
const LEAF1_ECX_PCID: u32 = 1 << 17;
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const LEAF1_ECX_POPCNT: u32 = 1 << 23;
const LEAF1_ECX_XSAVE: u32 = 1 << 26;
const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;
const LEAF1_ECX_AVX: u32 = 1 << 28;
const LEAF1_ECX_RDRAND: u32 = 1 << 30;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;
// Leaf 6
const LEAF6_ECX_EPB: u32 = 1 << 3;
// Leaf 7, subleaf 0
const LEAF7_EBX_FSGSBASE: u32 = 1 << 0;
const LEAF7_EBX_SMEP: u32 = 1 << 7;
const LEAF7_EBX_INVPCID: u32 = 1 << 10;
const LEAF7_EBX_RDSEED: u32 = 1 << 18;
const LEAF7_EBX_SMAP: u32 = 1 << 20;
const LEAF7_ECX_UMIP: u32 = 1 << 2;
const LEAF7_ECX_RDPID: u32 = 1 << 22;
// KVM paravirtual features (leaf 0x40000001 EAX)
const KVM_FEATURE_PV_UNHALT: u32 = 1 << 7;
// Leaf 0x80000008
const LEAF_80000008_EBX_XSAVEERPTR: u32 = 1 << 2;

/// CLFLUSH line size in 8-byte units (64-byte cache lines).
const CLFLUSH_LINE_SIZE: u32 = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vendor {
    Intel,
    Amd,
    Other,
}

/// The vendor named by leaf 0.
pub fn vendor(entries: &[kvm_cpuid_entry2]) -> Vendor {
    let Some(leaf0) = entries.iter().find(|e| e.function == 0) else {
        return Vendor::Other;
    };
    let mut id = [0u8; 12];
    id[0..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
    id[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
    id[8..12].copy_from_slice(&leaf0.ecx.to_le_bytes());
    match &id {
        b"GenuineIntel" => Vendor::Intel,
        b"AuthenticAMD" => Vendor::Amd,
        _ => Vendor::Other,
    }
}

/// Adjusts KVM's supported CPUID for vCPU `cpu_index` of `num_cpus`, one core per vCPU,
/// one package, then applies `template` (already resolved).
pub fn normalize(entries: &mut [kvm_cpuid_entry2], cpu_index: u8, num_cpus: u8, template: CpuTemplate) {
    let vendor = vendor(entries);
    let cpu = u32::from(cpu_index);
    let cpus = u32::from(num_cpus);
    // Bits needed to hold a core number: the shift to the package level in leaf 0xb.
    let core_bits = 32 - (cpus.max(1) - 1).leading_zeros();

    for e in entries.iter_mut() {
        match e.function {
            0x1 => {
                e.ebx = (cpu << 24) | (cpus << 16) | (CLFLUSH_LINE_SIZE << 8) | (e.ebx & 0xff);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if num_cpus > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            0x4 if vendor == Vendor::Intel => {
                // Cache topology: cores per package in [31:26]; caches above L2 are shared.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { cpus - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((cpus - 1) << 26) | (sharing << 14);
            }
            // Energy-performance bias MSR is not emulated.
            0x6 => e.ecx &= !LEAF6_ECX_EPB,
            // No virtual PMU.
            0xa => (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0),
            0xb | 0x1f => {
                // Extended topology: level 0 is SMT (1 thread per core), level 1 the cores.
                e.edx = cpu;
                match e.index {
                    0 => (e.eax, e.ebx, e.ecx) = (0, 1, 1 << 8),
                    1 => (e.eax, e.ebx, e.ecx) = (core_bits, cpus, (2 << 8) | 1),
                    n => (e.eax, e.ebx, e.ecx) = (0, 0, n),
                }
            }
            0x8000_0008 if vendor == Vendor::Amd => {
                e.ecx = (e.ecx & !0xff) | (cpus - 1);
            }
            _ => {}
        }
    }

    if template == CpuTemplate::Pvm {
        apply_pvm_template(entries, vendor);
    }
}

fn apply_pvm_template(entries: &mut [kvm_cpuid_entry2], vendor: Vendor) {
    for e in entries.iter_mut() {
        match (e.function, e.index) {
            (0x1, _) => {
                // CMPXCHG16B (SLUB's fast path) kills the guest; of these, only CX16
                // follows what the VMM sets on kvm_pvm, the others are also hidden by
                // kernel parameters (`kernel_params`).
                //
                // The TSC-deadline timer (whose bit does follow the VMM here) is hidden
                // too: 2-vCPU guests were seen to stop during boot with one vCPU halted
                // for good, as if its timer interrupt were lost; the LAPIC's one-shot
                // mode is what QEMU's reference CPU model gives the guest as well.
                e.ecx &= !(LEAF1_ECX_CX16
                    | LEAF1_ECX_TSC_DEADLINE
                    | LEAF1_ECX_PCID
                    | LEAF1_ECX_POPCNT
                    | LEAF1_ECX_XSAVE
                    | LEAF1_ECX_OSXSAVE
                    | LEAF1_ECX_AVX
                    | LEAF1_ECX_RDRAND);
            }
            (0x7, 0) => {
                e.ebx &= !(LEAF7_EBX_FSGSBASE | LEAF7_EBX_SMEP | LEAF7_EBX_INVPCID | LEAF7_EBX_RDSEED | LEAF7_EBX_SMAP);
                e.ecx &= !(LEAF7_ECX_UMIP | LEAF7_ECX_RDPID);
            }
            // Without XSAVEERPTR an AMD guest runs an FXSAVE leak workaround
            // (fnclex/emms/fild) on every FPU switch, which the emulator cannot run.
            (0x8000_0008, _) if vendor == Vendor::Amd => e.ebx |= LEAF_80000008_EBX_XSAVEERPTR,
            // Paravirtual spinlocks halt a waiting vCPU until the lock holder kicks it with
            // a hypercall; 2-vCPU guests on kvm_pvm were seen to stop with one vCPU halted
            // for good. Without PV_UNHALT the guest spins on contended locks instead.
            (0x4000_0001, _) => e.eax &= !KVM_FEATURE_PV_UNHALT,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, eax, ebx, ecx, edx, ..Default::default() }
    }

    fn vendor_leaf(id: &[u8; 12]) -> kvm_cpuid_entry2 {
        let word = |i: usize| u32::from_le_bytes(id[i..i + 4].try_into().unwrap());
        entry(0, 0, 0x1f, word(0), word(8), word(4))
    }

    fn sample(id: &[u8; 12]) -> Vec<kvm_cpuid_entry2> {
        vec![
            vendor_leaf(id),
            entry(0x1, 0, 0x806f8, 0xff00_0000, u32::MAX, u32::MAX),
            entry(0x4, 0, 0x121, 0, 0, 0),
            entry(0x4, 3, 0x163, 0, 0, 0),
            entry(0x6, 0, 0, 0, 0xf, 0),
            entry(0x7, 0, 0, u32::MAX, u32::MAX, 0),
            entry(0xa, 0, 7, 7, 7, 7),
            entry(0xb, 0, 9, 9, 9, 9),
            entry(0xb, 1, 9, 9, 9, 9),
            entry(0xb, 2, 9, 9, 9, 9),
            entry(0x8000_0008, 0, 0x3030, 0, 0, 0),
        ]
    }

    fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *entries.iter().find(|e| e.function == function && e.index == index).unwrap()
    }

    #[test]
    fn vendor_is_read_from_leaf_0() {
        assert_eq!(vendor(&sample(b"GenuineIntel")), Vendor::Intel);
        assert_eq!(vendor(&sample(b"AuthenticAMD")), Vendor::Amd);
        assert_eq!(vendor(&sample(b"HygonGenuine")), Vendor::Other);
        assert_eq!(vendor(&[]), Vendor::Other);
    }

    #[test]
    fn each_vcpu_reports_its_apic_id_and_the_topology() {
        for cpu in 0..4u8 {
            let mut e = sample(b"GenuineIntel");
            normalize(&mut e, cpu, 4, CpuTemplate::None);
            let leaf1 = find(&e, 1, 0);
            assert_eq!(leaf1.ebx >> 24, u32::from(cpu));
            assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
            assert_eq!((leaf1.ebx >> 8) & 0xff, 8);
            assert_ne!(leaf1.ecx & LEAF1_ECX_HYPERVISOR, 0);
            assert_ne!(leaf1.edx & LEAF1_EDX_HTT, 0);
            for sub in 0..3 {
                assert_eq!(find(&e, 0xb, sub).edx, u32::from(cpu));
            }
            assert_eq!(find(&e, 0xb, 0).ebx, 1);
            assert_eq!(find(&e, 0xb, 1).ebx, 4);
            assert_eq!(find(&e, 0xb, 1).eax, 2, "4 cores need 2 bits of APIC ID");
            assert_eq!(find(&e, 0xb, 2).ecx, 2, "levels past the cores are invalid");
            assert_eq!(find(&e, 0x4, 0).eax >> 26, 3);
            assert_eq!((find(&e, 0x4, 0).eax >> 14) & 0xfff, 0, "L1 is per core");
            assert_eq!((find(&e, 0x4, 3).eax >> 14) & 0xfff, 3, "L3 is shared");
        }
    }

    #[test]
    fn single_vcpu_has_no_htt_and_no_pmu_or_epb() {
        let mut e = sample(b"GenuineIntel");
        normalize(&mut e, 0, 1, CpuTemplate::None);
        assert_eq!(find(&e, 1, 0).edx & LEAF1_EDX_HTT, 0);
        assert_eq!(find(&e, 0xb, 1).eax, 0);
        let pmu = find(&e, 0xa, 0);
        assert_eq!((pmu.eax, pmu.ebx, pmu.ecx, pmu.edx), (0, 0, 0, 0));
        assert_eq!(find(&e, 6, 0).ecx & LEAF6_ECX_EPB, 0);
    }

    #[test]
    fn no_template_keeps_features() {
        let mut e = sample(b"GenuineIntel");
        normalize(&mut e, 0, 1, CpuTemplate::None);
        assert_ne!(find(&e, 1, 0).ecx & LEAF1_ECX_CX16, 0);
        assert_ne!(find(&e, 7, 0).ebx & LEAF7_EBX_SMAP, 0);
        assert!(CpuTemplate::None.kernel_params().is_empty());
    }

    #[test]
    fn pvm_template_hides_what_the_emulator_cannot_run() {
        let mut e = sample(b"AuthenticAMD");
        normalize(&mut e, 0, 2, CpuTemplate::Pvm);
        let leaf1 = find(&e, 1, 0);
        for bit in [
            LEAF1_ECX_CX16,
            LEAF1_ECX_TSC_DEADLINE,
            LEAF1_ECX_POPCNT,
            LEAF1_ECX_XSAVE,
            LEAF1_ECX_RDRAND,
            LEAF1_ECX_PCID,
        ] {
            assert_eq!(leaf1.ecx & bit, 0, "bit {bit:#x} still set");
        }
        let leaf7 = find(&e, 7, 0);
        assert_eq!(leaf7.ebx & (LEAF7_EBX_SMAP | LEAF7_EBX_SMEP | LEAF7_EBX_FSGSBASE), 0);
        assert_eq!(leaf7.ecx & (LEAF7_ECX_UMIP | LEAF7_ECX_RDPID), 0);
        assert_ne!(find(&e, 0x8000_0008, 0).ebx & LEAF_80000008_EBX_XSAVEERPTR, 0);
        assert_eq!(find(&e, 0x8000_0008, 0).ecx & 0xff, 1);
        let params = CpuTemplate::Pvm.kernel_params();
        for needed in ["noxsave", "smap", "popcnt", "cx16"] {
            assert!(params.contains(needed), "{needed} missing from {params}");
        }
    }

    #[test]
    fn auto_resolves_to_a_concrete_template() {
        let resolved = CpuTemplate::Auto.resolve();
        assert_ne!(resolved, CpuTemplate::Auto);
        assert_eq!(resolved == CpuTemplate::Pvm, host_kvm_is_pvm());
    }
}
