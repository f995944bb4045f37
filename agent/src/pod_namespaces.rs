//! The pod's namespaces in the guest (see `nestbox_protocols::pod`): a VM is one pod, so its
//! network, IPC and UTS namespaces exist once, made at CreateSandbox and held here as
//! descriptors for as long as the sandbox lives; every container whose spec names them by
//! their reserved paths is created in them. The pod's PID namespace is another matter: a
//! PID namespace lives only as long as its init, so it is the PID namespace of the first
//! container that names it (CRI's pause container, whose process is that init and reaps
//! the pod's orphans), held by that init's pidfd.
//!
//! Held by descriptors rather than bind mounts of `/proc/.../ns/*` (Kata's way): nothing to
//! unmount, nothing a container could find in the guest's file system, and host mode gets
//! the same namespaces without touching the host's mount table.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

/// The network, IPC and UTS namespaces of the pod.
pub struct PodNamespaces {
    net: OwnedFd,
    ipc: OwnedFd,
    uts: OwnedFd,
}

/// The pod's PID namespace: the one of container `container_id`'s init.
pub struct PodPidNamespace {
    pub container_id: String,
    pub init_pidfd: OwnedFd,
}

impl PodNamespaces {
    /// New network (with its loopback up), IPC and UTS namespaces, the UTS one with the
    /// guest's own name until [`PodNamespaces::set_hostname`]. Made on a thread of their own,
    /// which enters them and ends: the agent's other threads stay in the guest's namespaces.
    pub fn create() -> io::Result<PodNamespaces> {
        std::thread::scope(|s| {
            s.spawn(|| {
                let flags = libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
                // SAFETY: unshare with flags only; it affects this thread alone.
                if unsafe { libc::unshare(flags) } != 0 {
                    return Err(context("unsharing network, IPC and UTS namespaces", io::Error::last_os_error()));
                }
                loopback_up().map_err(|e| context("bringing up the pod's loopback interface", e))?;
                let open = |kind: &str| {
                    File::open(format!("/proc/thread-self/ns/{kind}"))
                        .map(OwnedFd::from)
                        .map_err(|e| context(&format!("opening the pod's {kind} namespace"), e))
                };
                Ok(PodNamespaces { net: open("net")?, ipc: open("ipc")?, uts: open("uts")? })
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the thread making the pod's namespaces panicked")))
        })
    }

    /// Names the pod's UTS namespace `hostname` (none: left as it is), from a thread of its
    /// own that enters it and ends (namespaces may be made before the pod's name is known).
    pub fn set_hostname(&self, hostname: &str) -> io::Result<()> {
        if hostname.is_empty() {
            return Ok(());
        }
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(self.uts.as_fd(), nix::sched::CloneFlags::CLONE_NEWUTS)
                    .map_err(|e| context("entering the pod's UTS namespace", e.into()))?;
                nix::unistd::sethostname(hostname)
                    .map_err(|e| context(&format!("setting the pod's hostname {hostname:?}"), e.into()))
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the thread naming the pod panicked")))
        })
    }

    /// The pod's network namespace (the network calls configure it, see `network`).
    pub fn net(&self) -> BorrowedFd<'_> {
        self.net.as_fd()
    }

    /// The namespaces among `flags` (clone flags of network, IPC, UTS), each with its flag,
    /// as `spawn::spawn_helper` enters them.
    pub fn to_enter(&self, flags: i32) -> Vec<(BorrowedFd<'_>, i32)> {
        [(libc::CLONE_NEWNET, &self.net), (libc::CLONE_NEWIPC, &self.ipc), (libc::CLONE_NEWUTS, &self.uts)]
            .into_iter()
            .filter(|(flag, _)| flags & flag != 0)
            .map(|(flag, fd)| (fd.as_fd(), flag))
            .collect()
    }
}

fn context(what: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Sets IFF_UP on `lo` in the calling thread's network namespace (a new one has it down).
fn loopback_up() -> io::Result<()> {
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socket just returned this descriptor; nothing else owns it.
    let socket = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: a zeroed ifreq is a valid empty request.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    let raw = std::os::fd::AsRawFd::as_raw_fd(&socket);
    // SAFETY: SIOCGIFFLAGS and SIOCSIFFLAGS read and write the ifreq we own.
    unsafe {
        if libc::ioctl(raw, libc::SIOCGIFFLAGS as _, &mut req) != 0 {
            return Err(io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(raw, libc::SIOCSIFFLAGS as _, &req) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hostname of the UTS namespace `uts`, read from a thread that enters it.
    fn hostname_in(uts: BorrowedFd<'_>) -> String {
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(uts, nix::sched::CloneFlags::CLONE_NEWUTS).expect("setns");
                nix::unistd::gethostname().expect("gethostname").to_string_lossy().into_owned()
            })
            .join()
            .expect("thread")
        })
    }

    #[test]
    fn namespaces_made_ahead_are_named_later() {
        assert!(nix::unistd::geteuid().is_root(), "this test makes namespaces: run it as root");
        let ours = nix::unistd::gethostname().expect("gethostname");
        let made = PodNamespaces::create().expect("namespaces");
        assert_eq!(hostname_in(made.uts.as_fd()), ours.to_string_lossy(), "unnamed: the guest's name");
        made.set_hostname("").expect("no name");
        made.set_hostname("pod-a").expect("naming");
        assert_eq!(hostname_in(made.uts.as_fd()), "pod-a");
        // This thread's (and so the agent's) name is untouched.
        assert_eq!(nix::unistd::gethostname().expect("gethostname"), ours);
    }
}
