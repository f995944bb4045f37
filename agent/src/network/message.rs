//! The rtnetlink messages the network calls send and read: links, addresses, routes and
//! neighbours, with their message type. Not netlink-packet-route's `RouteNetlinkMessage`:
//! its parser and emitter take in every kind there is (traffic control, rules, statistics,
//! ...), which the static agent would carry for nothing.

use netlink_packet_core::{
    DecodeError, Emitable, NetlinkDeserializable, NetlinkHeader, NetlinkPayload, NetlinkSerializable, Parseable,
};
use netlink_packet_route::address::AddressMessage;
use netlink_packet_route::link::LinkMessage;
use netlink_packet_route::neighbour::NeighbourMessage;
use netlink_packet_route::route::RouteMessage;

// Message types (linux/rtnetlink.h).
pub const RTM_NEWLINK: u16 = 16;
pub const RTM_GETLINK: u16 = 18;
pub const RTM_SETLINK: u16 = 19;
pub const RTM_NEWADDR: u16 = 20;
pub const RTM_DELADDR: u16 = 21;
pub const RTM_GETADDR: u16 = 22;
pub const RTM_NEWROUTE: u16 = 24;
pub const RTM_DELROUTE: u16 = 25;
pub const RTM_GETROUTE: u16 = 26;
pub const RTM_NEWNEIGH: u16 = 28;

#[derive(Clone, Debug)]
pub enum Body {
    Link(LinkMessage),
    Address(AddressMessage),
    Route(RouteMessage),
    Neighbour(NeighbourMessage),
}

#[derive(Clone, Debug)]
pub struct Message {
    pub kind: u16,
    pub body: Body,
}

impl Message {
    pub fn new(kind: u16, body: Body) -> Message {
        Message { kind, body }
    }
}

impl NetlinkSerializable for Message {
    fn message_type(&self) -> u16 {
        self.kind
    }

    fn buffer_len(&self) -> usize {
        match &self.body {
            Body::Link(m) => m.buffer_len(),
            Body::Address(m) => m.buffer_len(),
            Body::Route(m) => m.buffer_len(),
            Body::Neighbour(m) => m.buffer_len(),
        }
    }

    fn serialize(&self, buffer: &mut [u8]) {
        match &self.body {
            Body::Link(m) => m.emit(buffer),
            Body::Address(m) => m.emit(buffer),
            Body::Route(m) => m.emit(buffer),
            Body::Neighbour(m) => m.emit(buffer),
        }
    }
}

impl NetlinkDeserializable for Message {
    type Error = DecodeError;

    /// The kernel's answers to the requests above; any other type is an error (none is
    /// expected on a socket that joined no multicast group).
    fn deserialize(header: &NetlinkHeader, payload: &[u8]) -> Result<Message, DecodeError> {
        let kind = header.message_type;
        let body = match kind {
            RTM_NEWLINK => Body::Link(LinkMessage::parse(payload)?),
            RTM_NEWADDR => Body::Address(AddressMessage::parse(payload)?),
            RTM_NEWROUTE => Body::Route(RouteMessage::parse(payload)?),
            RTM_NEWNEIGH => Body::Neighbour(NeighbourMessage::parse(payload)?),
            other => return Err(DecodeError::from(format!("unexpected rtnetlink message type {other}"))),
        };
        Ok(Message { kind, body })
    }
}

impl From<Message> for NetlinkPayload<Message> {
    fn from(message: Message) -> Self {
        NetlinkPayload::InnerMessage(message)
    }
}
