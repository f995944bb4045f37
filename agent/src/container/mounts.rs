//! The container's file system view, built by the helper inside the container's new mount
//! namespace: the rootfs bind-mounted on itself, the spec's mounts, default devices,
//! pivot_root, masked and read-only paths, a read-only root.

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::fs::{symlink, FileTypeExt};
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};
use nestbox_protocols::mount_options::{parse_options, propagation};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use oci_spec::runtime::{LinuxDevice, LinuxDeviceType, Mount, Spec};

/// `root` joined with `path` as the container will see it: symbolic links met on the way
/// are resolved inside `root`, so a rootfs cannot point a mount outside itself.
pub fn secure_join(root: &Path, path: &Path) -> Result<PathBuf> {
    let mut resolved = PathBuf::new();
    let mut pending: VecDeque<PathBuf> = path.components().map(|c| PathBuf::from(c.as_os_str())).collect();
    let mut links = 0;
    while let Some(part) = pending.pop_front() {
        match part.components().next() {
            None | Some(Component::RootDir) | Some(Component::CurDir) | Some(Component::Prefix(_)) => {}
            Some(Component::ParentDir) => {
                resolved.pop();
            }
            Some(Component::Normal(name)) => {
                let candidate = root.join(&resolved).join(name);
                match fs::symlink_metadata(&candidate) {
                    Ok(meta) if meta.file_type().is_symlink() => {
                        links += 1;
                        if links > 40 {
                            bail!("too many symbolic links resolving {} in {}", path.display(), root.display());
                        }
                        let target = fs::read_link(&candidate)?;
                        if target.is_absolute() {
                            resolved.clear();
                        }
                        for c in target.components().rev() {
                            pending.push_front(PathBuf::from(c.as_os_str()));
                        }
                    }
                    _ => resolved.push(name),
                }
            }
        }
    }
    Ok(root.join(resolved))
}

