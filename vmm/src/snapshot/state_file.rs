//! The state file: a magic, the format version, the length of the bincode-encoded
//! [`MicrovmState`], the payload, and an FNV-1a checksum of it; written atomically.

use super::microvm::MicrovmStateV1;
use super::{io_err, MicrovmState, SnapshotError, FORMAT_VERSION, STATE_FILE};
use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

const MAGIC: &[u8; 8] = b"NBXSNAP\0";

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
    if version != FORMAT_VERSION && version != 1 {
        return Err(invalid(format!("format version {version}, this VMM reads versions 1 to {FORMAT_VERSION}")));
    }
    let len = u64::from_le_bytes(bytes[12..20].try_into().unwrap_or_default());
    // Checked: a length near 2^64 must not wrap around to the file's size.
    if usize::try_from(len).ok().and_then(|len| len.checked_add(28)) != Some(bytes.len()) {
        return Err(invalid(format!("truncated or padded: {} bytes, the header says a payload of {len}", bytes.len())));
    }
    let len = bytes.len() - 28;
    let payload = &bytes[20..20 + len];
    let sum = u64::from_le_bytes(bytes[20 + len..].try_into().unwrap_or_default());
    if fnv64(payload) != sum {
        return Err(invalid("checksum mismatch: the file is corrupt".into()));
    }
    let decoded = match version {
        1 => bincode::deserialize::<MicrovmStateV1>(payload).map(MicrovmState::from),
        _ => bincode::deserialize::<MicrovmState>(payload),
    };
    decoded.map_err(|e| invalid(format!("decoding: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `payload` as a state file of format `version`.
    fn write_raw(dir: &Path, version: u32, payload: &[u8]) {
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&version.to_le_bytes());
        bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        bytes.extend_from_slice(payload);
        bytes.extend_from_slice(&fnv64(payload).to_le_bytes());
        std::fs::write(dir.join(STATE_FILE), bytes).unwrap();
    }

    #[test]
    fn version_1_without_net_still_reads_and_version_2_keeps_the_net_device() {
        use crate::devices::virtio::net::{persist::NetState, MacAddr};
        let dir = std::env::temp_dir().join(format!("nestbox-state-v1-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let s = crate::snapshot::microvm::test_state();
        let v1 = MicrovmStateV1 {
            memory_mib: s.memory_mib,
            cpu_vendor: s.cpu_vendor,
            cpu_template: s.cpu_template,
            vcpus: s.vcpus,
            vm: s.vm,
            serial: s.serial,
            virtio: s.virtio,
        };
        write_raw(&dir, 1, &bincode::serialize(&v1).unwrap());
        let state = read_state(&dir).unwrap();
        assert_eq!((state.memory_mib, state.virtio.len()), (128, 1));
        assert!(state.net.is_none());

        let net = NetState { mac: MacAddr([2, 0, 0, 0, 0, 9]), acked_features: 0x1_0000_0023 };
        let v2 = MicrovmState { net: Some(net.clone()), ..state };
        write_state(&dir, &v2).unwrap();
        assert_eq!(read_state(&dir).unwrap().net, Some(net));
        write_raw(&dir, 3, b"later");
        let err = read_state(&dir).unwrap_err().to_string();
        assert!(err.contains("format version 3"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Found by the snapshot fuzz target: a header length that made `20 + len + 8` wrap
    /// around to the file's size passed the size check, then panicked slicing.
    #[test]
    fn a_length_that_wraps_around_is_refused() {
        let dir = std::env::temp_dir().join(format!("nestbox-state-wrap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&(u64::MAX - 3).to_le_bytes()); // + 28 wraps to 24
        bytes.extend_from_slice(&[0; 4]);
        assert_eq!(bytes.len(), 24);
        std::fs::write(dir.join(STATE_FILE), bytes).unwrap();
        let err = read_state(&dir).unwrap_err().to_string();
        assert!(err.contains("truncated or padded: 24 bytes"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn fnv_is_stable() {
        assert_eq!(fnv64(b""), 0xcbf2_9ce4_8422_2325);
        assert_ne!(fnv64(b"a"), fnv64(b"b"));
    }
}
