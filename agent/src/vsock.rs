//! AF_VSOCK stream sockets for the guest side: a listener and a stream with std-like
//! `Read`/`Write`, just what the agent's own vsock services need. (The agent API's
//! listener is ttrpc's own; these serve the I/O port, the test services and outgoing
//! connections.)

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, VsockAddr};

/// Any CID: listen on whatever CID the VM was given.
pub const CID_ANY: u32 = libc::VMADDR_CID_ANY;
/// The host, as seen from a guest.
pub const CID_HOST: u32 = libc::VMADDR_CID_HOST;

fn stream_socket() -> io::Result<OwnedFd> {
    Ok(socket::socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?)
}

pub struct VsockListener {
    fd: OwnedFd,
}

impl VsockListener {
    pub fn bind(cid: u32, port: u32) -> io::Result<Self> {
        let fd = stream_socket()?;
        socket::bind(fd.as_raw_fd(), &VsockAddr::new(cid, port))?;
        // Many concurrent connections are the point of the test services.
        socket::listen(&fd, Backlog::new(128).unwrap_or(Backlog::MAXCONN))?;
        Ok(Self { fd })
    }

    pub fn accept(&self) -> io::Result<VsockStream> {
        Ok(VsockStream { fd: self.accept_fd()? })
    }

    /// Accepts a connection as a plain descriptor (read and written as a file).
    pub fn accept_fd(&self) -> io::Result<OwnedFd> {
        let raw = socket::accept4(self.fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC)?;
        // SAFETY: accept4 just returned this descriptor; nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(raw) })
    }
}

pub struct VsockStream {
    fd: OwnedFd,
}

impl VsockStream {
    pub fn connect(cid: u32, port: u32) -> io::Result<Self> {
        let fd = stream_socket()?;
        socket::connect(fd.as_raw_fd(), &VsockAddr::new(cid, port))?;
        Ok(Self { fd })
    }
}

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Ok(nix::unistd::read(self.fd.as_raw_fd(), buf)?)
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(nix::unistd::write(self.fd.as_fd(), buf)?)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