fn mount_at(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<()> {
    mount(source, target, fstype, flags, data).with_context(|| {
        format!(
            "mounting {} on {} (type {}, flags {flags:?}, data {data:?})",
            source.map_or("none".into(), |s| s.display().to_string()),
            target.display(),
            fstype.unwrap_or("none"),
        )
    })
}

/// Builds the container's root and makes it the process's root.
pub fn setup_rootfs(spec: &Spec, rootfs: &Path) -> Result<()> {
    let linux = spec.linux().as_ref();
    // Nothing mounted from here on may propagate back to the agent's namespace.
    mount_at(None, Path::new("/"), None, MsFlags::MS_SLAVE | MsFlags::MS_REC, None)?;
    // pivot_root needs the new root to be a mount point.
    mount_at(Some(rootfs), rootfs, None, MsFlags::MS_BIND | MsFlags::MS_REC, None)?;

    let mut dev_mounted = false;
    for m in spec.mounts().iter().flatten() {
        mount_one(rootfs, m)?;
        if m.destination() == Path::new("/dev") && m.typ().as_deref() != Some("bind") {
            dev_mounted = true;
        }
    }
    // A fresh /dev (containerd's specs mount a tmpfs there) gets the standard devices, as
    // runc creates them.
    if dev_mounted {
        default_devices(rootfs)?;
    }
    for device in linux.and_then(|l| l.devices().as_ref()).into_iter().flatten() {
        create_device(rootfs, device)?;
    }

    enter_root(rootfs)?;

    for path in linux.and_then(|l| l.masked_paths().as_ref()).into_iter().flatten() {
        mask_path(Path::new(path))?;
    }
    for path in linux.and_then(|l| l.readonly_paths().as_ref()).into_iter().flatten() {
        readonly_path(Path::new(path))?;
    }
    if spec.root().as_ref().and_then(|r| r.readonly()).unwrap_or(false) {
        mount_at(None, Path::new("/"), None, MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY, None)
            .context("making the root file system read-only")?;
    }
    if let Some(p) = linux.and_then(|l| l.rootfs_propagation().as_deref()) {
        let flags = propagation(p).with_context(|| format!("unknown rootfsPropagation {p:?}"))?;
        mount_at(None, Path::new("/"), None, flags, None)?;
    }
    Ok(())
}

fn mount_one(rootfs: &Path, m: &Mount) -> Result<()> {
    let dest = secure_join(rootfs, m.destination())?;
    let options = parse_options(m.options().as_deref().unwrap_or_default());
    let mut fstype = m.typ().clone().unwrap_or_else(|| "none".into());
    let is_bind = options.flags.contains(MsFlags::MS_BIND) || fstype == "bind";
    let source = m.source().clone().unwrap_or_else(|| PathBuf::from(&fstype));
    if is_bind {
        let meta = fs::metadata(&source).with_context(|| format!("bind mount source {}", source.display()))?;
        if meta.is_dir() {
            fs::create_dir_all(&dest).with_context(|| format!("creating {}", dest.display()))?;
        } else {
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
            }
            if !dest.exists() {
                fs::File::create(&dest).with_context(|| format!("creating {}", dest.display()))?;
            }
        }
        // Flags beyond the bind itself only take effect on a remount.
        mount_at(Some(&source), &dest, None, MsFlags::MS_BIND | (options.flags & MsFlags::MS_REC), None)?;
        let extra = options.flags & !(MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_REMOUNT);
        if !extra.is_empty() {
            mount_at(None, &dest, None, extra | MsFlags::MS_BIND | MsFlags::MS_REMOUNT, None)?;
        }
    } else {
        fs::create_dir_all(&dest).with_context(|| format!("creating {}", dest.display()))?;
        // "cgroup" in a spec means the container's view of the cgroup hierarchy; the
        // guest's is cgroup v2.
        if fstype == "cgroup" {
            fstype = "cgroup2".into();
        }
        let data = options.data.join(",");
        let data = (!data.is_empty()).then_some(data.as_str());
        mount_at(Some(&source), &dest, Some(&fstype), options.flags, data)?;
    }
    for p in &options.propagation {
        mount_at(None, &dest, None, *p, None)?;
    }
    Ok(())
}

fn default_devices(rootfs: &Path) -> Result<()> {
    let dev = rootfs.join("dev");
    for (name, major, minor) in
        [("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9), ("tty", 5, 0)]
    {
        make_node(&dev.join(name), SFlag::S_IFCHR, major, minor, 0o666, Some(name))?;
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        match symlink(target, dev.join(link)) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                return Err(e).with_context(|| format!("creating /dev/{link}"))
            }
            _ => {}
        }
    }
    Ok(())
}

fn create_device(rootfs: &Path, device: &LinuxDevice) -> Result<()> {
    let kind = match device.typ() {
        LinuxDeviceType::C | LinuxDeviceType::U => SFlag::S_IFCHR,
        LinuxDeviceType::B => SFlag::S_IFBLK,
        LinuxDeviceType::P => SFlag::S_IFIFO,
        LinuxDeviceType::A => bail!("device {}: type 'a' is for cgroup rules only", device.path().display()),
    };
    let path = secure_join(rootfs, device.path())?;
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let mode = device.file_mode().unwrap_or(0o666);
    make_node(&path, kind, device.major() as u64, device.minor() as u64, mode, None)?;
    let (uid, gid) = (device.uid(), device.gid());
    if uid.is_some() || gid.is_some() {
        nix::unistd::chown(&path, uid.map(nix::unistd::Uid::from_raw), gid.map(nix::unistd::Gid::from_raw))
            .with_context(|| format!("chown {}", path.display()))?;
    }
    Ok(())
}

