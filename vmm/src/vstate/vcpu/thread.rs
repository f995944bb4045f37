//! The vCPU thread: runs KVM_RUN, routes port and MMIO exits to the buses, obeys the
//! VMM's commands between runs and reports why it stopped.

use super::persist::{VcpuSaveError, VcpuState};
use super::{Vcpu, VcpuError, VcpuEvent};
use crate::devices::bus::Bus;
use kvm_bindings::{KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::VcpuExit;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::thread::JoinHandle;
use vmm_sys_util::signal::Killable;

/// What the VMM asks of a running vCPU thread. The thread sees a command after its next
/// exit from KVM_RUN; [`VcpuHandle::kick`] forces one.
pub enum VcpuCommand {
    /// Stop running the guest and report on the pause channel; wait for more commands.
    Pause,
    Resume,
    /// Save the (paused) vCPU's state, reading these MSRs.
    Save {
        msrs: Vec<u32>,
        reply: Sender<Result<VcpuState, VcpuSaveError>>,
    },
}

/// The VMM's end of a vCPU thread.
pub struct VcpuHandle {
    pub index: u8,
    thread: JoinHandle<()>,
    commands: Sender<VcpuCommand>,
}

impl VcpuHandle {
    /// Queues a command; false once the thread has ended.
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
    /// Runs the vCPU on its own thread until the guest stops; why goes to `events`.
    /// `on_first_run` is called just before the first KVM_RUN; `pause_acks` hears the
    /// vCPU's index whenever it has paused.
    pub fn start<E: From<VcpuEvent> + Send + 'static>(
        mut self,
        pio: Bus,
        mmio: Bus,
        events: Sender<E>,
        pause_acks: Sender<u8>,
        on_first_run: Option<Box<dyn FnOnce() + Send>>,
    ) -> Result<VcpuHandle, VcpuError> {
        let index = self.index;
        let (commands, inbox) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                // Set up (registers, CPUID, MSRs) on the main thread: only running is left.
                if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Vcpu) {
                    let _ = events.send(E::from(VcpuEvent::Failed(e.to_string())));
                    return;
                }
                if let Some(hook) = on_first_run {
                    hook();
                }
                let event = self.run(&pio, &mmio, &inbox, &pause_acks);
                // The receiver only goes away when the VMM is already stopping.
                let _ = events.send(E::from(event));
            })
            .map_err(|source| VcpuError::Thread { index, source })?;
        Ok(VcpuHandle { index, thread, commands })
    }

    /// Handles commands that arrived; returns false when the VMM has gone away.
    fn handle_commands(&mut self, inbox: &Receiver<VcpuCommand>, pause_acks: &Sender<u8>) -> bool {
        let mut command = match inbox.try_recv() {
            Ok(c) => c,
            Err(TryRecvError::Empty) => return true,
            Err(TryRecvError::Disconnected) => return false,
        };
        loop {
            match command {
                VcpuCommand::Resume => return true,
                VcpuCommand::Pause => {
                    let _ = pause_acks.send(self.index);
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

    fn run(&mut self, pio: &Bus, mmio: &Bus, inbox: &Receiver<VcpuCommand>, pause_acks: &Sender<u8>) -> VcpuEvent {
        loop {
            if !self.handle_commands(inbox, pause_acks) {
                return VcpuEvent::Failed(format!("vCPU {}: the VMM stopped listening", self.index));
            }
            match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => pio.read(u64::from(port), data),
                Ok(VcpuExit::IoOut(port, data)) => pio.write(u64::from(port), data),
                Ok(VcpuExit::MmioRead(addr, data)) => mmio.read(addr, data),
                Ok(VcpuExit::MmioWrite(addr, data)) => mmio.write(addr, data),
                // With the in-kernel local APIC, HLT is handled in KVM; should one reach
                // us anyway, running again waits for the next interrupt.
                Ok(VcpuExit::Hlt) => {}
                Ok(VcpuExit::Shutdown) => return VcpuEvent::TripleFault { vcpu: self.index },
                Ok(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _)) => return VcpuEvent::Reset,
                Ok(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _)) => return VcpuEvent::PowerOff,
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    return VcpuEvent::Failed(format!("vCPU {}: unexpected system event {kind}", self.index))
                }
                Ok(VcpuExit::InternalError) => return VcpuEvent::Failed(self.describe_internal_error()),
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    return VcpuEvent::Failed(format!(
                        "vCPU {}: KVM could not enter the guest (hardware entry failure reason {reason:#x} on host CPU {cpu})",
                        self.index
                    ))
                }
                Ok(other) => return VcpuEvent::Failed(format!("vCPU {}: unhandled exit {other:?}", self.index)),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => return VcpuEvent::Failed(format!("vCPU {}: KVM_RUN: {e}", self.index)),
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
