//! The backend a net device moves frames through: a tap descriptor the VMM inherited
//! (opened by the shim with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR in the pod's network
//! namespace). Every frame read or written carries the 12-byte virtio-net header.

use super::{F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6, VNET_HDR_LEN};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// A frame source and sink that can be waited on with epoll. Reads and writes never
/// block; one call moves one whole frame (header included).
pub trait Backend: Send + Sync {
    fn fd(&self) -> RawFd;
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize>;
    fn write_frame(&self, buf: &[u8]) -> io::Result<usize>;
    /// Tells the backend which offloads the guest accepted on receive.
    fn set_guest_features(&self, acked: u64) -> io::Result<()>;
}

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("--net-tap-fd {fd}: not an open file descriptor")]
    NotOpen { fd: RawFd },
    #[error("--net-tap-fd {fd}: not an attached tun/tap device (TUNGETIFF: {source})")]
    NotATun { fd: RawFd, source: io::Error },
    #[error(
        "--net-tap-fd {fd}: the device is not a tap opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR (flags {flags:#x})"
    )]
    Flags { fd: RawFd, flags: i32 },
    #[error("--net-tap-fd {fd}: {what}: {source}")]
    Setup { fd: RawFd, what: &'static str, source: io::Error },
}

/// `struct ifreq` as the tun ioctls use it: the interface name, then the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

pub struct Tap {
    fd: OwnedFd,
    name: String,
}

impl Tap {
    /// Takes over the tap descriptor `fd` this process inherited: checks it is an open,
    /// attached tap with a vnet header, makes it non-blocking and sets the header size.
    /// On an error the descriptor is left as it was (not closed).
    pub fn from_inherited_fd(fd: RawFd) -> Result<Tap, TapError> {
        // SAFETY: F_GETFD only reads the descriptor flags of `fd`, whatever it is.
        if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(TapError::NotOpen { fd });
        }
        let mut ifr = IfReq { name: [0; libc::IFNAMSIZ], flags: 0, _pad: [0; 22] };
        // SAFETY: TUNGETIFF writes one `struct ifreq` into `ifr`, which is that size and
        // exclusively borrowed; on any other kind of file it fails without writing.
        if unsafe { libc::ioctl(fd, libc::TUNGETIFF, &mut ifr) } < 0 {
            return Err(TapError::NotATun { fd, source: io::Error::last_os_error() });
        }
        let flags = i32::from(ifr.flags);
        let wanted = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if flags & wanted != wanted {
            return Err(TapError::Flags { fd, flags });
        }
        let setup = |what| move |source| TapError::Setup { fd, what, source };
        // SAFETY: F_GETFL/F_SETFL read and set the status flags of an open descriptor.
        let status = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if status < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, status | libc::O_NONBLOCK) } < 0 {
            return Err(setup("O_NONBLOCK")(io::Error::last_os_error()));
        }
        let size = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from `size`, which outlives the call.
        if unsafe { libc::ioctl(fd, libc::TUNSETVNETHDRSZ, &size) } < 0 {
            return Err(setup("TUNSETVNETHDRSZ")(io::Error::last_os_error()));
        }
        let len = ifr.name.iter().position(|&b| b == 0).unwrap_or(ifr.name.len());
        let name = String::from_utf8_lossy(&ifr.name[..len]).into_owned();
        // SAFETY: `fd` is open (checked above) and handed to this process to own; nothing
        // else in the VMM knows the number, so the OwnedFd is its only owner.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Tap { fd, name })
    }

    /// The interface's name in its network namespace, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// The tap offloads that let the kernel hand us frames the guest accepted: a guest
/// without GUEST_TSO4 must never receive a 64 KiB TCP frame.
pub fn tun_offload_flags(acked: u64) -> libc::c_uint {
    let mut flags = 0;
    if acked & F_GUEST_CSUM != 0 {
        flags |= libc::TUN_F_CSUM;
        // TSO needs checksum offload (the kernel refuses TSO flags without TUN_F_CSUM).
        if acked & F_GUEST_TSO4 != 0 {
            flags |= libc::TUN_F_TSO4;
        }
        if acked & F_GUEST_TSO6 != 0 {
            flags |= libc::TUN_F_TSO6;
        }
    }
    flags
}

fn cvt(n: isize) -> io::Result<usize> {
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

impl Backend for Tap {
    fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: read writes at most `buf.len()` bytes into the exclusively borrowed `buf`.
        cvt(unsafe { libc::read(self.fd(), buf.as_mut_ptr().cast(), buf.len()) })
    }

    fn write_frame(&self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: write reads `buf.len()` bytes from the borrowed `buf`.
        cvt(unsafe { libc::write(self.fd(), buf.as_ptr().cast(), buf.len()) })
    }

    fn set_guest_features(&self, acked: u64) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        if unsafe { libc::ioctl(self.fd(), libc::TUNSETOFFLOAD, tun_offload_flags(acked) as libc::c_ulong) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}
