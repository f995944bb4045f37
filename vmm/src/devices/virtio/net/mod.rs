//! virtio-net with a tap backend the VMM inherits (Kata's tcfilter model): the shim makes
//! a tap in the pod's network namespace, ties it to CNI's veth with tc mirred, and hands
//! the VMM the open descriptor. The VMM needs no CAP_NET_ADMIN, no network namespace and
//! no /dev/net/tun: the only tap ioctls it makes (TUNSETVNETHDRSZ, TUNSETOFFLOAD,
//! TUNGETIFF) need no capability on an attached descriptor.
//!
//! The 12-byte `virtio_net_hdr_v1` passes straight through: the tap is set to the same
//! header size, so each TX chain is written to the tap as it is and each tap frame lands
//! in an RX chain as read. Offloads (checksum, TSO) are therefore free: the tap's kernel
//! side does the work from that header.
//!
//! No VIRTIO_NET_F_MRG_RXBUF: without it a frame goes into one RX chain, never split over
//! several, so the device needs no `num_buffers` bookkeeping and no partial-frame state.
//! The price is that a Linux guest that negotiated GUEST_TSO posts "big" chains of ~64 KiB
//! (19 descriptors: header, then pages); INDIRECT_DESC is offered so each such chain takes
//! one ring slot instead of 19.
//!
//! A device without a backend ("detached") is what a warm-start template is booted with:
//! TX chains are consumed and counted as dropped, RX never fires; a VM restored from the
//! template attaches its tap then ([`device::NetDevice::new`] with a backend).
//!
//! [`device`] is the virtio device (features, config space, activation), [`worker`] the
//! thread that moves frames between the queues and the backend, [`tap`] the backend,
//! [`persist`] the saved state.

pub mod device;
pub mod persist;
pub mod tap;
#[cfg(test)]
mod tests;
pub mod worker;

pub use device::NetDevice;

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const QUEUE_SIZE: u16 = 256;
/// `virtio_net_hdr_v1`: what every frame carries in front with VIRTIO_F_VERSION_1.
pub const VNET_HDR_LEN: usize = 12;
/// Largest frame after the header: a 64 KiB GSO frame plus Ethernet and VLAN headers,
/// the bound Linux's tap and virtio_net themselves keep to.
pub const MAX_FRAME_LEN: usize = 65550;
/// Largest header + frame a chain may carry either way.
pub const MAX_BUFFER_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;
/// Descriptors one chain may have: Linux uses at most MAX_SKB_FRAGS + 2 (19); more is a
/// guest that wants the device to walk a long list for nothing.
pub const MAX_CHAIN_DESCRIPTORS: usize = 64;
/// Chains served per queue per event, so a guest flooding one queue cannot keep the
/// worker from the other queue, the tap or a stop request.
pub const BATCH: usize = 64;

// Feature bits (virtio 1.2, 5.1.3).
pub const F_CSUM: u64 = 1 << 0;
pub const F_GUEST_CSUM: u64 = 1 << 1;
pub const F_MAC: u64 = 1 << 5;
pub const F_GUEST_TSO4: u64 = 1 << 7;
pub const F_GUEST_TSO6: u64 = 1 << 8;
pub const F_HOST_TSO4: u64 = 1 << 11;
pub const F_HOST_TSO6: u64 = 1 << 12;
pub const F_RING_INDIRECT_DESC: u64 = 1 << 28;

/// A unicast Ethernet address, as `--net-mac` gives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MacAddr(pub [u8; 6]);

impl FromStr for MacAddr {
    type Err = String;

    /// Six two-digit hex bytes separated by colons; multicast and all-zero addresses are
    /// refused (Linux would not take them for an interface).
    fn from_str(text: &str) -> Result<MacAddr, String> {
        let mut mac = [0u8; 6];
        let parts: Vec<&str> = text.split(':').collect();
        if parts.len() != 6 {
            return Err("a MAC address is six hex bytes separated by colons (aa:bb:cc:dd:ee:ff)".into());
        }
        for (byte, part) in mac.iter_mut().zip(&parts) {
            if part.len() != 2 {
                return Err(format!("{part:?} is not a two-digit hex byte"));
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| format!("{part:?} is not a two-digit hex byte"))?;
        }
        if mac[0] & 1 != 0 {
            return Err("the multicast bit (bit 0 of the first byte) is set".into());
        }
        if mac == [0; 6] {
            return Err("the all-zero address is not an interface address".into());
        }
        Ok(MacAddr(mac))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

/// What the device counts; shared by the device, its worker and whoever reports them.
#[derive(Debug, Default)]
pub struct NetMetrics {
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// TX frames consumed with no backend attached.
    pub tx_dropped_detached: AtomicU64,
    /// TX chains that were malformed: too many descriptors, a loop, a write-only
    /// descriptor, an address outside guest memory, shorter than the header.
    pub tx_malformed: AtomicU64,
    /// TX chains over [`MAX_BUFFER_LEN`].
    pub tx_too_big: AtomicU64,
    /// Frames the backend refused (interface down, say).
    pub tx_backend_errors: AtomicU64,
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// RX chains that were malformed (read-only descriptor, outside guest memory, ...).
    pub rx_malformed: AtomicU64,
    /// Frames from the backend that did not fit the guest's buffer.
    pub rx_too_big: AtomicU64,
    /// Frames from the backend shorter than the header.
    pub rx_runts: AtomicU64,
    pub rx_backend_errors: AtomicU64,
    /// Times reading the backend stopped because the guest had no RX buffer posted.
    pub rx_no_buffers: AtomicU64,
}

impl NetMetrics {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// `name=value` pairs, space separated, for the control API and logs.
    pub fn render(&self) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("net_tx_frames", get(&self.tx_frames)),
            ("net_tx_bytes", get(&self.tx_bytes)),
            ("net_tx_dropped_detached", get(&self.tx_dropped_detached)),
            ("net_tx_malformed", get(&self.tx_malformed)),
            ("net_tx_too_big", get(&self.tx_too_big)),
            ("net_tx_backend_errors", get(&self.tx_backend_errors)),
            ("net_rx_frames", get(&self.rx_frames)),
            ("net_rx_bytes", get(&self.rx_bytes)),
            ("net_rx_malformed", get(&self.rx_malformed)),
            ("net_rx_too_big", get(&self.rx_too_big)),
            ("net_rx_runts", get(&self.rx_runts)),
            ("net_rx_backend_errors", get(&self.rx_backend_errors)),
            ("net_rx_no_buffers", get(&self.rx_no_buffers)),
        ]
        .iter()
        .map(|(name, value)| format!("{name}={value}"))
        .collect::<Vec<_>>()
        .join(" ")
    }
}

/// What the rest of the VMM keeps of a net device once it is behind its transport: the
/// MAC, the counters and the features the guest accepted, for snapshots and reports.
#[derive(Clone, Debug)]
pub struct NetHandle {
    pub mac: MacAddr,
    pub metrics: std::sync::Arc<NetMetrics>,
    pub acked_features: std::sync::Arc<AtomicU64>,
}

impl NetHandle {
    /// The MAC, the features the guest's driver accepted (0 until it started the device)
    /// and the counters, as `name=value` words.
    pub fn report(&self) -> String {
        let acked = self.acked_features.load(Ordering::SeqCst);
        format!("net_mac={} net_acked_features={acked:#x} {}", self.mac, self.metrics.render())
    }
}
