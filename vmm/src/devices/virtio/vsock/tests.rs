//! The muxer driven through real virtqueues in guest memory by a small test driver that
//! plays the guest's part, against real host Unix sockets. No VM: fast, and a hostile
//! guest can be played exactly.

use super::muxer::Muxer;
use super::packet::*;
use super::{HOST_CID, RX_QUEUE, TX_QUEUE};
use crate::devices::virtio::test_driver::Driver;
use crate::devices::virtio::Interrupt;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const GUEST_CID: u64 = 3;
const QSIZE: u16 = 64;
const HDR: usize = 44;

fn encode(h: &Header) -> [u8; HDR] {
    let mut b = [0u8; HDR];
    b[0..8].copy_from_slice(&h.src_cid.to_le_bytes());
    b[8..16].copy_from_slice(&h.dst_cid.to_le_bytes());
    b[16..20].copy_from_slice(&h.src_port.to_le_bytes());
    b[20..24].copy_from_slice(&h.dst_port.to_le_bytes());
    b[24..28].copy_from_slice(&h.len.to_le_bytes());
    b[28..30].copy_from_slice(&h.type_.to_le_bytes());
    b[30..32].copy_from_slice(&h.op.to_le_bytes());
    b[32..36].copy_from_slice(&h.flags.to_le_bytes());
    b[36..40].copy_from_slice(&h.buf_alloc.to_le_bytes());
    b[40..44].copy_from_slice(&h.fwd_cnt.to_le_bytes());
    b
}

fn decode(b: &[u8]) -> Header {
    let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
    let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
    let u16_at = |i: usize| u16::from_le_bytes(b[i..i + 2].try_into().unwrap());
    Header {
        src_cid: u64_at(0),
        dst_cid: u64_at(8),
        src_port: u32_at(16),
        dst_port: u32_at(20),
        len: u32_at(24),
        type_: u16_at(28),
        op: u16_at(30),
        flags: u32_at(32),
        buf_alloc: u32_at(36),
        fwd_cnt: u32_at(40),
    }
}

/// A fake guest: memory, the driver side of RX and TX, and the muxer on its thread.
struct Guest {
    mem: GuestMemoryMmap,
    rx: Driver,
    tx: Driver,
    ev: Driver,
    events: Vec<EventFd>,
    stop: EventFd,
    worker: Option<JoinHandle<()>>,
    uds: PathBuf,
    /// Next free guest address for packet buffers, and the RX buffers by head.
    next_buf: u64,
    rx_bufs: std::collections::HashMap<u16, u64>,
    /// Used RX entries not yet looked at.
    rx_used: std::collections::VecDeque<(u16, u32)>,
}

const RX_BUF_DATA: u32 = 4096;

impl Guest {
    fn start(name: &str) -> Guest {
        Guest::start_with(name, false)
    }

    /// A guest whose device was restored from a snapshot: the muxer announces a
    /// transport reset first. The guest has posted one event buffer.
    fn start_restored(name: &str) -> Guest {
        Guest::start_with(name, true)
    }

