//! The vsock event loop, on the device's own thread: moves packets between the virtio
//! queues and host Unix streams. It sleeps in epoll until a queue notification, a host
//! socket event, a closing deadline or the stop signal; there is no polling.

use super::connection::{Connection, GuestAction, State};
use super::packet::{Header, MAX_PAYLOAD, OP_REQUEST, OP_RST, TYPE_STREAM};
use super::{EVENT_QUEUE, HOST_CID, RX_QUEUE, TX_QUEUE};
use crate::devices::virtio::Interrupt;
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// How long host connections wait for the guest to handle a transport reset.
const RESET_ACK_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the guest has to answer our SHUTDOWN with RST before we drop the connection.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest `CONNECT <port>\n` line we wait for.
const MAX_CONNECT_LINE: usize = 32;
/// Host ports given to host-initiated connections start here (above well-known ports).
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// At most this many malformed-packet messages per device, so a hostile guest cannot
/// flood the VMM's log.
const MAX_LOGGED_ERRORS: u32 = 16;
/// Control packets (RSTs, mostly) waiting for the guest's RX buffers. A guest that sends
/// packets but never reads could otherwise grow the queue without end; beyond the bound
/// new ones are dropped (the guest gets no answer it was not reading anyway).
pub const MAX_CONTROL: usize = 1024;
/// Connections the guest may open to host ports at once (each is a host socket); a
/// further request is refused with RST.
pub const MAX_GUEST_CONNECTIONS: usize = 1024;

const TOKEN_STOP: u64 = 0;
const TOKEN_RX: u64 = 1;
const TOKEN_TX: u64 = 2;
const TOKEN_EVENT: u64 = 3;
const TOKEN_LISTENER: u64 = 4;
/// Host socket tokens are their file descriptor plus this.
const TOKEN_FD_BASE: u64 = 16;

/// (host port, guest port)
type ConnKey = (u32, u32);

/// A host client that has connected but not yet sent its whole `CONNECT` line.
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
}

pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    memory: GuestMemoryMmap,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    interrupt: Arc<Interrupt>,
    stop: EventFd,
    conns: HashMap<ConnKey, Connection>,
    fd_to_conn: HashMap<RawFd, ConnKey>,
    handshakes: HashMap<RawFd, Handshake>,
    /// Packets for the guest that belong to no connection (RST replies).
    control: VecDeque<Header>,
    /// Connections with something for the guest, each at most once.
    rx_ready: VecDeque<ConnKey>,
    rx_ready_set: HashSet<ConnKey>,
    next_local_port: u32,
    logged_errors: u32,
    /// After a transport reset, host connections wait (in the listener's backlog) until
    /// the guest has handled the reset, or this deadline: a connection accepted earlier
    /// would be reset along with the old ones.
    reset_pending_until: Option<Instant>,
}

