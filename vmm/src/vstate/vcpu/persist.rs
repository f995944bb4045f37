//! The saved state of a vCPU: registers, FPU and extended state, MSRs, local APIC,
//! debug registers, pending events and MP state; read from a paused vCPU, put back on a
//! new one.

use super::{Vcpu, VcpuError};
use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, CpuId, Msrs,
};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub msrs: Vec<kvm_msr_entry>,
    pub lapic: kvm_lapic_state,
    pub debugregs: kvm_debugregs,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
}

/// Why a vCPU's state could not be saved.
#[derive(Debug, thiserror::Error)]
pub enum VcpuSaveError {
    /// KVM_GET_MSRS stops at the first MSR it cannot read: index `read` of the list.
    #[error("vCPU {index}: KVM_GET_MSRS read {read} of {total} MSRs")]
    Msrs { index: u8, read: usize, total: usize },
    #[error("vCPU {index}: cannot build a KVM MSR list of {count} entries: {source}")]
    MsrList { index: u8, count: usize, source: vmm_sys_util::fam::Error },
    #[error("vCPU {index}: {what}: {source}")]
    Kvm { index: u8, what: &'static str, source: kvm_ioctls::Error },
}

impl Vcpu {
    /// Reads everything KVM holds for this (paused) vCPU.
    pub(super) fn save_state(&self, msr_indices: &[u32]) -> Result<VcpuState, VcpuSaveError> {
        let index = self.index;
        let e = |what: &'static str| move |source| VcpuSaveError::Kvm { index, what, source };
        let entries: Vec<_> = msr_indices.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|source| VcpuSaveError::MsrList {
            index,
            count: entries.len(),
            source,
        })?;
        let read = self.fd.get_msrs(&mut msrs).map_err(e("KVM_GET_MSRS"))?;
        if read != msr_indices.len() {
            return Err(VcpuSaveError::Msrs { index, read, total: msr_indices.len() });
        }
        Ok(VcpuState {
            // Events first: reading them does not change them, but they must be consistent
            // with the registers KVM reports next.
            events: self.fd.get_vcpu_events().map_err(e("KVM_GET_VCPU_EVENTS"))?,
            mp_state: self.fd.get_mp_state().map_err(e("KVM_GET_MP_STATE"))?,
            regs: self.fd.get_regs().map_err(e("KVM_GET_REGS"))?,
            sregs: self.fd.get_sregs().map_err(e("KVM_GET_SREGS"))?,
            xsave: self.fd.get_xsave().map_err(e("KVM_GET_XSAVE"))?,
            xcrs: self.fd.get_xcrs().map_err(e("KVM_GET_XCRS"))?,
            debugregs: self.fd.get_debug_regs().map_err(e("KVM_GET_DEBUGREGS"))?,
            lapic: self.fd.get_lapic().map_err(e("KVM_GET_LAPIC"))?,
            msrs: msrs.as_slice().to_vec(),
        })
    }

    /// Puts a saved vCPU state back, on a new vCPU whose CPUID is `cpuid`.
    pub fn restore(&self, cpuid: &CpuId, state: &VcpuState) -> Result<(), VcpuError> {
        let index = self.index;
        let kvm = |what| move |source| VcpuError::Kvm { index, what, source };
        // CPUID first: KVM checks the other state against the features it allows.
        self.fd.set_cpuid2(cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
        self.fd.set_mp_state(state.mp_state).map_err(kvm("KVM_SET_MP_STATE"))?;
        self.fd.set_regs(&state.regs).map_err(kvm("KVM_SET_REGS"))?;
        self.fd.set_sregs(&state.sregs).map_err(kvm("KVM_SET_SREGS"))?;
        // SAFETY: KVM reads its xsave buffer size for this VM from `state.xsave`; that is
        // the legacy 4096 bytes, the size of kvm_xsave, because this VMM never requests
        // guest permission for dynamically enabled xfeatures (AMX), the only way it grows.
        unsafe { self.fd.set_xsave(&state.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
        self.fd.set_xcrs(&state.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
        self.fd.set_debug_regs(&state.debugregs).map_err(kvm("KVM_SET_DEBUGREGS"))?;
        self.fd.set_lapic(&state.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
        let msrs = Msrs::from_entries(&state.msrs).map_err(|source| VcpuError::MsrList {
            index,
            count: state.msrs.len(),
            source,
        })?;
        let set = self.fd.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
        if set != state.msrs.len() {
            return Err(VcpuError::Msrs { index, set, total: state.msrs.len() });
        }
        // Pending interrupts and exceptions last, on top of the registers they belong to.
        self.fd.set_vcpu_events(&state.events).map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}
