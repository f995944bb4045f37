//! The record of an installation, `<root>/var/lib/nestbox/install.json`: every file put in
//! place with its content hash, the folders made, and what was done to containerd's config,
//! so that `nestbox uninstall` takes out exactly that. Paths are the host's own (without the
//! `--root` they were installed under), so the same record serves `--root /host`.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where the manifest lives on the host.
pub const PATH: &str = "/var/lib/nestbox/install.json";
/// Where files that an installation replaced, and containerd's config as it was, are kept.
pub const BACKUP_DIR: &str = "/var/lib/nestbox/backup";

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// The nestbox version that installed.
    pub version: String,
    pub prefix: PathBuf,
    pub files: Vec<InstalledFile>,
    /// Folders the installation made, parents first; removed again when empty.
    pub dirs: Vec<PathBuf>,
    pub containerd: Option<ContainerdChange>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstalledFile {
    pub path: PathBuf,
    pub sha256: String,
    /// Where the file this one replaced is kept (restored by uninstall).
    pub replaced: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerdChange {
    pub config: PathBuf,
    /// Whether the file existed before the installation.
    pub existed: bool,
    /// The file's bytes before the installation (when it existed).
    pub backup: Option<PathBuf>,
    /// The hash of the file as the installation wrote it: if it is still that, uninstall
    /// writes back the original bytes; otherwise it takes out only the nestbox runtime.
    pub written_sha256: String,
    /// The text appended to the file (None: inserted in place).
    pub appended: Option<String>,
}

impl Manifest {
    pub fn file(&self, path: &Path) -> Option<&InstalledFile> {
        self.files.iter().find(|f| f.path == path)
    }
}
