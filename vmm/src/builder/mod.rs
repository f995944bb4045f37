//! From a validated configuration to a running VM. Two paths share one device assembly:
//! `boot.rs` loads a kernel onto fresh vCPUs, `restore.rs` puts a snapshot's state back.
//!
//! KVM (`Host`) → guest memory → VM with irqchip and PIT → devices (`devices.rs`), together
//! a `PreparedVm` → guest loaded or state restored → vCPUs started (`PreparedVm::start`).

mod boot;
mod devices;
mod error;
mod restore;

pub use boot::build_and_start;
pub use error::BuildError;
pub use restore::restore_and_start;

use self::devices::Devices;
use crate::arch::x86_64::cpuid::{self, CpuTemplate};
use crate::config::VmConfig;
use crate::snapshot::MicrovmState;
use crate::util::monotonic_ns;
use crate::vmm::{VmEvent, Vmm};
use crate::vstate::vcpu::{install_kick_handler, Vcpu};
use crate::vstate::{kvm, vm};
use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VmFd};
use std::sync::mpsc::{channel, Receiver, Sender};
use vm_memory::GuestMemoryMmap;

/// Options that change how the VMM reports, not what the guest is.
#[derive(Debug, Default, Clone)]
pub struct RunOptions {
    /// Print CLOCK_MONOTONIC timestamps of start-up milestones to stderr (benchmarks).
    pub boot_timestamps: bool,
}

/// This host's KVM, checked against the configuration, and what it offers the guest.
struct Host {
    kvm: Kvm,
    supported_cpuid: CpuId,
    /// The host CPU's vendor, as a snapshot records it.
    cpu_vendor: String,
    cpu_template: CpuTemplate,
}

impl Host {
    fn open(config: &VmConfig) -> Result<Host, BuildError> {
        let kvm = kvm::open()?;
        let max_vcpus = kvm.get_max_vcpus();
        if usize::from(config.vcpus) > max_vcpus {
            return Err(BuildError::TooManyVcpus { requested: config.vcpus, max: max_vcpus });
        }
        let supported_cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(BuildError::SupportedCpuid)?;
        let cpu_vendor = format!("{:?}", cpuid::vendor(supported_cpuid.as_slice()));
        Ok(Host { kvm, supported_cpuid, cpu_vendor, cpu_template: config.cpu_template.resolve() })
    }

    /// The CPUID vCPU `index` of `config.vcpus` sees.
    fn vcpu_cpuid(&self, index: u8, vcpus: u8) -> CpuId {
        let mut cpuid = self.supported_cpuid.clone();
        cpuid::normalize(cpuid.as_mut_slice(), index, vcpus, self.cpu_template);
        cpuid
    }
}

/// A VM with its memory and devices, before its vCPUs exist.
struct PreparedVm {
    host: Host,
    vm: VmFd,
    memory: GuestMemoryMmap,
    devices: Devices,
    events_tx: Sender<VmEvent>,
    events: Receiver<VmEvent>,
}

impl PreparedVm {
    /// Creates the VM on `memory` and assembles its devices (the console and net device
    /// from `saved` when restoring).
    fn assemble(
        config: &VmConfig,
        host: Host,
        memory: GuestMemoryMmap,
        saved: Option<&MicrovmState>,
    ) -> Result<PreparedVm, BuildError> {
        let vm = vm::create(&host.kvm, &memory)?;
        let (events_tx, events) = channel();
        let devices = devices::assemble(config, &vm, &memory, saved, events_tx.clone())?;
        Ok(PreparedVm { host, vm, memory, devices, events_tx, events })
    }

    /// Starts `vcpus` (configured or restored) and hands the running VM over.
    fn start(self, config: &VmConfig, vcpus: Vec<Vcpu>, options: &RunOptions) -> Result<Vmm, BuildError> {
        install_kick_handler().map_err(BuildError::KickHandler)?;
        let (pause_tx, pause_acks) = channel();
        let mut handles = Vec::with_capacity(vcpus.len());
        for vcpu in vcpus {
            let first_run: Option<Box<dyn FnOnce() + Send>> = (options.boot_timestamps && vcpu.index() == 0)
                .then(|| Box::new(|| eprintln!("nestbox-vmm: timestamp first_kvm_run {}", monotonic_ns())) as _);
            let (pio, mmio) = (self.devices.pio.clone(), self.devices.mmio.clone());
            handles.push(vcpu.start(pio, mmio, self.events_tx.clone(), pause_tx.clone(), first_run)?);
        }
        Ok(Vmm {
            kvm: self.host.kvm,
            vm: self.vm,
            memory: self.memory,
            memory_mib: config.memory_mib,
            cpu_vendor: self.host.cpu_vendor,
            cpu_template: self.host.cpu_template,
            vcpus: handles,
            pause_acks,
            events: self.events,
            requests: self.events_tx,
            console: self.devices.console,
            transports: self.devices.transports,
            cleanup_paths: self.devices.cleanup_paths,
            net: self.devices.net,
        })
    }
}
