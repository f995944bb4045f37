//! Small helpers every layer may use; this module imports nothing from the crate.

use std::sync::{Mutex, MutexGuard};

/// Locks a mutex, carrying on with the data if a panicking thread poisoned it: the VM is
/// going down anyway in that case, and the state is only read or replaced whole.
pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// CLOCK_MONOTONIC in nanoseconds: comparable across processes, unlike `Instant`.
pub fn monotonic_ns() -> u128 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}