/// mknod, or where that is not allowed, a bind mount of the agent's own node.
fn make_node(path: &Path, kind: SFlag, major: u64, minor: u64, mode: u32, host_name: Option<&str>) -> Result<()> {
    if let Ok(meta) = fs::symlink_metadata(path) {
        if meta.file_type().is_char_device() || meta.file_type().is_block_device() {
            return Ok(());
        }
    }
    match mknod(path, kind, Mode::from_bits_truncate(mode), makedev(major, minor)) {
        Ok(()) => {
            // mknod's mode is filtered by the umask; the spec's mode is meant as given.
            nix::sys::stat::fchmodat(
                None,
                path,
                Mode::from_bits_truncate(mode),
                nix::sys::stat::FchmodatFlags::FollowSymlink,
            )
            .with_context(|| format!("chmod {}", path.display()))
        }
        Err(nix::errno::Errno::EPERM) if host_name.is_some() => {
            let source = Path::new("/dev").join(host_name.unwrap_or_default());
            fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
            mount_at(Some(&source), path, None, MsFlags::MS_BIND, None)
        }
        Err(e) => Err(e).with_context(|| format!("mknod {}", path.display())),
    }
}

/// pivot_root into `rootfs` and detach the old root. In a guest this works because the
/// agent left the initramfs's rootfs at boot (see `init::leave_rootfs`); there is no
/// chroot fallback: a chroot leaves the old root reachable.
fn enter_root(rootfs: &Path) -> Result<()> {
    nix::unistd::chdir(rootfs).with_context(|| format!("chdir {}", rootfs.display()))?;
    nix::unistd::pivot_root(".", ".").with_context(|| format!("pivot_root into {}", rootfs.display()))?;
    // The old root is now stacked on "."; it must not propagate its unmount.
    mount_at(None, Path::new("."), None, MsFlags::MS_SLAVE | MsFlags::MS_REC, None)?;
    umount2(".", MntFlags::MNT_DETACH).context("detaching the old root")?;
    nix::unistd::chdir("/").context("chdir /")?;
    Ok(())
}

fn mask_path(path: &Path) -> Result<()> {
    match fs::metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("masking {}", path.display())),
        Ok(meta) if meta.is_dir() => mount_at(Some(Path::new("tmpfs")), path, Some("tmpfs"), MsFlags::MS_RDONLY, None),
        Ok(_) => mount_at(Some(Path::new("/dev/null")), path, None, MsFlags::MS_BIND, None),
    }
}

fn readonly_path(path: &Path) -> Result<()> {
    match fs::metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("making {} read-only", path.display())),
        Ok(_) => {
            mount_at(Some(path), path, None, MsFlags::MS_BIND | MsFlags::MS_REC, None)?;
            let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_REC;
            mount_at(None, path, None, flags, None)
        }
    }
}

/// Storage for the sandbox (CreateSandbox, CreateContainer): mount(2) with the given fields.
pub fn mount_storage(source: &str, fstype: &str, options: &[String], mount_point: &Path) -> Result<()> {
    if !mount_point.is_absolute() {
        bail!("storage mount point {} is not absolute", mount_point.display());
    }
    fs::create_dir_all(mount_point).with_context(|| format!("creating {}", mount_point.display()))?;
    let options = parse_options(options);
    let data = options.data.join(",");
    let data = (!data.is_empty()).then_some(data.as_str());
    let fstype = (!fstype.is_empty()).then_some(fstype);
    mount_at(Some(Path::new(OsStr::new(source))), mount_point, fstype, options.flags, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secure_join_stays_inside_the_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        fs::create_dir_all(root.join("real/sub")).expect("mkdir");
        symlink("/real", root.join("abs")).expect("symlink");
        symlink("../../..", root.join("real/up")).expect("symlink");
        assert_eq!(secure_join(root, Path::new("/abs/sub")).expect("join"), root.join("real/sub"));
        assert_eq!(secure_join(root, Path::new("/real/up/etc")).expect("join"), root.join("etc"));
        assert_eq!(secure_join(root, Path::new("../../x")).expect("join"), root.join("x"));
        symlink("loop", root.join("loop")).expect("symlink");
        assert!(secure_join(root, Path::new("/loop")).is_err());
    }
}
