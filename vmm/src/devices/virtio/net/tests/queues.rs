//! TX, RX and the hostile cases over a datagram socket pair, one worker step at a time.

use super::*;
use crate::devices::virtio::net::{BATCH, MAX_BUFFER_LEN};
use std::time::{Duration, Instant};

fn recv_all(peer: &UnixDatagram) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; MAX_BUFFER_LEN + 100];
    while let Ok(n) = peer.recv(&mut buf) {
        out.push(buf[..n].to_vec());
    }
    out
}

#[test]
fn tx_frame_reaches_the_backend_with_its_header() {
    let mut g = Guest::new();
    let (backend, peer) = SocketBackend::pair();
    let (mut worker, _stop) = g.worker(Some(backend));
    let body = frame(1514, 7);
    g.write(DATA, &vnet_header());
    g.write(DATA + 0x1000, &body[..100]);
    g.write(DATA + 0x2000, &body[100..]);
    let head = g.tx.add(&g.mem, &[(DATA, 12, false), (DATA + 0x1000, 100, false), (DATA + 0x2000, 1414, false)]);
    worker.process_tx();
    let sent = recv_all(&peer);
    assert_eq!(sent.len(), 1);
    assert_eq!(&sent[0][..12], &vnet_header());
    assert_eq!(&sent[0][12..], &body[..]);
    assert_eq!(g.tx.take_used(&g.mem), vec![(head, 0)]);
    assert_eq!(g.interrupt.irqfd().read().unwrap(), 1, "the guest is interrupted");
    assert_eq!(g.count(|m| &m.tx_frames), 1);
    assert_eq!(g.count(|m| &m.tx_bytes), 1514);
}

#[test]
fn rx_frame_is_delivered_with_its_header() {
    let mut g = Guest::new();
    let (backend, peer) = SocketBackend::pair();
    let (mut worker, _stop) = g.worker(Some(backend));
    let body = frame(3000, 3);
    let mut datagram = vec![0u8; 12];
    datagram[0] = 2; // DATA_VALID, as a tap with TUN_F_CSUM says
    datagram.extend_from_slice(&body);
    peer.send(&datagram).unwrap();
    let head = g.rx.add(&g.mem, &[(DATA, 12, true), (DATA + 0x1000, 2000, true), (DATA + 0x2000, 2000, true)]);
    worker.process_rx();
    assert_eq!(g.rx.take_used(&g.mem), vec![(head, 12 + 3000)]);
    let header = g.read(DATA, 12);
    assert_eq!(header[0], 2);
    assert_eq!(&header[10..12], &[1, 0], "num_buffers is 1");
    assert_eq!(g.read(DATA + 0x1000, 2000), &body[..2000]);
    assert_eq!(g.read(DATA + 0x2000, 1000), &body[2000..]);
    assert_eq!(g.count(|m| &m.rx_frames), 1);
    assert_eq!(g.count(|m| &m.rx_bytes), 3000);
    assert_eq!(g.interrupt.irqfd().read().unwrap(), 1);
}

#[test]
fn detached_device_drops_tx_and_never_fills_rx() {
    let mut g = Guest::new();
    let (mut worker, _stop) = g.worker(None);
    g.write(DATA, &vnet_header());
    let rx_head = g.rx.add(&g.mem, &[(DATA + 0x8000, 2000, true)]);
    for _ in 0..3 {
        g.tx.add(&g.mem, &[(DATA, 12, false), (DATA + 0x1000, 60, false)]);
    }
    worker.process_tx();
    worker.process_rx();
    assert_eq!(g.tx.take_used(&g.mem).len(), 3, "TX chains are consumed");
    assert_eq!(g.count(|m| &m.tx_dropped_detached), 3);
    assert_eq!(g.count(|m| &m.tx_frames), 0);
    assert!(g.rx.take_used(&g.mem).is_empty(), "RX buffer {rx_head} stays posted");
}

