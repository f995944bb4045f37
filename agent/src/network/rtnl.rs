//! The rtnetlink requests the network calls make, on a [`Netlink`] socket (which names the
//! namespace): links, addresses, routes of the main table, neighbours. Each returns the
//! kernel's errno as an `io::Error`; callers add what was being done.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, BorrowedFd};

use netlink_packet_core::{NLM_F_CREATE, NLM_F_REPLACE};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage, AddressScope};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::AddressFamily;

use super::message::*;
use super::request::{IpNet, NeighbourSpec};
use super::socket::Netlink;

/// An interface as the kernel reports it.
#[derive(Clone, Debug)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Vec<u8>,
    pub mtu: u32,
    /// The device's MTU bounds (IFLA_MIN_MTU, IFLA_MAX_MTU), where it reports them.
    pub mtu_range: Option<(u32, u32)>,
    pub up: bool,
}

fn link(m: LinkMessage) -> Link {
    let mut l =
        Link { index: m.header.index, name: String::new(), mac: Vec::new(), mtu: 0, mtu_range: None, up: false };
    let (mut min, mut max) = (None, None);
    l.up = m.header.flags.contains(LinkFlags::Up);
    for a in m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name = n,
            LinkAttribute::Address(a) => l.mac = a,
            LinkAttribute::Mtu(n) => l.mtu = n,
            LinkAttribute::MinMtu(n) => min = Some(n),
            LinkAttribute::MaxMtu(n) => max = Some(n),
            _ => {}
        }
    }
    l.mtu_range = min.zip(max);
    l
}

pub fn links(nl: &mut Netlink) -> io::Result<Vec<Link>> {
    let answer = nl.dump(Message::new(RTM_GETLINK, Body::Link(LinkMessage::default())))?;
    Ok(answer
        .into_iter()
        .filter_map(|m| match m {
            Message { body: Body::Link(m), .. } => Some(link(m)),
            _ => None,
        })
        .collect())
}

/// The interface named `name`, None when there is none (ENODEV).
pub fn link_by_name(nl: &mut Netlink, name: &str) -> io::Result<Option<Link>> {
    let mut m = LinkMessage::default();
    m.attributes.push(LinkAttribute::IfName(name.to_string()));
    match nl.request(Message::new(RTM_GETLINK, Body::Link(m)), 0) {
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(e),
        Ok(answer) => Ok(answer.into_iter().find_map(|m| match m {
            Message { body: Body::Link(m), .. } => Some(link(m)),
            _ => None,
        })),
    }
}

fn set_link(nl: &mut Netlink, index: u32, attributes: Vec<LinkAttribute>, up: Option<bool>) -> io::Result<()> {
    let mut m = LinkMessage::default();
    m.header.index = index;
    if let Some(up) = up {
        m.header.change_mask = LinkFlags::Up;
        m.header.flags = if up { LinkFlags::Up } else { LinkFlags::empty() };
    }
    m.attributes = attributes;
    nl.request(Message::new(RTM_SETLINK, Body::Link(m)), 0).map(drop)
}

pub fn set_up(nl: &mut Netlink, index: u32, up: bool) -> io::Result<()> {
    set_link(nl, index, Vec::new(), Some(up))
}

pub fn rename(nl: &mut Netlink, index: u32, name: &str) -> io::Result<()> {
    set_link(nl, index, vec![LinkAttribute::IfName(name.to_string())], None)
}

pub fn set_mac(nl: &mut Netlink, index: u32, mac: &[u8]) -> io::Result<()> {
    set_link(nl, index, vec![LinkAttribute::Address(mac.to_vec())], None)
}

pub fn set_mtu(nl: &mut Netlink, index: u32, mtu: u32) -> io::Result<()> {
    set_link(nl, index, vec![LinkAttribute::Mtu(mtu)], None)
}

