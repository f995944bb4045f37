//! The jail's file system: a new mount namespace whose root is a small read-only tmpfs
//! holding bind mounts of the VM's files at their host paths, a procfs limited to the
//! process directories (virtio-fs reopens files through /proc/self/fd), and /dev/kvm.

use super::error::{io_error, sys_error, JailError};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Where the new root is assembled before pivot_root. The mount only exists in the new
/// namespace; the sources are opened before it covers anything, so a source below it
/// (a test's temporary directory) still binds.
const STAGING: &str = "/tmp";

/// In order of precedence when one path is asked for twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum BindKind {
    /// A directory with what is mounted below it (recursive), flags as on the host: the
    /// shared directory, whose containers' mounts also come in later.
    Tree,
    /// A directory without the mounts below it, writable (the VMM creates its sockets and
    /// console log there): the sandbox directory, but not the host-only trees in it.
    Writable,
    /// A device node (/dev/kvm): as on the host.
    Device,
    /// Read only, nosuid, nodev, noexec.
    ReadOnly,
}

/// A host file or directory mounted at the same path inside the jail.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bind {
    pub source: PathBuf,
    pub kind: BindKind,
}

impl Bind {
    pub fn read_only(source: &Path) -> Bind {
        Bind { source: source.to_path_buf(), kind: BindKind::ReadOnly }
    }
    pub fn writable(source: &Path) -> Bind {
        Bind { source: source.to_path_buf(), kind: BindKind::Writable }
    }
    pub fn device(source: &Path) -> Bind {
        Bind { source: source.to_path_buf(), kind: BindKind::Device }
    }
    pub fn tree(source: &Path) -> Bind {
        Bind { source: source.to_path_buf(), kind: BindKind::Tree }
    }
}

/// Sorted by path (a directory before what is bound inside it), one bind per path (the
/// kind first in [`BindKind`]'s order), and nothing a [`BindKind::Tree`] above brings in.
pub fn minimal(mut binds: Vec<Bind>) -> Vec<Bind> {
    binds.sort();
    binds.dedup_by(|b, a| a.source == b.source);
    let trees: Vec<PathBuf> = binds.iter().filter(|b| b.kind == BindKind::Tree).map(|b| b.source.clone()).collect();
    binds.retain(|b| !trees.iter().any(|t| b.source != *t && b.source.starts_with(t)));
    binds
}

/// Moves the calling process into a new mount namespace rooted at a tmpfs that holds
/// `binds` and /proc, and detaches the host's tree from it.
pub fn pivot_into_new_root(binds: &[Bind]) -> Result<(), JailError> {
    unshare(CloneFlags::CLONE_NEWNS).map_err(sys_error("unshare(CLONE_NEWNS)"))?;
    // Nothing mounted here reaches the host; mounts the host makes later below a shared
    // mount (the pod's containers in its shared directory) still reach the jail.
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_SLAVE, None::<&str>)
        .map_err(sys_error("making / a slave mount"))?;
    // Opened in the new namespace: a bind's source must be a mount of the caller's own.
    let sources = binds.iter().map(open_source).collect::<Result<Vec<_>, _>>()?;
    let root = Path::new(STAGING);
    let hardened = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(Some("tmpfs"), root, Some("tmpfs"), hardened, Some("mode=0755,size=1m"))
        .map_err(sys_error(format!("mounting the jail's tmpfs on {STAGING}")))?;
    for (bind, fd) in binds.iter().zip(&sources) {
        bind_into(root, bind, fd)?;
    }
    mount_proc(&root.join("proc"))?;
    nix::unistd::chdir(root).map_err(sys_error(format!("chdir {STAGING}")))?;
    // pivot_root(".", ".") stacks the old root on the new one; unmounting it then leaves
    // only the new root (no directory for the old one needed).
    nix::unistd::pivot_root(".", ".").map_err(sys_error("pivot_root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(sys_error("detaching the host's root"))?;
    nix::unistd::chdir("/").map_err(sys_error("chdir /"))?;
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | hardened, None::<&str>)
        .map_err(sys_error("making the jail's root read-only"))
}

