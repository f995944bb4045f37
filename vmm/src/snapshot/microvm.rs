//! What a snapshot holds besides guest memory: each component's saved state (defined
//! beside the component, in its `persist` module), plus enough about the VM and host to
//! refuse restoring onto something else.
//!
//! The field order is the state file's layout (bincode): changing it means a new
//! [`super::FORMAT_VERSION`].

use super::SnapshotError;
use crate::arch::x86_64::cpuid::CpuTemplate;
use crate::devices::legacy::serial::persist::SerialState;
use crate::devices::virtio::mmio::persist::TransportState;
use crate::vstate::vcpu::persist::VcpuState;
use crate::vstate::vm::persist::VmState;
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Serialize, Deserialize, Debug)]
pub struct MicrovmState {
    pub memory_mib: u64,
    /// CPU vendor string of the host the snapshot was taken on: vCPU state does not move
    /// between vendors.
    pub cpu_vendor: String,
    pub cpu_template: CpuTemplate,
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    pub serial: SerialState,
    pub virtio: Vec<TransportState>,
}

/// What a VM about to be restored is: the snapshot must have been taken of the same.
#[derive(Debug, Clone, Copy)]
pub struct MachineShape<'a> {
    pub vcpus: u8,
    pub memory_mib: u64,
    pub cpu_vendor: &'a str,
    pub cpu_template: CpuTemplate,
}

impl MicrovmState {
    /// Refuses a snapshot (read from `dir`) of another machine than `shape`: vCPU count,
    /// memory size, host CPU vendor and CPU template must all match.
    pub fn check_fits(&self, dir: &Path, shape: MachineShape<'_>) -> Result<(), SnapshotError> {
        let mismatch = |reason: String| Err(SnapshotError::Mismatch { path: dir.to_path_buf(), reason });
        if self.vcpus.len() != usize::from(shape.vcpus) {
            return mismatch(format!("it has {} vCPUs, the configuration {}", self.vcpus.len(), shape.vcpus));
        }
        if self.memory_mib != shape.memory_mib {
            return mismatch(format!("it has {} MiB, the configuration {}", self.memory_mib, shape.memory_mib));
        }
        if self.cpu_vendor != shape.cpu_vendor || self.cpu_template != shape.cpu_template {
            return mismatch(format!(
                "taken on a {} CPU with template {:?}, this host is {} with {:?}",
                self.cpu_vendor, self.cpu_template, shape.cpu_vendor, shape.cpu_template
            ));
        }
        Ok(())
    }
}