impl Muxer {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        guest_cid: u64,
        uds_path: PathBuf,
        listener: UnixListener,
        memory: GuestMemoryMmap,
        queues: Vec<Queue>,
        queue_events: Vec<EventFd>,
        interrupt: Arc<Interrupt>,
        stop: EventFd,
    ) -> std::io::Result<Muxer> {
        let epoll = Epoll::new()?;
        let add = |fd: RawFd, token: u64| epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token));
        add(stop.as_raw_fd(), TOKEN_STOP)?;
        add(queue_events[RX_QUEUE].as_raw_fd(), TOKEN_RX)?;
        add(queue_events[TX_QUEUE].as_raw_fd(), TOKEN_TX)?;
        add(queue_events[EVENT_QUEUE].as_raw_fd(), TOKEN_EVENT)?;
        listener.set_nonblocking(true)?;
        add(listener.as_raw_fd(), TOKEN_LISTENER)?;
        Ok(Muxer {
            guest_cid,
            uds_path,
            listener,
            epoll,
            memory,
            queues,
            queue_events,
            interrupt,
            stop,
            conns: HashMap::new(),
            fd_to_conn: HashMap::new(),
            handshakes: HashMap::new(),
            control: VecDeque::new(),
            rx_ready: VecDeque::new(),
            rx_ready_set: HashSet::new(),
            next_local_port: FIRST_LOCAL_PORT,
            logged_errors: 0,
            reset_pending_until: None,
        })
    }

    /// Runs until the stop eventfd is signalled. `announce_reset`: the device was restored
    /// from a snapshot, and the guest is first told that its connections are gone.
    pub fn run(mut self, announce_reset: bool) {
        let mut events = vec![EpollEvent::default(); 64];
        if announce_reset {
            self.send_transport_reset();
        }
        // Buffers the guest may have queued before we started.
        self.process_tx();
        self.fill_rx();
        loop {
            let timeout = self
                .next_deadline()
                .map_or(-1, |d| d.saturating_duration_since(Instant::now()).as_millis().min(i32::MAX as u128) as i32);
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    eprintln!("nestbox-vmm: vsock: epoll failed, device stops: {e}");
                    return;
                }
            };
            let mut tx_kicked = false;
            for event in &events[..n] {
                match event.data() {
                    TOKEN_STOP => {
                        let _ = self.stop.read();
                        return;
                    }
                    TOKEN_RX => {
                        let _ = self.queue_events[RX_QUEUE].read();
                    }
                    TOKEN_TX => {
                        let _ = self.queue_events[TX_QUEUE].read();
                        tx_kicked = true;
                    }
                    TOKEN_EVENT => {
                        // Event buffers are only used for transport resets after a restore;
                        // the guest gives the buffer back once it has handled the reset.
                        let _ = self.queue_events[EVENT_QUEUE].read();
                        self.end_reset_wait();
                    }
                    TOKEN_LISTENER => self.accept_host_connections(),
                    token => self.on_host_socket(token.saturating_sub(TOKEN_FD_BASE) as RawFd, event.event_set()),
                }
            }
            if tx_kicked {
                self.process_tx();
            }
            if self.reset_pending_until.is_some_and(|d| d <= Instant::now()) {
                self.end_reset_wait();
            }
            self.expire_closing();
            self.fill_rx();
        }
    }

    /// Puts VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on the event queue: the guest resets
    /// every connection (the host ends of them did not survive the snapshot) and keeps
    /// its listening sockets.
    fn send_transport_reset(&mut self) {
        const TRANSPORT_RESET: u32 = 0;
        let memory = self.memory.clone();
        let Some(mut chain) = self.queues[EVENT_QUEUE].pop_descriptor_chain(&memory) else {
            self.log_guest_error(format_args!("no event buffer for the transport reset"));
            return;
        };
        let head = chain.head_index();
        let written = match chain.next() {
            Some(desc) if desc.is_write_only() && desc.len() >= 4 => {
                memory.write_obj(TRANSPORT_RESET.to_le(), desc.addr()).map(|()| 4).unwrap_or(0)
            }
            _ => 0,
        };
        let _ = self.queues[EVENT_QUEUE].add_used(&memory, head, written);
        self.notify_guest(EVENT_QUEUE);
        if written > 0
            && self.epoll.ctl(ControlOperation::Delete, self.listener.as_raw_fd(), EpollEvent::default()).is_ok()
        {
            self.reset_pending_until = Some(Instant::now() + RESET_ACK_TIMEOUT);
        }
    }

    fn log_guest_error(&mut self, what: std::fmt::Arguments<'_>) {
        if self.logged_errors < MAX_LOGGED_ERRORS {
            self.logged_errors += 1;
            eprintln!("nestbox-vmm: vsock: {what}");
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.conns
            .values()
            .filter_map(|c| match c.state {
                State::Closing { deadline } => Some(deadline),
                _ => None,
            })
            .chain(self.reset_pending_until)
            .min()
    }

    /// Host connections are accepted again (they waited in the listener's backlog).
    fn end_reset_wait(&mut self) {
        if self.reset_pending_until.take().is_some() {
            let listener = EpollEvent::new(EventSet::IN, TOKEN_LISTENER);
            if let Err(e) = self.epoll.ctl(ControlOperation::Add, self.listener.as_raw_fd(), listener) {
                self.log_guest_error(format_args!("cannot listen for host connections again: {e}"));
            }
        }
    }

    fn expire_closing(&mut self) {
        let now = Instant::now();
        let expired: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| matches!(c.state, State::Closing { deadline } if deadline <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            self.reset(key);
        }
    }

    // ---- host side ----

    fn accept_host_connections(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    let interest = EpollEvent::new(EventSet::IN | EventSet::READ_HANG_UP, TOKEN_FD_BASE + fd as u64);
                    if self.epoll.ctl(ControlOperation::Add, fd, interest).is_ok() {
                        self.handshakes.insert(fd, Handshake { stream, line: Vec::new() });
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    fn on_host_socket(&mut self, fd: RawFd, events: EventSet) {
        if self.handshakes.contains_key(&fd) {
            self.continue_handshake(fd);
            return;
        }
        let Some(&key) = self.fd_to_conn.get(&fd) else { return };
        let Some(conn) = self.conns.get_mut(&key) else { return };
        if events.contains(EventSet::HANG_UP) || events.contains(EventSet::ERROR) {
            conn.host_hung_up(Instant::now() + CLOSE_TIMEOUT);
        } else if events.intersects(EventSet::IN | EventSet::READ_HANG_UP) {
            conn.host_readable = true;
        }
        if events.contains(EventSet::OUT) && conn.flush_to_host() == GuestAction::Reset {
            self.reset(key);
            return;
        }
        self.schedule(key);
    }

    fn continue_handshake(&mut self, fd: RawFd) {
        let Some(hs) = self.handshakes.get_mut(&fd) else { return };
        let mut buf = [0u8; MAX_CONNECT_LINE];
        let done = loop {
            match hs.stream.read(&mut buf) {
                Ok(0) => break Err(()),
                Ok(n) => {
                    hs.line.extend_from_slice(&buf[..n]);
                    if hs.line.contains(&b'\n') {
                        break Ok(());
                    }
                    if hs.line.len() > MAX_CONNECT_LINE {
                        break Err(());
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(_) => break Err(()),
            }
        };
        let Some(hs) = self.handshakes.remove(&fd) else { return };
        let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
        let Ok(()) = done else { return };
        let newline = hs.line.iter().position(|&b| b == b'\n').unwrap_or(hs.line.len());
        let port = std::str::from_utf8(&hs.line[..newline])
            .ok()
            .and_then(|l| l.trim_end_matches('\r').strip_prefix("CONNECT "))
            .and_then(|p| p.trim().parse::<u32>().ok());
        // A malformed line: the stream is dropped, which the client sees as EOF.
        let Some(peer_port) = port else { return };
        let early = hs.line[newline + 1..].to_vec();
        let local_port = self.allocate_local_port(peer_port);
        let conn = Connection::from_host(hs.stream, local_port, peer_port, self.guest_cid, early);
        self.add_connection(conn);
    }

    fn allocate_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self.next_local_port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&(port, peer_port)) {
                return port;
            }
        }
    }

    fn add_connection(&mut self, conn: Connection) {
        let key = (conn.local_port, conn.peer_port);
        let fd = conn.stream.as_raw_fd();
        // Edge-triggered: the connection remembers readability, so a stream the guest has
        // no credit or buffers for does not wake the loop over and over.
        let interest = EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        if self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(interest, TOKEN_FD_BASE + fd as u64)).is_err() {
            return;
        }
        self.fd_to_conn.insert(fd, key);
        self.conns.insert(key, conn);
        self.schedule(key);
    }

    fn remove(&mut self, key: ConnKey) -> Option<Connection> {
        let conn = self.conns.remove(&key)?;
        let fd = conn.stream.as_raw_fd();
        let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
        self.fd_to_conn.remove(&fd);
        Some(conn)
    }

    /// Drops the connection and tells the guest with RST.
    fn reset(&mut self, key: ConnKey) {
        if let Some(conn) = self.remove(key) {
            push_bounded(
                &mut self.control,
                Header {
                    src_cid: HOST_CID,
                    dst_cid: self.guest_cid,
                    src_port: conn.local_port,
                    dst_port: conn.peer_port,
                    type_: TYPE_STREAM,
                    op: OP_RST,
                    ..Default::default()
                },
            );
        }
    }

    fn schedule(&mut self, key: ConnKey) {
        if self.rx_ready_set.insert(key) {
            self.rx_ready.push_back(key);
        }
    }

    // ---- guest side ----

    /// Takes every packet the guest queued for sending.
    fn process_tx(&mut self) {
        let memory = self.memory.clone();
        let mut used_any = false;
        while let Some(mut chain) = self.queues[TX_QUEUE].pop_descriptor_chain(&memory) {
            let head = chain.head_index();
            let parsed = VsockPacket::from_tx_virtq_chain(&memory, &mut chain, MAX_PAYLOAD)
                .map_err(|e| e.to_string())
                .and_then(|pkt| {
                    let header = Header::read_from(&pkt);
                    let mut data = vec![0u8; header.len as usize];
                    if header.len > 0 {
                        let slice = pkt.data_slice().ok_or("RW packet without a data buffer")?;
                        if (slice.len() as u64) < u64::from(header.len) {
                            return Err(format!("length {} beyond its {}-byte buffer", header.len, slice.len()));
                        }
                        slice
                            .subslice(0, data.len())
                            .and_then(|s| s.read_slice(&mut data, 0))
                            .map_err(|e| e.to_string())?;
                    }
                    Ok((header, data))
                });
            match parsed {
                Ok((header, data)) => self.on_guest_packet(header, &data),
                Err(e) => self.log_guest_error(format_args!("dropped a malformed packet from the guest: {e}")),
            }
            if self.queues[TX_QUEUE].add_used(&memory, head, 0).is_err() {
                self.log_guest_error(format_args!("TX used ring is not writable"));
            }
            used_any = true;
        }
        if used_any {
            self.notify_guest(TX_QUEUE);
        }
    }

    fn on_guest_packet(&mut self, h: Header, data: &[u8]) {
        if h.src_cid != self.guest_cid || h.dst_cid != HOST_CID || h.type_ != TYPE_STREAM {
            // Spoofed source, another destination, or a socket type we do not carry.
            if h.op != OP_RST {
                push_bounded(&mut self.control, h.reset_reply());
            }
            return;
        }
        let key = (h.dst_port, h.src_port);
        let Some(conn) = self.conns.get_mut(&key) else {
            match h.op {
                OP_REQUEST => self.connect_guest_to_host(&h),
                OP_RST => {}
                _ => push_bounded(&mut self.control, h.reset_reply()),
            }
            return;
        };
        match conn.on_guest_packet(&h, data) {
            GuestAction::Continue => self.schedule(key),
            GuestAction::Reset => self.reset(key),
            GuestAction::Drop => drop(self.remove(key)),
        }
    }

    /// The guest connects to host port P: connect to `<uds_path>_P`.
    fn connect_guest_to_host(&mut self, request: &Header) {
        if self.conns.len() >= MAX_GUEST_CONNECTIONS {
            self.log_guest_error(format_args!("refused a connection: {MAX_GUEST_CONNECTIONS} already open"));
            push_bounded(&mut self.control, request.reset_reply());
            return;
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", request.dst_port));
        match UnixStream::connect(&path).and_then(|s| s.set_nonblocking(true).map(|()| s)) {
            Ok(stream) => self.add_connection(Connection::from_guest(stream, request, self.guest_cid)),
            Err(_) => push_bounded(&mut self.control, request.reset_reply()),
        }
    }

    /// Fills guest RX buffers: control packets first, then connections in turn.
    fn fill_rx(&mut self) {
        let memory = self.memory.clone();
        let mut used_any = false;
        let mut payload = vec![0u8; MAX_PAYLOAD as usize];
        loop {
            let (conn_key, control) = if let Some(h) = self.control.pop_front() {
                (None, Some(h))
            } else if let Some(key) = self.rx_ready.pop_front() {
                self.rx_ready_set.remove(&key);
                (Some(key), None)
            } else {
                break;
            };
            if let Some(key) = conn_key {
                if !self.conns.get(&key).is_some_and(|c| c.has_rx_work()) {
                    continue;
                }
            }
            let Some(mut chain) = self.queues[RX_QUEUE].pop_descriptor_chain(&memory) else {
                // No buffers: put the work back and wait for the guest to add some.
                match (control, conn_key) {
                    (Some(h), _) => self.control.push_front(h),
                    (None, Some(key)) => {
                        if self.rx_ready_set.insert(key) {
                            self.rx_ready.push_front(key);
                        }
                    }
                    (None, None) => {}
                }
                break;
            };
            let head = chain.head_index();
            let mut pkt = match VsockPacket::from_rx_virtq_chain(&memory, &mut chain, MAX_PAYLOAD) {
                Ok(pkt) => pkt,
                Err(e) => {
                    self.log_guest_error(format_args!("unusable RX buffer from the guest: {e}"));
                    let _ = self.queues[RX_QUEUE].add_used(&memory, head, 0);
                    used_any = true;
                    if let Some(h) = control {
                        self.control.push_front(h);
                    } else if let Some(key) = conn_key {
                        self.schedule(key);
                    }
                    continue;
                }
            };
            let room = pkt.data_slice().map_or(0, |s| s.len()).min(payload.len());
            let header = match (control, conn_key) {
                (Some(h), _) => Some(h),
                (None, Some(key)) => self.conns.get_mut(&key).and_then(|c| c.next_rx_packet(&mut payload[..room])),
                (None, None) => None,
            };
            let Some(header) = header else {
                // Nothing to send after all (the host stream had no data): give the
                // buffer back unused.
                self.queues[RX_QUEUE].go_to_previous_position();
                continue;
            };
            let mut ok = true;
            if header.len > 0 {
                ok = pkt.data_slice().is_some_and(|s| s.write_slice(&payload[..header.len as usize], 0).is_ok());
            }
            header.write_to(&mut pkt);
            let used_len = if ok { PKT_HEADER_SIZE as u32 + header.len } else { 0 };
            let _ = self.queues[RX_QUEUE].add_used(&memory, head, used_len);
            used_any = true;
            if let Some(key) = conn_key {
                if self.conns.get(&key).is_some_and(|c| c.has_rx_work()) {
                    self.schedule(key);
                }
            }
        }
        if used_any {
            self.notify_guest(RX_QUEUE);
        }
    }

    fn notify_guest(&mut self, queue: usize) {
        if self.queues[queue].needs_notification(&self.memory).unwrap_or(true) {
            if let Err(e) = self.interrupt.signal_used_queue() {
                self.log_guest_error(format_args!("cannot interrupt the guest: {e}"));
            }
        }
    }
}

/// Queues a control packet unless [`MAX_CONTROL`] are already waiting.
pub(super) fn push_bounded(control: &mut VecDeque<Header>, packet: Header) {
    if control.len() < MAX_CONTROL {
        control.push_back(packet);
    }
}
