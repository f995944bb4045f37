//! Property test of the TX path: whatever descriptor tables, available rings and bytes a
//! guest writes, the worker never panics, returns only heads it was given (once each)
//! with length 0, and counts every chain it returned exactly once.

use super::*;
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct RawDesc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

fn raw_desc() -> impl Strategy<Value = RawDesc> {
    let addr = prop_oneof![
        4 => DATA..DATA + 0x2_0000,
        1 => any::<u64>(),
        1 => MEM_SIZE - 0x100..MEM_SIZE + 0x100,
        1 => Just(0x2_0000u64), // the TX descriptor table itself (for indirect)
    ];
    let len = prop_oneof![4 => 0u32..2048, 1 => 0u32..0x2_0000, 1 => any::<u32>()];
    let flags = prop_oneof![3 => 0u16..8, 1 => any::<u16>()];
    let next = prop_oneof![3 => 0u16..16, 1 => any::<u16>()];
    (addr, len, flags, next).prop_map(|(addr, len, flags, next)| RawDesc { addr, len, flags, next })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn tx_never_panics_and_keeps_the_used_ring_consistent(
        descs in proptest::collection::vec(raw_desc(), 1..32),
        heads in proptest::collection::vec(prop_oneof![4 => 0u16..32, 1 => any::<u16>()], 0..80),
        bytes in proptest::collection::vec(any::<u8>(), 0..4096),
        detached in any::<bool>(),
    ) {
        let mut g = Guest::new();
        let (backend, peer) = SocketBackend::pair();
        let backend: Option<Arc<dyn Backend>> = if detached { None } else { Some(backend) };
        let (mut worker, _stop) = g.worker(backend);
        g.write(DATA, &bytes);
        for (i, d) in descs.iter().enumerate() {
            g.tx.write_desc(&g.mem, i as u16, d.addr, d.len, d.flags, d.next);
        }
        for &head in heads.iter().take(usize::from(QSIZE)) {
            g.tx.publish(&g.mem, head);
        }
        // Enough turns for every published chain (re-armed batches included).
        for _ in 0..4 {
            worker.process_tx();
        }
        let used = g.tx.take_used(&g.mem);
        // Heads out of range cannot be returned; every other chain is, in order, empty.
        let returnable: Vec<(u16, u32)> = heads.iter().filter(|&&h| h < QSIZE).map(|&h| (h, 0)).collect();
        prop_assert_eq!(used, returnable);
        let counted = g.count(|m| &m.tx_frames) + g.count(|m| &m.tx_malformed) + g.count(|m| &m.tx_too_big)
            + g.count(|m| &m.tx_dropped_detached) + g.count(|m| &m.tx_backend_errors);
        prop_assert_eq!(counted as usize, heads.len());
        let mut buf = vec![0u8; 0x2_0000];
        let mut sent = 0;
        while peer.recv(&mut buf).is_ok() {
            sent += 1;
        }
        prop_assert_eq!(sent as u64, g.count(|m| &m.tx_frames));
    }
}
