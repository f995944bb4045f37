//! The KVM VM: memory slots, in-kernel irqchip (PIC, I/O APIC, local APICs) and PIT.

pub mod persist;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

/// Three pages KVM needs for the TSS of real-mode emulation on Intel; placed just below
/// the BIOS area at the top of the 32-bit space, inside the MMIO gap.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("KVM_CREATE_VM: {0}")]
    Create(kvm_ioctls::Error),
    #[error("KVM_SET_TSS_ADDR: {0}")]
    TssAddress(kvm_ioctls::Error),
    #[error("KVM_CREATE_IRQCHIP: {0}")]
    Irqchip(kvm_ioctls::Error),
    #[error("KVM_CREATE_PIT2: {0}")]
    Pit(kvm_ioctls::Error),
    #[error("KVM_SET_USER_MEMORY_REGION (slot {slot}): {source}")]
    MemoryRegion { slot: u32, source: kvm_ioctls::Error },
}

/// Creates the VM with its interrupt controllers and timer, and gives it `mem`.
pub fn create(kvm: &Kvm, mem: &GuestMemoryMmap) -> Result<VmFd, VmError> {
    let vm = kvm.create_vm().map_err(VmError::Create)?;
    vm.set_tss_address(KVM_TSS_ADDRESS).map_err(VmError::TssAddress)?;
    vm.create_irq_chip().map_err(VmError::Irqchip)?;
    // The dummy speaker port (0x61) keeps the kernel's PIT calibration from exiting to us.
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    vm.create_pit2(pit).map_err(VmError::Pit)?;
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let memory_region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mapping of `memory_size` bytes owned by `mem`,
        // which the caller keeps alive for as long as the VM runs.
        unsafe { vm.set_user_memory_region(memory_region) }.map_err(|source| VmError::MemoryRegion { slot, source })?;
    }
    Ok(vm)
}
