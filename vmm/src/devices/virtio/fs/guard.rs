//! The file system the guest sees: fuse-backend-rs's passthrough of the shared directory,
//! behind a guard that closes the ways out of that directory the passthrough leaves open.
//!
//! - LOOKUP of `.` and `..`: the passthrough allows them (for NFS export). It maps `..` of
//!   its root back to the root, but `..` of any other directory is resolved on the host:
//!   once the host moves a directory the guest holds out of the share (a rename race, or
//!   a container's rootfs being torn down), `..` leads to the host's file system. The
//!   guest kernel never needs these lookups (its VFS resolves `..` itself), so they are
//!   refused everywhere.
//! - MKNOD of character and block devices: a device node the guest creates would be a
//!   real host device node in the shared directory, usable by any host process that
//!   opens it. FIFOs and sockets are harmless and allowed. (Device nodes already in the
//!   directory are no way out: the guest kernel opens special files itself, with its own
//!   drivers, without asking the file server.)
//!
//! - OPEN of anything but a regular file: the guest kernel opens device nodes, FIFOs and
//!   sockets itself (its own drivers), never through the file server, so an OPEN of one
//!   is a raw request meant to make the VMM open a host device (the passthrough refuses
//!   them too, with EBADF; this is said once more here, where it is tested).
//! - Extended attributes the host's kernel acts on: setting `security.capability` (file
//!   capabilities a host exec would grant) and any `trusted.*` access (overlayfs and other
//!   host-kernel metadata, readable and writable only with CAP_SYS_ADMIN, which the VMM
//!   has and the guest must not borrow). `trusted.*` names still show in LISTXATTR.
//!
//! Setuid and setgid bits are kept, not stripped: the guest's containers need them (a
//! package manager installing sudo). What keeps them from the host is the mounts: the
//! shim mounts every rootfs and volume nosuid,nodev below a 0700 sandbox directory
//! (docs/shim.md, "The share and a hostile guest"), so no host exec through the share
//! honours them.
//!
//! - READ and WRITE flags: a request carries the guest's current flags of the file, which
//!   the passthrough applies to the handle's host descriptor with F_SETFL. When that
//!   fails (O_DIRECT on a directory, say), fuse-backend-rs 0.14 drops the `File` it made
//!   from the descriptor it only borrowed, closing it, and closes the number again at
//!   RELEASE: in between, the number may be reused by any file or socket of the VMM,
//!   which READ and WRITE on the handle then reach. The guard gives READ and WRITE the
//!   flags the handle was opened with, so the passthrough never calls F_SETFL (a guest
//!   that changes O_NONBLOCK or O_APPEND after open keeps the host descriptor's).
//!
//! It also lets the guest send large requests (BIG_WRITES, MAX_PAGES), which the
//! passthrough serves but does not ask for.
//!
//! Symlinks need no guard: the guest resolves them in its own name space, and the
//! passthrough opens everything with O_NOFOLLOW relative to directory descriptors.
//! Everything else is delegated unchanged.

use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64, CreateIn, FsOptions, OpenOptions, SetattrValid};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, GetxattrReply, ListxattrReply, ZeroCopyReader, ZeroCopyWriter,
};
use fuse_backend_rs::passthrough::PassthroughFs;
use std::collections::HashMap;
use std::ffi::CStr;
use std::io;
use std::sync::Mutex;
use std::time::Duration;

/// The passthrough's node and handle ids (plain u64 in fuse-backend-rs, not exported).
type Inode = u64;
type Handle = u64;

pub struct SharedDirFs {
    inner: PassthroughFs,
    /// The flags each open handle was opened with (as many entries as the passthrough
    /// has handles).
    open_flags: Mutex<HashMap<Handle, u32>>,
}

impl SharedDirFs {
    pub fn new(inner: PassthroughFs) -> SharedDirFs {
        SharedDirFs { inner, open_flags: Mutex::new(HashMap::new()) }
    }

