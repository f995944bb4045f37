//! The net device driven through real virtqueues in guest memory by a small driver that
//! plays the guest's part (so a hostile guest can be played exactly), against a datagram
//! socket pair or a real tap in a network namespace made for the test.

mod persist;
mod props;
mod queues;
mod tap;

use super::tap::Backend;
use super::worker::{GuestQueues, Worker};
use super::NetMetrics;
pub use crate::devices::virtio::test_driver::{Driver, F_INDIRECT, F_NEXT, F_WRITE};
use crate::devices::virtio::Interrupt;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

pub const QSIZE: u16 = 256;
pub const MEM_SIZE: u64 = 4 << 20;
/// Where test buffers live; below it the rings.
pub const DATA: u64 = 0x10_0000;

/// A fake guest: memory, the driver side of RX and TX, and the device's eventfds.
pub struct Guest {
    pub mem: GuestMemoryMmap,
    pub rx: Driver,
    pub tx: Driver,
    pub interrupt: Arc<Interrupt>,
    pub rx_event: EventFd,
    pub tx_event: EventFd,
    pub metrics: Arc<NetMetrics>,
}

impl Guest {
    pub fn new() -> Guest {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        Guest {
            mem,
            rx: Driver::new(0x1_0000, QSIZE),
            tx: Driver::new(0x2_0000, QSIZE),
            interrupt: Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())),
            rx_event: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            tx_event: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            metrics: Arc::new(NetMetrics::default()),
        }
    }

    /// A worker on this guest's queues; the eventfd stops its `run`.
    pub fn worker(&self, backend: Option<Arc<dyn Backend>>) -> (Worker, EventFd) {
        let stop = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let guest = GuestQueues {
            memory: self.mem.clone(),
            queues: vec![self.rx.device_queue(), self.tx.device_queue()],
            queue_events: vec![self.rx_event.try_clone().unwrap(), self.tx_event.try_clone().unwrap()],
            interrupt: self.interrupt.clone(),
        };
        let worker = Worker::new(guest, backend, self.metrics.clone(), stop.try_clone().unwrap()).unwrap();
        (worker, stop)
    }

    pub fn write(&self, addr: u64, bytes: &[u8]) {
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
    }

    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        self.mem.read_slice(&mut out, GuestAddress(addr)).unwrap();
        out
    }

    pub fn count(&self, counter: impl Fn(&NetMetrics) -> &std::sync::atomic::AtomicU64) -> u64 {
        counter(&self.metrics).load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A datagram socket as the backend (one datagram, one frame); the test holds the peer.
pub struct SocketBackend {
    pub sock: UnixDatagram,
    pub offloads: Mutex<Option<u64>>,
}

impl SocketBackend {
    pub fn pair() -> (Arc<SocketBackend>, UnixDatagram) {
        let (ours, peer) = UnixDatagram::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        peer.set_nonblocking(true).unwrap();
        (Arc::new(SocketBackend { sock: ours, offloads: Mutex::new(None) }), peer)
    }
}

impl Backend for SocketBackend {
    fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
    fn read_frame(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.sock.recv(buf)
    }
    fn write_frame(&self, buf: &[u8]) -> std::io::Result<usize> {
        self.sock.send(buf)
    }
    fn set_guest_features(&self, acked: u64) -> std::io::Result<()> {
        *self.offloads.lock().unwrap() = Some(acked);
        Ok(())
    }
}

/// A 12-byte virtio-net header: flags NEEDS_CSUM, GSO TCPv4, hdr_len, gso_size,
/// csum_start, csum_offset, num_buffers 0 (what a guest sends).
pub fn vnet_header() -> [u8; 12] {
    [1, 1, 54, 0, 0xb4, 0x05, 34, 0, 16, 0, 0, 0]
}

/// An Ethernet frame of `len` bytes with a recognisable pattern.
pub fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}
