//! The running microVM: its KVM objects, vCPU threads and devices, and the loop that waits
//! for the guest to stop or for a control request (pause, resume, snapshot, shutdown).
//!
//! Requests come in through a [`VmControl`], the one narrow handle the layers above (the
//! control API) get; vCPU threads report through [`VcpuEvent`]s. Neither knows this type.

use crate::arch::x86_64::cpuid::CpuTemplate;
use crate::devices::legacy::SerialConsole;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::NetHandle;
use crate::snapshot::{self, MicrovmState, SnapshotError};
use crate::util::lock;
use crate::vstate::vcpu::persist::VcpuSaveError;
use crate::vstate::vcpu::{VcpuCommand, VcpuEvent, VcpuHandle};
use crate::vstate::vm::persist as vm_persist;
use kvm_ioctls::{Kvm, VmFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vm_memory::GuestMemoryMmap;

/// How long vCPUs get to answer a pause before the request fails.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

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

impl From<VcpuEvent> for VmExit {
    fn from(event: VcpuEvent) -> VmExit {
        match event {
            VcpuEvent::Reset => VmExit::Reset,
            VcpuEvent::PowerOff => VmExit::PowerOff,
            VcpuEvent::TripleFault { vcpu } => VmExit::TripleFault { vcpu },
            VcpuEvent::Failed(reason) => VmExit::Error(reason),
        }
    }
}

/// What a controller may ask of the running VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Pause,
    Resume,
    /// Snapshot into this directory, then end the VMM.
    Snapshot(PathBuf),
    Shutdown,
    /// The devices' counters as `name=value` words (the net device's; none without one).
    Metrics,
}

/// What the VM loop waits for.
pub(crate) enum VmEvent {
    Exit(VmExit),
    /// A request and where its answer goes: a text (empty for most requests) or why not.
    Request(Request, Sender<Result<String, String>>),
}

impl From<VcpuEvent> for VmEvent {
    fn from(event: VcpuEvent) -> VmEvent {
        VmEvent::Exit(event.into())
    }
}

/// Why a request was not carried out, as its sender sees it.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The VM loop has ended: no request will be taken again.
    #[error("the VMM no longer takes requests")]
    Closed,
    /// The VM loop took the request but ended before answering.
    #[error("the VMM is stopping")]
    Stopping,
    #[error("{0}")]
    Failed(String),
}

/// The handle through which requests reach a running VM; cheap to clone.
#[derive(Clone)]
pub struct VmControl {
    events: Sender<VmEvent>,
}

impl VmControl {
    /// Sends `request` and waits for the VM loop's answer (a text for `Metrics`).
    pub fn request(&self, request: Request) -> Result<String, ControlError> {
        let (reply, answer) = channel();
        self.events.send(VmEvent::Request(request, reply)).map_err(|_| ControlError::Closed)?;
        answer.recv().map_err(|_| ControlError::Stopping)?.map_err(ControlError::Failed)
    }
}

/// Why a pause or snapshot failed; the guest runs on.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("vCPU {0} has stopped")]
    VcpuStopped(u8),
    #[error("vCPUs {waiting:?} did not pause within {PAUSE_TIMEOUT:?}")]
    PauseTimeout { waiting: Vec<u8> },
    #[error("creating {}: {source}", dir.display())]
    CreateDir { dir: PathBuf, source: std::io::Error },
    #[error("KVM_GET_MSR_INDEX_LIST: {0}")]
    MsrIndexList(kvm_ioctls::Error),
    #[error("no MSR could be read")]
    NoReadableMsr,
    #[error("vCPU {0} did not answer")]
    VcpuSilent(u8),
    #[error("vCPU {0} did not save its state")]
    VcpuNotSaved(u8),
    #[error(transparent)]
    VcpuSave(#[from] VcpuSaveError),
    #[error("interrupt controllers, timer and clock: {0}")]
    VmState(kvm_ioctls::Error),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
}

/// A running microVM, made by [`crate::builder`].
pub struct Vmm {
    pub(crate) kvm: Kvm,
    pub(crate) vm: VmFd,
    pub(crate) memory: GuestMemoryMmap,
    pub(crate) memory_mib: u64,
    pub(crate) cpu_vendor: String,
    pub(crate) cpu_template: CpuTemplate,
    pub(crate) vcpus: Vec<VcpuHandle>,
    /// Each vCPU's index, once it has paused.
    pub(crate) pause_acks: Receiver<u8>,
    pub(crate) events: Receiver<VmEvent>,
    /// The VMM's own sender of `events`, from which [`VmControl`]s are made.
    pub(crate) requests: Sender<VmEvent>,
    pub(crate) console: Arc<Mutex<SerialConsole>>,
    pub(crate) transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// Host files the VMM created (sockets), removed when it ends.
    pub(crate) cleanup_paths: Vec<PathBuf>,
    pub(crate) net: Option<NetHandle>,
}

impl Vmm {
    /// A handle to send this VM requests from another thread.
    pub fn control(&self) -> VmControl {
        VmControl { events: self.requests.clone() }
    }

    /// Removes `path` (a socket someone else made for this VM) when the VMM ends.
    pub fn remove_on_exit(&mut self, path: PathBuf) {
        self.cleanup_paths.push(path);
    }