/// Moves the interface into the network namespace `netns` (IFLA_NET_NS_FD).
pub fn move_to(nl: &mut Netlink, index: u32, netns: BorrowedFd<'_>) -> io::Result<()> {
    set_link(nl, index, vec![LinkAttribute::NetNsFd(netns.as_raw_fd())], None)
}

fn family(addr: &IpAddr) -> AddressFamily {
    if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

/// The addresses of interface `index`.
pub fn addresses(nl: &mut Netlink, index: u32) -> io::Result<Vec<IpNet>> {
    let answer = nl.dump(Message::new(RTM_GETADDR, Body::Address(AddressMessage::default())))?;
    let mut out = Vec::new();
    for m in answer {
        let Message { body: Body::Address(m), .. } = m else { continue };
        if m.header.index != index {
            continue;
        }
        // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's on a
        // point-to-point link, and the same as IFA_LOCAL otherwise (IPv6: only IFA_ADDRESS).
        let (mut local, mut address) = (None, None);
        for a in m.attributes {
            match a {
                AddressAttribute::Local(ip) => local = Some(ip),
                AddressAttribute::Address(ip) => address = Some(ip),
                _ => {}
            }
        }
        if let Some(addr) = local.or(address) {
            out.push(IpNet { addr, prefix: m.header.prefix_len });
        }
    }
    Ok(out)
}

fn address_message(index: u32, net: &IpNet) -> AddressMessage {
    let mut m = AddressMessage::default();
    m.header.family = family(&net.addr);
    m.header.prefix_len = net.prefix;
    m.header.index = index;
    m.header.scope =
        if super::request::is_ipv6_link_local(&net.addr) { AddressScope::Link } else { AddressScope::Universe };
    m.attributes.push(AddressAttribute::Local(net.addr));
    m.attributes.push(AddressAttribute::Address(net.addr));
    m
}

/// Adds (or replaces) an address. IPv6 ones skip duplicate address detection: the
/// address is the pod's, already checked on the host by CNI, and a tentative address
/// would fail the pod's first connections for a second or more.
pub fn add_address(nl: &mut Netlink, index: u32, net: &IpNet) -> io::Result<()> {
    let mut m = address_message(index, net);
    if net.addr.is_ipv6() {
        m.attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    nl.request(Message::new(RTM_NEWADDR, Body::Address(m)), NLM_F_CREATE | NLM_F_REPLACE).map(drop)
}

pub fn del_address(nl: &mut Netlink, index: u32, net: &IpNet) -> io::Result<()> {
    nl.request(Message::new(RTM_DELADDR, Body::Address(address_message(index, net))), 0).map(drop)
}

/// A route of the main table as the kernel reports it.
#[derive(Clone, Debug)]
pub struct Route {
    pub dest: IpNet,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
    pub source: Option<IpAddr>,
    pub scope: u8,
    pub kernel: bool,
    /// What deleting it takes: the header and the attributes that identify it.
    message: RouteMessage,
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
        RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

fn route(m: RouteMessage) -> Option<Route> {
    let v4 = match m.header.address_family {
        AddressFamily::Inet => true,
        AddressFamily::Inet6 => false,
        _ => return None,
    };
    let mut table = u32::from(m.header.table);
    let any = if v4 { IpAddr::from([0u8; 4]) } else { IpAddr::from([0u8; 16]) };
    let mut message = RouteMessage::default();
    message.header = m.header.clone();
    let mut r = Route {
        dest: IpNet { addr: any, prefix: m.header.destination_prefix_length },
        gateway: None,
        oif: None,
        source: None,
        scope: m.header.scope.into(),
        kernel: m.header.protocol == RouteProtocol::Kernel,
        message,
    };
    for a in m.attributes {
        match &a {
            RouteAttribute::Destination(d) => r.dest.addr = route_ip(d)?,
            RouteAttribute::Gateway(g) => r.gateway = route_ip(g),
            RouteAttribute::PrefSource(s) => r.source = route_ip(s),
            RouteAttribute::Oif(i) => r.oif = Some(*i),
            RouteAttribute::Table(t) => table = *t,
            _ => {}
        }
        if matches!(
            a,
            RouteAttribute::Destination(_)
                | RouteAttribute::Gateway(_)
                | RouteAttribute::Oif(_)
                | RouteAttribute::Table(_)
                | RouteAttribute::Priority(_)
        ) {
            r.message.attributes.push(a);
        }
    }
    (table == u32::from(RouteHeader::RT_TABLE_MAIN)).then_some(r)
}

/// The routes of the main table, both families.
pub fn routes(nl: &mut Netlink) -> io::Result<Vec<Route>> {
    let answer = nl.dump(Message::new(RTM_GETROUTE, Body::Route(RouteMessage::default())))?;
    Ok(answer
        .into_iter()
        .filter_map(|m| match m {
            Message { body: Body::Route(m), .. } => route(m),
            _ => None,
        })
        .collect())
}

fn route_address(ip: IpAddr) -> RouteAddress {
    match ip {
        IpAddr::V4(a) => RouteAddress::Inet(a),
        IpAddr::V6(a) => RouteAddress::Inet6(a),
    }
}

/// What a route to add says: destination, gateway, interface, preferred source, scope.
pub struct NewRoute {
    pub dest: IpNet,
    pub gateway: Option<IpAddr>,
    pub oif: u32,
    pub source: Option<IpAddr>,
    pub scope: u8,
}

/// Adds a unicast route to the main table, replacing one with the same destination
/// (and metric 0), as `ip route replace` does; protocol "boot", as `ip route` sets.
pub fn add_route(nl: &mut Netlink, r: &NewRoute) -> io::Result<()> {
    let mut m = RouteMessage::default();
    m.header.address_family = family(&r.dest.addr);
    m.header.destination_prefix_length = r.dest.prefix;
    m.header.table = RouteHeader::RT_TABLE_MAIN;
    m.header.protocol = RouteProtocol::Boot;
    m.header.scope = RouteScope::from(r.scope);
    m.header.kind = RouteType::Unicast;
    if r.dest.prefix > 0 {
        m.attributes.push(RouteAttribute::Destination(route_address(r.dest.addr)));
    }
    if let Some(gw) = r.gateway {
        m.attributes.push(RouteAttribute::Gateway(route_address(gw)));
    }
    m.attributes.push(RouteAttribute::Oif(r.oif));
    if let Some(src) = r.source {
        m.attributes.push(RouteAttribute::PrefSource(route_address(src)));
    }
    nl.request(Message::new(RTM_NEWROUTE, Body::Route(m)), NLM_F_CREATE | NLM_F_REPLACE).map(drop)
}

pub fn del_route(nl: &mut Netlink, r: &Route) -> io::Result<()> {
    nl.request(Message::new(RTM_DELROUTE, Body::Route(r.message.clone())), 0).map(drop)
}

/// Adds (or replaces) a static neighbour entry on interface `index`.
pub fn add_neighbour(nl: &mut Netlink, index: u32, n: &NeighbourSpec) -> io::Result<()> {
    let mut m = NeighbourMessage::default();
    m.header.family = family(&n.ip);
    m.header.ifindex = index;
    m.header.state = NeighbourState::from(n.state);
    m.header.flags = NeighbourFlags::from_bits_retain(n.flags);
    m.header.kind = RouteType::Unicast;
    let to = match n.ip {
        IpAddr::V4(a) => NeighbourAddress::Inet(a),
        IpAddr::V6(a) => NeighbourAddress::Inet6(a),
    };
    m.attributes.push(NeighbourAttribute::Destination(to));
    m.attributes.push(NeighbourAttribute::LinkLayerAddress(n.mac.0.to_vec()));
    nl.request(Message::new(RTM_NEWNEIGH, Body::Neighbour(m)), NLM_F_CREATE | NLM_F_REPLACE).map(drop)
}
