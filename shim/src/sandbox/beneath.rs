//! File operations below a directory descriptor that never follow a symlink and never
//! leave the directory: everything under a sandbox directory is reached this way, so an
//! entry someone else made there (a symlink swapped in for a directory, say) is refused
//! rather than followed.
//!
//! Only the root of such a tree (a sandbox's or a template's directory, from the
//! configuration) is opened by path. Below it, every name is resolved with openat2's
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, and mounts are made onto descriptors
//! (`/proc/self/fd/N`), so what is mounted on is exactly the directory or file that was
//! checked.

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// An open directory and the path it had when opened (for messages and for matching the
/// kernel's mount table, which names mount points by path).
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

/// What resolution below a directory allows: nothing outside it, no symlink at all.
fn beneath() -> ResolveFlag {
    ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS
}

/// `/proc/self/fd/N` of a descriptor: mount(2) and umount2(2) take paths, and this one
/// names exactly the file the descriptor holds.
pub fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

fn openat2(dir: &OwnedFd, rel: &Path, flags: OFlag, resolve: ResolveFlag) -> io::Result<OwnedFd> {
    let how = OpenHow::new().flags(flags | OFlag::O_CLOEXEC).resolve(resolve);
    let fd = nix::fcntl::openat2(dir.as_raw_fd(), rel, how)?;
    // SAFETY: openat2 returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Dir {
    /// Opens the root of a tree by path (symlinks in it are followed: it comes from the
    /// configuration, not from below a sandbox). Its recorded path is the kernel's name for
    /// it, so it matches the mount table even when `path` went through a symlink.
    pub fn open_root(path: &Path) -> io::Result<Dir> {
        let fd = nix::fcntl::open(path, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())?;
        // SAFETY: open returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let path = std::fs::read_link(fd_path(&fd))?;
        Ok(Dir { fd, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path of `rel` below this directory, for messages.
    pub fn display(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.path.join(rel)
    }

    /// Opens the directory `rel` below this one.
    pub fn dir(&self, rel: impl AsRef<Path>) -> io::Result<Dir> {
        let rel = rel.as_ref();
        let fd = openat2(&self.fd, rel, OFlag::O_RDONLY | OFlag::O_DIRECTORY, beneath())?;
        Ok(Dir { fd, path: self.path.join(rel) })
    }

    /// Opens `rel` below this directory as an O_PATH descriptor (a mount target or a mount
    /// point to unmount; a directory or a file).
    pub fn path_fd(&self, rel: impl AsRef<Path>) -> io::Result<OwnedFd> {
        openat2(&self.fd, rel.as_ref(), OFlag::O_PATH | OFlag::O_NOFOLLOW, beneath())
    }

    /// Opens the directory `rel` below this one without crossing a mount point.
    fn dir_same_mount(&self, rel: &Path) -> io::Result<Dir> {
        let resolve = beneath() | ResolveFlag::RESOLVE_NO_XDEV;
        let fd = openat2(&self.fd, rel, OFlag::O_RDONLY | OFlag::O_DIRECTORY, resolve)?;
        Ok(Dir { fd, path: self.path.join(rel) })
    }

    /// Creates directory `name` (one component) with `mode`; it must not exist.
    pub fn mkdir(&self, name: &str, mode: u32) -> io::Result<Dir> {
        one_component(name)?;
        nix::sys::stat::mkdirat(Some(self.fd.as_raw_fd()), name, Mode::from_bits_truncate(mode))?;
        self.dir(name)
    }

    /// Creates the empty file `name` (one component) with `mode`; it must not exist.
    pub fn create_file(&self, name: &str, mode: u32) -> io::Result<()> {
        one_component(name)?;
        let flags = OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW;
        let how =
            OpenHow::new().flags(flags | OFlag::O_CLOEXEC).mode(Mode::from_bits_truncate(mode)).resolve(beneath());
        let fd = nix::fcntl::openat2(self.fd.as_raw_fd(), name, how)?;
        // SAFETY: openat2 returned a new descriptor that nothing else owns; closed here.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
        Ok(())
    }

    /// Removes `rel` below this directory with everything in it, without following a
    /// symlink and without entering another mount (a mount still there is an error, so a
    /// volume's contents are never deleted through it). Missing is fine.
    pub fn remove_tree(&self, rel: &Path) -> io::Result<()> {
        let (parent, name) = match (rel.parent(), rel.file_name()) {
            (Some(parent), Some(name)) => (parent, name),
            _ => return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{} names no entry", rel.display()))),
        };
        let parent = if parent.as_os_str().is_empty() { self.dir(".")? } else { self.dir(parent)? };
        match parent.dir_same_mount(Path::new(name)) {
            Ok(dir) => dir.empty(0)?,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            // A file, or a symlink: removed as an entry below.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTDIR) | Some(libc::ELOOP)) => {
                return parent.unlink(Path::new(name), false)
            }
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                return Err(io::Error::other(format!("{} is still a mount point", self.display(rel).display())))
            }
            Err(e) => return Err(io::Error::other(format!("opening {}: {e}", self.display(rel).display()))),
        }
        parent.unlink(Path::new(name), true)
    }

    /// Deletes everything in this directory (see [`Dir::remove_tree`]).
    fn empty(&self, depth: usize) -> io::Result<()> {
        // Far deeper than anything the shim makes: a bound on descriptors and stack.
        const MAX_DEPTH: usize = 64;
        if depth > MAX_DEPTH {
            return Err(io::Error::other(format!("{} is nested deeper than {MAX_DEPTH}", self.path.display())));
        }
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        let mut listing = nix::dir::Dir::openat(Some(self.fd.as_raw_fd()), ".", flags, Mode::empty())?;
        let mut names = Vec::new();
        for entry in listing.iter() {
            let entry = entry?;
            let name = entry.file_name().to_bytes();
            if name != b"." && name != b".." {
                names.push(PathBuf::from(OsStr::from_bytes(name)));
            }
        }
        for name in names {
            match self.dir_same_mount(&name) {
                Ok(child) => {
                    child.empty(depth + 1)?;
                    self.unlink(&name, true)?;
                }
                Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                    return Err(io::Error::other(format!("{} is still a mount point", self.display(&name).display())))
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTDIR) | Some(libc::ELOOP)) => {
                    self.unlink(&name, false)?
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn unlink(&self, name: &Path, dir: bool) -> io::Result<()> {
        let flag = if dir { nix::unistd::UnlinkatFlags::RemoveDir } else { nix::unistd::UnlinkatFlags::NoRemoveDir };
        match nix::unistd::unlinkat(Some(self.fd.as_raw_fd()), name, flag) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(io::Error::other(format!("removing {}: {e}", self.display(name).display()))),
        }
    }
}

/// One path component: not empty, no '/', not `.` or `..`.
fn one_component(name: &str) -> io::Result<()> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{name:?} is not a single file name")));
    }
    Ok(())
}