    fn start_with(name: &str, restored: bool) -> Guest {
        let uds = std::env::temp_dir().join(format!("nestbox-mux-{}-{name}.sock", std::process::id()));
        let _ = std::fs::remove_file(&uds);
        let listener = UnixListener::bind(&uds).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let rx = Driver::new(0x1_0000, QSIZE);
        let tx = Driver::new(0x2_0000, QSIZE);
        let mut ev = Driver::new(0x3_0000, QSIZE);
        ev.add(&mem, &[(0x4_0000, 8, true)]);
        let events: Vec<EventFd> = (0..3).map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap()).collect();
        let stop = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let muxer = Muxer::new(
            GUEST_CID,
            uds.clone(),
            listener,
            mem.clone(),
            vec![rx.device_queue(), tx.device_queue(), ev.device_queue()],
            events.iter().map(|e| e.try_clone().unwrap()).collect(),
            Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())),
            stop.try_clone().unwrap(),
        )
        .unwrap();
        let worker = Some(std::thread::spawn(move || muxer.run(restored)));
        let mut guest = Guest {
            mem,
            rx,
            tx,
            ev,
            events,
            stop,
            worker,
            uds,
            next_buf: 0x10_0000,
            rx_bufs: Default::default(),
            rx_used: Default::default(),
        };
        for _ in 0..16 {
            guest.post_rx_buffer();
        }
        guest
    }

    fn alloc(&mut self, len: u64) -> u64 {
        let addr = self.next_buf;
        self.next_buf += len.div_ceil(0x1000) * 0x1000;
        if self.next_buf > 60 << 20 {
            self.next_buf = 0x10_0000;
        }
        addr
    }

    fn post_rx_buffer(&mut self) {
        let addr = self.alloc(HDR as u64 + u64::from(RX_BUF_DATA));
        // As Linux 6.1 does: header and data in separate descriptors.
        let head = self.rx.add(&self.mem, &[(addr, HDR as u32, true), (addr + HDR as u64, RX_BUF_DATA, true)]);
        self.rx_bufs.insert(head, addr);
        self.events[RX_QUEUE].write(1).unwrap();
    }

    /// Sends one packet from the guest; a raw chain lets a test send garbage.
    fn send_raw(&mut self, chain: &[(u64, u32, bool)]) {
        self.tx.add(&self.mem, chain);
        self.events[TX_QUEUE].write(1).unwrap();
    }

    fn send(&mut self, mut h: Header, data: &[u8]) {
        h.len = data.len() as u32;
        let addr = self.alloc(HDR as u64 + data.len() as u64);
        self.mem.write_slice(&encode(&h), GuestAddress(addr)).unwrap();
        self.mem.write_slice(data, GuestAddress(addr + HDR as u64)).unwrap();
        if data.is_empty() {
            self.send_raw(&[(addr, HDR as u32, false)]);
        } else {
            self.send_raw(&[(addr, HDR as u32, false), (addr + HDR as u64, data.len() as u32, false)]);
        }
    }

    /// Waits for the next packet the device delivers to the guest.
    fn recv(&mut self) -> (Header, Vec<u8>) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let used = self.rx.take_used(&self.mem);
            self.rx_used.extend(used);
            if let Some((head, len)) = self.rx_used.pop_front() {
                let addr = self.rx_bufs.remove(&head).expect("used entry for a posted buffer");
                let mut hdr = [0u8; HDR];
                self.mem.read_slice(&mut hdr, GuestAddress(addr)).unwrap();
                let h = decode(&hdr);
                assert_eq!(len as usize, HDR + h.len as usize, "used length covers header and payload");
                let mut data = vec![0u8; h.len as usize];
                self.mem.read_slice(&mut data, GuestAddress(addr + HDR as u64)).unwrap();
                self.post_rx_buffer();
                return (h, data);
            }
            assert!(
                Instant::now() < deadline,
                "no packet for the guest within 5 s (rx used idx seen {})",
                self.rx.used_seen
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn expect_nothing(&mut self) {
        std::thread::sleep(Duration::from_millis(100));
        assert!(self.rx_used.is_empty() && self.rx.take_used(&self.mem).is_empty(), "unexpected packet for the guest");
    }

    fn header(&self, src_port: u32, dst_port: u32, op: u16) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 1 << 20,
            ..Default::default()
        }
    }

    /// A host client connects to guest port `port`; the guest accepts.
    fn host_connects(&mut self, port: u32, guest_port_accepts: bool) -> (UnixStream, Header) {
        let mut host = UnixStream::connect(&self.uds).unwrap();
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        host.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        let (req, _) = self.recv();
        assert_eq!((req.op, req.src_cid, req.dst_cid, req.dst_port), (OP_REQUEST, HOST_CID, GUEST_CID, port));
        if guest_port_accepts {
            let resp = self.header(port, req.src_port, OP_RESPONSE);
            self.send(resp, &[]);
        }
        (host, req)
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
        let _ = std::fs::remove_file(&self.uds);
    }
}

fn read_line(stream: &mut UnixStream) -> String {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    line
}

