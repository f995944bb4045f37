//! The restore path: guest memory mapped from a snapshot's memory file, and every vCPU,
//! the interrupt controllers, clock and devices put back as the snapshot saved them.

use super::error::BuildError;
use super::{Host, PreparedVm, RunOptions};
use crate::config::VmConfig;
use crate::snapshot::{self, MachineShape, MicrovmState, SnapshotError};
use crate::util::lock;
use crate::vmm::Vmm;
use crate::vstate::memory;
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vm::persist as vm_persist;
use std::path::Path;

/// Builds a VM from the snapshot in `dir`, whose state file holds `state` (devices as
/// `config` gives them: their host paths are the new sandbox's), and starts its vCPUs
/// where the snapshot stopped them.
pub fn restore_and_start(
    config: &VmConfig,
    dir: &Path,
    state: MicrovmState,
    options: RunOptions,
) -> Result<Vmm, BuildError> {
    let host = Host::open(config)?;
    state.check_fits(
        dir,
        MachineShape {
            vcpus: config.vcpus,
            memory_mib: config.memory_mib,
            cpu_vendor: &host.cpu_vendor,
            cpu_template: host.cpu_template,
        },
    )?;
    let file = snapshot::open_memory(dir, config.memory_bytes())?;
    let guest_memory = memory::map_guest_memory_from_file(config.memory_bytes(), &file)?;
    let prepared = PreparedVm::assemble(config, host, guest_memory, Some(&state))?;

    let mismatch = |reason: String| SnapshotError::Mismatch { path: dir.to_path_buf(), reason };
    let transports = &prepared.devices.transports;
    if state.virtio.len() != transports.len() {
        let reason = format!("it has {} virtio devices, the configuration {}", state.virtio.len(), transports.len());
        return Err(mismatch(reason).into());
    }
    let mut vcpus = Vec::with_capacity(state.vcpus.len());
    for (index, saved) in (0..config.vcpus).zip(&state.vcpus) {
        let vcpu = Vcpu::create(&prepared.vm, index)?;
        vcpu.restore(&prepared.host.vcpu_cpuid(index, config.vcpus), saved)?;
        vcpus.push(vcpu);
    }
    vm_persist::restore_state(&prepared.vm, &state.vm)
        .map_err(|e| mismatch(format!("interrupt controllers and clock: {e}")))?;
    for (transport, saved) in transports.iter().zip(&state.virtio) {
        lock(transport).restore_state(saved).map_err(|e| mismatch(e.to_string()))?;
    }
    prepared.start(config, vcpus, &options)
}
