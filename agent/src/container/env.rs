//! What every container operation needs from the rest of the agent.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use crate::cgroup::Hierarchy;
use crate::oom::OomQueue;
use crate::process::streams::IoHub;
use crate::reaper::Reaper;

pub struct Env {
    pub reaper: Arc<Reaper>,
    pub io: Arc<IoHub>,
    /// The agent's own executable, re-executed as the helper.
    pub exe: OwnedFd,
    /// Where container cgroups go; an error (why there is none) when the system has none.
    pub cgroups: Result<Hierarchy, String>,
    pub oom: Arc<OomQueue>,
    /// Host mode standing in for a VM: the directory that CreateSandbox's virtio-fs
    /// storage binds instead of mounting the tag.
    pub share: Option<std::path::PathBuf>,
    /// The guest leaves the AVX registers unsaved, so container programs get glibc's AVX
    /// functions turned off (`avx_quirk`); decided once, at the agent's start.
    pub glibc_avx_off: bool,
}
