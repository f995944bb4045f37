//! The memory file: guest RAM region after region, all-zero pages left as holes, mapped
//! private by a restoring VMM.

use super::{io_err, SnapshotError, MEMORY_FILE};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use vm_memory::{Bytes, GuestMemory, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

const PAGE: usize = 4096;

/// Writes guest RAM to the memory file; all-zero pages are left as holes.
pub fn write_memory(dir: &Path, memory: &GuestMemoryMmap) -> Result<(), SnapshotError> {
    let path = dir.join(MEMORY_FILE);
    let file = File::create(&path).map_err(io_err(&path))?;
    let mut chunk = vec![0u8; 1 << 20];
    let mut file_offset = 0u64;
    for region in memory.iter() {
        let len = region.len() as usize;
        let mut done = 0usize;
        while done < len {
            let n = chunk.len().min(len - done);
            region.read_slice(&mut chunk[..n], MemoryRegionAddress(done as u64)).map_err(|e| {
                SnapshotError::Invalid { path: path.clone(), reason: format!("reading guest memory: {e}") }
            })?;
            for (i, page) in chunk[..n].chunks(PAGE).enumerate() {
                if page.iter().any(|&b| b != 0) {
                    file.write_all_at(page, file_offset + (done + i * PAGE) as u64).map_err(io_err(&path))?;
                }
            }
            done += n;
        }
        file_offset += len as u64;
    }
    file.set_len(file_offset).and_then(|()| file.sync_all()).map_err(io_err(&path))
}

/// Opens the memory file of a snapshot of a `memory_bytes` guest.
pub fn open_memory(dir: &Path, memory_bytes: u64) -> Result<File, SnapshotError> {
    let path = dir.join(MEMORY_FILE);
    let file = File::open(&path).map_err(io_err(&path))?;
    let len = file.metadata().map_err(io_err(&path))?.len();
    if len != memory_bytes {
        return Err(SnapshotError::Invalid {
            path,
            reason: format!("{len} bytes, the state describes {memory_bytes} bytes of guest memory (truncated?)"),
        });
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_round_trip_keeps_zero_pages_as_holes() {
        use vm_memory::GuestAddress;
        let dir = std::env::temp_dir().join(format!("nestbox-snap-mem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let size = 8u64 << 20;
        let mem = crate::vstate::memory::create_guest_memory(size).unwrap();
        mem.write_slice(b"hello", GuestAddress(0x1000)).unwrap();
        mem.write_slice(b"world", GuestAddress(size - 5)).unwrap();
        write_memory(&dir, &mem).unwrap();
        let file = open_memory(&dir, size).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert!(file.metadata().unwrap().blocks() * 512 < 64 * 1024, "zero pages are holes");
        let restored = crate::vstate::memory::map_guest_memory_from_file(size, &file).unwrap();
        let mut buf = [0u8; 5];
        restored.read_slice(&mut buf, GuestAddress(0x1000)).unwrap();
        assert_eq!(&buf, b"hello");
        restored.read_slice(&mut buf, GuestAddress(size - 5)).unwrap();
        assert_eq!(&buf, b"world");
        // Private mapping: writes stay in this guest, the file keeps its bytes.
        restored.write_slice(b"HELLO", GuestAddress(0x1000)).unwrap();
        let mut on_disk = [0u8; 5];
        file.read_exact_at(&mut on_disk, 0x1000).unwrap();
        assert_eq!(&on_disk, b"hello");
        assert!(matches!(open_memory(&dir, size * 2), Err(SnapshotError::Invalid { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
