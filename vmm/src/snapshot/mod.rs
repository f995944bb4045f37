//! Snapshots of a running microVM: a directory with `state` (vCPUs, interrupt controllers,
//! timer, clock, devices; checksummed) and `memory` (guest RAM, region after region, zero
//! pages left as holes). A new VMM restores from it by mapping `memory` private, so many
//! sandboxes restored from one snapshot share its unchanged pages.
//!
//! Taking a snapshot pauses the vCPUs, stops the device threads and ends the VMM: it is
//! how a warm template is made, not a checkpoint to continue from.

pub mod state;

use state::MicrovmState;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use vm_memory::{Bytes, GuestMemory, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

pub const STATE_FILE: &str = "state";
pub const MEMORY_FILE: &str = "memory";
const MAGIC: &[u8; 8] = b"NBXSNAP\0";
/// Bumped whenever `MicrovmState` changes shape: an older file is refused, not misread.
pub const FORMAT_VERSION: u32 = 1;
const PAGE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("snapshot {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("snapshot {path} does not fit this VM: {reason}")]
    Mismatch { path: PathBuf, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io { path: path.to_path_buf(), source }
}

fn fnv64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
}

/// Writes the state file atomically (a reader never sees half of one).
pub fn write_state(dir: &Path, state: &MicrovmState) -> Result<(), SnapshotError> {
    let path = dir.join(STATE_FILE);
    let payload = bincode::serialize(state)
        .map_err(|e| SnapshotError::Invalid { path: path.clone(), reason: format!("encoding: {e}") })?;
    let mut bytes = Vec::with_capacity(payload.len() + 28);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&payload);
    bytes.extend_from_slice(&fnv64(&payload).to_le_bytes());
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    let mut file = File::create(&tmp).map_err(io_err(&tmp))?;
    file.write_all(&bytes).and_then(|()| file.sync_all()).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err(&path))
}

/// Reads and checks the state file: a foreign, truncated, corrupt or other-version file
/// is an error naming what is wrong.
pub fn read_state(dir: &Path) -> Result<MicrovmState, SnapshotError> {
    let path = dir.join(STATE_FILE);
    let mut bytes = Vec::new();
    File::open(&path).and_then(|mut f| f.read_to_end(&mut bytes)).map_err(io_err(&path))?;
    let invalid = |reason: String| SnapshotError::Invalid { path: path.clone(), reason };
    if bytes.len() < 20 || &bytes[..8] != MAGIC {
        return Err(invalid("not a nestbox snapshot state file".into()));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap_or_default());
    if version != FORMAT_VERSION {
        return Err(invalid(format!("format version {version}, this VMM reads version {FORMAT_VERSION}")));
    }
    let len = u64::from_le_bytes(bytes[12..20].try_into().unwrap_or_default()) as usize;
    if bytes.len() != 20 + len + 8 {
        return Err(invalid(format!("truncated or padded: {} bytes, the header says {}", bytes.len(), 20 + len + 8)));
    }
    let payload = &bytes[20..20 + len];
    let sum = u64::from_le_bytes(bytes[20 + len..].try_into().unwrap_or_default());
    if fnv64(payload) != sum {
        return Err(invalid("checksum mismatch: the file is corrupt".into()));
    }
    bincode::deserialize(payload).map_err(|e| invalid(format!("decoding: {e}")))
}

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
    fn fnv_is_stable() {
        assert_eq!(fnv64(b""), 0xcbf2_9ce4_8422_2325);
        assert_ne!(fnv64(b"a"), fnv64(b"b"));
    }

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
