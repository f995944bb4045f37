//! A running microVM: its KVM objects, vCPU threads and devices, and the loop that waits
//! for the guest to stop or for a control request (pause, resume, snapshot, shutdown).

use crate::arch::x86_64::cpuid::CpuTemplate;
use crate::builder::lock;
use crate::devices::legacy::SerialConsole;
use crate::devices::virtio::mmio::MmioTransport;
use crate::snapshot::{self, state::MicrovmState};
use crate::vstate::vcpu::{SaveError, VcpuCommand, VcpuHandle, VmExit};
use crate::vstate::vm;
use kvm_ioctls::{Kvm, VmFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vm_memory::GuestMemoryMmap;

/// How long vCPUs get to answer a pause before the request fails.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

/// A control request, from the API socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Pause,
    Resume,
    /// Snapshot into this directory, then end the VMM.
    Snapshot(PathBuf),
    Shutdown,
}

impl Request {
    /// Parses one line of the control protocol.
    pub fn parse(line: &str) -> Result<Request, String> {
        let mut words = line.split_whitespace();
        let request = match (words.next(), words.next()) {
            (Some("pause"), None) => Request::Pause,
            (Some("resume"), None) => Request::Resume,
            (Some("snapshot"), Some(dir)) => Request::Snapshot(PathBuf::from(dir)),
            (Some("shutdown"), None) => Request::Shutdown,
            _ => return Err(format!("unknown request {line:?} (pause, resume, snapshot DIR, shutdown)")),
        };
        match words.next() {
            None => Ok(request),
            Some(extra) => Err(format!("unexpected {extra:?} after the request")),
        }
    }
}

pub enum VmEvent {
    Exit(VmExit),
    Request(Request, Sender<Result<(), String>>),
}

pub struct Vmm {
    pub(crate) kvm: Kvm,
    pub(crate) vm: VmFd,
    pub(crate) memory: GuestMemoryMmap,
    pub(crate) memory_mib: u64,
    pub(crate) cpu_vendor: String,
    pub(crate) cpu_template: CpuTemplate,
    pub(crate) vcpus: Vec<VcpuHandle>,
    pub(crate) paused: Receiver<u8>,
    pub(crate) events: Receiver<VmEvent>,
    pub(crate) console: Arc<Mutex<SerialConsole>>,
    pub(crate) transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// Host files the VMM created (sockets), removed when it ends.
    pub(crate) cleanup_paths: Vec<PathBuf>,
}

impl Vmm {
    /// Runs until the guest stops, a vCPU fails, or a request ends the VMM; says why.
    pub fn wait(mut self) -> VmExit {
        let exit = loop {
            match self.events.recv() {
                Ok(VmEvent::Exit(exit)) => break exit,
                Ok(VmEvent::Request(request, reply)) => {
                    let (result, ends) = self.handle(&request);
                    let _ = reply.send(result.clone());
                    if let (Some(exit), Ok(())) = (ends, result) {
                        break exit;
                    }
                }
                Err(_) => break VmExit::Error("every vCPU thread ended without a reason".into()),
            }
        };
        lock(&self.console).flush();
        for path in &self.cleanup_paths {
            let _ = std::fs::remove_file(path);
        }
        exit
    }

    /// Carries out a request; the second value is set when the VMM must end after it.
    fn handle(&mut self, request: &Request) -> (Result<(), String>, Option<VmExit>) {
        match request {
            Request::Pause => (self.pause(), None),
            Request::Resume => (self.resume(), None),
            Request::Shutdown => (Ok(()), Some(VmExit::Stopped)),
            Request::Snapshot(dir) => {
                let result = self.snapshot(dir);
                if result.is_err() {
                    // Leave the guest running as it was; a half-written snapshot is removed.
                    let _ = std::fs::remove_file(dir.join(snapshot::STATE_FILE));
                    let _ = std::fs::remove_file(dir.join(snapshot::MEMORY_FILE));
                    let _ = self.resume();
                }
                (result, Some(VmExit::Stopped))
            }
        }
    }

