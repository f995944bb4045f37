//! The virtio-net device: two queues (RX, TX), the MAC in its config space, and the
//! offloads a vnet-header tap gives for nothing.

use super::persist::NetState;
use super::tap::Backend;
use super::worker::{GuestQueues, Worker};
use super::{
    MacAddr, NetHandle, NetMetrics, F_CSUM, F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6, F_HOST_TSO4, F_HOST_TSO6, F_MAC,
    F_RING_INDIRECT_DESC, QUEUE_SIZE,
};
use crate::devices::virtio::{
    read_config_bytes, ActivateError, ActiveQueues, DeviceThread, VirtioDevice, TYPE_NET, VIRTIO_F_VERSION_1,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// What the device offers. No UFO: Linux dropped UDP fragmentation offload in 4.14, so a
/// Linux guest neither sends it nor can take it (USO, its successor, needs 6.2 on both
/// ends). No MRG_RXBUF (see the module doc of `net`), no control queue, no STATUS (the
/// link is always up), no multiqueue.
pub const OFFERED_FEATURES: u64 = VIRTIO_F_VERSION_1
    | F_RING_INDIRECT_DESC
    | F_MAC
    | F_CSUM
    | F_GUEST_CSUM
    | F_GUEST_TSO4
    | F_GUEST_TSO6
    | F_HOST_TSO4
    | F_HOST_TSO6;

pub struct NetDevice {
    handle: NetHandle,
    backend: Option<Arc<dyn Backend>>,
    worker: Option<DeviceThread>,
}

impl NetDevice {
    /// A device with address `mac`, attached to `backend` or detached (`None`).
    pub fn new(mac: MacAddr, backend: Option<Arc<dyn Backend>>) -> NetDevice {
        let handle =
            NetHandle { mac, metrics: Arc::new(NetMetrics::default()), acked_features: Arc::new(AtomicU64::new(0)) };
        NetDevice { handle, backend, worker: None }
    }

    /// The device a snapshot saved, with the backend of the VM restoring it (or none).
    pub fn from_state(state: &NetState, backend: Option<Arc<dyn Backend>>) -> NetDevice {
        let device = NetDevice::new(state.mac, backend);
        device.handle.acked_features.store(state.acked_features, Ordering::SeqCst);
        device
    }

    pub fn handle(&self) -> NetHandle {
        self.handle.clone()
    }
}

impl VirtioDevice for NetDevice {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 2]
    }

    fn features(&self) -> u64 {
        OFFERED_FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.handle.mac.0, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The MAC is read-only: VIRTIO_NET_F_CTRL_MAC_ADDR is not offered.
    }

    fn activate(&mut self, active: ActiveQueues) -> Result<(), ActivateError> {
        self.worker = None;
        self.handle.acked_features.store(active.acked_features, Ordering::SeqCst);
        let (backend, metrics) = (self.backend.clone(), self.handle.metrics.clone());
        self.worker = Some(DeviceThread::spawn("virtio-net", move |stop| {
            // Here rather than before: the tap's offload ioctl belongs on the device side
            // (the seccomp launcher), not on the vCPU thread that activates the device.
            if let Some(backend) = &backend {
                backend.set_guest_features(active.acked_features)?;
            }
            let guest = GuestQueues {
                memory: active.memory,
                queues: active.queues,
                queue_events: active.queue_events,
                interrupt: active.interrupt,
            };
            let worker = Worker::new(guest, backend, metrics, stop)?;
            Ok(move || worker.run())
        })?);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
    }
}
