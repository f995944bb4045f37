//! The net device's thread: TX chains from the guest to the backend, backend frames into
//! the guest's RX chains, each side a bounded batch per event.
//!
//! Hostile-guest rules: a chain is read into (TX) or checked against (RX) one bounce
//! buffer of [`MAX_BUFFER_LEN`] bytes, so no guest input grows host memory; a malformed
//! chain (too many descriptors, a loop, a descriptor of the wrong direction, an address
//! outside guest memory) is returned used with length 0 and counted; a frame that does
//! not fit is dropped and counted. When the guest has no RX buffer posted the worker stops
//! reading the backend (the tap's own queue bounds what waits there) and starts again on
//! the guest's next RX notification.

use super::tap::Backend;
use super::{NetMetrics, BATCH, MAX_BUFFER_LEN, MAX_CHAIN_DESCRIPTORS, RX_QUEUE, TX_QUEUE, VNET_HDR_LEN};
use crate::devices::virtio::Interrupt;
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

const TOKEN_STOP: u64 = 0;
const TOKEN_RX: u64 = 1;
const TOKEN_TX: u64 = 2;
const TOKEN_BACKEND: u64 = 3;
const MAX_LOGGED: u32 = 16;

/// Why a chain was not used as it came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bad {
    Malformed,
    TooBig,
}

/// The guest side of the device: memory, queues and interrupt.
pub struct GuestQueues {
    pub memory: GuestMemoryMmap,
    /// RX then TX.
    pub queues: Vec<Queue>,
    /// The notification eventfds of RX and TX.
    pub queue_events: Vec<EventFd>,
    pub interrupt: Arc<Interrupt>,
}

pub struct Worker {
    memory: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    rx_event: EventFd,
    tx_event: EventFd,
    interrupt: Arc<Interrupt>,
    backend: Option<Arc<dyn Backend>>,
    metrics: Arc<NetMetrics>,
    /// Held so the descriptor in the epoll set stays open; only epoll reads it.
    _stop: EventFd,
    epoll: Epoll,
    /// Whether the backend is in the epoll set (it is not while the guest has no buffer).
    reading: bool,
    tx_buf: Vec<u8>,
    rx_buf: Vec<u8>,
    /// Length of a frame in `rx_buf` read from the backend and not delivered yet.
    rx_pending: Option<usize>,
    /// (address, length) of the RX chain being filled; at most MAX_CHAIN_DESCRIPTORS.
    segments: Vec<(GuestAddress, usize)>,
    logged: u32,
}

