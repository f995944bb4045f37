//! virtio-net: the TX chains a guest sends (header + frame over any descriptors, direct
//! or indirect, of any length) and the RX chains it posts for frames from the host,
//! through the device's worker ([`Worker::run`]) with a fake tap.
//!
//! The worker runs on the fuzzer's thread: its queue eventfds are signalled before it is
//! made and its stop eventfd after, so `run` serves TX and RX, takes one round of events
//! and returns. The fake tap checks what the worker writes to it (a whole frame, header
//! included, never more than a tap takes) and hands it frames from the input.

use super::eventfd;
use crate::guest::{encode_chain, Guest, OP_DEVICE};
use crate::input::{Encoder, Input};
use nestbox_vmm::devices::virtio::net::tap::Backend;
use nestbox_vmm::devices::virtio::net::worker::{GuestQueues, Worker};
use nestbox_vmm::devices::virtio::net::{NetMetrics, MAX_BUFFER_LEN, VNET_HDR_LEN};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use vmm_sys_util::eventfd::EventFd;

/// A tap that holds frames for the guest and checks the frames from it.
struct FakeTap {
    readable: EventFd,
    frames: Mutex<VecDeque<Vec<u8>>>,
    fail_writes: bool,
}

impl Backend for FakeTap {
    fn fd(&self) -> RawFd {
        self.readable.as_raw_fd()
    }

    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut frames = self.frames.lock().expect("frames lock");
        let Some(frame) = frames.pop_front() else {
            let _ = self.readable.read();
            return Err(io::ErrorKind::WouldBlock.into());
        };
        // A tap truncates a frame to the buffer it is given.
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        Ok(n)
    }

    fn write_frame(&self, buf: &[u8]) -> io::Result<usize> {
        assert!(buf.len() >= VNET_HDR_LEN, "a frame of {} bytes reached the tap: no virtio-net header", buf.len());
        assert!(buf.len() <= MAX_BUFFER_LEN, "a frame of {} bytes reached the tap", buf.len());
        if self.fail_writes {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(buf.len())
    }

    fn set_guest_features(&self, _acked: u64) -> io::Result<()> {
        Ok(())
    }
}

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let flags = input.u8();
    let (detached, fail_writes, event_idx) = (flags & 1 != 0, flags & 2 != 0, flags & 4 != 0);
    let mut guest = Guest::new(2);
    let mut frames = VecDeque::new();
    while !input.is_empty() {
        if !guest.step(&mut input) {
            // The device op: a frame from the host, up to 64 KiB + header (mostly small).
            let len = usize::from(input.u16()) + usize::from(input.u8() & 1) * 0x1_0000;
            let mut frame = input.bytes(len.min(256)).to_vec();
            frame.resize(len, 0);
            frames.push_back(frame);
        }
    }
    let readable = eventfd();
    if !frames.is_empty() {
        readable.write(1).expect("eventfd");
    }
    let tap = FakeTap { readable, frames: Mutex::new(frames), fail_writes };
    let backend: Option<Arc<dyn Backend>> = if detached { None } else { Some(Arc::new(tap)) };
    let events = [eventfd(), eventfd()];
    for event in &events {
        event.write(1).expect("eventfd");
    }
    let stop = eventfd();
    let queues = GuestQueues {
        memory: guest.mem.clone(),
        queues: vec![guest.device_queue(0, event_idx), guest.device_queue(1, event_idx)],
        queue_events: events.iter().map(|e| e.try_clone().expect("eventfd")).collect(),
        interrupt: super::interrupt(),
    };
    let metrics = Arc::new(NetMetrics::default());
    let worker = Worker::new(queues, backend, metrics, stop.try_clone().expect("eventfd")).expect("net worker");
    stop.write(1).expect("eventfd");
    worker.run();
}

pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let (rx, tx) = (0u8, 1u8);
    let mut seeds = Vec::new();
    let frame = [0u8; 12 + 60];

    let mut e = Encoder::default();
    e.u8(4);
    encode_chain(&mut e, rx, &[(0, 2048, true, b"")]);
    encode_chain(&mut e, rx, &[(0x100, 12, true, b""), (0x200, 1500, true, b"")]);
    encode_chain(&mut e, tx, &[(0x300, 72, false, &frame)]);
    encode_chain(&mut e, tx, &[(0x400, 12, false, &frame[..12]), (0x500, 60, false, &frame[12..])]);
    e.u8(OP_DEVICE).u16(80).u8(0).bytes(&[0x11; 80]);
    e.u8(OP_DEVICE).u16(4000).u8(0).bytes(&[0x22; 256]);
    seeds.push(("tx-rx", e.0));

    // A header-only frame, a detached device, an indirect chain.
    let mut e = Encoder::default();
    e.u8(1);
    encode_chain(&mut e, tx, &[(0, 4, false, b"abcd")]);
    e.u8(crate::guest::OP_INDIRECT).u8(tx).u16(0x800).u8(1);
    e.u16(0x900).u16(12).u16(1).u8(1).bytes(&[0; 12]);
    e.u16(0xa00).u16(20).u16(0).u8(0).bytes(&[0x33; 20]);
    seeds.push(("short-and-indirect", e.0));
    seeds
}
