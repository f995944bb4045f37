//! virtio devices over the virtio-mmio transport (virtio 1.2, "modern" MMIO version 2).
//!
//! The transport ([`mmio::MmioTransport`]) owns the registers, feature negotiation and
//! queue configuration, and runs in the vCPU thread that takes the MMIO exit. When the
//! driver sets DRIVER_OK, the device ([`VirtioDevice`]) is activated with its queues and
//! runs on its own thread from then on, woken by ioeventfds (queue notifications that
//! KVM turns into eventfd signals without leaving the kernel) and interrupting the guest
//! through an irqfd.

pub mod fs;
pub mod mmio;
pub mod net;
#[cfg(test)]
pub mod test_driver;
pub mod vsock;

use crate::seccomp::{self, ThreadKind};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Feature bit every modern device offers and a modern driver must accept.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Device type numbers from the virtio specification.
pub const TYPE_NET: u32 = 1;
pub const TYPE_VSOCK: u32 = 19;
pub const TYPE_FS: u32 = 26;

/// Interrupt status bits (InterruptStatus register).
pub const INTERRUPT_USED_BUFFER: u32 = 1;
pub const INTERRUPT_CONFIG_CHANGE: u32 = 2;

/// The device's interrupt line: a status word the driver reads and acknowledges through
/// the transport, and the irqfd that raises the guest interrupt.
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Interrupt {
        Interrupt { status: AtomicU32::new(0), irqfd }
    }

    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }

    /// Tells the driver that used buffers are waiting.
    pub fn signal_used_queue(&self) -> std::io::Result<()> {
        self.signal(INTERRUPT_USED_BUFFER)
    }

    pub fn signal(&self, bits: u32) -> std::io::Result<()> {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.irqfd.write(1)
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// What an activated device is given: guest memory, the configured queues with the
/// eventfds KVM signals when the driver notifies each one, and the interrupt.
pub struct ActiveQueues {
    pub memory: GuestMemoryMmap,
    pub queues: Vec<Queue>,
    pub queue_events: Vec<EventFd>,
    pub interrupt: Arc<Interrupt>,
    pub acked_features: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("cannot start the device thread: {0}")]
    Thread(std::io::Error),
    #[error("device setup: {0}")]
    Setup(std::io::Error),
}

/// The thread an active device does its work on, with the eventfd that stops it.
pub struct DeviceThread {
    stop: EventFd,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl DeviceThread {
    /// `prepare` gets the eventfd that, once readable, asks the work to return, and sets
    /// the work up (here, so a setup error fails the activation); the work it returns then
    /// runs on a thread called `name`.
    ///
    /// Setup and start run on the seccomp launcher thread when filters are on (a vCPU
    /// activates devices, and its filter allows neither), and the thread installs the
    /// device filter before its work.
    pub fn spawn<W: FnOnce() + Send + 'static>(
        name: &str,
        prepare: impl FnOnce(EventFd) -> std::io::Result<W> + Send + 'static,
    ) -> Result<DeviceThread, ActivateError> {
        let name = name.to_string();
        seccomp::launch(move || {
            let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::Setup)?;
            let work = prepare(stop.try_clone().map_err(ActivateError::Setup)?).map_err(ActivateError::Setup)?;
            let filtered = move || {
                seccomp::install_or_exit(ThreadKind::Device);
                work()
            };
            let handle = std::thread::Builder::new().name(name).spawn(filtered).map_err(ActivateError::Thread)?;
            Ok(DeviceThread { stop, handle: Some(handle) })
        })
    }
}

impl Drop for DeviceThread {
    /// Stops the thread and waits for it: a reset device must not touch guest memory.
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features the device offers (VIRTIO_F_VERSION_1 included).
    fn features(&self) -> u64;
    /// Reads device configuration space at `offset`. Bytes beyond it read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space; most devices ignore it.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device's work with queues the driver has set up.
    fn activate(&mut self, active: ActiveQueues) -> Result<(), ActivateError>;
    /// Stops the device's work after a driver reset, so it can be activated again.
    fn reset(&mut self);
    /// Called before a device restored from a snapshot is activated: connections and
    /// sessions the guest had are gone, which some devices must tell the guest.
    fn restored(&mut self) {}
}

/// Copies the part of `config` that `offset`/`data` cover; the rest of `data` is zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(offset) = usize::try_from(offset) else { return };
    if let Some(src) = config.get(offset..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_are_bounded() {
        let config = [1u8, 2, 3, 4, 5, 6, 7, 8];
        let mut data = [0xffu8; 4];
        read_config_bytes(&config, 6, &mut data);
        assert_eq!(data, [7, 8, 0, 0]);
        read_config_bytes(&config, 100, &mut data);
        assert_eq!(data, [0; 4]);
        read_config_bytes(&config, u64::MAX, &mut data);
        assert_eq!(data, [0; 4]);
    }

    #[test]
    fn interrupt_status_is_set_and_acknowledged() {
        let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        irq.signal_used_queue().unwrap();
        irq.signal(INTERRUPT_CONFIG_CHANGE).unwrap();
        assert_eq!(irq.status(), 3);
        assert_eq!(irq.irqfd().read().unwrap(), 2);
        irq.acknowledge(INTERRUPT_USED_BUFFER);
        assert_eq!(irq.status(), INTERRUPT_CONFIG_CHANGE);
    }
}
