//! Host mounts that share a container's files with the guest: containerd's rootfs mounts
//! (an overlay, or a bind of a snapshot) mounted on `<sandbox>/mounts/<cid>/rootfs`, and
//! the spec's bind mounts (hosts, resolv.conf, volumes) on `<cid>/mounts/<n>`; the VMM
//! exports them through `<sandbox>/shared` (see `share`). Every mount is made onto a
//! descriptor opened below the sandbox without following a symlink, and is nosuid and
//! nodev.
//!
//! Cleanup never relies on remembering what was mounted: [`unmount_under`] reads the
//! kernel's mount table, so a crash between a mount and its bookkeeping leaves nothing
//! behind.

use super::beneath::{fd_path, Dir};
use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
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

/// mount(2) flags as the new mount API's attributes: `(everywhere, top)`, the first for
/// every mount of a recursive bind (nosuid, nodev), the second for its top only (ro,
/// noexec, atime), as a remount of a bind mount would set them.
fn mount_attrs(flags: MsFlags) -> (libc::mount_attr, libc::mount_attr) {
    let attr = |set: u64, clr: u64| libc::mount_attr { attr_set: set, attr_clr: clr, propagation: 0, userns_fd: 0 };
    let everywhere = attr(libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV, 0);
    let pairs = [
        (MsFlags::MS_RDONLY, libc::MOUNT_ATTR_RDONLY),
        (MsFlags::MS_NOEXEC, libc::MOUNT_ATTR_NOEXEC),
        (MsFlags::MS_NODIRATIME, libc::MOUNT_ATTR_NODIRATIME),
    ];
    let mut set = pairs.iter().filter(|(ms, _)| flags.contains(*ms)).fold(0, |all, (_, attr)| all | attr);
    let mut clr = 0;
    if flags.contains(MsFlags::MS_NOATIME) {
        (set, clr) = (set | libc::MOUNT_ATTR_NOATIME, libc::MOUNT_ATTR__ATIME);
    } else if flags.contains(MsFlags::MS_STRICTATIME) {
        (set, clr) = (set | libc::MOUNT_ATTR_STRICTATIME, libc::MOUNT_ATTR__ATIME);
    }
    (everywhere, attr(set, clr))
}

fn owned(fd: libc::c_long) -> nix::Result<OwnedFd> {
    let fd = Errno::result(fd)?;
    // SAFETY: the syscall returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn mount_setattr(tree: &OwnedFd, flags: libc::c_int, attr: &libc::mount_attr) -> nix::Result<()> {
    let empty = c"";
    let size = std::mem::size_of::<libc::mount_attr>();
    // SAFETY: a valid descriptor, a NUL-terminated path, and an attribute struct of the
    // size passed, which the kernel only reads.
    let res = unsafe { libc::syscall(libc::SYS_mount_setattr, tree.as_raw_fd(), empty.as_ptr(), flags, attr, size) };
    Errno::result(res).map(drop)
}

/// Binds `source` onto the descriptor `target` with the new mount API: the copy is made
/// detached, gets its flags, and only then is attached, so it never appears (nor
/// propagates into the guest's view) without them; a remount after mount(2) would change
/// the original only, not its propagated copies.
fn bind_onto(source: &str, recursive: bool, flags: MsFlags, target: &OwnedFd) -> nix::Result<()> {
    let source = std::ffi::CString::new(source).map_err(|_| Errno::EINVAL)?;
    let mut open_flags = libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC;
    if recursive {
        open_flags |= libc::AT_RECURSIVE as libc::c_uint;
    }
    // SAFETY: a NUL-terminated path; the result is checked and owned below.
    let tree = owned(unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, source.as_ptr(), open_flags) })?;
    let (everywhere, top) = mount_attrs(flags);
    let recursive_flag = if recursive { libc::AT_RECURSIVE } else { 0 };
    mount_setattr(&tree, libc::AT_EMPTY_PATH | recursive_flag, &everywhere)?;
    mount_setattr(&tree, libc::AT_EMPTY_PATH, &top)?;
    let empty = c"";
    let move_flags = libc::MOVE_MOUNT_F_EMPTY_PATH | libc::MOVE_MOUNT_T_EMPTY_PATH;
    // SAFETY: two valid descriptors and NUL-terminated empty paths.
    let res = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            target.as_raw_fd(),
            empty.as_ptr(),
            move_flags,
        )
    };
    Errno::result(res).map(drop)
}

/// Mounts one of containerd's mounts on `name` below `dir` (which must exist there),
/// always nosuid and nodev: nothing the guest writes through it can be a setuid program or
/// a device node for the host. The target is opened below `dir` without following a
/// symlink, and the mount is made onto that descriptor.
pub fn mount(spec: &MountSpec, dir: &Dir, name: &str) -> Result<(), MountError> {
    let target_path = dir.display(name);
    let fail = |errno| MountError::Mount {
        kind: spec.kind.clone(),
        source_path: spec.source.clone(),
        target: target_path.clone(),
        errno,
    };
    let open = |source| MountError::MountPoint { path: target_path.clone(), source };
    let (flags, data) = parse_options(&spec.options);
    let flags = flags | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let target = dir.path_fd(name).map_err(open)?;
    let is_bind = flags.contains(MsFlags::MS_BIND) || spec.kind == "bind";
    if !is_bind {
        let data = (!data.is_empty()).then_some(data.as_str());
        let kind = Some(spec.kind.as_str());
        return nix::mount::mount(Some(spec.source.as_str()), &fd_path(&target), kind, flags, data).map_err(fail);
    }
    bind_onto(&spec.source, flags.contains(MsFlags::MS_REC), flags, &target).map_err(fail)
}

