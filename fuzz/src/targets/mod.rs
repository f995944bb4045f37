//! One module per target; each has `run(&[u8])` and `seeds()` (the inputs the committed
//! corpus was written from, see tests/targets.rs).

pub mod snapshot;
pub mod virtio_fs;
pub mod virtio_mmio;
pub mod virtio_net;
pub mod vsock;

use nestbox_vmm::devices::virtio::Interrupt;
use std::sync::Arc;
use vmm_sys_util::eventfd::EventFd;

pub(crate) fn eventfd() -> EventFd {
    EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")
}

pub(crate) fn interrupt() -> Arc<Interrupt> {
    Arc::new(Interrupt::new(eventfd()))
}
