//! What can go wrong with a sandbox, for every module of it.

use super::agent::AgentError;
use super::paths::{BadSandboxId, CleanupError};
use super::vmm;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    BadId(#[from] BadSandboxId),
    #[error("{0}")]
    BadContainerId(String),
    #[error("creating sandbox directory {path}: {source}", path = path.display())]
    Dir { path: PathBuf, source: std::io::Error },
    #[error("sandbox {id} already exists at {path} (a shim of that pod is still running, or a crashed one was not cleaned up: `ctr task delete` it)", path = path.display())]
    Exists { id: String, path: PathBuf },
    #[error("sharing the pod's files with its guest: {0}")]
    Share(super::mounts::MountError),
    #[error(transparent)]
    Vmm(#[from] vmm::VmmError),
    #[error("the VMM exited ({status}) before the guest's agent answered{details}")]
    VmmExited { status: String, details: String },
    #[error("the guest's agent did not answer within {waited:?} (VMM pid {pid} still running): {reason}{details}")]
    BootTimeout { waited: Duration, pid: u32, reason: String, details: String },
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Cleanup(#[from] CleanupError),
}