#[test]
fn host_initiated_connection_carries_data_both_ways_and_closes() {
    let mut g = Guest::start("hostconn");
    let (mut host, req) = g.host_connects(1024, true);
    let ok = read_line(&mut host);
    assert_eq!(ok, format!("OK {}\n", req.src_port));

    host.write_all(b"ping").unwrap();
    let (h, data) = g.recv();
    assert_eq!((h.op, h.dst_port, data.as_slice()), (OP_RW, 1024, &b"ping"[..]));

    g.send(g.header(1024, req.src_port, OP_RW), b"pong");
    let mut buf = [0u8; 4];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");

    // Host closes: the guest is told to shut down, answers with RST, and the connection
    // is gone (a later packet on it gets RST).
    drop(host);
    let (h, _) = g.recv();
    assert_eq!(h.op, OP_SHUTDOWN);
    g.send(g.header(1024, req.src_port, OP_RST), &[]);
    g.send(g.header(1024, req.src_port, OP_RW), b"late");
    let (h, _) = g.recv();
    assert_eq!((h.op, h.dst_port), (OP_RST, 1024));
}

#[test]
fn data_the_host_sends_with_connect_is_delivered_after_the_response() {
    let mut g = Guest::start("early");
    let mut host = UnixStream::connect(&g.uds).unwrap();
    host.write_all(b"CONNECT 7\nearly bytes").unwrap();
    let (req, _) = g.recv();
    g.send(g.header(7, req.src_port, OP_RESPONSE), &[]);
    let (h, data) = g.recv();
    assert_eq!((h.op, data.as_slice()), (OP_RW, &b"early bytes"[..]));
    assert_eq!(read_line(&mut host), format!("OK {}\n", req.src_port));
}

#[test]
fn guest_refusal_closes_the_host_stream() {
    let mut g = Guest::start("refused");
    let (mut host, req) = g.host_connects(99, false);
    g.send(g.header(99, req.src_port, OP_RST), &[]);
    let mut buf = Vec::new();
    host.read_to_end(&mut buf).unwrap();
    assert!(buf.is_empty(), "no OK line for a refused connection");
}

#[test]
fn malformed_connect_lines_are_dropped() {
    let g = Guest::start("badline");
    for line in ["CONNECT\n", "CONNECT x\n", "HELLO 5\n", &"A".repeat(100)] {
        let mut host = UnixStream::connect(&g.uds).unwrap();
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = host.write_all(line.as_bytes());
        let mut buf = Vec::new();
        let _ = host.read_to_end(&mut buf);
        assert!(buf.is_empty(), "{line:?} got {buf:?}");
    }
}

#[test]
fn guest_initiated_connection_reaches_the_port_socket() {
    let mut g = Guest::start("guestconn");
    let mut port_path = g.uds.clone().into_os_string();
    port_path.push("_5000");
    let _ = std::fs::remove_file(&port_path);
    let listener = UnixListener::bind(&port_path).unwrap();

    g.send(g.header(40000, 5000, OP_REQUEST), &[]);
    let (h, _) = g.recv();
    assert_eq!((h.op, h.src_port, h.dst_port), (OP_RESPONSE, 5000, 40000));
    let (mut host, _) = listener.accept().unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    g.send(g.header(40000, 5000, OP_RW), b"hello from guest\n");
    assert_eq!(read_line(&mut host), "hello from guest\n");
    host.write_all(b"hi").unwrap();
    let (h, data) = g.recv();
    assert_eq!((h.op, data.as_slice()), (OP_RW, &b"hi"[..]));

    // Guest closes both ways: everything it sent reaches the host, then RST.
    let mut shutdown = g.header(40000, 5000, OP_SHUTDOWN);
    shutdown.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    g.send(shutdown, &[]);
    let (h, _) = g.recv();
    assert_eq!(h.op, OP_RST);
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    let _ = std::fs::remove_file(&port_path);
}

#[test]
fn guest_connection_to_a_port_nobody_listens_on_is_reset() {
    let mut g = Guest::start("noport");
    g.send(g.header(40001, 6000, OP_REQUEST), &[]);
    let (h, _) = g.recv();
    assert_eq!((h.op, h.src_port, h.dst_port), (OP_RST, 6000, 40001));
}

