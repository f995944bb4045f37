//! Scratch files of the targets: sockets, the virtio-fs share, snapshot files.

/// A directory of this process for a target's files (sockets, the shared directory, a
/// snapshot), created on first use. `NESTBOX_FUZZ_SCRATCH` places it (scripts/fuzz points
/// it at a small tmpfs); the default is under the temporary directory.
pub fn dir(target: &str) -> std::path::PathBuf {
    let dir = scratch_base().join(format!("{}{target}", scratch_prefix()));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        panic!("fuzz scratch directory {}: {e}", dir.display());
    }
    dir
}

fn scratch_base() -> std::path::PathBuf {
    std::env::var_os("NESTBOX_FUZZ_SCRATCH").map(std::path::PathBuf::from).unwrap_or_else(std::env::temp_dir)
}

fn scratch_prefix() -> String {
    format!("nestbox-fuzz-{}-", std::process::id())
}

/// Removes the scratch directories of this process.
pub fn remove() {
    let (base, prefix) = (scratch_base(), scratch_prefix());
    for entry in std::fs::read_dir(&base).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
