//! A directory of the share held open, every attempt made relative to it: a path walk from
//! the share's root per attempt would cost a FUSE lookup per component once the guest's
//! one-second entry cache has lapsed, and a FUSE request takes milliseconds here.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

pub struct At {
    fd: OwnedFd,
    path: PathBuf,
}

fn cstr(name: impl AsRef<Path>) -> CString {
    CString::new(name.as_ref().as_os_str().as_bytes()).unwrap_or_default()
}

fn check(res: libc::c_int) -> io::Result<()> {
    match res {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

fn owned(fd: libc::c_int) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just returned, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

const DIR_FLAGS: libc::c_int = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;

impl At {
    pub fn open(path: &Path) -> io::Result<At> {
        let name = cstr(path);
        // SAFETY: a NUL-terminated path.
        let fd = owned(unsafe { libc::open(name.as_ptr(), DIR_FLAGS) })?;
        Ok(At { fd, path: path.to_path_buf() })
    }

    /// The directory `name` in this one, not through a symlink.
    pub fn sub(&self, name: &str) -> io::Result<At> {
        let c = cstr(name);
        // SAFETY: our descriptor and a NUL-terminated name.
        let fd = owned(unsafe { libc::openat(self.fd.as_raw_fd(), c.as_ptr(), DIR_FLAGS) })?;
        Ok(At { fd, path: self.path.join(name) })
    }

    /// `name` below this directory, for messages.
    pub fn shown(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn stat(&self, name: &str) -> io::Result<libc::stat> {
        let c = cstr(name);
        // SAFETY: an all-zero stat is a valid value of this plain C struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: our descriptor, a NUL-terminated name and a stat struct the kernel fills.
        check(unsafe { libc::fstatat(self.fd.as_raw_fd(), c.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) })?;
        Ok(st)
    }

    pub fn exists(&self, name: &str) -> bool {
        self.stat(name).is_ok()
    }

    pub fn symlink(&self, target: &Path, name: &str) -> io::Result<()> {
        let (t, c) = (cstr(target), cstr(name));
        // SAFETY: NUL-terminated strings and our descriptor.
        check(unsafe { libc::symlinkat(t.as_ptr(), self.fd.as_raw_fd(), c.as_ptr()) })
    }

    /// Moves `from` in this directory to `to` in `dir`.
    pub fn rename(&self, from: &str, dir: &At, to: &str) -> io::Result<()> {
        let (f, t) = (cstr(from), cstr(to));
        // SAFETY: NUL-terminated names and two descriptors of ours.
        check(unsafe { libc::renameat(self.fd.as_raw_fd(), f.as_ptr(), dir.fd.as_raw_fd(), t.as_ptr()) })
    }

    /// Unlinks `name`, or removes it as a directory.
    pub fn remove(&self, name: &str) -> io::Result<()> {
        let c = cstr(name);
        let is_dir = self.stat(name)?.st_mode & libc::S_IFMT == libc::S_IFDIR;
        let flags = if is_dir { libc::AT_REMOVEDIR } else { 0 };
        // SAFETY: our descriptor and a NUL-terminated name.
        check(unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), flags) })
    }

    /// A new file with `mode`, set again after the create (setuid bits as a guest would set
    /// them); made only if the file then has that mode.
    pub fn create(&self, name: &str, mode: u32) -> io::Result<()> {
        let c = cstr(name);
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: our descriptor and a NUL-terminated name.
        let file = owned(unsafe { libc::openat(self.fd.as_raw_fd(), c.as_ptr(), flags, mode) })?;
        // SAFETY: a descriptor we own.
        check(unsafe { libc::fchmod(file.as_raw_fd(), mode) })?;
        let now = self.stat(name)?.st_mode & 0o7777;
        match now == mode {
            true => Ok(()),
            false => Err(io::Error::other(format!("mode {now:o} instead of {mode:o}"))),
        }
    }

    pub fn mknod(&self, name: &str, kind: libc::mode_t, major: u32, minor: u32) -> io::Result<()> {
        let c = cstr(name);
        let dev = libc::makedev(major, minor);
        // SAFETY: our descriptor and a NUL-terminated name.
        check(unsafe { libc::mknodat(self.fd.as_raw_fd(), c.as_ptr(), kind | 0o666, dev) })
    }

    pub fn mkdir(&self, name: &str) -> io::Result<()> {
        let c = cstr(name);
        // SAFETY: our descriptor and a NUL-terminated name.
        check(unsafe { libc::mkdirat(self.fd.as_raw_fd(), c.as_ptr(), 0o755) })
    }

    /// A hard link `name` here to `from` in `dir`.
    pub fn link(&self, dir: &At, from: &str, name: &str) -> io::Result<()> {
        let (f, c) = (cstr(from), cstr(name));
        // SAFETY: NUL-terminated names and two descriptors of ours.
        check(unsafe { libc::linkat(dir.fd.as_raw_fd(), f.as_ptr(), self.fd.as_raw_fd(), c.as_ptr(), 0) })
    }

    /// A mode change of this directory itself.
    pub fn chmod(&self, mode: libc::mode_t) -> io::Result<()> {
        // SAFETY: a descriptor we own.
        check(unsafe { libc::fchmod(self.fd.as_raw_fd(), mode) })
    }

    /// Sets xattr `key` on this directory itself (`name` None) or on the file `name` in it.
    pub fn set_xattr(&self, name: Option<&str>, key: &str, value: &[u8]) -> io::Result<()> {
        let file;
        let fd = match name {
            None => self.fd.as_raw_fd(),
            Some(name) => {
                let c = cstr(name);
                let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
                // SAFETY: our descriptor and a NUL-terminated name.
                file = owned(unsafe { libc::openat(self.fd.as_raw_fd(), c.as_ptr(), flags) })?;
                file.as_raw_fd()
            }
        };
        let key = CString::new(key).unwrap_or_default();
        // SAFETY: a valid descriptor, a NUL-terminated key, and a value of the length passed.
        check(unsafe { libc::fsetxattr(fd, key.as_ptr(), value.as_ptr().cast(), value.len(), 0) })
    }

    /// This directory's entries, read through its descriptor (no walk from the share's root).
    fn read(&self) -> Vec<std::fs::DirEntry> {
        let entries = std::fs::read_dir(format!("/proc/self/fd/{}", self.fd.as_raw_fd()));
        entries.map(|e| e.flatten().collect()).unwrap_or_default()
    }

    /// The names in this directory that are directories.
    pub fn dirs(&self) -> Vec<String> {
        let dirs = self.read().into_iter().filter(|e| e.file_type().is_ok_and(|t| t.is_dir()));
        dirs.map(|e| e.file_name().to_string_lossy().into_owned()).collect()
    }

    /// How many entries this directory has.
    pub fn entries(&self) -> usize {
        self.read().len()
    }
}
