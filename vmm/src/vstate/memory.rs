//! Guest RAM: anonymous private mappings laid out around the MMIO gap.

use crate::arch::x86_64::layout;
use vm_memory::GuestMemoryMmap;

#[derive(Debug, thiserror::Error)]
#[error("cannot map {size_mib} MiB of guest memory: {source}")]
pub struct MemoryError {
    size_mib: u64,
    source: vm_memory::mmap::FromRangesError,
}

/// Maps `size` bytes of guest RAM. The mappings are MAP_NORESERVE: host memory is only
/// used for pages the guest touches.
pub fn create_guest_memory(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let ranges: Vec<_> = layout::ram_ranges(size).into_iter().map(|(addr, len)| (addr, len as usize)).collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError { size_mib: size >> 20, source })
}
