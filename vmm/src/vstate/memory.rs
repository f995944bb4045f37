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

/// Maps guest RAM of `size` bytes from `file` (laid out region after region), private:
/// pages are read from the file on first touch and copied on first write, so guests
/// restored from one file share its unchanged pages through the page cache.
pub fn map_guest_memory_from_file(size: u64, file: &std::fs::File) -> Result<GuestMemoryMmap, FileMemoryError> {
    use vm_memory::mmap::{GuestRegionMmap, MmapRegionBuilder};
    use vm_memory::FileOffset;
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (addr, len) in layout::ram_ranges(size) {
        let file = file.try_clone().map_err(FileMemoryError::Io)?;
        let region = MmapRegionBuilder::new(len as usize)
            .with_file_offset(FileOffset::new(file, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| FileMemoryError::Map(e.to_string()))?;
        regions.push(GuestRegionMmap::new(region, addr).ok_or(FileMemoryError::Map("region overflows".into()))?);
        offset += len;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| FileMemoryError::Map(e.to_string()))
}

#[derive(Debug, thiserror::Error)]
pub enum FileMemoryError {
    #[error("guest memory file: {0}")]
    Io(std::io::Error),
    #[error("mapping guest memory from its file: {0}")]
    Map(String),
}
