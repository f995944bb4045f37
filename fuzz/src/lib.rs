//! Coverage-guided fuzz targets for everything a hostile guest can send to nestbox-vmm
//! (docs/fuzzing.md). Each target is a plain `fn(&[u8])` here, so the same code runs
//! under libFuzzer (`fuzz_targets/`, built by `scripts/fuzz`) and in `cargo test`
//! (`tests/targets.rs`: the seed corpus plus a bounded random run).
//!
//! A target turns its input into what a guest controls (guest memory, the virtqueues in
//! it, register accesses, a snapshot file) and drives the VMM's own code with it. Panics
//! and failed invariants are the findings; errors the VMM returns are not.

pub mod guest;
pub mod input;
pub mod scratch;
pub mod targets;

/// A fuzz target: its name (that of its binary and corpus directory), the function that
/// runs one input, and the seed inputs the committed corpus was written from.
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
    pub seeds: fn() -> Vec<(&'static str, Vec<u8>)>,
}

/// Every target, as `scripts/fuzz` and the tests know them.
pub const TARGETS: &[Target] = &[
    Target { name: "virtio_mmio", run: targets::virtio_mmio::run, seeds: targets::virtio_mmio::seeds },
    Target { name: "vsock", run: targets::vsock::run, seeds: targets::vsock::seeds },
    Target { name: "virtio_fs", run: targets::virtio_fs::run, seeds: targets::virtio_fs::seeds },
    Target { name: "snapshot", run: targets::snapshot::run, seeds: targets::snapshot::seeds },
    Target { name: "virtio_net", run: targets::virtio_net::run, seeds: targets::virtio_net::seeds },
];
