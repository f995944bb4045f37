//! The saved state of a net device: its MAC and the features the guest accepted. The
//! queues are the transport's (`mmio/persist.rs`); the backend is not saved: a restored
//! VM gets the tap of the sandbox restoring it, or none.

use super::{MacAddr, NetHandle};
use serde::{Deserialize, Serialize};
use std::sync::atomic::Ordering;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct NetState {
    pub mac: MacAddr,
    /// Features the guest accepted (also in the transport's state): what the tap's
    /// offloads are set from when the device starts again.
    pub acked_features: u64,
}

impl NetHandle {
    pub fn save_state(&self) -> NetState {
        NetState { mac: self.mac, acked_features: self.acked_features.load(Ordering::SeqCst) }
    }
}
