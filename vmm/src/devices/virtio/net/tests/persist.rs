//! A net device through its transport: negotiated, running, snapshotted (transport and
//! net state through bincode, as the state file holds them) and restored onto a new
//! backend or detached, carrying on where it stopped.

use super::*;
use crate::devices::bus::BusDevice;
use crate::devices::virtio::mmio::persist::TransportState;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::device::OFFERED_FEATURES;
use crate::devices::virtio::net::persist::NetState;
use crate::devices::virtio::net::{MacAddr, NetDevice, F_GUEST_CSUM, F_GUEST_TSO4, F_MAC};
use crate::devices::virtio::VIRTIO_F_VERSION_1;
use std::time::{Duration, Instant};

const MAC: MacAddr = MacAddr([0x02, 0x11, 0x22, 0x33, 0x44, 0x55]);

fn wr(t: &mut MmioTransport, offset: u64, v: u32) {
    t.write(offset, &v.to_le_bytes());
}

fn rd(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

/// What Linux's virtio_mmio and virtio_net do up to DRIVER_OK, accepting `features`.
fn bring_up(t: &mut MmioTransport, g: &Guest, features: u64) {
    wr(t, 0x70, 1);
    wr(t, 0x70, 3);
    wr(t, 0x14, 0);
    assert_eq!(u64::from(rd(t, 0x10)), OFFERED_FEATURES & 0xffff_ffff);
    wr(t, 0x24, 0);
    wr(t, 0x20, features as u32);
    wr(t, 0x24, 1);
    wr(t, 0x20, (features >> 32) as u32);
    wr(t, 0x70, 0xb);
    for (i, d) in [(0u32, &g.rx), (1, &g.tx)] {
        wr(t, 0x30, i);
        wr(t, 0x38, u32::from(QSIZE));
        for (reg, addr) in [(0x80, d.desc), (0x90, d.avail), (0xa0, d.used)] {
            wr(t, reg, addr as u32);
            wr(t, reg + 4, 0);
        }
        wr(t, 0x44, 1);
    }
    wr(t, 0x70, 0xf);
    assert_eq!(rd(t, 0x70), 0xf, "the device runs");
}

fn send_one(t: &mut MmioTransport, g: &mut Guest, seed: u8) {
    g.write(DATA, &vnet_header());
    g.write(DATA + 0x1000, &frame(60, seed));
    g.tx.add(&g.mem, &[(DATA, 12, false), (DATA + 0x1000, 60, false)]);
    wr(t, 0x50, 1); // QUEUE_NOTIFY for TX
}

fn wait_frame(peer: &UnixDatagram) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = vec![0u8; 4096];
    loop {
        match peer.recv(&mut buf) {
            Ok(n) => return buf[..n].to_vec(),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            Err(e) => panic!("no frame reached the backend: {e}"),
        }
    }
}

#[test]
fn device_state_round_trips_and_restores_with_or_without_a_tap() {
    let mut g = Guest::new();
    let (backend, peer) = SocketBackend::pair();
    let device = NetDevice::new(MAC, Some(backend.clone()));
    let handle = device.handle();
    let mut t = MmioTransport::new(Box::new(device), g.mem.clone(), g.interrupt.clone()).unwrap();
    let mut mac = [0u8; 6];
    t.read(0x100, &mut mac);
    assert_eq!(mac, MAC.0, "the MAC is in config space");
    let accepted = VIRTIO_F_VERSION_1 | F_MAC | F_GUEST_CSUM | F_GUEST_TSO4;
    bring_up(&mut t, &g, accepted);
    assert_eq!(*backend.offloads.lock().unwrap(), Some(accepted), "offloads set from what the guest took");
    let report = handle.report();
    assert!(report.starts_with("net_mac=02:11:22:33:44:55 net_acked_features=0x1000000a2 net_tx_frames=0"), "{report}");
    send_one(&mut t, &mut g, 1);
    assert_eq!(&wait_frame(&peer)[12..], &frame(60, 1)[..]);

    t.quiesce();
    let transport: TransportState = bincode::deserialize(&bincode::serialize(&t.save_state()).unwrap()).unwrap();
    let net: NetState = bincode::deserialize(&bincode::serialize(&handle.save_state()).unwrap()).unwrap();
    assert_eq!(net, NetState { mac: MAC, acked_features: accepted });
    drop(t);

    // Restored onto a new tap: it carries on from the rings in guest memory.
    let (backend2, peer2) = SocketBackend::pair();
    let mut t2 = MmioTransport::new(
        Box::new(NetDevice::from_state(&net, Some(backend2.clone()))),
        g.mem.clone(),
        g.interrupt.clone(),
    )
    .unwrap();
    t2.restore_state(&transport).unwrap();
    assert_eq!(*backend2.offloads.lock().unwrap(), Some(accepted));
    send_one(&mut t2, &mut g, 2);
    assert_eq!(&wait_frame(&peer2)[12..], &frame(60, 2)[..]);
    assert_eq!(g.tx.take_used(&g.mem).len(), 2);
    t2.quiesce();
    let transport = t2.save_state();
    drop(t2);

    // Restored detached (a template): TX is consumed and counted.
    let detached = NetDevice::from_state(&net, None);
    let metrics = detached.handle().metrics;
    let mut t3 = MmioTransport::new(Box::new(detached), g.mem.clone(), g.interrupt.clone()).unwrap();
    t3.restore_state(&transport).unwrap();
    send_one(&mut t3, &mut g, 3);
    let deadline = Instant::now() + Duration::from_secs(10);
    while metrics.tx_dropped_detached.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "the detached device never consumed the frame");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(g.tx.take_used(&g.mem).len(), 1);
}