/// Every malformed TX chain comes back used and counted, nothing reaches the backend,
/// and a good frame afterwards still goes through.
#[test]
fn malformed_tx_chains_are_dropped_and_counted() {
    let mut g = Guest::new();
    let (backend, peer) = SocketBackend::pair();
    let (mut worker, _stop) = g.worker(Some(backend));
    g.write(DATA, &vnet_header());
    // Too many descriptors: 70 of 12 bytes each.
    let long: Vec<(u64, u32, bool)> = (0..70).map(|_| (DATA, 12, false)).collect();
    g.tx.add(&g.mem, &long);
    // A write-only descriptor in a TX chain.
    g.tx.add(&g.mem, &[(DATA, 12, false), (DATA + 0x1000, 60, true)]);
    // An address outside guest memory.
    g.tx.add(&g.mem, &[(DATA, 12, false), (MEM_SIZE - 10, 60, false)]);
    // Shorter than the header.
    g.tx.add(&g.mem, &[(DATA, 5, false)]);
    // A loop: 200 -> 201 -> 200.
    g.tx.write_desc(&g.mem, 200, DATA, 12, F_NEXT, 201);
    g.tx.write_desc(&g.mem, 201, DATA, 12, F_NEXT, 200);
    g.tx.publish(&g.mem, 200);
    // A `next` out of range.
    g.tx.write_desc(&g.mem, 202, DATA, 12, F_NEXT, 999);
    g.tx.publish(&g.mem, 202);
    // An indirect table outside guest memory.
    g.tx.write_desc(&g.mem, 203, MEM_SIZE + 0x1000, 16 * 4, F_INDIRECT, 0);
    g.tx.publish(&g.mem, 203);
    // Over 64 KiB + header: one descriptor of MAX_BUFFER_LEN + 1 bytes.
    g.tx.write_desc(&g.mem, 204, DATA, MAX_BUFFER_LEN as u32 + 1, 0, 0);
    g.tx.publish(&g.mem, 204);
    worker.process_tx();
    assert_eq!(g.tx.take_used(&g.mem).len(), 8, "every chain is returned");
    assert_eq!(g.count(|m| &m.tx_malformed), 7);
    assert_eq!(g.count(|m| &m.tx_too_big), 1);
    assert!(recv_all(&peer).is_empty());
    // The largest frame allowed still goes through, as does a small one.
    g.write(DATA + 0x1_0000, &frame(MAX_BUFFER_LEN - 12, 1));
    g.tx.write_desc(&g.mem, 205, DATA, 12, F_NEXT, 206);
    g.tx.write_desc(&g.mem, 206, DATA + 0x1_0000, (MAX_BUFFER_LEN - 12) as u32, 0, 0);
    g.tx.publish(&g.mem, 205);
    g.tx.add(&g.mem, &[(DATA, 12, false), (DATA + 0x1000, 60, false)]);
    worker.process_tx();
    let sent = recv_all(&peer);
    assert_eq!(sent.iter().map(Vec::len).collect::<Vec<_>>(), vec![MAX_BUFFER_LEN, 72]);
    assert_eq!(g.count(|m| &m.tx_frames), 2);
}

#[test]
fn malformed_rx_chains_are_returned_empty_and_the_frame_waits_for_a_good_one() {
    let mut g = Guest::new();
    let (backend, peer) = SocketBackend::pair();
    let (mut worker, _stop) = g.worker(Some(backend));
    let mut datagram = vec![0u8; 12];
    datagram.extend_from_slice(&frame(100, 9));
    peer.send(&datagram).unwrap();
    let read_only = g.rx.add(&g.mem, &[(DATA, 12, true), (DATA + 0x1000, 2000, false)]);
    let outside = g.rx.add(&g.mem, &[(MEM_SIZE - 100, 2000, true)]);
    g.rx.write_desc(&g.mem, 100, DATA, 12, F_NEXT | F_WRITE, 101);
    g.rx.write_desc(&g.mem, 101, DATA, 12, F_NEXT | F_WRITE, 100);
    g.rx.publish(&g.mem, 100);
    let good = g.rx.add(&g.mem, &[(DATA + 0x4000, 2000, true)]);
    worker.process_rx();
    assert_eq!(g.rx.take_used(&g.mem), vec![(read_only, 0), (outside, 0), (100, 0), (good, 112)]);
    assert_eq!(g.count(|m| &m.rx_malformed), 3);
    assert_eq!(g.read(DATA + 0x4000 + 12, 100), frame(100, 9));
}

