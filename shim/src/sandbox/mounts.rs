//! Host mounts that share a container's files with the guest: containerd's rootfs mounts
//! (an overlay, or a bind of a snapshot) mounted into `<sandbox>/shared/<cid>/rootfs`,
//! and the spec's bind mounts (hosts, resolv.conf, volumes) under `<cid>/mounts/`. The VMM
//! exports `<sandbox>/shared` to the guest over virtio-fs.
//!
//! Cleanup never relies on remembering what was mounted: [`unmount_under`] reads the
//! kernel's mount table, so a crash between a mount and its bookkeeping leaves nothing
//! behind.

use nix::mount::{MntFlags, MsFlags};
use std::io;
use std::path::{Path, PathBuf};

/// One mount as containerd describes it (`containerd.types.Mount`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountSpec {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mounting {kind} {source_path} on {target}: {errno}", target = target.display())]
    Mount { kind: String, source_path: String, target: PathBuf, errno: nix::Error },
    #[error("preparing mount point {path}: {source}", path = path.display())]
    MountPoint { path: PathBuf, source: io::Error },
    #[error("reading the mount table: {0}")]
    MountTable(io::Error),
    #[error("unmounting {path}: {errno}", path = path.display())]
    Unmount { path: PathBuf, errno: nix::Error },
}

/// mount(8)-style options split into flags and the data string the file system gets.
/// Propagation options are the guest's business: not applied on the host.
fn parse_options(options: &[String]) -> (MsFlags, String) {
    let parsed = nestbox_protocols::mount_options::parse_options(options);
    (parsed.flags, parsed.data.join(","))
}

/// Mounts one of containerd's mounts on `target` (which must exist).
pub fn mount(spec: &MountSpec, target: &Path) -> Result<(), MountError> {
    let (flags, data) = parse_options(&spec.options);
    let fail = |errno| MountError::Mount {
        kind: spec.kind.clone(),
        source_path: spec.source.clone(),
        target: target.to_path_buf(),
        errno,
    };
    let is_bind = flags.contains(MsFlags::MS_BIND) || spec.kind == "bind";
    if is_bind {
        let bind = MsFlags::MS_BIND | (flags & MsFlags::MS_REC);
        nix::mount::mount(Some(spec.source.as_str()), target, None::<&str>, bind, None::<&str>).map_err(fail)?;
        // A bind mount takes its flags (ro, nosuid, ...) only on a remount.
        let extra = flags - (MsFlags::MS_BIND | MsFlags::MS_REC);
        if !extra.is_empty() {
            let remount = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | extra;
            if let Err(errno) = nix::mount::mount(None::<&str>, target, None::<&str>, remount, None::<&str>) {
                let _ = nix::mount::umount2(target, MntFlags::MNT_DETACH);
                return Err(fail(errno));
            }
        }
        return Ok(());
    }
    let data = (!data.is_empty()).then_some(data.as_str());
    nix::mount::mount(Some(spec.source.as_str()), target, Some(spec.kind.as_str()), flags, data).map_err(fail)
}

/// Bind-mounts a host file or directory on `target`, creating `target` as the same kind.
pub fn bind(source: &Path, target: &Path, read_only: bool) -> Result<(), MountError> {
    let point = |source| MountError::MountPoint { path: target.to_path_buf(), source };
    let meta =
        std::fs::metadata(source).map_err(|e| MountError::MountPoint { path: source.to_path_buf(), source: e })?;
    if meta.is_dir() {
        std::fs::create_dir_all(target).map_err(point)?;
    } else {
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(point)?;
        }
        std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(target).map_err(point)?;
    }
    let mut options = vec!["rbind".to_string()];
    if read_only {
        options.push("ro".into());
    }
    let spec = MountSpec { kind: "bind".into(), source: source.to_string_lossy().into_owned(), options };
    mount(&spec, target)
}

/// Every mount point at or below `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Result<Vec<PathBuf>, MountError> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").map_err(MountError::MountTable)?;
    let mut found: Vec<PathBuf> = table
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape(field)))
        .filter(|point| point.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    Ok(found)
}