impl Worker {
    /// Sets the worker up on `guest`'s queues (RX, TX); `stop` readable asks `run` to return.
    pub fn new(
        guest: GuestQueues,
        backend: Option<Arc<dyn Backend>>,
        metrics: Arc<NetMetrics>,
        stop: EventFd,
    ) -> std::io::Result<Worker> {
        let invalid = || std::io::Error::new(ErrorKind::InvalidInput, "a net device has an RX and a TX queue");
        let mut queues = guest.queues.into_iter();
        let mut events = guest.queue_events.into_iter();
        let (rx, tx) = (queues.next().ok_or_else(invalid)?, queues.next().ok_or_else(invalid)?);
        let (rx_event, tx_event) = (events.next().ok_or_else(invalid)?, events.next().ok_or_else(invalid)?);
        let epoll = Epoll::new()?;
        let add = |fd, token| epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token));
        add(stop.as_raw_fd(), TOKEN_STOP)?;
        add(rx_event.as_raw_fd(), TOKEN_RX)?;
        add(tx_event.as_raw_fd(), TOKEN_TX)?;
        if let Some(backend) = &backend {
            add(backend.fd(), TOKEN_BACKEND)?;
        }
        Ok(Worker {
            memory: guest.memory,
            rx,
            tx,
            rx_event,
            tx_event,
            interrupt: guest.interrupt,
            reading: backend.is_some(),
            backend,
            metrics,
            _stop: stop,
            epoll,
            tx_buf: vec![0; MAX_BUFFER_LEN],
            rx_buf: vec![0; MAX_BUFFER_LEN],
            rx_pending: None,
            segments: Vec::with_capacity(MAX_CHAIN_DESCRIPTORS),
            logged: 0,
        })
    }

    /// Serves events until the stop eventfd is readable.
    pub fn run(mut self) {
        let mut events = [EpollEvent::default(); 4];
        // Chains the guest queued before this activation (or before a snapshot).
        self.process_tx();
        self.process_rx();
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    eprintln!("nestbox-vmm: virtio-net: epoll failed, device stops: {e}");
                    return;
                }
            };
            for event in &events[..n] {
                match event.data() {
                    TOKEN_STOP => return,
                    TOKEN_RX => {
                        let _ = self.rx_event.read();
                        self.resume_reading();
                        self.process_rx();
                    }
                    TOKEN_TX => {
                        let _ = self.tx_event.read();
                        self.process_tx();
                    }
                    _ => self.process_rx(),
                }
            }
        }
    }

    fn log(&mut self, what: std::fmt::Arguments<'_>) {
        if self.logged < MAX_LOGGED {
            self.logged += 1;
            eprintln!("nestbox-vmm: virtio-net: {what}");
        }
    }

    fn return_chain(&mut self, queue: usize, head: u16, len: u32) {
        let q = if queue == RX_QUEUE { &mut self.rx } else { &mut self.tx };
        if q.add_used(&self.memory, head, len).is_err() {
            // A head out of range cannot be returned: the guest loses that chain.
            self.log(format_args!("chain {head} of queue {queue} cannot be returned (bad head or used ring)"));
        }
    }

    fn notify(&mut self, queue: usize) {
        let q = if queue == RX_QUEUE { &mut self.rx } else { &mut self.tx };
        if q.needs_notification(&self.memory).unwrap_or(true) {
            let _ = self.interrupt.signal_used_queue();
        }
    }

    /// Sends up to [`BATCH`] TX chains to the backend (or drops them when detached). If
    /// the batch filled up, the TX eventfd is signalled so the rest is served after
    /// whatever else is waiting.
    pub fn process_tx(&mut self) {
        let memory = self.memory.clone();
        let mut served = 0;
        while served < BATCH {
            let Some(chain) = self.tx.pop_descriptor_chain(&memory) else { break };
            served += 1;
            let head = chain.head_index();
            match read_tx_chain(&memory, chain, &mut self.tx_buf) {
                Ok(len) => self.send_frame(len),
                Err(Bad::Malformed) => NetMetrics::add(&self.metrics.tx_malformed, 1),
                Err(Bad::TooBig) => NetMetrics::add(&self.metrics.tx_too_big, 1),
            }
            self.return_chain(TX_QUEUE, head, 0);
        }
        if served > 0 {
            self.notify(TX_QUEUE);
        }
        if served == BATCH {
            let _ = self.tx_event.write(1);
        }
    }

    fn send_frame(&mut self, len: usize) {
        let Some(backend) = &self.backend else {
            return NetMetrics::add(&self.metrics.tx_dropped_detached, 1);
        };
        match backend.write_frame(&self.tx_buf[..len]) {
            Ok(_) => {
                NetMetrics::add(&self.metrics.tx_frames, 1);
                NetMetrics::add(&self.metrics.tx_bytes, (len - VNET_HDR_LEN) as u64);
            }
            Err(e) => {
                NetMetrics::add(&self.metrics.tx_backend_errors, 1);
                self.log(format_args!("the tap refused a frame of {len} bytes: {e}"));
            }
        }
    }

    fn pause_reading(&mut self) {
        if let (true, Some(backend)) = (self.reading, &self.backend) {
            let _ = self.epoll.ctl(ControlOperation::Delete, backend.fd(), EpollEvent::default());
            self.reading = false;
        }
    }

    fn resume_reading(&mut self) {
        if let (false, Some(backend)) = (self.reading, &self.backend) {
            let interest = EpollEvent::new(EventSet::IN, TOKEN_BACKEND);
            self.reading = self.epoll.ctl(ControlOperation::Add, backend.fd(), interest).is_ok();
        }
    }

    /// Moves up to [`BATCH`] frames from the backend into RX chains. The backend stays in
    /// the (level-triggered) epoll set, so frames left after a full batch are served on
    /// the next turn of the loop.
    pub fn process_rx(&mut self) {
        let Some(backend) = self.backend.clone() else { return };
        let mut used_any = false;
        for _ in 0..BATCH {
            let len = match self.rx_pending {
                Some(len) => len,
                None => match backend.read_frame(&mut self.rx_buf) {
                    Ok(n) if n < VNET_HDR_LEN => {
                        NetMetrics::add(&self.metrics.rx_runts, 1);
                        continue;
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // A tap that fails on read will fail again: stop polling it until
                        // the guest posts buffers again, instead of spinning.
                        NetMetrics::add(&self.metrics.rx_backend_errors, 1);
                        self.log(format_args!("reading the tap failed: {e}"));
                        self.pause_reading();
                        break;
                    }
                },
            };
            self.rx_pending = Some(len);
            match self.deliver(len) {
                Ok(true) => {
                    used_any = true;
                    self.rx_pending = None;
                }
                Ok(false) => {
                    NetMetrics::add(&self.metrics.rx_no_buffers, 1);
                    self.pause_reading();
                    break;
                }
                Err(Bad::TooBig) => {
                    NetMetrics::add(&self.metrics.rx_too_big, 1);
                    self.rx_pending = None;
                }
                Err(Bad::Malformed) => {
                    // The chain went back used and empty; the frame waits for the next.
                    NetMetrics::add(&self.metrics.rx_malformed, 1);
                    used_any = true;
                }
            }
        }
        if used_any {
            self.notify(RX_QUEUE);
        }
    }

    /// Puts the frame of `len` bytes in `rx_buf` into the next RX chain. Ok(false): the
    /// guest has none posted. A chain too small is left for the next frame.
    fn deliver(&mut self, len: usize) -> Result<bool, Bad> {
        let memory = self.memory.clone();
        let Some(chain) = self.rx.pop_descriptor_chain(&memory) else { return Ok(false) };
        let head = chain.head_index();
        let capacity = match rx_segments(&memory, chain, &mut self.segments) {
            Ok(capacity) => capacity,
            Err(bad) => {
                self.return_chain(RX_QUEUE, head, 0);
                return Err(bad);
            }
        };
        if capacity < len {
            self.rx.go_to_previous_position();
            return Err(Bad::TooBig);
        }
        // Without MRG_RXBUF a frame takes exactly one chain: num_buffers is 1. The tap
        // leaves those two bytes of the header alone.
        self.rx_buf[10..VNET_HDR_LEN].copy_from_slice(&1u16.to_le_bytes());
        let mut done = 0;
        for &(addr, seg_len) in &self.segments {
            let n = seg_len.min(len - done);
            if memory.write_slice(&self.rx_buf[done..done + n], addr).is_err() {
                self.return_chain(RX_QUEUE, head, 0);
                return Err(Bad::Malformed);
            }
            done += n;
            if done == len {
                break;
            }
        }
        self.return_chain(RX_QUEUE, head, len as u32);
        NetMetrics::add(&self.metrics.rx_frames, 1);
        NetMetrics::add(&self.metrics.rx_bytes, (len - VNET_HDR_LEN) as u64);
        Ok(true)
    }
}

