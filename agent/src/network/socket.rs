//! A synchronous rtnetlink client: one request at a time on a NETLINK_ROUTE socket, its
//! answers read until the kernel's acknowledgement or the end of a dump.
//!
//! A netlink socket acts in the network namespace it was created in, for its whole life,
//! whichever thread uses it: [`Netlink::open_in`] creates one on a short-lived thread that
//! entered the pod's namespace, so the agent's own threads never switch namespaces.

use std::io;
use std::os::fd::BorrowedFd;
use std::time::Duration;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST,
};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use nix::sys::time::TimeValLike;

use super::message::Message;

/// The kernel answers a request at once (it is handled in the sending system call); a
/// missing answer would be a kernel bug, but a call stuck forever would hold the network
/// lock for good, so a receive gives up after this.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Large enough for the kernel's dump messages (it fills at most 32 KiB per datagram for
/// a reader that never asked for more).
const RECEIVE_BUFFER: usize = 64 * 1024;

pub struct Netlink {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

fn context(what: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

impl Netlink {
    /// A socket in the calling thread's network namespace.
    pub fn open() -> io::Result<Netlink> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(|e| context("opening a netlink socket", e))?;
        socket.bind_auto().map_err(|e| context("binding the netlink socket", e))?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(|e| context("connecting the netlink socket", e))?;
        let timeout = nix::sys::time::TimeVal::seconds(RECEIVE_TIMEOUT.as_secs() as i64);
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::ReceiveTimeout, &timeout)
            .map_err(|e| context("setting the netlink socket's receive timeout", e.into()))?;
        Ok(Netlink { socket, seq: 0, buf: vec![0; RECEIVE_BUFFER] })
    }

    /// A socket in the network namespace `netns`, made on a thread that enters it and ends.
    pub fn open_in(netns: BorrowedFd<'_>) -> io::Result<Netlink> {
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| context("entering the pod's network namespace", e.into()))?;
                Netlink::open()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the thread opening a netlink socket panicked")))
        })
    }

    /// Sends a request, and returns the messages of its answer until the acknowledgement.
    pub fn request(&mut self, message: Message, flags: u16) -> io::Result<Vec<Message>> {
        self.send(message, NLM_F_REQUEST | NLM_F_ACK | flags)
    }

    /// Sends a dump request, and returns every message of the dump. A dump the table's
    /// changes interrupted (by the kernel's own updates: DAD, a link coming up) is asked
    /// again, a few times.
    pub fn dump(&mut self, message: Message) -> io::Result<Vec<Message>> {
        let mut tries = 0;
        loop {
            match self.send(message.clone(), NLM_F_REQUEST | NLM_F_DUMP) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted && tries < 3 => tries += 1,
                r => return r,
            }
        }
    }

    fn send(&mut self, message: Message, flags: u16) -> io::Result<Vec<Message>> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
        packet.finalize();
        let mut bytes = vec![0; packet.buffer_len()];
        packet.serialize(&mut bytes);
        self.socket.send(&bytes, 0).map_err(|e| context("sending a netlink request", e))?;
        self.receive(self.seq)
    }

    /// Reads the answer to request `seq`: messages until NLMSG_DONE (a dump) or an
    /// NLMSG_ERROR (0: the acknowledgement, else the request's errno). Answers to other
    /// sequence numbers (none are expected: one request at a time) are skipped.
    fn receive(&mut self, seq: u32) -> io::Result<Vec<Message>> {
        let mut messages = Vec::new();
        loop {
            let n = self
                .socket
                .recv(&mut &mut self.buf[..], libc::MSG_TRUNC)
                .map_err(|e| context("receiving the kernel's netlink answer", e))?;
            if n > self.buf.len() {
                return Err(io::Error::other(format!("a netlink answer of {n} bytes overflows the buffer")));
            }
            let mut offset = 0;
            while offset < n {
                let packet = NetlinkMessage::<Message>::deserialize(&self.buf[offset..n]).map_err(|e| {
                    io::Error::new(io::ErrorKind::InvalidData, format!("decoding a netlink answer: {e}"))
                })?;
                let len = packet.header.length as usize;
                if len == 0 {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "a netlink answer of length 0"));
                }
                // Messages in a datagram are 4-byte aligned (NLMSG_ALIGN).
                offset += (len + 3) & !3;
                if packet.header.sequence_number != seq {
                    continue;
                }
                if packet.header.flags & NLM_F_DUMP_INTR != 0 {
                    return Err(io::Error::new(io::ErrorKind::Interrupted, "the table changed during the dump"));
                }
                match packet.payload {
                    NetlinkPayload::Done(_) => return Ok(messages),
                    NetlinkPayload::Error(e) if e.code.is_none() => return Ok(messages),
                    NetlinkPayload::Error(e) => return Err(e.to_io()),
                    NetlinkPayload::InnerMessage(m) => messages.push(m),
                    _ => {}
                }
            }
        }
    }
}
