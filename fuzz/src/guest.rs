//! The guest's side of split virtqueues, written by the fuzzer: descriptors, chains
//! (direct and indirect), available-ring entries and indices, all in a guest memory of
//! [`MEM_SIZE`] bytes. The layout is fixed (queue `q`'s rings at [`queue_base`], buffers
//! in the data area above [`DATA`]) so that most inputs are near-valid, but every field a
//! driver writes can also be set to any value.

use crate::input::{Encoder, Input};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const MEM_SIZE: u64 = 1 << 20;
/// Entries of every queue the fuzz driver sets up: small, so that wrapping is reached.
pub const QUEUE_SIZE: u16 = 16;
/// Start of the buffer area; below it are the rings.
pub const DATA: u64 = 0x2_0000;
const DATA_SPAN: u64 = MEM_SIZE - DATA;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

/// Descriptor table of queue `q`; its available ring is 4 KiB above, its used ring 8 KiB.
pub fn queue_base(q: usize) -> u64 {
    0x1000 + q as u64 * 0x3000
}

/// Longest content one descriptor takes from the input.
const MAX_FILL: usize = 1024;

/// Driver operations, the first byte of each step.
pub const OP_CHAIN: u8 = 0;
pub const OP_RAW_DESC: u8 = 1;
pub const OP_PUBLISH: u8 = 2;
pub const OP_WRITE: u8 = 3;
pub const OP_AVAIL_IDX: u8 = 4;
pub const OP_RING_FLAGS: u8 = 5;
pub const OP_INDIRECT: u8 = 6;
/// Not a driver operation: the target's own (a register access, running the device).
pub const OP_DEVICE: u8 = 7;
const OPS: u8 = 8;

struct Ring {
    desc: u64,
    avail: u64,
    avail_idx: u16,
    next_desc: u16,
}

pub struct Guest {
    pub mem: GuestMemoryMmap,
    rings: Vec<Ring>,
}

impl Guest {
    pub fn new(queues: usize) -> Guest {
        let mem = match GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]) {
            Ok(mem) => mem,
            Err(e) => panic!("guest memory of {MEM_SIZE} bytes: {e}"),
        };
        let rings = (0..queues)
            .map(|q| Ring { desc: queue_base(q), avail: queue_base(q) + 0x1000, avail_idx: 0, next_desc: 0 })
            .collect();
        Guest { mem, rings }
    }

    /// The device's view of queue `q` as a driver would configure it.
    pub fn device_queue(&self, q: usize, event_idx: bool) -> Queue {
        let mut queue = Queue::new(QUEUE_SIZE).expect("a power of two is a valid queue size");
        let base = queue_base(q);
        queue.set_size(QUEUE_SIZE);
        queue.set_desc_table_address(Some(base as u32), Some(0));
        queue.set_avail_ring_address(Some((base + 0x1000) as u32), Some(0));
        queue.set_used_ring_address(Some((base + 0x2000) as u32), Some(0));
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        queue
    }

    /// Starts the rings over, as a driver does after resetting the device: index 0,
    /// descriptor 0 next. Descriptors and buffers stay as they are.
    pub fn restart(&mut self) {
        for q in 0..self.rings.len() {
            let ring = &mut self.rings[q];
            (ring.avail_idx, ring.next_desc) = (0, 0);
            let avail = ring.avail;
            self.write(avail + 2, &0u16.to_le_bytes());
            self.write(avail + 0x1000 + 2, &0u16.to_le_bytes());
        }
    }

    /// Whether every available ring's index, as the guest memory holds it, is 0: a device
    /// activated now starts each queue at index 0 too, so it would find no request to
    /// take, whatever else the memory holds.
    pub fn rings_idle(&self) -> bool {
        self.rings.iter().all(|ring| self.mem.read_obj::<u16>(GuestAddress(ring.avail + 2)).is_ok_and(|idx| idx == 0))
    }

    /// Writes guest memory; a write that runs off the end is cut short (it is the
    /// harness's own write, not the device's).
    fn write(&self, addr: u64, bytes: &[u8]) {
        let _ = self.mem.write_slice(bytes, GuestAddress(addr));
    }

    fn write_desc(&self, q: usize, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.rings[q].desc + 16 * u64::from(idx % QUEUE_SIZE);
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        self.write(at, &d);
    }

    fn publish(&mut self, q: usize, head: u16) {
        let ring = &mut self.rings[q];
        let slot = ring.avail + 4 + 2 * u64::from(ring.avail_idx % QUEUE_SIZE);
        ring.avail_idx = ring.avail_idx.wrapping_add(1);
        let (avail, idx) = (ring.avail, ring.avail_idx);
        self.write(slot, &head.to_le_bytes());
        self.write(avail + 2, &idx.to_le_bytes());
    }

    fn queue(&self, input: &mut Input<'_>) -> usize {
        usize::from(input.u8()) % self.rings.len()
    }

    /// A buffer address: mostly in the data area, sometimes anything at all.
    fn data_addr(input: &mut Input<'_>) -> u64 {
        match input.u16() {
            0xffff => input.u64(),
            v => DATA + (u64::from(v) * 16) % DATA_SPAN,
        }
    }

    /// Fills a device-readable buffer with content from the input.
    fn fill(&self, input: &mut Input<'_>, addr: u64, len: u32) {
        let content = input.bytes((len as usize).min(MAX_FILL));
        self.write(addr, content);
    }

    /// Runs one driver operation. Returns false when the operation is [`OP_DEVICE`],
    /// which the caller interprets.
    pub fn step(&mut self, input: &mut Input<'_>) -> bool {
        match input.u8() % OPS {
            OP_CHAIN => {
                let q = self.queue(input);
                let n = 1 + u16::from(input.u8() % 4);
                let head = self.rings[q].next_desc;
                for i in 0..n {
                    let (addr, len, writable) = (Self::data_addr(input), u32::from(input.u16()), input.bool());
                    if !writable {
                        self.fill(input, addr, len);
                    }
                    let idx = (head + i) % QUEUE_SIZE;
                    let flags = if writable { F_WRITE } else { 0 } | if i + 1 < n { F_NEXT } else { 0 };
                    self.write_desc(q, idx, addr, len, flags, (idx + 1) % QUEUE_SIZE);
                }
                self.rings[q].next_desc = (head + n) % QUEUE_SIZE;
                self.publish(q, head);
            }
            OP_RAW_DESC => {
                let (q, idx) = (self.queue(input), u16::from(input.u8()));
                let (addr, len, flags, next) = (input.u64(), input.u32(), input.u16(), input.u16());
                self.write_desc(q, idx, addr, len, flags, next);
            }
            OP_PUBLISH => {
                let (q, head) = (self.queue(input), input.u16());
                self.publish(q, head);
            }
            OP_WRITE => {
                let addr = Self::data_addr(input);
                let n = input.u8();
                self.fill(input, addr, u32::from(n));
            }
            OP_AVAIL_IDX => {
                let (q, idx) = (self.queue(input), input.u16());
                self.rings[q].avail_idx = idx;
                self.write(self.rings[q].avail + 2, &idx.to_le_bytes());
            }
            OP_RING_FLAGS => {
                // The available ring's flags (NO_INTERRUPT) and its used_event field.
                let (q, flags, used_event) = (self.queue(input), input.u16(), input.u16());
                let avail = self.rings[q].avail;
                self.write(avail, &flags.to_le_bytes());
                self.write(avail + 4 + 2 * u64::from(QUEUE_SIZE), &used_event.to_le_bytes());
            }
            OP_INDIRECT => {
                let q = self.queue(input);
                let table = Self::data_addr(input);
                let n = 1 + u32::from(input.u8() % 8);
                for i in 0..n {
                    let (addr, len, flags, next) = (Self::data_addr(input), input.u16(), input.u16(), input.u8());
                    if flags & F_WRITE == 0 {
                        self.fill(input, addr, u32::from(len));
                    }
                    let mut d = [0u8; 16];
                    d[..8].copy_from_slice(&addr.to_le_bytes());
                    d[8..12].copy_from_slice(&u32::from(len).to_le_bytes());
                    d[12..14].copy_from_slice(&flags.to_le_bytes());
                    d[14..].copy_from_slice(&u16::from(next).to_le_bytes());
                    self.write(table.wrapping_add(16 * u64::from(i)), &d);
                }
                let head = self.rings[q].next_desc;
                self.write_desc(q, head, table, 16 * n, F_INDIRECT, 0);
                self.rings[q].next_desc = (head + 1) % QUEUE_SIZE;
                self.publish(q, head);
            }
            _ => return false,
        }
        true
    }
}

