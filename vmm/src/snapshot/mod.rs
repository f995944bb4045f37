//! Snapshots of a running microVM: a directory with `state` (vCPUs, interrupt controllers,
//! timer, clock, devices; checksummed) and `memory` (guest RAM, region after region, zero
//! pages left as holes). A new VMM restores from it by mapping `memory` private, so many
//! sandboxes restored from one snapshot share its unchanged pages.
//!
//! Taking a snapshot pauses the vCPUs, stops the device threads and ends the VMM: it is
//! how a warm template is made, not a checkpoint to continue from.

mod memory_file;
pub mod microvm;
mod state_file;

pub use memory_file::{open_memory, write_memory};
pub use microvm::{MachineShape, MicrovmState};
pub use state_file::{read_state, write_state};
use std::path::{Path, PathBuf};

pub const STATE_FILE: &str = "state";
pub const MEMORY_FILE: &str = "memory";
/// Bumped whenever `MicrovmState` changes shape: a file of an unknown version is refused,
/// not misread. Version 1 (no net device) is still read, as [`microvm::MicrovmStateV1`].
pub const FORMAT_VERSION: u32 = 2;

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
