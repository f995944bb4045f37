//! One vsock stream connection between a guest socket and a host Unix stream: the
//! connection state, both directions' buffering and virtio-vsock credit flow control.
//!
//! Credit, in short: each side advertises how much it can buffer (`buf_alloc`) and how
//! much it has consumed so far (`fwd_cnt`). A sender may have at most
//! `peer_buf_alloc - (sent - peer_fwd_cnt)` bytes in flight. We hold the guest to that
//! (a guest that overruns its credit is reset) and respect it towards the guest.

use super::packet::{
    Header, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RW, OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use super::HOST_CID;
use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::Instant;

/// Bytes we buffer from the guest per connection before the host reads them: the credit
/// the guest gets.
pub const BUF_ALLOC: u32 = 256 * 1024;
/// Tell the guest about freed buffer space once this much has been forwarded, so a guest
/// that only sends never stalls waiting for credit.
pub const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST sent (or to be sent), waiting for the guest's RESPONSE.
    Connecting {
        request_sent: bool,
    },
    Established,
    /// We asked the guest to close (SHUTDOWN both ways); it has until the deadline to
    /// answer with RST before the connection is dropped anyway.
    Closing {
        deadline: Instant,
    },
}

/// What the guest did that the muxer must act on.
#[derive(Debug, PartialEq, Eq)]
pub enum GuestAction {
    /// Nothing more to do.
    Continue,
    /// Reset the connection: send RST to the guest and drop it.
    Reset,
    /// The connection is over: drop it (no RST: the guest sent one).
    Drop,
}

pub struct Connection {
    pub stream: UnixStream,
    /// Host side port (CID 2).
    pub local_port: u32,
    /// Guest side port.
    pub peer_port: u32,
    pub guest_cid: u64,
    pub state: State,
    /// Bytes from the guest not yet written to the host stream.
    to_host: VecDeque<u8>,
    /// What is left of the `OK <port>\n` line owed to the host; it goes before any data.
    greeting: Vec<u8>,
    /// Bytes the host wrote right after `CONNECT <port>\n`, for the guest once connected.
    early_from_host: Vec<u8>,
    /// Our consumption counter (bytes written to the host) and its last advertised value.
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    /// The guest's buffer and consumption, and how much we sent it.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    rx_cnt: Wrapping<u32>,
    /// SHUTDOWN flags the guest sent.
    peer_shutdown: u32,
    /// The host stream has data (or EOF) to read; cleared when a read would block.
    pub host_readable: bool,
    host_eof: bool,
    shutdown_sent: bool,
    host_write_closed: bool,
    response_due: bool,
    credit_update_due: bool,
}

impl Connection {
    /// A connection the host opened through `CONNECT <peer_port>`.
    pub fn from_host(
        stream: UnixStream,
        local_port: u32,
        peer_port: u32,
        guest_cid: u64,
        early: Vec<u8>,
    ) -> Connection {
        let mut c = Connection::new(stream, local_port, peer_port, guest_cid);
        c.state = State::Connecting { request_sent: false };
        c.early_from_host = early;
        c
    }

    /// A connection the guest opened to host port `local_port`, already connected to
    /// the host's listener. The RESPONSE is due.
    pub fn from_guest(stream: UnixStream, request: &Header, guest_cid: u64) -> Connection {
        let mut c = Connection::new(stream, request.dst_port, request.src_port, guest_cid);
        c.update_peer_credit(request);
        c.response_due = true;
        c.host_readable = true;
        c
    }

    fn new(stream: UnixStream, local_port: u32, peer_port: u32, guest_cid: u64) -> Connection {
        Connection {
            stream,
            local_port,
            peer_port,
            guest_cid,
            state: State::Established,
            to_host: VecDeque::new(),
            greeting: Vec::new(),
            early_from_host: Vec::new(),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            peer_shutdown: 0,
            host_readable: false,
            host_eof: false,
            shutdown_sent: false,
            host_write_closed: false,
            response_due: false,
            credit_update_due: false,
        }
    }

    fn update_peer_credit(&mut self, h: &Header) {
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = Wrapping(h.fwd_cnt);
    }

