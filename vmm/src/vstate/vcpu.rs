//! vCPUs: initial state for PVH boot and the run loop, one thread each.

use crate::arch::x86_64::{cpuid, regs};
use crate::devices::bus::Bus;
use kvm_bindings::{CpuId, Msrs, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use std::sync::mpsc::Sender;
use std::thread::JoinHandle;

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest rebooted (i8042 reset, or a KVM reset event): a clean end.
    Reset,
    /// The guest powered off through a KVM shutdown event: a clean end.
    PowerOff,
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN): the guest crashed.
    TripleFault { vcpu: u8 },
    /// KVM could not run the guest.
    Error(String),
}

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {index}: {what}: {source}")]
    Kvm { index: u8, what: &'static str, source: kvm_ioctls::Error },
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

    /// Sets CPUID, MSRs, registers, FPU and local APIC for PVH entry at `entry_point`.
    /// Every vCPU gets the boot state; the secondary ones are started by the guest
    /// through INIT/SIPI, which KVM's local APIC handles.
    pub fn configure(
        &self,
        supported_cpuid: &CpuId,
        num_cpus: u8,
        template: cpuid::CpuTemplate,
        entry_point: u64,
    ) -> Result<(), VcpuError> {
        let index = self.index;
        let kvm = |what| move |source| VcpuError::Kvm { index, what, source };

        let mut cpuid = supported_cpuid.clone();
        cpuid::normalize(cpuid.as_mut_slice(), index, num_cpus, template);
        self.fd.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;

        let boot_msrs = regs::boot_msrs();
        let msrs =
            Msrs::from_entries(&boot_msrs).map_err(|_| VcpuError::Msrs { index, set: 0, total: boot_msrs.len() })?;
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

    /// Runs the vCPU on its own thread until the guest stops; the reason goes to `exits`.
    /// `on_first_run` is called just before the first KVM_RUN.
    pub fn start(
        mut self,
        pio: Bus,
        mmio: Bus,
        exits: Sender<VmExit>,
        on_first_run: Option<Box<dyn FnOnce() + Send>>,
    ) -> Result<JoinHandle<()>, VcpuError> {
        let index = self.index;
        std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                if let Some(hook) = on_first_run {
                    hook();
                }
                let exit = self.run(&pio, &mmio);
                // The receiver only goes away when the VMM is already stopping.
                let _ = exits.send(exit);
            })
            .map_err(|source| VcpuError::Thread { index, source })
    }

    fn run(&mut self, pio: &Bus, mmio: &Bus) -> VmExit {
        loop {
            match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => pio.read(u64::from(port), data),
                Ok(VcpuExit::IoOut(port, data)) => pio.write(u64::from(port), data),
                Ok(VcpuExit::MmioRead(addr, data)) => mmio.read(addr, data),
                Ok(VcpuExit::MmioWrite(addr, data)) => mmio.write(addr, data),
                // With the in-kernel local APIC, HLT is handled in KVM; should one reach
                // us anyway, running again waits for the next interrupt.
                Ok(VcpuExit::Hlt) => {}
                Ok(VcpuExit::Shutdown) => return VmExit::TripleFault { vcpu: self.index },
                Ok(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _)) => return VmExit::Reset,
                Ok(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _)) => return VmExit::PowerOff,
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    return VmExit::Error(format!("vCPU {}: unexpected system event {kind}", self.index))
                }
                Ok(VcpuExit::InternalError) => return VmExit::Error(self.describe_internal_error()),
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    return VmExit::Error(format!(
                        "vCPU {}: KVM could not enter the guest (hardware entry failure reason {reason:#x} on host CPU {cpu})",
                        self.index
                    ))
                }
                Ok(other) => return VmExit::Error(format!("vCPU {}: unhandled exit {other:?}", self.index)),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => return VmExit::Error(format!("vCPU {}: KVM_RUN: {e}", self.index)),
            }
        }
    }

    /// KVM_EXIT_INTERNAL_ERROR with what KVM reports: for an emulation failure
    /// (suberror 1) the data holds the instruction bytes, which name the culprit.
    fn describe_internal_error(&mut self) -> String {
        let rip = self.fd.get_regs().map(|r| format!("{:#x}", r.rip)).unwrap_or_else(|_| "unknown".into());
        let run = self.fd.get_kvm_run();
        // SAFETY: the last exit was KVM_EXIT_INTERNAL_ERROR, so `internal` is the member
        // of the exit union that KVM filled in; it is plain integers.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let ndata = (internal.ndata as usize).min(internal.data.len());
        let data: Vec<String> = internal.data[..ndata].iter().map(|d| format!("{d:#018x}")).collect();
        let what = if internal.suberror == 1 { "emulation failure" } else { "internal error" };
        format!(
            "vCPU {}: KVM {what} (suberror {}) at guest RIP {rip}; data: [{}]. On software-nested KVM this names an instruction the emulator cannot run; see docs/guest-kernel.md",
            self.index,
            internal.suberror,
            data.join(", ")
        )
    }
}
