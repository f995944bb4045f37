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

/// Keeps the calling thread, and the threads it starts, on the CPU it is running on until
/// dropped, when the thread's own CPU set comes back.
///
/// The device targets start a device thread per activation and wait for it at every reset:
/// a handful of wake-ups per input. Across CPUs each is an inter-processor interrupt, which
/// on this project's software-nested KVM host costs far more than the work (a virtio-fs
/// input took 3-4 times as long on two CPUs as on one). On one CPU, the thread that
/// blocks hands the CPU straight to the one it waits for. Between inputs the fuzzer is
/// free to move, so two fuzzers (or a busy CPU) still spread out.
pub(crate) struct SameCpu(Option<libc::cpu_set_t>);

impl SameCpu {
    pub(crate) fn pin() -> SameCpu {
        // SAFETY: cpu_set_t is plain data; the calls get a valid set of its size and act on
        // the calling thread only. A failure leaves the thread as it was (only slower).
        unsafe {
            let mut saved: libc::cpu_set_t = std::mem::zeroed();
            let size = std::mem::size_of::<libc::cpu_set_t>();
            let cpu = libc::sched_getcpu();
            if cpu < 0 || libc::sched_getaffinity(0, size, &mut saved) != 0 {
                return SameCpu(None);
            }
            let mut one: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu as usize, &mut one);
            if libc::sched_setaffinity(0, size, &one) != 0 {
                return SameCpu(None);
            }
            SameCpu(Some(saved))
        }
    }
}

impl Drop for SameCpu {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            // SAFETY: as in pin: a valid set of the right size, for the calling thread.
            unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), saved) };
        }
    }
}
