//! The boot path: fresh guest memory, the kernel and initramfs loaded for PVH entry, and
//! vCPUs set up to enter it.

use super::error::BuildError;
use super::{Host, PreparedVm, RunOptions};
use crate::arch::x86_64::boot;
use crate::config::VmConfig;
use crate::vmm::Vmm;
use crate::vstate::memory;
use crate::vstate::vcpu::Vcpu;

/// Builds the VM described by `config`, boots its kernel and starts its vCPUs.
pub fn build_and_start(config: &VmConfig, options: RunOptions) -> Result<Vmm, BuildError> {
    let host = Host::open(config)?;
    let guest_memory = memory::create_guest_memory(config.memory_bytes())?;
    let prepared = PreparedVm::assemble(config, host, guest_memory, None)?;

    let cmdline = boot::kernel_cmdline(prepared.host.cpu_template, &prepared.devices.kernel_params, &config.cmdline)?;
    let entry = boot::load_guest(
        &prepared.memory,
        config.memory_bytes(),
        &config.kernel,
        &config.initramfs,
        &cmdline,
        config.vcpus,
    )?;
    let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
    for index in 0..config.vcpus {
        let vcpu = Vcpu::create(&prepared.vm, index)?;
        vcpu.configure(&prepared.host.vcpu_cpuid(index, config.vcpus), entry.entry_point)?;
        vcpus.push(vcpu);
    }
    prepared.start(config, vcpus, &options)
}
