//! The virtio-mmio transport, version 2 ("modern"): one 4 KiB register window per device,
//! declared to the guest kernel on its command line (`virtio_mmio.device=4K@ADDR:IRQ`).

pub mod persist;

use super::{ActiveQueues, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::bus::BusDevice;
use std::sync::Arc;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Size of one device's register window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// Offset of QueueNotify: KVM turns writes here into ioeventfd signals.
pub const QUEUE_NOTIFY: u64 = 0x50;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4e42_5856; // "VXBN", nestbox
const CONFIG_SPACE: u64 = 0x100;

// Register offsets.
const REG_MAGIC: u64 = 0x00;
const REG_VERSION: u64 = 0x04;
const REG_DEVICE_ID: u64 = 0x08;
const REG_VENDOR_ID: u64 = 0x0c;
const REG_DEVICE_FEATURES: u64 = 0x10;
const REG_DEVICE_FEATURES_SEL: u64 = 0x14;
const REG_DRIVER_FEATURES: u64 = 0x20;
const REG_DRIVER_FEATURES_SEL: u64 = 0x24;
const REG_QUEUE_SEL: u64 = 0x30;
const REG_QUEUE_NUM_MAX: u64 = 0x34;
const REG_QUEUE_NUM: u64 = 0x38;
const REG_QUEUE_READY: u64 = 0x44;
const REG_INTERRUPT_STATUS: u64 = 0x60;
const REG_INTERRUPT_ACK: u64 = 0x64;
const REG_STATUS: u64 = 0x70;
const REG_QUEUE_DESC_LOW: u64 = 0x80;
const REG_QUEUE_DESC_HIGH: u64 = 0x84;
const REG_QUEUE_AVAIL_LOW: u64 = 0x90;
const REG_QUEUE_AVAIL_HIGH: u64 = 0x94;
const REG_QUEUE_USED_LOW: u64 = 0xa0;
const REG_QUEUE_USED_HIGH: u64 = 0xa4;
const REG_CONFIG_GENERATION: u64 = 0xfc;

// Device status bits.
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 0x40;
pub const STATUS_FAILED: u32 = 0x80;

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    memory: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    config_generation: u32,
    active: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("virtio queue of size {size}: {source:?}")]
    Queue { size: u16, source: virtio_queue::Error },
    #[error("queue eventfd: {0}")]
    EventFd(std::io::Error),
}

