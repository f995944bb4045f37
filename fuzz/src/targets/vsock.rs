//! vsock: packets the guest puts on the TX queue (header parsing, the connection state
//! machine, flow control, the muxer's table of connections), with the RX and event
//! queues the guest posts, through the device's own event loop ([`Muxer::run`]).
//!
//! The muxer runs on the fuzzer's thread: its queue eventfds are signalled before it is
//! made and its stop eventfd after, so `run` serves the queued TX chains, fills RX, takes
//! one round of events (queue kicks, a host client's `CONNECT` line) and returns. A host
//! listener on port [`HOST_PORT`] accepts the guest's connections, so connected streams
//! (RW, credit, shutdown) are reached, not only RST replies.

use super::eventfd;
use crate::guest::{encode_chain, Guest, OP_DEVICE};
use crate::input::{Encoder, Input};
use nestbox_vmm::devices::virtio::vsock::muxer::Muxer;
use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};

const GUEST_CID: u64 = 3;
/// The host port the harness listens on (the socket `<uds>_1024`).
pub const HOST_PORT: u32 = 1024;

pub fn run(data: &[u8]) {
    run_in(data);
}

/// Runs one input; the guest it leaves behind.
fn run_in(data: &[u8]) -> Guest {
    let mut input = Input::new(data);
    let flags = input.u8();
    let (announce_reset, host_client, event_idx) = (flags & 1 != 0, flags & 2 != 0, flags & 4 != 0);
    let mut guest = Guest::new(3);
    while !input.is_empty() {
        if !guest.step(&mut input) {
            // The device op: nothing of the device is reachable before it runs.
            input.u8();
        }
    }

    let dir = crate::scratch::dir("vsock");
    let uds = dir.join("v.sock");
    let host_port = dir.join(format!("v.sock_{HOST_PORT}"));
    for path in [&uds, &host_port] {
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(&uds).expect("binding the vsock socket");
    let host_listener = UnixListener::bind(&host_port).expect("binding the host port's socket");
    // A host client that asks for the guest's port 52 while the guest's packets are served.
    let client = host_client.then(|| {
        let mut stream = UnixStream::connect(&uds).expect("connecting to the vsock socket");
        stream.write_all(b"CONNECT 52\n").expect("writing CONNECT");
        stream
    });

    let events = [eventfd(), eventfd(), eventfd()];
    for event in &events {
        event.write(1).expect("eventfd");
    }
    let stop = eventfd();
    let queues = (0..3).map(|q| guest.device_queue(q, event_idx)).collect();
    let muxer = Muxer::new(
        GUEST_CID,
        uds.clone(),
        listener,
        guest.mem.clone(),
        queues,
        events.iter().map(|e| e.try_clone().expect("eventfd")).collect(),
        super::interrupt(),
        stop.try_clone().expect("eventfd"),
    )
    .expect("setting up the muxer");
    stop.write(1).expect("eventfd");
    muxer.run(announce_reset);

    drop((client, host_listener));
    for path in [&uds, &host_port] {
        let _ = std::fs::remove_file(path);
    }
    guest
}

/// A packet header as the guest writes it (virtio 1.2, 5.10.6).
#[allow(clippy::too_many_arguments)]
pub fn header(src_port: u32, dst_cid: u64, dst_port: u32, len: u32, op: u16, flags: u32, buf_alloc: u32) -> Vec<u8> {
    let mut e = Encoder::default();
    e.u64(GUEST_CID).u64(dst_cid).u32(src_port).u32(dst_port).u32(len).u16(1).u16(op).u32(flags);
    e.u32(buf_alloc).u32(0);
    e.0
}

pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    use nestbox_vmm::devices::virtio::vsock::packet::*;
    let (rx, tx) = (0u8, 1u8);
    let hdr = |op, len, flags| header(5000, 2, HOST_PORT, len, op, flags, 65536);
    let rx_buffers = |e: &mut Encoder| {
        for slot in 0..4u16 {
            encode_chain(e, rx, &[(0x1000 + slot * 0x100, 4096, true, b"")]);
        }
    };
    let mut seeds = Vec::new();

    // Connect to the host's port, send data in the header's buffer and in a second one,
    // ask for credit, shut down, reset.
    let mut e = Encoder::default();
    e.u8(0);
    rx_buffers(&mut e);
    let request = hdr(OP_REQUEST, 0, 0);
    encode_chain(&mut e, tx, &[(0, 44, false, &request)]);
    let mut rw = hdr(OP_RW, 5, 0);
    rw.extend_from_slice(b"hello");
    encode_chain(&mut e, tx, &[(0x10, 49, false, &rw)]);
    let rw2 = hdr(OP_RW, 3, 0);
    encode_chain(&mut e, tx, &[(0x20, 44, false, &rw2), (0x30, 3, false, b"abc")]);
    encode_chain(&mut e, tx, &[(0x40, 44, false, &hdr(OP_CREDIT_REQUEST, 0, 0))]);
    encode_chain(&mut e, tx, &[(0x50, 44, false, &hdr(OP_CREDIT_UPDATE, 0, 0))]);
    encode_chain(&mut e, tx, &[(0x60, 44, false, &hdr(OP_SHUTDOWN, 0, SHUTDOWN_RCV | SHUTDOWN_SEND))]);
    encode_chain(&mut e, tx, &[(0x70, 44, false, &hdr(OP_RST, 0, 0))]);
    seeds.push(("connect-send-close", e.0));

    // A host client connects while the guest answers an unknown port; restored device.
    let mut e = Encoder::default();
    e.u8(1 | 2 | 4);
    rx_buffers(&mut e);
    encode_chain(&mut e, 2, &[(0x2000, 8, true, b"")]);
    let other = header(6000, 2, 9999, 0, OP_REQUEST, 0, 4096);
    encode_chain(&mut e, tx, &[(0, 44, false, &other)]);
    encode_chain(&mut e, tx, &[(0x10, 44, false, &header(52, 2, 1 << 30, 0, OP_RESPONSE, 0, 4096))]);
    seeds.push(("host-client-restored", e.0));

    // A header that claims more payload than it carries, and a device op.
    let mut e = Encoder::default();
    e.u8(0);
    encode_chain(&mut e, tx, &[(0, 44, false, &hdr(OP_RW, 60000, 0))]);
    e.u8(OP_DEVICE).u8(0);
    seeds.push(("short-payload", e.0));
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;
    use nestbox_vmm::devices::virtio::vsock::packet::OP_RESPONSE;
    use vm_memory::{Bytes, GuestAddress};

    /// The harness reaches a connected stream: the guest's REQUEST to the host port is
    /// answered with RESPONSE.
    #[test]
    fn a_request_to_the_host_port_connects() {
        use nestbox_vmm::devices::virtio::vsock::packet::OP_REQUEST;
        let mut e = Encoder::default();
        e.u8(0);
        encode_chain(&mut e, 0, &[(0x1000, 4096, true, b"")]);
        encode_chain(&mut e, 1, &[(0, 44, false, &header(5000, 2, HOST_PORT, 0, OP_REQUEST, 0, 65536))]);
        let guest = run_in(&e.0);
        let used_idx: u16 = guest.mem.read_obj(GuestAddress(crate::guest::queue_base(0) + 0x2000 + 2)).unwrap();
        assert!(used_idx >= 1, "no RX buffer used");
        let first_rx = crate::guest::DATA + 0x1000 * 16;
        let op: u16 = guest.mem.read_obj(GuestAddress(first_rx + 30)).unwrap();
        let dst_port: u32 = guest.mem.read_obj(GuestAddress(first_rx + 20)).unwrap();
        crate::scratch::remove();
        assert_eq!((op, dst_port), (OP_RESPONSE, 5000), "the first RX packet answers the REQUEST");
    }
}
