//! The host side of the VMM's jail (`nestbox-vmm --jail`, docs/jail.md): what the shim
//! prepares before the VMM confines itself, cleans up after it, and reports about it.

use nix::mount::MsFlags;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// cgroup root of every hierarchy (v2 itself, or the v1 controllers' mounts below it).
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The v1 controllers the VMM's jail uses (nestbox-vmm's jail/cgroup.rs).
const V1_CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

/// How a jailed VMM is started: its cgroup and what the pod's size makes of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JailSpec {
    /// `<cgroup_parent>/<sandbox>`, relative to the cgroup root.
    pub cgroup: String,
    /// cgroup v2 CPU weight: the default (100) per vCPU.
    pub cpu_weight: u16,
    pub oom_score_adj: Option<i16>,
}

impl JailSpec {
    pub fn new(cgroup_parent: &str, name: &str, vcpus: u8, oom_score_adj: Option<i16>) -> JailSpec {
        JailSpec {
            cgroup: format!("{cgroup_parent}/{name}"),
            cpu_weight: (u16::from(vcpus) * 100).clamp(1, 10000),
            oom_score_adj,
        }
    }

    pub fn args(&self) -> Vec<String> {
        let mut args = vec![
            "--jail".to_string(),
            "--jail-cgroup".to_string(),
            self.cgroup.clone(),
            "--jail-cpu-weight".to_string(),
            self.cpu_weight.to_string(),
        ];
        if let Some(adj) = self.oom_score_adj {
            args.extend(["--jail-oom-score-adj".to_string(), adj.to_string()]);
        }
        args
    }

    /// The cgroup directories the VMM may have created (one for v2, one per controller
    /// on v1).
    fn cgroup_dirs(&self) -> Vec<PathBuf> {
        let root = Path::new(CGROUP_ROOT);
        std::iter::once(root.join(&self.cgroup))
            .chain(V1_CONTROLLERS.iter().map(|c| root.join(c).join(&self.cgroup)))
            .collect()
    }

    /// Removes the ended VMM's cgroup (empty once its last task has gone).
    pub fn remove_cgroup(&self) {
        for dir in self.cgroup_dirs() {
            match std::fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => log::warn!("removing the VMM's cgroup {}: {e}", dir.display()),
            }
        }
    }
}

/// Which cgroup hierarchy a jailed VMM uses here: "v2" where /sys/fs/cgroup is cgroup2,
/// "v1" where it has the v1 memory controller (a hybrid host), else why there is none.
pub fn cgroup_version() -> Result<&'static str, String> {
    let fs = nix::sys::statfs::statfs(CGROUP_ROOT).map_err(|e| format!("statfs {CGROUP_ROOT}: {e}"))?;
    if fs.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC {
        Ok("v2")
    } else if Path::new(CGROUP_ROOT).join("memory/memory.limit_in_bytes").exists() {
        Ok("v1")
    } else {
        Err(format!("{CGROUP_ROOT} has neither cgroup v2 nor the v1 memory controller"))
    }
}

/// Makes `dir` a shared mount (binding it onto itself if it is not a mount point), so
/// that what the shim mounts below it later (containers' root file systems) also appears
/// in the jailed VMM's mount namespace, which holds a slave copy of it.
pub fn share_mounts_below(dir: &Path) -> Result<(), String> {
    let fail = |what: &str, e: nix::Error| format!("{what} {}: {e}", dir.display());
    let points = super::mounts::mounts_under(dir).map_err(|e| e.to_string())?;
    if !points.iter().any(|point| point == dir) {
        // A bind onto itself hides what is mounted below (those mounts would then stay,
        // unreachable, and keep their directories busy): only on an empty tree.
        if !points.is_empty() {
            return Err(format!("{} has mounts below it but is not a mount point itself", dir.display()));
        }
        nix::mount::mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .map_err(|e| fail("binding onto itself", e))?;
    }
    // Recursive too, so that unmounting a container's rootfs on the host also reaches the
    // VMM's copy of it.
    nix::mount::mount(None::<&str>, dir, None::<&str>, MsFlags::MS_SHARED | MsFlags::MS_REC, None::<&str>)
        .map_err(|e| fail("making shared", e))
}

/// What the kernel logged about the seccomp kill of `pid`: the system call number from
/// its audit record (`type=1326 ... pid=P ... syscall=N`). The record exists only where
/// audit is enabled (auditd running or `audit=1`); None otherwise.
pub fn seccomp_kill_syscall(pid: u32) -> Option<u64> {
    let mut kmsg = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open("/dev/kmsg").ok()?;
    let mut found = None;
    // One record per read; EAGAIN at the end of the buffer.
    let mut record = vec![0u8; 8192];
    loop {
        match kmsg.read(&mut record) {
            Ok(0) => break,
            Ok(n) => {
                if let Some(nr) = audit_syscall(&String::from_utf8_lossy(&record[..n]), pid) {
                    found = Some(nr);
                }
            }
            // EPIPE: a record was overwritten while reading; go on with the next.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(_) => break,
        }
    }
    found
}

