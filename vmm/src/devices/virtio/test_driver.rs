//! The driver side of split virtqueues in guest memory, for device unit tests: it plays
//! the guest's part exactly (a hostile guest included), with no VM.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

/// The driver side of one split virtqueue.
pub struct Driver {
    size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
    /// How many used entries `take_used` has returned (for diagnostics).
    pub used_seen: u16,
}

impl Driver {
    /// A queue of `size` entries whose rings start at `base` (descriptors, then the
    /// available ring 4 KiB above, the used ring 8 KiB above).
    pub fn new(base: u64, size: u16) -> Driver {
        let (avail, used) = (base + 0x1000, base + 0x2000);
        Driver { size, desc: base, avail, used, next_desc: 0, avail_idx: 0, used_seen: 0 }
    }

    pub fn device_queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some(0));
        q.set_avail_ring_address(Some(self.avail as u32), Some(0));
        q.set_used_ring_address(Some(self.used as u32), Some(0));
        q.set_ready(true);
        q
    }

    pub fn write_desc(&self, mem: &GuestMemoryMmap, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.desc + 16 * u64::from(idx % self.size);
        mem.write_obj(addr, GuestAddress(at)).unwrap();
        mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    /// Makes the chain starting at descriptor `head` available.
    pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
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
            let idx = (self.next_desc + i as u16) % self.size;
            let last = i == bufs.len() - 1;
            let flags = if write { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            self.write_desc(mem, idx, addr, len, flags, (idx + 1) % self.size);
        }
        self.next_desc = (self.next_desc + bufs.len() as u16) % self.size;
        self.publish(mem, head);
        head
    }

    /// Used entries (descriptor head, length) the device returned since the last call.
    pub fn take_used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u16, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let at = self.used + 4 + 8 * u64::from(self.used_seen % self.size);
            let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
            out.push((id as u16, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}