/// Walks a chain, checking what every chain must be: at most MAX_CHAIN_DESCRIPTORS, not
/// cut short (a loop, a `next` out of range, an unreadable descriptor or indirect table
/// all end the walk on a descriptor that still says NEXT), each descriptor of the
/// direction `writable` wants and inside guest memory. `f` sees each descriptor.
fn walk_chain(
    memory: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    writable: bool,
    mut f: impl FnMut(GuestAddress, usize) -> Result<(), Bad>,
) -> Result<(), Bad> {
    let (mut count, mut more) = (0, true);
    for desc in chain {
        count += 1;
        if count > MAX_CHAIN_DESCRIPTORS || desc.is_write_only() != writable {
            return Err(Bad::Malformed);
        }
        if !memory.check_range(desc.addr(), desc.len() as usize) {
            return Err(Bad::Malformed);
        }
        f(desc.addr(), desc.len() as usize)?;
        more = desc.has_next();
    }
    if count == 0 || more {
        return Err(Bad::Malformed);
    }
    Ok(())
}

/// Copies a TX chain (header and frame) into `buf`; its length.
fn read_tx_chain(
    memory: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    buf: &mut [u8],
) -> Result<usize, Bad> {
    let mut len = 0usize;
    walk_chain(memory, chain, false, |addr, n| {
        let end = len.checked_add(n).filter(|&end| end <= buf.len()).ok_or(Bad::TooBig)?;
        memory.read_slice(&mut buf[len..end], addr).map_err(|_| Bad::Malformed)?;
        len = end;
        Ok(())
    })?;
    if len < VNET_HDR_LEN {
        return Err(Bad::Malformed);
    }
    Ok(len)
}

/// The writable buffers of an RX chain, into `segments`; their total length.
fn rx_segments(
    memory: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    segments: &mut Vec<(GuestAddress, usize)>,
) -> Result<usize, Bad> {
    segments.clear();
    let mut capacity = 0usize;
    walk_chain(memory, chain, true, |addr, n| {
        segments.push((addr, n));
        capacity = capacity.saturating_add(n);
        Ok(())
    })?;
    Ok(capacity)
}