#[test]
fn hostile_packets_are_answered_or_dropped_and_the_device_keeps_working() {
    let mut g = Guest::start("hostile");
    // Data for a connection that does not exist.
    g.send(g.header(1, 2, OP_RW), b"x");
    assert_eq!(g.recv().0.op, OP_RST);
    // A spoofed source CID.
    let mut spoofed = g.header(1, 2, OP_REQUEST);
    spoofed.src_cid = 77;
    g.send(spoofed, &[]);
    let (h, _) = g.recv();
    assert_eq!((h.op, h.dst_cid), (OP_RST, 77));
    // Unknown op and unknown socket type.
    g.send(g.header(1, 2, 99), &[]);
    assert_eq!(g.recv().0.op, OP_RST);
    let mut dgram = g.header(1, 2, OP_REQUEST);
    dgram.type_ = 2;
    g.send(dgram, &[]);
    assert_eq!(g.recv().0.op, OP_RST);
    // RST for nothing: no answer.
    g.send(g.header(1, 2, OP_RST), &[]);
    // Descriptor chains that are not packets: too short, device-writable, length beyond
    // the buffer, address outside guest memory. Dropped without an answer.
    let addr = g.alloc(0x2000);
    g.send_raw(&[(addr, 8, false)]);
    g.send_raw(&[(addr, HDR as u32, true)]);
    let mut h = g.header(1, 2, OP_RW);
    h.len = 60_000;
    g.mem.write_slice(&encode(&h), GuestAddress(addr)).unwrap();
    g.send_raw(&[(addr, HDR as u32, false), (addr + HDR as u64, 16, false)]);
    g.send_raw(&[(0xffff_ffff_0000, HDR as u32, false)]);
    g.expect_nothing();
    // The device still works.
    let (mut host, req) = g.host_connects(1024, true);
    assert_eq!(read_line(&mut host), format!("OK {}\n", req.src_port));
}

#[test]
fn guest_that_overruns_its_credit_is_reset() {
    let mut g = Guest::start("credit");
    let (mut host, req) = g.host_connects(1024, true);
    assert_eq!(read_line(&mut host), format!("OK {}\n", req.src_port));
    // The host does not read: the guest may send BUF_ALLOC bytes and no more.
    let chunk = vec![7u8; 60 * 1024];
    let mut sent = 0usize;
    let limit = super::connection::BUF_ALLOC as usize;
    // Unix socket buffers take some of it; keep sending until the muxer must buffer
    // beyond the credit: it resets the connection.
    let mut reset = false;
    for _ in 0..200 {
        g.send(g.header(1024, req.src_port, OP_RW), &chunk);
        sent += chunk.len();
        std::thread::sleep(Duration::from_millis(1));
        let used = g.rx.take_used(&g.mem);
        g.rx_used.extend(used);
        if !g.rx_used.is_empty() && g.recv().0.op == OP_RST {
            reset = true;
            break;
        }
    }
    assert!(reset, "sent {sent} bytes (credit {limit}) without a reset");
}