    fn handles(&self) -> std::sync::MutexGuard<'_, HashMap<Handle, u32>> {
        self.open_flags.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn opened<T>(&self, handle: Option<Handle>, flags: u32, result: T) -> T {
        if let Some(handle) = handle {
            self.handles().insert(handle, flags);
        }
        result
    }

    /// The flags READ and WRITE pass on: the handle's own. For a handle the passthrough
    /// does not have, the guest's (the passthrough refuses the handle before using them).
    fn flags_of(&self, handle: Handle, guest_flags: u32) -> u32 {
        self.handles().get(&handle).copied().unwrap_or(guest_flags)
    }
}

fn refused() -> io::Error {
    io::Error::from_raw_os_error(libc::EPERM)
}

/// Whether LOOKUP may resolve `name`.
pub fn lookup_allowed(name: &CStr) -> bool {
    !matches!(name.to_bytes(), b"." | b"..")
}

/// Whether extended attribute `name` may be set (`set`) or read and removed.
pub fn xattr_allowed(name: &CStr, set: bool) -> bool {
    let name = name.to_bytes();
    !(name.starts_with(b"trusted.") || (set && name == b"security.capability"))
}

/// Whether OPEN may open an inode of this `mode`: regular files only (directories are
/// opened with OPENDIR).
pub fn open_allowed(mode: u32) -> bool {
    mode & libc::S_IFMT == libc::S_IFREG
}

/// Whether MKNOD may create a node of this `mode`.
pub fn mknod_allowed(mode: u32) -> bool {
    !matches!(mode & libc::S_IFMT, libc::S_IFCHR | libc::S_IFBLK)
}