    /// How many bytes the guest can take now. A guest reporting that it consumed more
    /// than it was sent gets no credit rather than a wrapped, huge one.
    pub fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc.saturating_sub((self.rx_cnt - self.peer_fwd_cnt).0)
    }

    /// Handles one packet from the guest for this connection.
    pub fn on_guest_packet(&mut self, h: &Header, data: &[u8]) -> GuestAction {
        self.update_peer_credit(h);
        match (h.op, self.state) {
            (OP_RESPONSE, State::Connecting { request_sent: true }) => {
                self.state = State::Established;
                // Tell the host client which port it got; then data flows both ways.
                self.greeting = format!("OK {}\n", self.local_port).into_bytes();
                self.host_readable = true;
                self.flush_to_host()
            }
            (OP_RW, State::Established) => {
                if self.peer_shutdown & SHUTDOWN_SEND != 0 || self.to_host.len() + data.len() > BUF_ALLOC as usize {
                    // Data after the guest said it would send none, or beyond its credit.
                    return GuestAction::Reset;
                }
                self.to_host.extend(data);
                self.flush_to_host()
            }
            (OP_RW, State::Closing { .. }) => GuestAction::Continue,
            (OP_CREDIT_UPDATE, _) => GuestAction::Continue,
            (super::packet::OP_CREDIT_REQUEST, _) => {
                self.credit_update_due = true;
                GuestAction::Continue
            }
            (OP_SHUTDOWN, State::Established) => {
                self.peer_shutdown |= h.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                self.flush_to_host()
            }
            (OP_SHUTDOWN, State::Closing { .. }) => GuestAction::Reset,
            (super::packet::OP_RST, _) => GuestAction::Drop,
            _ => GuestAction::Reset,
        }
    }

    /// Writes buffered guest data to the host stream until it would block; closes the
    /// host's read side once the guest said it sends no more and all is written.
    pub fn flush_to_host(&mut self) -> GuestAction {
        while !self.greeting.is_empty() {
            match self.stream.write(&self.greeting) {
                Ok(0) => return GuestAction::Reset,
                Ok(n) => drop(self.greeting.drain(..n)),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return GuestAction::Continue,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return GuestAction::Reset,
            }
        }
        while !self.to_host.is_empty() {
            let (chunk, _) = self.to_host.as_slices();
            match self.stream.write(chunk) {
                Ok(0) => return GuestAction::Reset,
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return GuestAction::Reset,
            }
        }
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD {
            self.credit_update_due = true;
        }
        if self.to_host.is_empty() && self.peer_shutdown & SHUTDOWN_SEND != 0 && !self.host_write_closed {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
            self.host_write_closed = true;
        }
        if self.to_host.is_empty() && self.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND {
            // The guest closed both ways and everything reached the host: done.
            return GuestAction::Reset;
        }
        GuestAction::Continue
    }

    /// The host closed the stream completely: ask the guest to close, and give it until
    /// `deadline` to answer.
    pub fn host_hung_up(&mut self, deadline: Instant) {
        self.host_readable = true;
        if !matches!(self.state, State::Closing { .. }) {
            self.host_eof = true;
            self.state = State::Closing { deadline };
            self.shutdown_sent = false;
        }
    }

    fn header(&self, op: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
            ..Default::default()
        }
    }

    /// Whether a packet for the guest is waiting (used to schedule the connection).
    pub fn has_rx_work(&self) -> bool {
        match self.state {
            State::Connecting { request_sent } => !request_sent,
            State::Closing { .. } => !self.shutdown_sent,
            State::Established => {
                self.response_due
                    || self.credit_update_due
                    || (self.host_eof && !self.shutdown_sent)
                    || (self.host_readable
                        && !self.host_eof
                        && self.peer_shutdown & SHUTDOWN_RCV == 0
                        && self.peer_credit() > 0)
            }
        }
    }

    /// Produces the next packet for the guest, with payload written into `buf` (at most
    /// `buf.len()` bytes). `None` when there is nothing to send after all.
    pub fn next_rx_packet(&mut self, buf: &mut [u8]) -> Option<Header> {
        let mut h = match self.state {
            State::Connecting { request_sent: false } => {
                self.state = State::Connecting { request_sent: true };
                self.header(OP_REQUEST)
            }
            State::Connecting { request_sent: true } => return None,
            State::Closing { .. } if !self.shutdown_sent => {
                self.shutdown_sent = true;
                let mut h = self.header(OP_SHUTDOWN);
                h.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
                h
            }
            State::Closing { .. } => return None,
            State::Established if self.response_due => {
                self.response_due = false;
                self.header(OP_RESPONSE)
            }
            State::Established => match self.read_host(buf) {
                Some(n) => {
                    let mut h = self.header(OP_RW);
                    h.len = n as u32;
                    self.rx_cnt += Wrapping(n as u32);
                    h
                }
                None if self.host_eof && !self.shutdown_sent => {
                    // The host will send no more; it may still read what the guest sends.
                    self.shutdown_sent = true;
                    let mut h = self.header(OP_SHUTDOWN);
                    h.flags = SHUTDOWN_SEND;
                    h
                }
                None if self.credit_update_due => self.header(OP_CREDIT_UPDATE),
                None => return None,
            },
        };
        self.credit_update_due = false;
        self.last_fwd_cnt_sent = self.fwd_cnt;
        h.fwd_cnt = self.fwd_cnt.0;
        Some(h)
    }

    /// Reads host data for one RW packet, within the guest's credit.
    fn read_host(&mut self, buf: &mut [u8]) -> Option<usize> {
        if !self.host_readable || self.host_eof || self.peer_shutdown & SHUTDOWN_RCV != 0 {
            return None;
        }
        let limit = buf.len().min(self.peer_credit() as usize);
        if limit == 0 {
            return None;
        }
        if !self.early_from_host.is_empty() {
            let n = limit.min(self.early_from_host.len());
            buf[..n].copy_from_slice(&self.early_from_host[..n]);
            self.early_from_host.drain(..n);
            return Some(n);
        }
        loop {
            match self.stream.read(&mut buf[..limit]) {
                Ok(0) => {
                    self.host_eof = true;
                    return None;
                }
                Ok(n) => return Some(n),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.host_readable = false;
                    return None;
                }
                Err(_) => {
                    self.host_eof = true;
                    return None;
                }
            }
        }
    }
}