    /// Stops every vCPU outside KVM_RUN. vCPUs see the request after their next exit; a
    /// signal forces one, repeated until each has answered (a signal that lands just
    /// before KVM_RUN is entered would otherwise be missed).
    pub fn pause(&mut self) -> Result<(), String> {
        while self.paused.try_recv().is_ok() {}
        for vcpu in &self.vcpus {
            if !vcpu.send(VcpuCommand::Pause) {
                return Err(format!("vCPU {} has stopped", vcpu.index));
            }
        }
        let mut waiting: Vec<u8> = self.vcpus.iter().map(|v| v.index).collect();
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        while !waiting.is_empty() {
            for vcpu in self.vcpus.iter().filter(|v| waiting.contains(&v.index)) {
                vcpu.kick();
            }
            while let Ok(index) = self.paused.recv_timeout(Duration::from_millis(5)) {
                waiting.retain(|&i| i != index);
            }
            if Instant::now() > deadline {
                return Err(format!("vCPUs {waiting:?} did not pause within {PAUSE_TIMEOUT:?}"));
            }
        }
        Ok(())
    }

    pub fn resume(&mut self) -> Result<(), String> {
        for vcpu in &self.vcpus {
            vcpu.send(VcpuCommand::Resume);
        }
        Ok(())
    }

    /// Pauses the guest, stops the device threads and writes the snapshot into `dir`.
    fn snapshot(&mut self, dir: &Path) -> Result<(), String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        self.pause()?;
        for transport in &self.transports {
            lock(transport).quiesce();
        }
        let msrs = self.msrs_to_save()?;
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for vcpu in &self.vcpus {
            let (reply, answer) = channel();
            vcpu.send(VcpuCommand::Save { msrs: msrs.clone(), reply });
            let state = answer
                .recv_timeout(PAUSE_TIMEOUT)
                .map_err(|_| format!("vCPU {} did not save its state", vcpu.index))?
                .map_err(|e| e.to_string())?;
            vcpus.push(state);
        }
        let state = MicrovmState {
            memory_mib: self.memory_mib,
            cpu_vendor: self.cpu_vendor.clone(),
            cpu_template: self.cpu_template,
            vcpus,
            vm: vm::save_state(&self.vm).map_err(|e| format!("interrupt controllers, timer and clock: {e}"))?,
            serial: lock(&self.console).save_state(),
            virtio: self.transports.iter().map(|t| lock(t).save_state()).collect(),
        };
        snapshot::write_memory(dir, &self.memory).map_err(|e| e.to_string())?;
        snapshot::write_state(dir, &state).map_err(|e| e.to_string())
    }

    /// The MSRs KVM can save for this VM: its index list, less those it refuses to read
    /// (KVM_GET_MSRS stops at the first one it cannot read).
    fn msrs_to_save(&self) -> Result<Vec<u32>, String> {
        let list = self.kvm.get_msr_index_list().map_err(|e| format!("KVM_GET_MSR_INDEX_LIST: {e}"))?;
        let mut indices = list.as_slice().to_vec();
        let Some(first) = self.vcpus.first() else { return Ok(indices) };
        for _ in 0..indices.len() {
            let (reply, answer) = channel();
            first.send(VcpuCommand::Save { msrs: indices.clone(), reply });
            match answer.recv_timeout(PAUSE_TIMEOUT) {
                Ok(Ok(_)) => return Ok(indices),
                // KVM could not read the MSR at `read`: drop it and try the rest.
                Ok(Err(SaveError::Msrs { read, .. })) if read < indices.len() => drop(indices.remove(read)),
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => return Err(format!("vCPU {} did not answer", first.index)),
            }
        }
        Err("no MSR could be read".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse() {
        assert_eq!(Request::parse("pause\n"), Ok(Request::Pause));
        assert_eq!(Request::parse(" resume "), Ok(Request::Resume));
        assert_eq!(Request::parse("snapshot /tmp/t"), Ok(Request::Snapshot("/tmp/t".into())));
        assert_eq!(Request::parse("shutdown"), Ok(Request::Shutdown));
        assert!(Request::parse("snapshot").is_err());
        assert!(Request::parse("pause now").is_err());
        assert!(Request::parse("reboot").is_err());
        assert!(Request::parse("").is_err());
    }
}
