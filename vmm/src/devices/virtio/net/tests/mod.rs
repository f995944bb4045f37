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
use crate::devices::virtio::Interrupt;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

pub const QSIZE: u16 = 256;
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;
pub const MEM_SIZE: u64 = 4 << 20;
/// Where test buffers live; below it the rings.
pub const DATA: u64 = 0x10_0000;

/// The driver side of one split virtqueue.
pub struct Driver {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl Driver {
    pub fn new(base: u64) -> Driver {
        Driver { desc: base, avail: base + 0x1000, used: base + 0x2000, next_desc: 0, avail_idx: 0, used_seen: 0 }
    }

    pub fn device_queue(&self) -> Queue {
        let mut q = Queue::new(QSIZE).unwrap();
        q.set_size(QSIZE);
        q.set_desc_table_address(Some(self.desc as u32), Some(0));
        q.set_avail_ring_address(Some(self.avail as u32), Some(0));
        q.set_used_ring_address(Some(self.used as u32), Some(0));
        q.set_ready(true);
        q
    }

    pub fn write_desc(&self, mem: &GuestMemoryMmap, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.desc + 16 * u64::from(idx % QSIZE);
        mem.write_obj(addr, GuestAddress(at)).unwrap();
        mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    /// Makes the chain starting at descriptor `head` available.
    pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2)).unwrap();
    }

    /// Writes and publishes a chain of (address, length, device-writable) buffers in
    /// consecutive descriptors; its head.
    pub fn add(&mut self, mem: &GuestMemoryMmap, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let idx = (self.next_desc + i as u16) % QSIZE;
            let last = i == bufs.len() - 1;
            let flags = if write { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            self.write_desc(mem, idx, addr, len, flags, (idx + 1) % QSIZE);
        }
        self.next_desc = (self.next_desc + bufs.len() as u16) % QSIZE;
        self.publish(mem, head);
        head
    }

    /// Used entries (descriptor head, length) the device returned since the last call.
    pub fn take_used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u16, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let at = self.used + 4 + 8 * u64::from(self.used_seen % QSIZE);
            let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
            out.push((id as u16, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

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
            rx: Driver::new(0x1_0000),
            tx: Driver::new(0x2_0000),
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