fn open_source(bind: &Bind) -> Result<OwnedFd, JailError> {
    if !bind.source.is_absolute() {
        return Err(JailError::Invalid(format!(
            "{} is a relative path: a jailed VMM needs absolute ones",
            bind.source.display()
        )));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
        .open(&bind.source)
        .map_err(io_error(format!("opening {}", bind.source.display())))?;
    Ok(file.into())
}

fn bind_into(root: &Path, bind: &Bind, fd: &OwnedFd) -> Result<(), JailError> {
    let relative = bind.source.strip_prefix("/").unwrap_or(&bind.source);
    let target = root.join(relative);
    let is_dir = nix::sys::stat::fstat(fd.as_raw_fd())
        .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR)
        .map_err(sys_error(format!("stat {}", bind.source.display())))?;
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(io_error(format!("creating {}", parent.display())))?;
    }
    let created = if is_dir { std::fs::create_dir_all(&target) } else { File::create(&target).map(drop) };
    created.map_err(io_error(format!("creating the mount point {}", target.display())))?;
    let what = || format!("binding {} into the jail", bind.source.display());
    // The O_PATH descriptor names exactly the file opened before the tmpfs covered STAGING.
    let source = format!("/proc/self/fd/{}", fd.as_raw_fd());
    let flags = match bind.kind {
        BindKind::Tree => MsFlags::MS_BIND | MsFlags::MS_REC,
        BindKind::Writable | BindKind::ReadOnly | BindKind::Device => MsFlags::MS_BIND,
    };
    mount(Some(source.as_str()), &target, None::<&str>, flags, None::<&str>).map_err(sys_error(what()))?;
    if bind.kind == BindKind::ReadOnly {
        // A bind mount takes flags only on a remount.
        let ro = MsFlags::MS_REMOUNT
            | MsFlags::MS_BIND
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC;
        mount(None::<&str>, &target, None::<&str>, ro, None::<&str>).map_err(sys_error(what()))?;
    }
    Ok(())
}

/// A procfs showing only process directories (`subset=pid`, Linux 5.8): no /proc/sys,
/// /proc/sysrq-trigger or /proc/kcore. Older kernels get a whole procfs.
fn mount_proc(target: &Path) -> Result<(), JailError> {
    std::fs::create_dir_all(target).map_err(io_error(format!("creating {}", target.display())))?;
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    match mount(Some("proc"), target, Some("proc"), flags, Some("subset=pid")) {
        Err(nix::Error::EINVAL) => mount(Some("proc"), target, Some("proc"), flags, None::<&str>),
        other => other,
    }
    .map_err(sys_error("mounting /proc in the jail"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_keeps_parents_first_and_drops_what_a_tree_above_brings_in() {
        let binds = minimal(vec![
            Bind::tree(Path::new("/sb/pod/shared")),
            Bind::writable(Path::new("/sb/pod")),
            Bind::writable(Path::new("/sb/pod")),
            Bind::read_only(Path::new("/sb/pod/shared/x")),
            Bind::read_only(Path::new("/sb/pod-other/k")),
            Bind::device(Path::new("/dev/kvm")),
            Bind::writable(Path::new("/cli/dir")),
            Bind::tree(Path::new("/cli/dir")),
        ]);
        assert_eq!(
            binds,
            vec![
                Bind::tree(Path::new("/cli/dir")),
                Bind::device(Path::new("/dev/kvm")),
                Bind::writable(Path::new("/sb/pod")),
                Bind::tree(Path::new("/sb/pod/shared")),
                Bind::read_only(Path::new("/sb/pod-other/k")),
            ]
        );
    }

    #[test]
    fn relative_sources_are_refused_by_name() {
        let err = open_source(&Bind::writable(Path::new("rel/dir"))).expect_err("relative").to_string();
        assert!(err.contains("rel/dir") && err.contains("absolute"), "{err}");
    }
}