fn audit_syscall(record: &str, pid: u32) -> Option<u64> {
    if !record.contains("type=1326") {
        return None;
    }
    let field = |name: &str| record.split_whitespace().find_map(|w| w.strip_prefix(name));
    if field("pid=")? != pid.to_string() {
        return None;
    }
    field("syscall=")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vmm_gets_its_cgroup_and_a_weight_per_vcpu() {
        let spec = JailSpec::new("nestbox", "pod1", 2, Some(300));
        assert_eq!(spec.cgroup, "nestbox/pod1");
        assert_eq!(
            spec.args(),
            ["--jail", "--jail-cgroup", "nestbox/pod1", "--jail-cpu-weight", "200", "--jail-oom-score-adj", "300"]
        );
        assert_eq!(JailSpec::new("n", "p", 254, None).cpu_weight, 10000);
        let dirs = spec.cgroup_dirs();
        assert!(dirs.contains(&PathBuf::from("/sys/fs/cgroup/nestbox/pod1")), "{dirs:?}");
        assert!(dirs.contains(&PathBuf::from("/sys/fs/cgroup/memory/nestbox/pod1")), "{dirs:?}");
    }

    #[test]
    fn the_syscall_is_read_from_the_audit_record_of_that_pid_only() {
        let record = "6,1234,5678,-;audit: type=1326 audit(1.2:3): auid=4294967295 uid=0 gid=0 ses=4294967295 \
                      pid=4242 comm=\"api\" exe=\"/usr/bin/nestbox-vmm\" sig=31 arch=c000003e syscall=135 \
                      compat=0 ip=0x7f code=0x80000000";
        assert_eq!(audit_syscall(record, 4242), Some(135));
        assert_eq!(audit_syscall(record, 424), None);
        assert_eq!(audit_syscall("6,1,2,-;audit: type=1400 pid=4242 syscall=1", 4242), None);
    }

    #[test]
    fn a_directory_becomes_a_shared_mount_point_once_before_anything_is_mounted_below() {
        let dir = tempfile::tempdir().expect("tempdir");
        let shared = dir.path().join("shared");
        std::fs::create_dir_all(shared.join("c1/rootfs")).expect("mkdir");
        std::fs::create_dir(dir.path().join("data")).expect("mkdir");
        std::fs::write(dir.path().join("data/f"), "in the rootfs").expect("write");
        let bind = |src: &Path, dst: &Path| {
            nix::mount::mount(Some(src), dst, None::<&str>, MsFlags::MS_BIND, None::<&str>).expect("bind");
        };
        let mounted = || super::super::mounts::mounts_under(&shared).expect("mount table");
        assert!(mounted().is_empty(), "not a mount point yet");
        share_mounts_below(&shared).expect("shared");
        bind(&dir.path().join("data"), &shared.join("c1/rootfs"));
        let rootfs_file = shared.join("c1/rootfs/f");
        assert_eq!(std::fs::read_to_string(&rootfs_file).expect("visible"), "in the rootfs");
        share_mounts_below(&shared).expect("again: no second bind");
        let table = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let ours: Vec<&str> =
            table.lines().filter(|l| l.split(' ').nth(4) == Some(shared.to_str().expect("utf-8"))).collect();
        assert_eq!(ours.len(), 1, "{ours:?}");
        assert!(ours[0].contains(" shared:"), "{ours:?}");
        let root = super::super::beneath::Dir::open_root(dir.path()).expect("open");
        super::super::mounts::unmount_under(&root).expect("unmount");
        assert!(!rootfs_file.exists(), "everything unmounted");
    }

    #[test]
    fn this_host_has_a_cgroup_hierarchy_for_the_jail() {
        let version = cgroup_version().expect("v1 or v2");
        assert!(["v1", "v2"].contains(&version));
    }

    #[test]
    fn a_tree_with_mounts_below_is_refused_rather_than_hidden() {
        let dir = tempfile::tempdir().expect("tempdir");
        let shared = dir.path().join("shared");
        std::fs::create_dir_all(shared.join("c1")).expect("mkdir");
        nix::mount::mount(Some(dir.path()), &shared.join("c1"), None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .expect("bind");
        let err = share_mounts_below(&shared).expect_err("refused");
        assert!(err.contains("not a mount point"), "{err}");
        let root = super::super::beneath::Dir::open_root(dir.path()).expect("open");
        super::super::mounts::unmount_under(&root).expect("unmount");
    }
}
