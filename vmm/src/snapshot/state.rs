//! What a snapshot holds besides guest memory: every vCPU's registers and pending events,
//! the in-kernel interrupt controllers, timer and clock, and the devices' state, plus
//! enough about the VM and host to refuse restoring onto something else.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
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

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// The 16550A's registers (vm-superio's `SerialState`, which is not serialisable).
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// One virtqueue as the driver configured it. The ring positions are not kept: device
/// threads are stopped before a snapshot, and a stopped device has returned every chain
/// it took, so both positions equal the used ring's index in guest memory.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueState {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub event_idx: bool,
}

/// A virtio-mmio transport's registers.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct TransportState {
    pub device_type: u32,
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub acked_features: u64,
    pub queue_sel: u32,
    pub config_generation: u32,
    pub interrupt_status: u32,
    pub active: bool,
    pub queues: Vec<QueueState>,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct MicrovmState {
    pub memory_mib: u64,
    /// CPU vendor string of the host the snapshot was taken on: vCPU state does not move
    /// between vendors.
    pub cpu_vendor: String,
    pub cpu_template: crate::arch::x86_64::cpuid::CpuTemplate,
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    pub serial: SerialState,
    pub virtio: Vec<TransportState>,
}