/// Unmounts everything at or below `dir` (lazily, so a busy mount does not stop cleanup).
/// Tries every mount and reports the first failure.
pub fn unmount_under(dir: &Path) -> Result<(), MountError> {
    let mut first_error = None;
    // Stacked mounts on one point need one unmount each: repeat while progress is made.
    for _ in 0..8 {
        let points = mounts_under(dir)?;
        if points.is_empty() {
            break;
        }
        let mut progress = false;
        for point in points {
            match nix::mount::umount2(&point, MntFlags::MNT_DETACH) {
                Ok(()) => progress = true,
                // Gone already (a parent's lazy unmount took it along).
                Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
                Err(errno) => {
                    first_error.get_or_insert(MountError::Unmount { path: point, errno });
                }
            }
        }
        if !progress {
            break;
        }
    }
    match first_error {
        Some(e) if !mounts_under(dir)?.is_empty() => Err(e),
        _ => Ok(()),
    }
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            let value =
                (bytes[i + 1] - b'0') as u32 * 64 + (bytes[i + 2] - b'0') as u32 * 8 + (bytes[i + 3] - b'0') as u32;
            if let Ok(byte) = u8::try_from(value) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_split_into_flags_and_data() {
        let (flags, data) = parse_options(&opts(&["ro", "nosuid", "lowerdir=/a:/b", "index=off", "rprivate"]));
        assert_eq!(flags, MsFlags::MS_RDONLY | MsFlags::MS_NOSUID);
        assert_eq!(data, "lowerdir=/a:/b,index=off");
        let (flags, data) = parse_options(&opts(&["ro", "rw", "rbind"]));
        assert_eq!(flags, MsFlags::MS_BIND | MsFlags::MS_REC);
        assert!(data.is_empty());
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/run/a\040b"), "/run/a b");
        assert_eq!(unescape(r"/x\134y"), r"/x\y");
        assert_eq!(unescape(r"/plain"), "/plain");
        assert_eq!(unescape(r"/short\04"), r"/short\04");
    }

    /// Real mounts: needs root (as the whole test suite does).
    #[test]
    fn overlay_and_binds_are_mounted_and_all_unmounted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path();
        for d in ["lower", "upper", "work", "rootfs", "data"] {
            std::fs::create_dir(base.join(d)).expect("mkdir");
        }
        std::fs::write(base.join("lower/hello"), "from lower").expect("write");
        std::fs::write(base.join("data/file"), "bound").expect("write");
        let overlay = MountSpec {
            kind: "overlay".into(),
            source: "overlay".into(),
            options: vec![
                format!("lowerdir={}", base.join("lower").display()),
                format!("upperdir={}", base.join("upper").display()),
                format!("workdir={}", base.join("work").display()),
            ],
        };
        mount(&overlay, &base.join("rootfs")).expect("overlay mount");
        assert_eq!(std::fs::read_to_string(base.join("rootfs/hello")).expect("read"), "from lower");
        bind(&base.join("data/file"), &base.join("rootfs/mnt/file"), true).expect("file bind");
        bind(&base.join("data"), &base.join("rootfs/data"), false).expect("dir bind");
        assert_eq!(std::fs::read_to_string(base.join("rootfs/mnt/file")).expect("read"), "bound");
        // Read-only bind: writes fail.
        assert!(std::fs::write(base.join("rootfs/mnt/file"), "x").is_err());
        assert_eq!(mounts_under(base).expect("table").len(), 3);

        unmount_under(base).expect("unmounting");
        assert!(mounts_under(base).expect("table").is_empty());
        assert!(!base.join("rootfs/hello").exists(), "overlay still mounted");

        // A mount that fails reports what and where.
        let bad =
            MountSpec { kind: "overlay".into(), source: "overlay".into(), options: opts(&["lowerdir=/nonexistent"]) };
        let err = mount(&bad, &base.join("rootfs")).expect_err("no lower dir").to_string();
        assert!(err.contains("overlay") && err.contains("rootfs"), "{err}");
    }
}