/// Seeds: the input that [`Guest::step`] reads as a chain on queue `q` of buffers
/// (data-area slot, length, writable, content of a readable one).
pub fn encode_chain(e: &mut Encoder, q: u8, bufs: &[(u16, u16, bool, &[u8])]) {
    e.u8(OP_CHAIN).u8(q).u8(bufs.len() as u8 - 1);
    for &(slot, len, writable, content) in bufs {
        e.u16(slot).u16(len).u8(u8::from(writable));
        if !writable {
            assert_eq!(content.len(), len as usize, "a readable buffer's content fills it");
            e.bytes(content);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_lands_in_the_rings() {
        let mut g = Guest::new(2);
        let mut e = Encoder::default();
        encode_chain(&mut e, 1, &[(1, 3, false, b"abc"), (2, 8, true, b"")]);
        assert!(g.step(&mut Input::new(&e.0)));
        let mut q = g.device_queue(1, false);
        let chain = q.pop_descriptor_chain(&g.mem).expect("one chain published");
        let descs: Vec<_> = chain.collect();
        assert_eq!(descs.len(), 2);
        assert_eq!((descs[0].addr().0, descs[0].len(), descs[0].is_write_only()), (DATA + 16, 3, false));
        assert_eq!((descs[1].addr().0, descs[1].len(), descs[1].is_write_only()), (DATA + 32, 8, true));
        let mut content = [0u8; 3];
        g.mem.read_slice(&mut content, GuestAddress(DATA + 16)).unwrap();
        assert_eq!(&content, b"abc");
    }

    #[test]
    fn rings_are_idle_until_a_head_is_published() {
        let mut g = Guest::new(2);
        assert!(g.rings_idle());
        let mut e = Encoder::default();
        e.u8(OP_RAW_DESC).u8(1).u8(0).u64(DATA).u32(8).u16(0).u16(0);
        assert!(g.step(&mut Input::new(&e.0)));
        assert!(g.rings_idle(), "a descriptor alone is no request");
        let mut e = Encoder::default();
        e.u8(OP_PUBLISH).u8(1).u16(0);
        assert!(g.step(&mut Input::new(&e.0)));
        assert!(!g.rings_idle());
        g.restart();
        assert!(g.rings_idle());
    }
}