impl FileSystem for SharedDirFs {
    type Inode = Inode;
    type Handle = Handle;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        // The passthrough does not ask for large requests, and without them the guest
        // kernel sends every write one 4 KiB page at a time (one virtio round trip per
        // page). The server handles requests up to 1 MiB; let the guest use them.
        let large_requests = capable & (FsOptions::BIG_WRITES | FsOptions::MAX_PAGES);
        Ok(self.inner.init(capable)? | large_requests)
    }

    fn destroy(&self) {
        self.inner.destroy();
        self.handles().clear();
    }

    fn statfs(&self, ctx: &Context, inode: Inode) -> io::Result<statvfs64> {
        self.inner.statfs(ctx, inode)
    }

    fn lookup(&self, ctx: &Context, parent: Inode, name: &CStr) -> io::Result<Entry> {
        if !lookup_allowed(name) {
            return Err(refused());
        }
        self.inner.lookup(ctx, parent, name)
    }

    fn forget(&self, ctx: &Context, inode: Inode, count: u64) {
        self.inner.forget(ctx, inode, count)
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(Inode, u64)>) {
        self.inner.batch_forget(ctx, requests)
    }

    fn opendir(&self, ctx: &Context, inode: Inode, flags: u32) -> io::Result<(Option<Handle>, OpenOptions)> {
        let opened = self.inner.opendir(ctx, inode, flags)?;
        // The passthrough opens (and records) directories with O_DIRECTORY added.
        Ok(self.opened(opened.0, flags | libc::O_DIRECTORY as u32, opened))
    }

    fn releasedir(&self, ctx: &Context, inode: Inode, flags: u32, handle: Handle) -> io::Result<()> {
        self.inner.releasedir(ctx, inode, flags, handle)?;
        // Only once the passthrough has let the handle go (it refuses a wrong inode).
        self.handles().remove(&handle);
        Ok(())
    }

    fn mkdir(&self, ctx: &Context, parent: Inode, name: &CStr, mode: u32, umask: u32) -> io::Result<Entry> {
        self.inner.mkdir(ctx, parent, name, mode, umask)
    }

    fn rmdir(&self, ctx: &Context, parent: Inode, name: &CStr) -> io::Result<()> {
        self.inner.rmdir(ctx, parent, name)
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner.readdir(ctx, inode, handle, size, offset, add_entry)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner.readdirplus(ctx, inode, handle, size, offset, add_entry)
    }

    fn open(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<Handle>, OpenOptions, Option<u32>)> {
        // The inode's type never changes, so this check cannot be raced.
        let (attr, _) = self.inner.getattr(ctx, inode, None)?;
        if !open_allowed(attr.st_mode) {
            return Err(refused());
        }
        let opened = self.inner.open(ctx, inode, flags, fuse_flags)?;
        Ok(self.opened(opened.0, flags, opened))
    }

    #[allow(clippy::too_many_arguments)]
    fn release(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
        handle: Handle,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.inner.release(ctx, inode, flags, handle, flush, flock_release, lock_owner)?;
        // Only once the passthrough has let the handle go (it refuses a wrong inode).
        self.handles().remove(&handle);
        Ok(())
    }

    fn create(
        &self,
        ctx: &Context,
        parent: Inode,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<Handle>, OpenOptions, Option<u32>)> {
        let flags = args.flags;
        let created = self.inner.create(ctx, parent, name, args)?;
        Ok(self.opened(created.1, flags, created))
    }

    fn unlink(&self, ctx: &Context, parent: Inode, name: &CStr) -> io::Result<()> {
        self.inner.unlink(ctx, parent, name)
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        let flags = self.flags_of(handle, flags);
        self.inner.read(ctx, inode, handle, w, size, offset, lock_owner, flags)
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        let flags = self.flags_of(handle, flags);
        self.inner.write(ctx, inode, handle, r, size, offset, lock_owner, delayed_write, flags, fuse_flags)
    }

    fn getattr(&self, ctx: &Context, inode: Inode, handle: Option<Handle>) -> io::Result<(stat64, Duration)> {
        self.inner.getattr(ctx, inode, handle)
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: Inode,
        attr: stat64,
        handle: Option<Handle>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        self.inner.setattr(ctx, inode, attr, handle, valid)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: Inode,
        oldname: &CStr,
        newdir: Inode,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.inner.rename(ctx, olddir, oldname, newdir, newname, flags)
    }

    fn mknod(&self, ctx: &Context, inode: Inode, name: &CStr, mode: u32, rdev: u32, umask: u32) -> io::Result<Entry> {
        if !mknod_allowed(mode) {
            return Err(refused());
        }
        self.inner.mknod(ctx, inode, name, mode, rdev, umask)
    }

    fn link(&self, ctx: &Context, inode: Inode, newparent: Inode, newname: &CStr) -> io::Result<Entry> {
        self.inner.link(ctx, inode, newparent, newname)
    }

    fn symlink(&self, ctx: &Context, linkname: &CStr, parent: Inode, name: &CStr) -> io::Result<Entry> {
        self.inner.symlink(ctx, linkname, parent, name)
    }

    fn readlink(&self, ctx: &Context, inode: Inode) -> io::Result<Vec<u8>> {
        self.inner.readlink(ctx, inode)
    }

    fn flush(&self, ctx: &Context, inode: Inode, handle: Handle, lock_owner: u64) -> io::Result<()> {
        self.inner.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(&self, ctx: &Context, inode: Inode, datasync: bool, handle: Handle) -> io::Result<()> {
        self.inner.fsync(ctx, inode, datasync, handle)
    }

    fn fsyncdir(&self, ctx: &Context, inode: Inode, datasync: bool, handle: Handle) -> io::Result<()> {
        self.inner.fsyncdir(ctx, inode, datasync, handle)
    }

    fn access(&self, ctx: &Context, inode: Inode, mask: u32) -> io::Result<()> {
        self.inner.access(ctx, inode, mask)
    }

    fn setxattr(&self, ctx: &Context, inode: Inode, name: &CStr, value: &[u8], flags: u32) -> io::Result<()> {
        if !xattr_allowed(name, true) {
            return Err(refused());
        }
        self.inner.setxattr(ctx, inode, name, value, flags)
    }

    fn getxattr(&self, ctx: &Context, inode: Inode, name: &CStr, size: u32) -> io::Result<GetxattrReply> {
        if !xattr_allowed(name, false) {
            return Err(refused());
        }
        self.inner.getxattr(ctx, inode, name, size)
    }

    fn listxattr(&self, ctx: &Context, inode: Inode, size: u32) -> io::Result<ListxattrReply> {
        self.inner.listxattr(ctx, inode, size)
    }

    fn removexattr(&self, ctx: &Context, inode: Inode, name: &CStr) -> io::Result<()> {
        if !xattr_allowed(name, false) {
            return Err(refused());
        }
        self.inner.removexattr(ctx, inode, name)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.inner.fallocate(ctx, inode, handle, mode, offset, length)
    }

    fn lseek(&self, ctx: &Context, inode: Inode, handle: Handle, offset: u64, whence: u32) -> io::Result<u64> {
        self.inner.lseek(ctx, inode, handle, offset, whence)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_and_dotdot_lookups_are_refused() {
        assert!(!lookup_allowed(c".."));
        assert!(!lookup_allowed(c"."));
        assert!(lookup_allowed(c"..."));
        assert!(lookup_allowed(c"..hidden"));
        assert!(lookup_allowed(c"rootfs"));
    }

    fn shared_dir_under(base: &std::path::Path) -> PassthroughFs {
        let cfg = fuse_backend_rs::passthrough::Config {
            root_dir: base.join("shared").to_str().unwrap().to_string(),
            do_import: true,
            // As the device has it.
            xattr: true,
            ..Default::default()
        };
        let fs = PassthroughFs::new(cfg).unwrap();
        fs.import().unwrap();
        fs
    }

    /// The hole the guard closes, at the FUSE level. The passthrough maps `..` of its root
    /// to the root, but not `..` of any other directory: when the host moves a directory
    /// the guest has looked up out of the share (a rename race), `..` of that directory
    /// is its new host parent, and everything there becomes reachable. Through the guard
    /// `..` is refused everywhere.
    #[test]
    fn fuse_lookup_of_dotdot_cannot_leave_the_shared_directory() {
        use fuse_backend_rs::api::filesystem::ROOT_ID;
        let base = std::env::temp_dir().join(format!("nestbox-fs-guard-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(base.join("shared/sub")).unwrap();
        std::fs::write(base.join("secret"), b"host secret").unwrap();
        let ctx = Context::new();

        let raw = shared_dir_under(&base);
        let guarded = SharedDirFs::new(shared_dir_under(&base));
        let raw_sub = raw.lookup(&ctx, ROOT_ID, c"sub").unwrap();
        let guarded_sub = guarded.lookup(&ctx, ROOT_ID, c"sub").unwrap();
        std::fs::rename(base.join("shared/sub"), base.join("moved")).unwrap();

        let parent = raw.lookup(&ctx, raw_sub.inode, c"..").expect("the bare passthrough resolves ..");
        assert!(raw.lookup(&ctx, parent.inode, c"secret").is_ok(), "and reaches outside the share");

        for (inode, name) in [(guarded_sub.inode, c".."), (ROOT_ID, c".."), (ROOT_ID, c".")] {
            let err = guarded.lookup(&ctx, inode, name).expect_err("refused");
            assert_eq!(err.raw_os_error(), Some(libc::EPERM));
        }
        let err = guarded.mknod(&ctx, ROOT_ID, c"mem", libc::S_IFCHR | 0o600, 0x0101, 0).expect_err("refused");
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
        assert!(!base.join("shared/mem").exists());
        guarded.mknod(&ctx, ROOT_ID, c"fifo", libc::S_IFIFO | 0o600, 0, 0).expect("a FIFO is fine");
        std::fs::remove_dir_all(&base).unwrap();
    }

    /// A ZeroCopyWriter that takes nothing (the test is about the descriptor, not data).
    struct Sink;

    impl io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl ZeroCopyWriter for Sink {
        fn write_from(
            &mut self,
            _: &mut dyn fuse_backend_rs::file_traits::FileReadWriteVolatile,
            _: usize,
            _: u64,
        ) -> io::Result<usize> {
            Ok(0)
        }
        fn available_bytes(&self) -> usize {
            4096
        }
    }

    /// Found by the virtio_fs fuzz target: READ with flags F_SETFL refuses (O_DIRECT on
    /// a directory) made the passthrough close the handle's descriptor, which RELEASE
    /// then closed a second time, whatever it had become in between.
    #[test]
    fn read_flags_cannot_close_the_handle_descriptor() {
        use fuse_backend_rs::api::filesystem::ROOT_ID;
        let base = std::env::temp_dir().join(format!("nestbox-fs-flags-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(base.join("shared")).unwrap();
        let shared = base.join("shared");
        let open_on_shared = || {
            let fds = std::fs::read_dir("/proc/self/fd").unwrap().flatten();
            fds.filter(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target == shared)).count()
        };
        let ctx = Context::new();
        let guarded = SharedDirFs::new(shared_dir_under(&base));
        // A directory handle (OPENDIR: the guard refuses OPEN of anything but a regular file).
        let handle = guarded.opendir(&ctx, ROOT_ID, libc::O_RDONLY as u32).unwrap().0.expect("a handle");
        let open = open_on_shared();
        let _ = guarded.read(&ctx, ROOT_ID, handle, &mut Sink, 64, 0, None, libc::O_DIRECT as u32);
        assert_eq!(open_on_shared(), open, "the handle's descriptor was closed under it");
        // A RELEASEDIR the passthrough refuses (wrong inode) leaves the handle, and the guard.
        assert!(guarded.releasedir(&ctx, ROOT_ID + 1, 0, handle).is_err());
        let _ = guarded.read(&ctx, ROOT_ID, handle, &mut Sink, 64, 0, None, libc::O_DIRECT as u32);
        assert_eq!(open_on_shared(), open, "the handle's descriptor was closed under it");
        guarded.releasedir(&ctx, ROOT_ID, 0, handle).unwrap();
        assert_eq!(open_on_shared(), open - 1, "RELEASEDIR closes it");
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn only_device_nodes_are_refused() {
        assert!(!mknod_allowed(libc::S_IFCHR | 0o600));
        assert!(!mknod_allowed(libc::S_IFBLK | 0o600));
        assert!(mknod_allowed(libc::S_IFIFO | 0o600));
        assert!(mknod_allowed(libc::S_IFSOCK | 0o600));
        assert!(mknod_allowed(libc::S_IFREG | 0o600));
    }

    #[test]
    fn xattrs_the_host_kernel_acts_on_are_refused() {
        assert!(!xattr_allowed(c"security.capability", true));
        assert!(xattr_allowed(c"security.capability", false), "reading and dropping capabilities is harmless");
        for name in [c"trusted.overlay.opaque", c"trusted.x", c"trusted."] {
            assert!(!xattr_allowed(name, true) && !xattr_allowed(name, false), "{name:?}");
        }
        for name in [c"user.x", c"security.selinux", c"system.posix_acl_access"] {
            assert!(xattr_allowed(name, true), "{name:?}");
        }
        assert!(open_allowed(libc::S_IFREG | 0o644));
        for kind in [libc::S_IFCHR, libc::S_IFBLK, libc::S_IFIFO, libc::S_IFSOCK, libc::S_IFDIR, libc::S_IFLNK] {
            assert!(!open_allowed(kind | 0o644), "{kind:o}");
        }
    }

    /// The length of xattr `name` of `path` on the host, if it has one.
    fn host_xattr_len(path: &std::path::Path, name: &CStr) -> Option<usize> {
        let path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: two NUL-terminated strings; a null buffer of size 0 only asks the size.
        let len = unsafe { libc::lgetxattr(path.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
        usize::try_from(len).ok()
    }

    /// What a hostile guest kernel can ask for by raw requests, at the FUSE level: opening
    /// a host device node, FIFO or socket found in the share (a container image may carry
    /// device nodes), truncating one, setting capability and trusted xattrs. Each is
    /// refused and the host file is left as it was; a setuid file keeps its bits (the
    /// mounts are nosuid: see the module's comment).
    #[test]
    fn raw_requests_for_host_devices_and_privileged_xattrs_are_refused() {
        use fuse_backend_rs::api::filesystem::ROOT_ID;
        let base = std::env::temp_dir().join(format!("nestbox-fs-guard-raw-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(base.join("shared")).unwrap();
        // A host device node (what /dev/null is) and a FIFO, as an image's layer may carry.
        let made = |args: &[&str]| std::process::Command::new(args[0]).args(&args[1..]).status().unwrap().success();
        let null = base.join("shared/null");
        assert!(made(&["mknod", "-m", "666", null.to_str().unwrap(), "c", "1", "3"]));
        assert!(made(&["mkfifo", base.join("shared/fifo").to_str().unwrap()]));
        std::fs::write(base.join("shared/file"), b"data").unwrap();
        let ctx = Context::new();
        let fs = SharedDirFs::new(shared_dir_under(&base));

        for name in [c"null", c"fifo"] {
            let entry = fs.lookup(&ctx, ROOT_ID, name).unwrap();
            for flags in [libc::O_RDONLY, libc::O_RDWR, libc::O_WRONLY | libc::O_NONBLOCK] {
                let err = fs.open(&ctx, entry.inode, flags as u32, 0).expect_err("refused");
                assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{name:?}");
            }
            let mut attr = entry.attr;
            attr.st_size = 0;
            assert!(fs.setattr(&ctx, entry.inode, attr, None, SetattrValid::SIZE).is_err(), "{name:?} truncated");
        }
        let file = fs.lookup(&ctx, ROOT_ID, c"file").unwrap();
        fs.open(&ctx, file.inode, libc::O_RDONLY as u32, 0).expect("a regular file opens");
        // A capability set (version 2, CAP_SYS_ADMIN) and a trusted xattr.
        let mut caps = [0u8; 20];
        caps[..4].copy_from_slice(&0x0200_0001u32.to_le_bytes());
        caps[4..8].copy_from_slice(&(1u32 << 21).to_le_bytes());
        for (name, value) in
            [(c"security.capability", &caps[..]), (c"trusted.overlay.opaque", b"y"), (c"trusted.x", b"1")]
        {
            let err = fs.setxattr(&ctx, file.inode, name, value, 0).expect_err("refused");
            assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{name:?}");
            assert!(host_xattr_len(&base.join("shared/file"), name).is_none(), "{name:?} set");
        }
        assert!(fs.getxattr(&ctx, file.inode, c"trusted.x", 64).is_err());
        fs.setxattr(&ctx, file.inode, c"user.note", b"fine", 0).expect("user xattrs are the guest's");
        // The control: the bare passthrough (running as root, as the VMM does) sets them.
        let bare = shared_dir_under(&base);
        let bare_file = bare.lookup(&ctx, ROOT_ID, c"file").unwrap();
        bare.setxattr(&ctx, bare_file.inode, c"trusted.x", b"1", 0).expect("the bare passthrough sets trusted.x");
        assert_eq!(host_xattr_len(&base.join("shared/file"), c"trusted.x"), Some(1));

        let mut attr = file.attr;
        attr.st_mode = libc::S_IFREG | 0o4755;
        fs.setattr(&ctx, file.inode, attr, None, SetattrValid::MODE).expect("chmod u+s");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(base.join("shared/file")).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o4755, "kept: the mounts are nosuid");
        assert!(base.join("shared/null").exists());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
