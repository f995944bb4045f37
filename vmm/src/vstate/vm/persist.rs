//! The saved state of a VM: its in-kernel interrupt controllers (PIC pair, I/O APIC),
//! timer (PIT) and clock. The local APICs belong to the vCPUs (see `vcpu::persist`).

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// The in-kernel interrupt controllers, timer and clock of a (paused) VM.
pub fn save_state(vm: &VmFd) -> Result<VmState, kvm_ioctls::Error> {
    let chip = |chip_id| -> Result<kvm_irqchip, kvm_ioctls::Error> {
        let mut chip = kvm_irqchip { chip_id, ..Default::default() };
        vm.get_irqchip(&mut chip)?;
        Ok(chip)
    };
    Ok(VmState {
        pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2()?,
        clock: vm.get_clock()?,
    })
}

/// Puts saved interrupt controller, timer and clock state into a VM made by [`super::create`].
pub fn restore_state(vm: &VmFd, state: &VmState) -> Result<(), kvm_ioctls::Error> {
    vm.set_irqchip(&state.pic_master)?;
    vm.set_irqchip(&state.pic_slave)?;
    vm.set_irqchip(&state.ioapic)?;
    vm.set_pit2(&state.pit)?;
    // The guest's clock continues from where it stopped, not from the host's time now;
    // only the flags KVM accepts on SET_CLOCK are kept.
    let clock = kvm_clock_data { clock: state.clock.clock, flags: 0, ..Default::default() };
    vm.set_clock(&clock)?;
    Ok(())
}
