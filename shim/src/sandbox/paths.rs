//! Where a sandbox's files live, and their removal (unmount first, then delete; below the
//! sandbox directory through descriptors only, see `beneath`).

use super::beneath::Dir;
use super::mounts::{self, MountError};
use super::share;
use std::path::{Path, PathBuf};

/// A sandbox directory (or part of one) that could not be removed.
#[derive(Debug, thiserror::Error)]
#[error("removing sandbox directory {path}: {reason}", path = path.display())]
pub struct CleanupError {
    pub path: PathBuf,
    pub reason: String,
}

/// A sandbox (pod) id that may not name a directory: it must be what containerd allows for
/// a container id (see `nestbox_protocols::stdio::validate_id`), so no '/', no `..`, at
/// most 128 bytes.
#[derive(Debug, thiserror::Error)]
#[error("{0} (the pod id comes from the annotation io.kubernetes.cri.sandbox-id, else it is the container id)")]
pub struct BadSandboxId(pub String);

/// Checks a sandbox id before it becomes a path.
pub fn validate_sandbox_id(id: &str) -> Result<(), BadSandboxId> {
    nestbox_protocols::stdio::validate_id("sandbox id", id).map_err(BadSandboxId)
}

/// Where a sandbox's files live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxPaths {
    pub dir: PathBuf,
    /// The host-only tree the shim creates and mounts in (see `share`).
    pub mounts: PathBuf,
    /// Its read-only export, which the VMM serves to the guest.
    pub shared: PathBuf,
    pub console: PathBuf,
    pub vmm_log: PathBuf,
    pub pid_file: PathBuf,
    pub vsock: PathBuf,
    /// What the pod network left in its namespace (`network::PodNetwork::record`), so a
    /// `delete` after a killed shim can remove it.
    pub network: PathBuf,
}

impl SandboxPaths {
    /// The paths of pod `id`, which is checked first: a pod id comes from the spec.
    pub fn of_pod(sandboxes_dir: &Path, id: &str) -> Result<SandboxPaths, BadSandboxId> {
        validate_sandbox_id(id)?;
        Ok(SandboxPaths::new(sandboxes_dir, id))
    }

    /// The paths below `sandboxes_dir/id` for an id the caller made (a template's).
    pub fn new(sandboxes_dir: &Path, id: &str) -> SandboxPaths {
        let dir = sandboxes_dir.join(id);
        SandboxPaths {
            mounts: dir.join(share::MOUNTS_DIR),
            shared: dir.join(share::SHARED_DIR),
            console: dir.join("console.log"),
            vmm_log: dir.join("vmm.log"),
            pid_file: dir.join("vmm.pid"),
            vsock: dir.join("vsock.sock"),
            network: dir.join("network"),
            dir,
        }
    }

    /// A container's directory in the host-only tree (`mounts/<cid>`; the guest sees it as
    /// `<cid>` of the share).
    pub fn container_dir(&self, container_id: &str) -> PathBuf {
        self.mounts.join(container_id)
    }

    /// The sandbox directory, opened (by path: only its parent, from the configuration,
    /// and the checked id are in it).
    pub fn open(&self) -> std::io::Result<Dir> {
        let (Some(parent), Some(name)) = (self.dir.parent(), self.dir.file_name()) else {
            return Err(std::io::Error::other(format!("{} has no parent", self.dir.display())));
        };
        Dir::open_root(parent)?.dir(name)
    }

    /// Creates container `container_id`'s directory in the host-only tree.
    pub fn create_container_dir(&self, container_id: &str) -> Result<Dir, MountError> {
        let sandbox = self.open().map_err(|source| MountError::MountPoint { path: self.dir.clone(), source })?;
        share::container_dir(&sandbox, container_id)
    }

    /// Unmounts and deletes container `container_id`'s directory. Missing is fine.
    pub fn remove_container_dir(&self, container_id: &str) -> Result<(), CleanupError> {
        let cleanup = |reason: String| CleanupError { path: self.container_dir(container_id), reason };
        let sandbox = match self.open() {
            Ok(sandbox) => sandbox,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(cleanup(e.to_string())),
        };
        remove_below(&sandbox, &Path::new(share::MOUNTS_DIR).join(container_id)).map_err(cleanup)
    }
}

/// Unmounts everything below `dir` and deletes it, never following a symlink below its
/// parent and never deleting through a mount. Missing is fine.
pub fn remove_dir(dir: &Path) -> Result<(), CleanupError> {
    let cleanup = |reason: String| CleanupError { path: dir.to_path_buf(), reason };
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
        return Err(cleanup("not a directory below another".into()));
    };
    let root = match Dir::open_root(parent) {
        Ok(root) => root,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(cleanup(e.to_string())),
    };
    remove_below(&root, Path::new(name)).map_err(cleanup)
}

fn remove_below(root: &Dir, rel: &Path) -> Result<(), String> {
    match root.dir(rel) {
        Ok(dir) => mounts::unmount_under(&dir).map_err(|e| e.to_string())?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        // A file or a symlink where the directory was: only the entry goes.
        Err(_) => {}
    }
    root.remove_tree(rel).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_inside_the_sandbox_dir() {
        let p = SandboxPaths::new(Path::new("/run/nestbox/sandboxes"), "pod1");
        assert_eq!(p.dir, Path::new("/run/nestbox/sandboxes/pod1"));
        for inner in [&p.shared, &p.console, &p.vmm_log, &p.pid_file, &p.vsock] {
            assert!(inner.starts_with(&p.dir), "{}", inner.display());
        }
        assert_eq!(p.container_dir("c1"), Path::new("/run/nestbox/sandboxes/pod1/mounts/c1"));
    }

    #[test]
    fn path_like_sandbox_ids_are_refused_by_name() {
        let base = Path::new("/run/nestbox/sandboxes");
        for bad in ["../etc", "..", ".", "a/b", "/abs", "", "-x", "a\0b", "a b", &"x".repeat(129)] {
            let err = SandboxPaths::of_pod(base, bad).expect_err(bad).to_string();
            assert!(err.contains("sandbox id"), "{err}");
            assert!(bad.is_empty() || bad.len() > 128 || err.contains(&format!("{bad:?}")), "{err}");
        }
        for good in ["pod1", "a..b", "0f3e_x-y.z", &"x".repeat(128)] {
            assert!(SandboxPaths::of_pod(base, good).is_ok(), "{good}");
        }
    }

    #[test]
    fn remove_dir_unmounts_first_and_tolerates_missing() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("sb");
        std::fs::create_dir_all(dir.join("shared/c1/rootfs")).expect("mkdir");
        std::fs::create_dir_all(root.path().join("data")).expect("mkdir");
        std::fs::write(root.path().join("data/f"), "keep me").expect("write");
        let c1 = Dir::open_root(&dir.join("shared/c1")).expect("open");
        mounts::bind(&root.path().join("data"), &c1, "data", false).expect("bind");
        remove_dir(&dir).expect("removed");
        assert!(!dir.exists());
        // The bound source was unmounted, not emptied through the mount.
        assert_eq!(std::fs::read_to_string(root.path().join("data/f")).expect("still there"), "keep me");
        remove_dir(&dir).expect("missing is fine");
    }
}
