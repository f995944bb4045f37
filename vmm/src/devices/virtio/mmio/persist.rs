//! The saved state of a virtio-mmio transport: its registers and each queue's
//! configuration. The device behind it is started again from these queues; most keep
//! nothing of their own across a snapshot (their connections and sessions end), the net
//! device its MAC and features (`net/persist.rs`).

use super::MmioTransport;
use serde::{Deserialize, Serialize};
use virtio_queue::QueueT;

/// One virtqueue as the driver configured it. The ring positions are not kept: device
/// threads are stopped before a snapshot, and a stopped device has returned every chain
/// it took, so both positions equal the used ring's index in guest memory.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueState {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub event_idx: bool,
}

/// A virtio-mmio transport's registers.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct TransportState {
    pub device_type: u32,
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub acked_features: u64,
    pub queue_sel: u32,
    pub config_generation: u32,
    pub interrupt_status: u32,
    pub active: bool,
    pub queues: Vec<QueueState>,
}

/// A saved transport that does not fit the device it is restored onto.
#[derive(Debug, thiserror::Error)]
pub enum TransportRestoreError {
    #[error("snapshot has device type {saved_type} with {saved_queues} queues here, this VM has type {device_type} with {queues}")]
    Device { saved_type: u32, saved_queues: usize, device_type: u32, queues: usize },
    #[error("queue size {saved} in the snapshot, {here} here")]
    QueueSize { saved: u16, here: u16 },
    #[error("reading the used ring: {0}")]
    UsedRing(String),
    #[error("the device did not start again")]
    NotStarted,
}

impl MmioTransport {
    /// The registers and queue configuration, for a snapshot (after [`Self::quiesce`]).
    pub fn save_state(&self) -> TransportState {
        TransportState {
            device_type: self.device.device_type(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            active: self.active,
            queues: self
                .queues
                .iter()
                .map(|q| QueueState {
                    max_size: q.max_size(),
                    size: q.size(),
                    ready: q.ready(),
                    desc_table: q.desc_table(),
                    avail_ring: q.avail_ring(),
                    used_ring: q.used_ring(),
                    event_idx: q.event_idx_enabled(),
                })
                .collect(),
        }
    }

    /// Puts saved registers and queues back and, if the device was running, starts it
    /// again where it stopped (ring positions from the used rings in guest memory).
    pub fn restore_state(&mut self, state: &TransportState) -> Result<(), TransportRestoreError> {
        if state.device_type != self.device.device_type() || state.queues.len() != self.queues.len() {
            return Err(TransportRestoreError::Device {
                saved_type: state.device_type,
                saved_queues: state.queues.len(),
                device_type: self.device.device_type(),
                queues: self.queues.len(),
            });
        }
        for (q, saved) in self.queues.iter_mut().zip(&state.queues) {
            if saved.max_size != q.max_size() {
                return Err(TransportRestoreError::QueueSize { saved: saved.max_size, here: q.max_size() });
            }
            q.set_size(saved.size);
            q.set_desc_table_address(Some(saved.desc_table as u32), Some((saved.desc_table >> 32) as u32));
            q.set_avail_ring_address(Some(saved.avail_ring as u32), Some((saved.avail_ring >> 32) as u32));
            q.set_used_ring_address(Some(saved.used_ring as u32), Some((saved.used_ring >> 32) as u32));
            q.set_event_idx(saved.event_idx);
            q.set_ready(saved.ready);
            if saved.ready {
                let used = q
                    .used_idx(&self.memory, std::sync::atomic::Ordering::Acquire)
                    .map_err(|e| TransportRestoreError::UsedRing(format!("{e:?}")))?;
                q.set_next_avail(used.0);
                q.set_next_used(used.0);
            }
        }
        self.status = state.status;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.acked_features = state.acked_features;
        self.queue_sel = state.queue_sel;
        self.config_generation = state.config_generation;
        if state.interrupt_status != 0 {
            // The guest had not acknowledged an interrupt yet: raise it again.
            let _ = self.interrupt.signal(state.interrupt_status);
        }
        if state.active {
            self.device.restored();
            self.activate();
            if !self.active {
                return Err(TransportRestoreError::NotStarted);
            }
        }
        Ok(())
    }
}
