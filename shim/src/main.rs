//! `containerd-shim-nestbox-v2`: containerd's runtime v2 shim for nestbox (task API v2).
//! containerd starts it with `start`, talks ttrpc to the daemon that prints, and runs
//! `delete` to clean up after a shim that died. See `nestbox_shim::shim`.

fn main() {
    let config = containerd_shim::Config {
        // The VMM is waited for by its supervisor thread, not by a global reaper.
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    containerd_shim::run::<nestbox_shim::shim::NestboxShim>(nestbox_shim::shim::RUNTIME_ID, Some(config));
}
