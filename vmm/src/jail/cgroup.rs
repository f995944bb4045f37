//! The VMM's own cgroup: memory, pids and CPU limits, then the VMM moves itself in.
//!
//! cgroup v2 where the cgroup root is a cgroup2 file system (production hosts); otherwise
//! the v1 hierarchies of the memory (required), pids and cpu controllers, as on hosts that
//! mount v1 controllers next to a controller-less cgroup2 `unified` mount (hybrid).
//! Plain files under /sys/fs/cgroup: a handful of writes, no daemon, no library.

use super::error::{io_error, sys_error, JailError};
use std::path::{Component, Path, PathBuf};

pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The v1 controllers used; the memory one is required.
const V1_CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupLimits {
    pub memory_bytes: u64,
    pub pids_max: u32,
    /// cgroup v2 cpu.weight (1-10000, default 100).
    pub cpu_weight: u16,
}

/// A cgroup path relative to the root of each hierarchy, and its limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    pub path: String,
    pub limits: CgroupLimits,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

impl CgroupVersion {
    /// Which hierarchy the jail uses on this host: v2 only if the root is cgroup2.
    pub fn detect(root: &Path) -> Result<CgroupVersion, JailError> {
        let fs = nix::sys::statfs::statfs(root).map_err(sys_error(format!("statfs {}", root.display())))?;
        if fs.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC {
            return Ok(CgroupVersion::V2);
        }
        if root.join("memory").join("memory.limit_in_bytes").exists() {
            return Ok(CgroupVersion::V1);
        }
        Err(JailError::Invalid(format!("{} has neither cgroup v2 nor the v1 memory controller", root.display())))
    }
}

/// cgroup v1 cpu.shares of the same proportion as a v2 weight: each version's default
/// (100, 1024) maps to the other's.
pub fn v1_shares(weight: u16) -> u64 {
    (u64::from(weight) * 1024 / 100).max(2)
}

impl Cgroup {
    /// Checks the path: relative, no `..`, no empty parts.
    fn relative(&self) -> Result<PathBuf, JailError> {
        let path = Path::new(&self.path);
        let ok = !self.path.is_empty() && path.components().all(|c| matches!(c, Component::Normal(_)));
        if ok {
            Ok(path.to_path_buf())
        } else {
            Err(JailError::Invalid(format!("cgroup path {:?} must be relative, without '..'", self.path)))
        }
    }

    /// Creates the cgroup (and its parents) below `root`, sets its limits and moves the
    /// calling process into it.
    pub fn create_and_join(&self, root: &Path) -> Result<(), JailError> {
        let relative = self.relative()?;
        let pid = std::process::id().to_string();
        match CgroupVersion::detect(root)? {
            CgroupVersion::V2 => {
                enable_v2_controllers(root, &relative)?;
                let dir = root.join(&relative);
                mkdir(&dir)?;
                write(&dir, "memory.max", &self.limits.memory_bytes.to_string())?;
                write(&dir, "pids.max", &self.limits.pids_max.to_string())?;
                write(&dir, "cpu.weight", &self.limits.cpu_weight.to_string())?;
                write(&dir, "cgroup.procs", &pid)
            }
            CgroupVersion::V1 => {
                for controller in V1_CONTROLLERS {
                    let hierarchy = root.join(controller);
                    // pids and cpu are best effort on v1 hosts that lack them; memory is not.
                    if controller != "memory" && !hierarchy.join("cgroup.procs").exists() {
                        continue;
                    }
                    let dir = hierarchy.join(&relative);
                    mkdir(&dir)?;
                    match controller {
                        "memory" => write(&dir, "memory.limit_in_bytes", &self.limits.memory_bytes.to_string())?,
                        "pids" => write(&dir, "pids.max", &self.limits.pids_max.to_string())?,
                        _ => write(&dir, "cpu.shares", &v1_shares(self.limits.cpu_weight).to_string())?,
                    }
                    write(&dir, "cgroup.procs", &pid)?;
                }
                Ok(())
            }
        }
    }
}

/// Turns on memory, pids and cpu for the children of every cgroup from the root down to
/// the parent of `relative` (v2 only delegates a controller a parent has enabled).
fn enable_v2_controllers(root: &Path, relative: &Path) -> Result<(), JailError> {
    let mut dir = root.to_path_buf();
    let parents: Vec<_> = relative.parent().map(|p| p.components().collect()).unwrap_or_default();
    for step in std::iter::once(None).chain(parents.into_iter().map(Some)) {
        if let Some(component) = step {
            dir.push(component);
            mkdir(&dir)?;
        }
        let enabled = std::fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
        for controller in ["memory", "pids", "cpu"] {
            if !enabled.split_whitespace().any(|c| c == controller) {
                write(&dir, "cgroup.subtree_control", &format!("+{controller}"))?;
            }
        }
    }
    Ok(())
}

fn mkdir(dir: &Path) -> Result<(), JailError> {
    match std::fs::create_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            Err(io_error(format!("creating cgroup {}", dir.display()))(e))
        }
        _ => Ok(()),
    }
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), JailError> {
    let path = dir.join(file);
    std::fs::write(&path, value).map_err(io_error(format!("writing {value} to {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cgroup(path: &str) -> Cgroup {
        Cgroup { path: path.into(), limits: CgroupLimits { memory_bytes: 1 << 30, pids_max: 10, cpu_weight: 100 } }
    }

    #[test]
    fn paths_that_leave_the_parent_are_refused_by_name() {
        for bad in ["", "/abs", "a/../../b", "./a", ".."] {
            let err = cgroup(bad).relative().expect_err(bad).to_string();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
        assert_eq!(cgroup("nestbox/pod1").relative().expect("fine"), Path::new("nestbox/pod1"));
    }

    #[test]
    fn weights_map_to_shares_default_to_default() {
        assert_eq!(v1_shares(100), 1024);
        assert_eq!(v1_shares(200), 2048);
        assert_eq!(v1_shares(1), 10);
        assert_eq!(v1_shares(10000), 102400);
    }

    #[test]
    fn this_host_has_a_hierarchy_the_jail_can_use() {
        // Either version is fine; a host with neither cannot run the jail's cgroup.
        CgroupVersion::detect(Path::new(CGROUP_ROOT)).expect("cgroup v2 or the v1 memory controller");
    }
}
