//! vCPUs: initial state for PVH boot and the run loop, one thread each.

use crate::arch::x86_64::{cpuid, regs};
use crate::devices::bus::Bus;
use crate::snapshot::state::VcpuState;
use kvm_bindings::{kvm_msr_entry, CpuId as KvmCpuId};
use kvm_bindings::{CpuId, Msrs, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::thread::JoinHandle;
use vmm_sys_util::signal::Killable;

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest rebooted (i8042 reset, or a KVM reset event): a clean end.
    Reset,
    /// The guest powered off through a KVM shutdown event: a clean end.
    PowerOff,
    /// The VMM was asked to stop (shutdown request, or after a snapshot).
    Stopped,
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

/// What the VMM asks of a running vCPU thread. The thread sees a command after its next
/// exit from KVM_RUN; [`VcpuHandle::kick`] forces one.
pub enum VcpuCommand {
    /// Stop running the guest and report on the pause channel; wait for more commands.
    Pause,
    Resume,
    /// Save the (paused) vCPU's state, reading these MSRs.
    Save {
        msrs: Vec<u32>,
        reply: Sender<Result<VcpuState, SaveError>>,
    },
}

/// Why a vCPU's state could not be saved.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// KVM_GET_MSRS stops at the first MSR it cannot read: index `read` of the list.
    #[error("vCPU {index}: KVM_GET_MSRS read {read} of {total} MSRs")]
    Msrs { index: u8, read: usize, total: usize },
    #[error("vCPU {index}: {what}: {reason}")]
    Kvm { index: u8, what: &'static str, reason: String },
}

/// The VMM's end of a vCPU thread.
pub struct VcpuHandle {
    pub index: u8,
    thread: JoinHandle<()>,
    commands: Sender<VcpuCommand>,
}

impl VcpuHandle {
    pub fn send(&self, command: VcpuCommand) -> bool {
        self.commands.send(command).is_ok()
    }

    /// Interrupts KVM_RUN on the vCPU's thread (the signal's handler does nothing; the
    /// interrupted KVM_RUN returns EINTR and the thread looks at its commands).
    pub fn kick(&self) {
        let _ = self.thread.kill(vmm_sys_util::signal::SIGRTMIN() + KICK_SIGNAL_OFFSET);
    }
}

/// The vCPU kick signal: SIGRTMIN + this.
const KICK_SIGNAL_OFFSET: i32 = 0;

extern "C" fn ignore_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) handler of the kick signal; once per process, before vCPUs run.
pub fn install_kick_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(vmm_sys_util::signal::SIGRTMIN() + KICK_SIGNAL_OFFSET, ignore_signal)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
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
    /// `on_first_run` is called just before the first KVM_RUN; `paused` hears the vCPU's
    /// index whenever it has paused.
    pub fn start(
        mut self,
        pio: Bus,
        mmio: Bus,
        exits: Sender<crate::machine::VmEvent>,
        paused: Sender<u8>,
        on_first_run: Option<Box<dyn FnOnce() + Send>>,
    ) -> Result<VcpuHandle, VcpuError> {
        let index = self.index;
        let (commands, inbox) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                if let Some(hook) = on_first_run {
                    hook();
                }
                let exit = self.run(&pio, &mmio, &inbox, &paused);
                // The receiver only goes away when the VMM is already stopping.
                let _ = exits.send(crate::machine::VmEvent::Exit(exit));
            })
            .map_err(|source| VcpuError::Thread { index, source })?;
        Ok(VcpuHandle { index, thread, commands })
    }

    /// Handles commands that arrived; returns false when the VMM has gone away.
    fn obey(&mut self, inbox: &Receiver<VcpuCommand>, paused: &Sender<u8>) -> bool {
        let mut command = match inbox.try_recv() {
            Ok(c) => c,
            Err(TryRecvError::Empty) => return true,
            Err(TryRecvError::Disconnected) => return false,
        };
        loop {
            match command {
                VcpuCommand::Resume => return true,
                VcpuCommand::Pause => {
                    let _ = paused.send(self.index);
                }
                VcpuCommand::Save { msrs, reply } => {
                    let _ = reply.send(self.save_state(&msrs));
                }
            }
            // Paused: wait for the next command without running the guest.
            command = match inbox.recv() {
                Ok(c) => c,
                Err(_) => return false,
            };
        }
    }

    fn run(&mut self, pio: &Bus, mmio: &Bus, inbox: &Receiver<VcpuCommand>, paused: &Sender<u8>) -> VmExit {
        loop {
            if !self.obey(inbox, paused) {
                return VmExit::Error(format!("vCPU {}: the VMM stopped listening", self.index));
            }
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

    /// Reads everything KVM holds for this (paused) vCPU.
    fn save_state(&self, msr_indices: &[u32]) -> Result<VcpuState, SaveError> {
        let index = self.index;
        let e =
            |what: &'static str| move |err: kvm_ioctls::Error| SaveError::Kvm { index, what, reason: err.to_string() };
        let mut msrs = Msrs::from_entries(
            &msr_indices.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect::<Vec<_>>(),
        )
        .map_err(|err| SaveError::Kvm { index, what: "MSR list", reason: format!("{err:?}") })?;
        let read = self.fd.get_msrs(&mut msrs).map_err(e("KVM_GET_MSRS"))?;
        if read != msr_indices.len() {
            return Err(SaveError::Msrs { index, read, total: msr_indices.len() });
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
    pub fn restore(&self, cpuid: &KvmCpuId, state: &VcpuState) -> Result<(), VcpuError> {
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
        let msrs =
            Msrs::from_entries(&state.msrs).map_err(|_| VcpuError::Msrs { index, set: 0, total: state.msrs.len() })?;
        let set = self.fd.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
        if set != state.msrs.len() {
            return Err(VcpuError::Msrs { index, set, total: state.msrs.len() });
        }
        // Pending interrupts and exceptions last, on top of the registers they belong to.
        self.fd.set_vcpu_events(&state.events).map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
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