#[test]
fn flow_control_moves_a_large_transfer_intact() {
    let mut g = Guest::start("bulk");
    let (mut host, req) = g.host_connects(1024, true);
    assert_eq!(read_line(&mut host), format!("OK {}\n", req.src_port));
    // Host to guest, 1 MiB; the guest's credit (buf_alloc 1 MiB, fwd_cnt advanced as it
    // reads) is honoured: the device never sends more than the guest can hold.
    let total = 1 << 20;
    let pattern: Vec<u8> = (0..total).map(|i| (i * 7 % 251) as u8).collect();
    let writer = {
        let mut host = host.try_clone().unwrap();
        let pattern = pattern.clone();
        std::thread::spawn(move || host.write_all(&pattern).unwrap())
    };
    let mut got = Vec::with_capacity(total);
    while got.len() < total {
        let (h, data) = g.recv();
        assert_eq!(h.op, OP_RW);
        assert!(data.len() <= RX_BUF_DATA as usize);
        got.extend_from_slice(&data);
        let mut credit = g.header(1024, req.src_port, OP_CREDIT_UPDATE);
        credit.fwd_cnt = got.len() as u32;
        if got.len() % (64 * 1024) < RX_BUF_DATA as usize {
            g.send(credit, &[]);
        }
    }
    writer.join().unwrap();
    assert!(got == pattern, "host-to-guest data corrupted");
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    /// One thing a hostile guest can put on the TX queue.
    #[derive(Debug, Clone)]
    enum Input {
        Packet { op: u16, type_: u16, src_cid: u64, src_port: u32, dst_port: u32, flags: u32, len: u32, data: Vec<u8> },
        Chain(Vec<(u64, u32, bool)>),
    }

    fn input() -> impl Strategy<Value = Input> {
        prop_oneof![
            (
                0u16..10,
                0u16..4,
                prop_oneof![Just(GUEST_CID), any::<u64>()],
                0u32..4,
                1020u32..1030,
                any::<u32>(),
                prop_oneof![Just(None), Just(Some(0u32)), (0u32..70_000).prop_map(Some)],
                proptest::collection::vec(any::<u8>(), 0..256)
            )
                .prop_map(|(op, type_, src_cid, src_port, dst_port, flags, len, data)| Input::Packet {
                    op,
                    type_,
                    src_cid,
                    src_port,
                    dst_port,
                    flags,
                    len: len.unwrap_or(data.len() as u32),
                    data,
                }),
            proptest::collection::vec((prop_oneof![0u64..(80 << 20), any::<u64>()], any::<u32>(), any::<bool>()), 1..4)
                .prop_map(Input::Chain),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// Whatever the guest queues, the device neither panics nor stops: a host client
        /// can still connect afterwards.
        #[test]
        fn random_guest_traffic_never_breaks_the_device(inputs in proptest::collection::vec(input(), 1..24)) {
            let mut g = Guest::start("fuzz");
            for inp in inputs {
                match inp {
                    Input::Packet { op, type_, src_cid, src_port, dst_port, flags, len, data } => {
                        let h = Header { src_cid, dst_cid: HOST_CID, src_port, dst_port, type_, op, flags, len, buf_alloc: 4096, fwd_cnt: 0 };
                        let addr = g.alloc(HDR as u64 + data.len() as u64);
                        g.mem.write_slice(&encode(&h), GuestAddress(addr)).unwrap();
                        g.mem.write_slice(&data, GuestAddress(addr + HDR as u64)).unwrap();
                        g.send_raw(&[(addr, HDR as u32, false), (addr + HDR as u64, data.len() as u32, false)]);
                    }
                    Input::Chain(chain) => g.send_raw(&chain),
                }
            }
            // The device still serves: a host client reaches guest port 4242 (answers to
            // the inputs above may arrive first and are skipped).
            let mut host = UnixStream::connect(&g.uds).unwrap();
            host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            host.write_all(b"CONNECT 4242\n").unwrap();
            let req = loop {
                let (h, _) = g.recv();
                if h.op == OP_REQUEST && h.dst_port == 4242 {
                    break h;
                }
            };
            g.send(g.header(4242, req.src_port, OP_RESPONSE), &[]);
            prop_assert_eq!(read_line(&mut host), format!("OK {}\n", req.src_port));
        }
    }
}

#[test]
fn restored_device_announces_a_reset_and_holds_host_connections_until_the_guest_handled_it() {
    let mut g = Guest::start_restored("reset");
    let deadline = Instant::now() + Duration::from_secs(5);
    let used = loop {
        let used = g.ev.take_used(&g.mem);
        if !used.is_empty() || Instant::now() > deadline {
            break used;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    assert_eq!(used, vec![(0, 4)], "one 4-byte event");
    let id: u32 = g.mem.read_obj(GuestAddress(0x4_0000)).unwrap();
    assert_eq!(id, 0, "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET");

    // A host client connecting now waits: the guest has not handled the reset yet.
    let mut host = UnixStream::connect(&g.uds).unwrap();
    host.write_all(b"CONNECT 1024\n").unwrap();
    g.expect_nothing();
    // The guest gives the event buffer back: the connection goes through.
    g.ev.add(&g.mem, &[(0x4_0000, 8, true)]);
    g.events[super::EVENT_QUEUE].write(1).unwrap();
    let (req, _) = g.recv();
    assert_eq!((req.op, req.dst_port), (OP_REQUEST, 1024));
}

#[test]
fn the_control_queue_is_bounded() {
    let mut control = std::collections::VecDeque::new();
    let h = Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: 1,
        dst_port: 2,
        type_: TYPE_STREAM,
        op: OP_RST,
        ..Header::default()
    };
    for _ in 0..super::muxer::MAX_CONTROL + 10 {
        super::muxer::push_bounded(&mut control, h);
    }
    assert_eq!(control.len(), super::muxer::MAX_CONTROL);
}