    /// Runs until the guest stops, a vCPU fails, or a request ends the VMM; says why.
    pub fn wait(mut self) -> VmExit {
        // Let go of our own sender: once every vCPU thread and controller is gone,
        // `recv` fails instead of waiting for ever.
        drop(std::mem::replace(&mut self.requests, channel().0));
        let exit = loop {
            match self.events.recv() {
                Ok(VmEvent::Exit(exit)) => break exit,
                Ok(VmEvent::Request(request, reply)) => {
                    let (result, ends) = self.handle_request(&request);
                    let result = result.map_err(|e| e.to_string());
                    let ok = result.is_ok();
                    let _ = reply.send(result);
                    if let (Some(exit), true) = (ends, ok) {
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
    fn handle_request(&mut self, request: &Request) -> (Result<String, RequestError>, Option<VmExit>) {
        let done = |r: Result<(), RequestError>| r.map(|()| String::new());
        match request {
            Request::Pause => (done(self.pause()), None),
            Request::Resume => (done(self.resume()), None),
            Request::Shutdown => (Ok(String::new()), Some(VmExit::Stopped)),
            Request::Metrics => (Ok(self.net.as_ref().map(NetHandle::report).unwrap_or_default()), None),
            Request::Snapshot(dir) => {
                let result = self.snapshot(dir);
                if result.is_err() {
                    // Leave the guest running as it was; a half-written snapshot is removed.
                    let _ = std::fs::remove_file(dir.join(snapshot::STATE_FILE));
                    let _ = std::fs::remove_file(dir.join(snapshot::MEMORY_FILE));
                    let _ = self.resume();
                }
                (done(result), Some(VmExit::Stopped))
            }
        }
    }

    /// Stops every vCPU outside KVM_RUN. vCPUs see the request after their next exit; a
    /// signal forces one, repeated until each has answered (a signal that lands just
    /// before KVM_RUN is entered would otherwise be missed).
    pub fn pause(&mut self) -> Result<(), RequestError> {
        while self.pause_acks.try_recv().is_ok() {}
        for vcpu in &self.vcpus {
            if !vcpu.send(VcpuCommand::Pause) {
                return Err(RequestError::VcpuStopped(vcpu.index));
            }
        }
        let mut waiting: Vec<u8> = self.vcpus.iter().map(|v| v.index).collect();
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        while !waiting.is_empty() {
            for vcpu in self.vcpus.iter().filter(|v| waiting.contains(&v.index)) {
                vcpu.kick();
            }
            while let Ok(index) = self.pause_acks.recv_timeout(Duration::from_millis(5)) {
                waiting.retain(|&i| i != index);
            }
            if Instant::now() > deadline {
                return Err(RequestError::PauseTimeout { waiting });
            }
        }
        Ok(())
    }

    pub fn resume(&mut self) -> Result<(), RequestError> {
        for vcpu in &self.vcpus {
            vcpu.send(VcpuCommand::Resume);
        }
        Ok(())
    }

    /// Pauses the guest, stops the device threads and writes the snapshot into `dir`.
    fn snapshot(&mut self, dir: &Path) -> Result<(), RequestError> {
        std::fs::create_dir_all(dir).map_err(|source| RequestError::CreateDir { dir: dir.to_path_buf(), source })?;
        self.pause()?;
        for transport in &self.transports {
            lock(transport).quiesce();
        }
        let msrs = self.msrs_to_save()?;
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for vcpu in &self.vcpus {
            let (reply, answer) = channel();
            vcpu.send(VcpuCommand::Save { msrs: msrs.clone(), reply });
            let state = answer.recv_timeout(PAUSE_TIMEOUT).map_err(|_| RequestError::VcpuNotSaved(vcpu.index))??;
            vcpus.push(state);
        }
        let state = MicrovmState {
            memory_mib: self.memory_mib,
            cpu_vendor: self.cpu_vendor.clone(),
            cpu_template: self.cpu_template,
            vcpus,
            vm: vm_persist::save_state(&self.vm).map_err(RequestError::VmState)?,
            serial: lock(&self.console).save_state(),
            virtio: self.transports.iter().map(|t| lock(t).save_state()).collect(),
            net: self.net.as_ref().map(NetHandle::save_state),
        };
        snapshot::write_memory(dir, &self.memory)?;
        Ok(snapshot::write_state(dir, &state)?)
    }

    /// The MSRs KVM can save for this VM: its index list, less those it refuses to read
    /// (KVM_GET_MSRS stops at the first one it cannot read).
    fn msrs_to_save(&self) -> Result<Vec<u32>, RequestError> {
        let list = self.kvm.get_msr_index_list().map_err(RequestError::MsrIndexList)?;
        let mut indices = list.as_slice().to_vec();
        let Some(first) = self.vcpus.first() else { return Ok(indices) };
        for _ in 0..indices.len() {
            let (reply, answer) = channel();
            first.send(VcpuCommand::Save { msrs: indices.clone(), reply });
            match answer.recv_timeout(PAUSE_TIMEOUT) {
                Ok(Ok(_)) => return Ok(indices),
                // KVM could not read the MSR at `read`: drop it and try the rest.
                Ok(Err(VcpuSaveError::Msrs { read, .. })) if read < indices.len() => drop(indices.remove(read)),
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => return Err(RequestError::VcpuSilent(first.index)),
            }
        }
        Err(RequestError::NoReadableMsr)
    }
}
