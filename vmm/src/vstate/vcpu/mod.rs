//! vCPUs: their initial state for PVH boot, the thread each runs on, and the narrow
//! channels between that thread and the VM loop: [`VcpuCommand`]s in, one [`VcpuEvent`]
//! out when it stops running the guest, and its index on the pause channel.
//!
//! This module knows nothing of the VM type above it: the thread sends its event on any
//! channel whose messages can be made from a [`VcpuEvent`].

pub mod persist;
mod thread;

pub use thread::{install_kick_handler, VcpuCommand, VcpuHandle};

use crate::arch::x86_64::regs;
use kvm_bindings::{CpuId, Msrs};
use kvm_ioctls::{VcpuFd, VmFd};

/// Why a vCPU thread stopped running the guest: the one message it sends the VM loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuEvent {
    /// The guest asked KVM for a reset (KVM_SYSTEM_EVENT_RESET).
    Reset,
    /// The guest powered off (KVM_SYSTEM_EVENT_SHUTDOWN).
    PowerOff,
    /// KVM_EXIT_SHUTDOWN: the vCPU triple-faulted, the guest crashed.
    TripleFault { vcpu: u8 },
    /// KVM could not run the guest, or the VMM stopped listening; says which and why.
    Failed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {index}: {what}: {source}")]
    Kvm { index: u8, what: &'static str, source: kvm_ioctls::Error },
    #[error("vCPU {index}: cannot build a KVM MSR list of {count} entries: {source}")]
    MsrList { index: u8, count: usize, source: vmm_sys_util::fam::Error },
    #[error("vCPU {index}: KVM_SET_MSRS set {set} of {total} boot MSRs")]
    Msrs { index: u8, set: usize, total: usize },
    #[error("vCPU {index}: cannot start its thread: {source}")]
    Thread { index: u8, source: std::io::Error },
}

pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
}

impl Vcpu {
    pub fn create(vm: &VmFd, index: u8) -> Result<Vcpu, VcpuError> {
        let fd = vm.create_vcpu(u64::from(index)).map_err(|source| VcpuError::Kvm {
            index,
            what: "KVM_CREATE_VCPU",
            source,
        })?;
        Ok(Vcpu { index, fd })
    }

    pub fn index(&self) -> u8 {
        self.index
    }

    /// Sets CPUID (already normalised for this vCPU), MSRs, registers, FPU and local APIC
    /// for PVH entry at `entry_point`. Every vCPU gets the boot state; the secondary ones
    /// are started by the guest through INIT/SIPI, which KVM's local APIC handles.
    pub fn configure(&self, cpuid: &CpuId, entry_point: u64) -> Result<(), VcpuError> {
        let index = self.index;
        let kvm = |what| move |source| VcpuError::Kvm { index, what, source };
        self.fd.set_cpuid2(cpuid).map_err(kvm("KVM_SET_CPUID2"))?;

        let boot_msrs = regs::boot_msrs();
        let msrs = Msrs::from_entries(&boot_msrs).map_err(|source| VcpuError::MsrList {
            index,
            count: boot_msrs.len(),
            source,
        })?;
        let set = self.fd.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
        if set != boot_msrs.len() {
            return Err(VcpuError::Msrs { index, set, total: boot_msrs.len() });
        }

        self.fd.set_regs(&regs::pvh_regs(entry_point)).map_err(kvm("KVM_SET_REGS"))?;
        let sregs = self.fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
        self.fd.set_sregs(&regs::pvh_sregs(sregs)).map_err(kvm("KVM_SET_SREGS"))?;
        self.fd.set_fpu(&regs::boot_fpu()).map_err(kvm("KVM_SET_FPU"))?;
        let mut lapic = self.fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
        regs::configure_lint(&mut lapic);
        self.fd.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))?;
        Ok(())
    }
}