#[test]
fn rx_frame_too_big_for_the_buffer_is_dropped_and_the_buffer_kept() {
    let mut g = Guest::new();
    let (backend, peer) = SocketBackend::pair();
    let (mut worker, _stop) = g.worker(Some(backend));
    let big: Vec<u8> = [vec![0u8; 12], frame(1500, 1)].concat();
    let small: Vec<u8> = [vec![0u8; 12], frame(60, 2)].concat();
    peer.send(&big).unwrap();
    peer.send(&small).unwrap();
    peer.send(&[0u8; 5]).unwrap(); // a runt: shorter than the header
    let head = g.rx.add(&g.mem, &[(DATA, 12, true), (DATA + 0x1000, 500, true)]);
    worker.process_rx();
    assert_eq!(g.rx.take_used(&g.mem), vec![(head, 72)], "the small frame took the buffer");
    assert_eq!(g.read(DATA + 0x1000, 60), frame(60, 2));
    assert_eq!(g.count(|m| &m.rx_too_big), 1);
    assert_eq!(g.count(|m| &m.rx_runts), 1);
    assert_eq!(g.count(|m| &m.rx_frames), 1);
}

#[test]
fn tx_flood_is_served_a_bounded_batch_per_event() {
    let mut g = Guest::new();
    let (backend, peer) = SocketBackend::pair();
    let (mut worker, _stop) = g.worker(Some(backend));
    g.write(DATA, &vnet_header());
    for _ in 0..(BATCH + 20) {
        g.tx.add(&g.mem, &[(DATA, 12, false)]);
    }
    worker.process_tx();
    assert_eq!(g.tx.take_used(&g.mem).len(), BATCH);
    assert_eq!(g.tx_event.read().unwrap(), 1, "the worker re-armed itself for the rest");
    worker.process_tx();
    assert_eq!(g.tx.take_used(&g.mem).len(), 20);
    assert!(g.tx_event.read().is_err(), "nothing left: not re-armed");
    assert_eq!(recv_all(&peer).len(), BATCH + 20);
}

/// The event loop on its thread: with no RX buffer posted the worker stops reading the
/// backend (frames stay queued in it) and starts again on the RX notification.
#[test]
fn rx_waits_for_buffers_and_resumes_on_notification() {
    let mut g = Guest::new();
    let (backend, peer) = SocketBackend::pair();
    let (worker, stop) = g.worker(Some(backend));
    let thread = std::thread::spawn(move || worker.run());
    for seed in 0..3u8 {
        peer.send(&[vec![0u8; 12], frame(60, seed)].concat()).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while g.count(|m| &m.rx_no_buffers) == 0 {
        assert!(Instant::now() < deadline, "the worker never found the RX queue empty");
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(g.count(|m| &m.rx_no_buffers), 1, "reading stopped instead of spinning");
    let heads: Vec<u16> = (0..3).map(|i| g.rx.add(&g.mem, &[(DATA + 0x1000 * i, 2000, true)])).collect();
    g.rx_event.write(1).unwrap();
    let mut used = Vec::new();
    while used.len() < 3 {
        assert!(Instant::now() < deadline, "frames not delivered after the notification: {used:?}");
        used.extend(g.rx.take_used(&g.mem));
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(used, heads.iter().map(|&h| (h, 72)).collect::<Vec<_>>());
    for i in 0..3u64 {
        assert_eq!(g.read(DATA + 0x1000 * i + 12, 60), frame(60, i as u8));
    }
    stop.write(1).unwrap();
    thread.join().unwrap();
}