/// Bind-mounts a host file or directory (recursively) on `name` below `dir`, creating
/// `name` there as the same kind (it must not exist yet); nosuid and nodev as [`mount`].
pub fn bind(source: &Path, dir: &Dir, name: &str, read_only: bool) -> Result<(), MountError> {
    let point = |source| MountError::MountPoint { path: dir.display(name), source };
    let meta =
        std::fs::metadata(source).map_err(|e| MountError::MountPoint { path: source.to_path_buf(), source: e })?;
    if meta.is_dir() {
        dir.mkdir(name, 0o755).map_err(point)?;
    } else {
        dir.create_file(name, 0o644).map_err(point)?;
    }
    let mut options = vec!["rbind".to_string()];
    if read_only {
        options.push("ro".into());
    }
    let spec = MountSpec { kind: "bind".into(), source: source.to_string_lossy().into_owned(), options };
    mount(&spec, dir, name)
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
/// Each mount point the kernel's table names is opened below `dir` without following a
/// symlink and unmounted through that descriptor, so a path someone swapped for a symlink
/// since is refused, not followed. Tries every mount and reports the first failure.
pub fn unmount_under(dir: &Dir) -> Result<(), MountError> {
    let mut first_error = None;
    // Stacked mounts on one point need one unmount each: repeat while progress is made.
    for _ in 0..8 {
        let points = mounts_under(dir.path())?;
        if points.is_empty() {
            break;
        }
        let mut progress = false;
        for point in points {
            let rel = point.strip_prefix(dir.path()).unwrap_or(Path::new(""));
            let rel = if rel.as_os_str().is_empty() { Path::new(".") } else { rel };
            let fd = match dir.path_fd(rel) {
                Ok(fd) => fd,
                // Gone already (a parent's lazy unmount took it along).
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                Err(source) => {
                    first_error.get_or_insert(MountError::MountPoint { path: point, source });
                    continue;
                }
            };
            match nix::mount::umount2(&fd_path(&fd), MntFlags::MNT_DETACH) {
                Ok(()) => progress = true,
                // Not a mount point any more (an unmount propagated to it).
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
        Some(e) if !mounts_under(dir.path())?.is_empty() => Err(e),
        _ => Ok(()),
    }
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
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
        assert_eq!(unescape(r"/a\040b/c\134d"), "/a b/c\\d");
        assert_eq!(unescape(r"/ends\040"), "/ends ", "an escape at the very end");
        assert_eq!(unescape(r"/odd\0"), r"/odd\0");
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
        let at = Dir::open_root(base).expect("open");
        mount(&overlay, &at, "rootfs").expect("overlay mount");
        assert_eq!(std::fs::read_to_string(base.join("rootfs/hello")).expect("read"), "from lower");
        let rootfs = at.dir("rootfs").expect("the overlay");
        bind(&base.join("data/file"), &rootfs, "file", true).expect("file bind");
        bind(&base.join("data"), &rootfs, "data", false).expect("dir bind");
        assert_eq!(std::fs::read_to_string(base.join("rootfs/file")).expect("read"), "bound");
        // Read-only bind: writes fail.
        assert!(std::fs::write(base.join("rootfs/file"), "x").is_err());
        assert!(std::fs::write(base.join("rootfs/data/new"), "x").is_ok());
        assert_eq!(mounts_under(base).expect("table").len(), 3);
        // Every mount is nosuid and nodev for the host.
        let table = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let base_text = at.path().display().to_string();
        for line in table.lines().filter(|l| l.split(' ').nth(4).is_some_and(|p| p.starts_with(&base_text))) {
            let options = line.split(' ').nth(5).expect("mount options");
            assert!(options.contains("nosuid") && options.contains("nodev"), "{line}");
        }
        // A target that is not there, or is a symlink, is refused, not followed.
        std::os::unix::fs::symlink(base.join("lower"), base.join("rootfs/link")).expect("symlink");
        let err = mount(&overlay, &rootfs, "link").expect_err("symlink target").to_string();
        assert!(err.contains("rootfs/link"), "{err}");
        assert!(bind(&base.join("data"), &rootfs, "link", false).is_err());
        assert_eq!(mounts_under(base).expect("table").len(), 3, "nothing mounted through the symlink");

        unmount_under(&at).expect("unmounting");
        assert!(mounts_under(base).expect("table").is_empty());
        assert!(!base.join("rootfs/hello").exists(), "overlay still mounted");

        // A mount that fails reports what and where.
        let bad =
            MountSpec { kind: "overlay".into(), source: "overlay".into(), options: opts(&["lowerdir=/nonexistent"]) };
        let err = mount(&bad, &at, "rootfs").expect_err("no lower dir").to_string();
        assert!(err.contains("overlay") && err.contains("rootfs"), "{err}");
    }
}
