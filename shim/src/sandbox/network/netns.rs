//! The pod's network namespace: opened and checked once, then entered by short-lived
//! threads of their own (setns(2) changes only the calling thread, so the shim's other
//! threads never leave the host's namespace), each with a netlink connection made there.

use super::error::{Context, NetworkError};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Component, Path};

/// A network namespace file, held open: the namespace stays valid (and the same one) for
/// as long as the pod network exists, even if its path is unmounted or replaced.
pub struct Netns {
    pub ctx: Context,
    file: File,
}

impl Netns {
    /// Opens `path` (from containerd's spec, checked anyway): an absolute path without `.`
    /// or `..`, whose last component is not a symbolic link, naming a network namespace
    /// (an nsfs file of type CLONE_NEWNET) other than the shim's own.
    pub fn open(path: &Path) -> Result<Netns, NetworkError> {
        let ctx = Context::new(path);
        let step = "opening the network namespace";
        if !path.is_absolute() || path.components().any(|c| matches!(c, Component::CurDir | Component::ParentDir)) {
            return Err(ctx.error(step, "not an absolute path without . or .. components"));
        }
        let file = File::options().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(path).map_err(
            |e| match e.raw_os_error() {
                Some(libc::ELOOP) => ctx.error(step, "it is a symbolic link, which is not followed"),
                Some(libc::ENOENT) => ctx.error(step, "it does not exist"),
                _ => ctx.error(step, e),
            },
        )?;
        let check = "checking the network namespace";
        // SAFETY: fstatfs fills the statfs we own, from a descriptor we own.
        let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstatfs(file.as_raw_fd(), &mut fs) } != 0 {
            return Err(ctx.error(check, std::io::Error::last_os_error()));
        }
        if fs.f_type != libc::NSFS_MAGIC {
            return Err(ctx.error(check, format!("not a namespace file (file system type {:#x}, not nsfs)", fs.f_type)));
        }
        // SAFETY: NS_GET_NSTYPE takes no argument and returns the namespace's CLONE_ type.
        let kind = unsafe { libc::ioctl(file.as_raw_fd(), libc::NS_GET_NSTYPE) };
        if kind != libc::CLONE_NEWNET {
            return Err(ctx.error(check, format!("a namespace of type {kind:#x}, not a network namespace")));
        }
        // Entering the host's own namespace would put the tap and the redirects on the
        // host's interfaces.
        let ours = std::fs::metadata("/proc/thread-self/ns/net").map_err(ctx.at(check))?;
        let theirs = file.metadata().map_err(ctx.at(check))?;
        if (ours.dev(), ours.ino()) == (theirs.dev(), theirs.ino()) {
            return Err(ctx.error(check, "it is the shim's own (the host's) network namespace"));
        }
        Ok(Netns { ctx, file })
    }

    /// The namespace's descriptor, for others that work inside it (port forwarding).
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.file)
    }

    /// Runs `work` on a new thread that entered this namespace, with a netlink connection
    /// made there (a netlink socket belongs to the namespace of its creator) and the
    /// current-thread tokio runtime that drives it; returns what `work` returned.
    pub fn run<T: Send>(
        &self,
        work: impl FnOnce(&tokio::runtime::Runtime, rtnetlink::Handle) -> Result<T, NetworkError> + Send,
    ) -> Result<T, NetworkError> {
        let ctx = &self.ctx;
        std::thread::scope(|scope| {
            let thread = std::thread::Builder::new()
                .name("pod-netns".into())
                .spawn_scoped(scope, || {
                    nix::sched::setns(&self.file, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(ctx.at("entering the network namespace"))?;
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_io()
                        .build()
                        .map_err(ctx.at("starting the netlink runtime"))?;
                    // The netlink socket registers with the runtime's reactor as it is made.
                    let _entered = runtime.enter();
                    let (connection, handle, _) =
                        rtnetlink::new_connection().map_err(ctx.at("opening a netlink socket"))?;
                    runtime.spawn(connection);
                    work(&runtime, handle)
                })
                .map_err(ctx.at("starting a thread for the network namespace"))?;
            thread.join().unwrap_or_else(|_| Err(ctx.error("working in the network namespace", "the thread panicked")))
        })
    }
}
