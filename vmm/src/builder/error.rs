//! Why a VM could not be built or restored.

use crate::arch::x86_64::{boot, layout};
use crate::devices::bus::BusOverlap;
use crate::devices::legacy::serial::persist::SerialStateError;
use crate::devices::virtio::fs::FsError;
use crate::devices::virtio::mmio::TransportError;
use crate::devices::virtio::net::tap::TapError;
use crate::devices::virtio::vsock::device::VsockError;
use crate::snapshot::SnapshotError;
use crate::vstate::vcpu::VcpuError;
use crate::vstate::{kvm, memory, vm};
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Kvm(#[from] kvm::KvmError),
    #[error("vcpus = {requested}: this host's KVM allows at most {max}")]
    TooManyVcpus { requested: u8, max: usize },
    #[error("KVM_GET_SUPPORTED_CPUID: {0}")]
    SupportedCpuid(kvm_ioctls::Error),
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    Vm(#[from] vm::VmError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error("console {path}: {source}")]
    Console { path: PathBuf, source: std::io::Error },
    #[error("serial interrupt: {0}")]
    SerialIrq(std::io::Error),
    #[error(transparent)]
    SerialState(#[from] SerialStateError),
    #[error("vCPU kick signal handler: {0}")]
    KickHandler(std::io::Error),
    #[error(transparent)]
    Bus(#[from] BusOverlap),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Vsock(#[from] VsockError),
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("virtio device type {device_type}: interrupt eventfd: {source}")]
    VirtioIrqfd { device_type: u32, source: std::io::Error },
    #[error("virtio device type {device_type}: {what}: {source}")]
    VirtioKvm { device_type: u32, what: &'static str, source: kvm_ioctls::Error },
    #[error("virtio device type {device_type}: {source}")]
    VirtioTransport { device_type: u32, source: TransportError },
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    FileMemory(#[from] memory::FileMemoryError),
    #[error("too many virtio devices: {} interrupt lines are available", layout::VIRTIO_IRQ_LAST - layout::VIRTIO_IRQ_FIRST + 1)]
    TooManyDevices,
}