impl MmioTransport {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        memory: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
    ) -> Result<MmioTransport, TransportError> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&size| Queue::new(size).map_err(|source| TransportError::Queue { size, source }))
            .collect::<Result<Vec<_>, _>>()?;
        let queue_events = (0..queues.len())
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).map_err(TransportError::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MmioTransport {
            device,
            memory,
            interrupt,
            queues,
            queue_events,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            config_generation: 0,
            active: false,
        })
    }

    /// The eventfd to register with KVM for notifications of queue `index`.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may change only while the driver sets the device up.
    fn queue_config_allowed(&self) -> bool {
        self.status & STATUS_FEATURES_OK != 0 && self.status & STATUS_DRIVER_OK == 0
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MAGIC_VALUE,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let setting_up = self.queue_config_allowed();
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            // Features are accepted between DRIVER and FEATURES_OK only.
            REG_DRIVER_FEATURES if self.status & (STATUS_DRIVER | STATUS_FEATURES_OK) == STATUS_DRIVER => {
                let shift = match self.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                let mask = 0xffff_ffffu64 << shift;
                // The driver may only accept what the device offered.
                let accepted = (u64::from(value) << shift) & self.device.features();
                self.acked_features = (self.acked_features & !mask) | accepted;
            }
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NUM if setting_up => {
                if let (Some(q), Ok(size)) = (self.selected_queue(), u16::try_from(value)) {
                    q.set_size(size);
                }
            }
            REG_QUEUE_READY if setting_up => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            REG_QUEUE_DESC_LOW if setting_up => self.with_queue(|q| q.set_desc_table_address(Some(value), None)),
            REG_QUEUE_DESC_HIGH if setting_up => self.with_queue(|q| q.set_desc_table_address(None, Some(value))),
            REG_QUEUE_AVAIL_LOW if setting_up => self.with_queue(|q| q.set_avail_ring_address(Some(value), None)),
            REG_QUEUE_AVAIL_HIGH if setting_up => self.with_queue(|q| q.set_avail_ring_address(None, Some(value))),
            REG_QUEUE_USED_LOW if setting_up => self.with_queue(|q| q.set_used_ring_address(Some(value), None)),
            REG_QUEUE_USED_HIGH if setting_up => self.with_queue(|q| q.set_used_ring_address(None, Some(value))),
            QUEUE_NOTIFY => {
                // Normally KVM's ioeventfd takes these writes; one that reaches us (another
                // access width, say) is forwarded the same way.
                if let Some(evt) = self.queue_events.get(value as usize) {
                    let _ = evt.write(1);
                }
            }
            REG_INTERRUPT_ACK => self.interrupt.acknowledge(value),
            REG_STATUS => self.set_status(value),
            _ => {}
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected_queue() {
            f(q);
        }
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let newly = value & !self.status;
        let mut value = value;
        if newly & STATUS_FEATURES_OK != 0 && self.acked_features & VIRTIO_F_VERSION_1 == 0 {
            // A legacy driver on a modern-only transport: refuse FEATURES_OK, which tells
            // the driver the negotiation failed.
            value &= !STATUS_FEATURES_OK;
        }
        self.status = value;
        if newly & STATUS_DRIVER_OK != 0 && value & STATUS_FEATURES_OK != 0 && !self.active {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let queues_ok = self.queues.iter().all(|q| q.is_valid(&self.memory));
        let events: Result<Vec<EventFd>, _> = self.queue_events.iter().map(|e| e.try_clone()).collect();
        // The device gets its own copies of the queues; the transport keeps the
        // configuration for reads of its registers and for a later reset.
        let copies: Result<Vec<Queue>, _> = self.queues.iter().map(|q| Queue::try_from(q.state())).collect();
        let result = match (queues_ok, events, copies) {
            (true, Ok(queue_events), Ok(queues)) => self
                .device
                .activate(ActiveQueues {
                    memory: self.memory.clone(),
                    queues,
                    queue_events,
                    interrupt: self.interrupt.clone(),
                    acked_features: self.acked_features,
                })
                .map_err(|e| e.to_string()),
            (false, _, _) => Err("a queue is not ready or lies outside guest memory".into()),
            (_, Err(e), _) => Err(format!("cloning queue eventfds: {e}")),
            (_, _, Err(e)) => Err(format!("copying queue state: {e:?}")),
        };
        match result {
            Ok(()) => self.active = true,
            Err(reason) => {
                eprintln!("nestbox-vmm: virtio device type {} not activated: {reason}", self.device.device_type());
                self.status |= STATUS_NEEDS_RESET;
                let _ = self.interrupt.signal(super::INTERRUPT_CONFIG_CHANGE);
            }
        }
    }

    /// Stops the device's thread without touching the transport's registers, so its
    /// state can be saved: a stopped device has returned every chain it took.
    pub fn quiesce(&mut self) {
        if self.active {
            self.device.reset();
        }
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.interrupt.acknowledge(u32::MAX);
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_register(offset).to_le_bytes());
        } else {
            // Registers are 32 bits wide; other accesses are undefined: read zeros.
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            self.device.write_config(offset - CONFIG_SPACE, data);
            self.config_generation = self.config_generation.wrapping_add(1);
        } else if let (Ok(bytes), true) = (<[u8; 4]>::try_from(data), offset.is_multiple_of(4)) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::ActivateError;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use vm_memory::GuestAddress;

    struct Fake {
        activations: Arc<AtomicUsize>,
        resets: Arc<AtomicUsize>,
    }

    impl VirtioDevice for Fake {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 1
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&[9, 8, 7, 6], offset, data);
        }
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(&mut self, active: ActiveQueues) -> Result<(), ActivateError> {
            assert_eq!(active.queues.len(), 2);
            assert_eq!(active.acked_features, VIRTIO_F_VERSION_1 | 1);
            self.activations.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn reset(&mut self) {
            self.resets.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn transport() -> (MmioTransport, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let (a, r) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let dev = Fake { activations: a.clone(), resets: r.clone() };
        (MmioTransport::new(Box::new(dev), mem, irq).unwrap(), a, r)
    }

    fn rd(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, offset: u64, v: u32) {
        t.write(offset, &v.to_le_bytes());
    }

    /// Drives the transport the way Linux's virtio_mmio driver does.
    fn set_up_queues(t: &mut MmioTransport) {
        for (i, base) in [(0u32, 0x1000u32), (1, 0x2000)] {
            wr(t, REG_QUEUE_SEL, i);
            assert_eq!(rd(t, REG_QUEUE_NUM_MAX), 16);
            wr(t, REG_QUEUE_NUM, 16);
            wr(t, REG_QUEUE_DESC_LOW, base);
            wr(t, REG_QUEUE_DESC_HIGH, 0);
            wr(t, REG_QUEUE_AVAIL_LOW, base + 0x100);
            wr(t, REG_QUEUE_AVAIL_HIGH, 0);
            wr(t, REG_QUEUE_USED_LOW, base + 0x200);
            wr(t, REG_QUEUE_USED_HIGH, 0);
            wr(t, REG_QUEUE_READY, 1);
        }
    }

    fn negotiate(t: &mut MmioTransport, high_features: u32) {
        wr(t, REG_STATUS, STATUS_ACKNOWLEDGE);
        wr(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        wr(t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(t, REG_DEVICE_FEATURES), 1);
        wr(t, REG_DRIVER_FEATURES_SEL, 0);
        wr(t, REG_DRIVER_FEATURES, 0xffff_ffff); // more than offered: only bit 0 sticks
        wr(t, REG_DRIVER_FEATURES_SEL, 1);
        wr(t, REG_DRIVER_FEATURES, high_features);
        wr(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    }

    #[test]
    fn identifies_as_a_modern_device() {
        let (mut t, _, _) = transport();
        assert_eq!(rd(&mut t, REG_MAGIC), MAGIC_VALUE);
        assert_eq!(rd(&mut t, REG_VERSION), 2);
        assert_eq!(rd(&mut t, REG_DEVICE_ID), 42);
        let mut cfg = [0u8; 2];
        t.read(CONFIG_SPACE + 2, &mut cfg);
        assert_eq!(cfg, [7, 6]);
    }

    #[test]
    fn full_handshake_activates_once_and_reset_stops_the_device() {
        let (mut t, activations, resets) = transport();
        negotiate(&mut t, 1);
        assert_ne!(rd(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
        set_up_queues(&mut t);
        wr(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        assert_eq!(activations.load(Ordering::SeqCst), 1);
        // Queue registers are frozen once the device runs.
        wr(&mut t, REG_QUEUE_SEL, 0);
        wr(&mut t, REG_QUEUE_READY, 0);
        assert_eq!(rd(&mut t, REG_QUEUE_READY), 1);
        wr(&mut t, REG_STATUS, 0);
        assert_eq!(resets.load(Ordering::SeqCst), 1);
        assert_eq!(rd(&mut t, REG_STATUS), 0);
        assert_eq!(rd(&mut t, REG_QUEUE_READY), 0);
        // And it can be brought up again.
        negotiate(&mut t, 1);
        set_up_queues(&mut t);
        wr(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        assert_eq!(activations.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn legacy_driver_is_refused() {
        let (mut t, activations, _) = transport();
        negotiate(&mut t, 0); // VERSION_1 not accepted
        assert_eq!(rd(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
        set_up_queues(&mut t);
        wr(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK);
        assert_eq!(activations.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn queues_outside_memory_are_not_activated() {
        let (mut t, activations, _) = transport();
        negotiate(&mut t, 1);
        set_up_queues(&mut t);
        wr(&mut t, REG_QUEUE_SEL, 1);
        wr(&mut t, REG_QUEUE_USED_LOW, 0xffff_f000);
        wr(&mut t, REG_QUEUE_USED_HIGH, 0xff);
        wr(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        assert_eq!(activations.load(Ordering::SeqCst), 0);
        assert_ne!(rd(&mut t, REG_STATUS) & STATUS_NEEDS_RESET, 0);
    }

    #[test]
    fn odd_accesses_are_harmless() {
        let (mut t, _, _) = transport();
        let mut byte = [0xffu8];
        t.read(REG_MAGIC, &mut byte);
        assert_eq!(byte, [0]);
        t.write(REG_STATUS, &[1]); // 1-byte write to a 32-bit register: ignored
        assert_eq!(rd(&mut t, REG_STATUS), 0);
        wr(&mut t, REG_QUEUE_SEL, 99);
        assert_eq!(rd(&mut t, REG_QUEUE_NUM_MAX), 0);
        wr(&mut t, REG_QUEUE_NUM, 8); // no such queue, and not in setup: ignored
        wr(&mut t, QUEUE_NOTIFY, 1000); // no such queue
        wr(&mut t, 0xff0, 1); // unknown register
    }
}
