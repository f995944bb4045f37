//! The VM's tap: a non-persistent tap device, so it exists exactly as long as a descriptor
//! of it is open (the shim's and the VMM's): closing them removes it, whatever happens to
//! the shim.

use std::fs::File;
use std::os::fd::AsRawFd;

/// The tap's name in the pod's network namespace (Kata's is `tap0_kata`).
pub const TAP_NAME: &str = "tap0_nestbox";

/// Opens /dev/net/tun and makes it the tap `name` in the calling thread's network
/// namespace: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, as the VMM's virtio-net backend wants it
/// (the VMM sets the header size and offloads itself).
pub fn open(name: &str) -> std::io::Result<File> {
    let file = File::options().read(true).write(true).open("/dev/net/tun")?;
    // SAFETY: ifreq is plain data; zeroed is a valid value of it.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= req.ifr_name.len() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("tap name {name:?} is too long")));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads (and may write back) the ifreq we own, on a descriptor we own.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}
