//! What CNI made in the pod's network namespace, read over rtnetlink and turned into the
//! agent's messages: the interface (its name, MAC, MTU, addresses), the routes through it
//! and its permanent neighbours.

use super::error::{Context, NetworkError};
use futures_util::TryStreamExt;
use nestbox_protocols::types::{ARPNeighbor, IPAddress, IPFamily, Interface, Route};
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::{Handle, RouteMessageBuilder};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// CNI's interface in the pod's namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Veth {
    pub index: u32,
    pub name: String,
    pub mac: [u8; 6],
    pub mtu: u32,
}

/// What the guest is to have: sent as UpdateInterface, UpdateRoutes and AddArpNeighbors.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NetworkConfig {
    pub interface: Interface,
    pub routes: Vec<Route>,
    pub neighbors: Vec<ARPNeighbor>,
}

pub fn format_mac(mac: &[u8]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

fn name_of(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| if let LinkAttribute::IfName(n) = a { Some(n.as_str()) } else { None })
}

/// The namespace's one interface besides loopback (and a tap of ours): CNI's. With more
/// than one, the first (lowest index) is used and the others are logged as unsupported.
pub async fn find_veth(handle: &Handle, ctx: &Context, skip: &str) -> Result<Veth, NetworkError> {
    let step = "listing the interfaces";
    let mut links: Vec<LinkMessage> = handle.link().get().execute().try_collect().await.map_err(ctx.at(step))?;
    links.retain(|l| !l.header.flags.contains(LinkFlags::Loopback) && name_of(l) != Some(skip));
    links.sort_by_key(|l| l.header.index);
    let Some(link) = links.first() else {
        return Err(ctx.error(step, "no interface besides loopback (did CNI run for this pod?)"));
    };
    for other in &links[1..] {
        log::warn!(
            "pod network {}: interface {} (index {}) is not supported (one interface per pod): left out of the VM",
            ctx.netns.display(),
            name_of(other).unwrap_or("?"),
            other.header.index
        );
    }
    let index = link.header.index;
    let name =
        name_of(link).map(str::to_string).ok_or_else(|| ctx.error(step, format!("index {index} has no name")))?;
    let mut mac = None;
    let mut mtu = None;
    for a in &link.attributes {
        match a {
            LinkAttribute::Address(bytes) => mac = <[u8; 6]>::try_from(bytes.as_slice()).ok(),
            LinkAttribute::Mtu(m) => mtu = Some(*m),
            _ => {}
        }
    }
    let step = format!("reading interface {name} (index {index})");
    let mac = mac.ok_or_else(|| ctx.error(&step, "no Ethernet (6-byte) hardware address"))?;
    let mtu = mtu.ok_or_else(|| ctx.error(&step, "no MTU"))?;
    Ok(Veth { index, name, mac, mtu })
}

fn ip_address(ip: IpAddr, prefix_len: u8) -> IPAddress {
    let family = if ip.is_ipv4() { IPFamily::IP_FAMILY_V4 } else { IPFamily::IP_FAMILY_V6 };
    IPAddress { family: family.into(), address: ip.to_string(), prefix_len: prefix_len.into(), ..Default::default() }
}

fn is_ipv6_link_local(ip: &Ipv6Addr) -> bool {
    ip.segments()[0] & 0xffc0 == 0xfe80
}

/// The interface's addresses, IPv6 link-local ones left out (the guest's kernel makes its own).
pub async fn addresses(handle: &Handle, ctx: &Context, veth: &Veth) -> Result<Vec<IPAddress>, NetworkError> {
    let step = format!("listing the addresses of {}", veth.name);
    let messages: Vec<_> = handle
        .address()
        .get()
        .set_link_index_filter(veth.index)
        .execute()
        .try_collect()
        .await
        .map_err(ctx.at(&step))?;
    let mut addresses = Vec::new();
    for m in messages.iter().filter(|m| m.header.index == veth.index) {
        // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's on a
        // point-to-point link, and the same as IFA_LOCAL otherwise.
        let local =
            m.attributes.iter().find_map(|a| if let AddressAttribute::Local(ip) = a { Some(*ip) } else { None });
        let address =
            m.attributes.iter().find_map(|a| if let AddressAttribute::Address(ip) = a { Some(*ip) } else { None });
        match local.or(address) {
            Some(IpAddr::V6(ip)) if is_ipv6_link_local(&ip) => {}
            Some(ip) => addresses.push(ip_address(ip, m.header.prefix_len)),
            None => {}
        }
    }
    Ok(addresses)
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    }
}

/// One route of the main table as the agent takes it, if it is one to send: through the
/// interface, not a prefix route the kernel made for an address (the guest's kernel makes
/// it again), not an IPv6 link-local or multicast route.
fn route_of(m: &RouteMessage, veth: &Veth) -> Option<Route> {
    let table = m.attributes.iter().find_map(|a| if let RouteAttribute::Table(t) = a { Some(*t) } else { None });
    let main = u32::from(RouteHeader::RT_TABLE_MAIN);
    if table.unwrap_or(u32::from(m.header.table)) != main
        || m.header.kind != RouteType::Unicast
        || m.header.protocol == RouteProtocol::Kernel
    {
        return None;
    }
    let oif = m.attributes.iter().find_map(|a| if let RouteAttribute::Oif(i) = a { Some(*i) } else { None });
    if oif != Some(veth.index) {
        return None;
    }
    let find =
        |want: fn(&RouteAttribute) -> Option<&RouteAddress>| m.attributes.iter().find_map(want).and_then(route_ip);
    let dest = find(|a| if let RouteAttribute::Destination(d) = a { Some(d) } else { None });
    if let Some(IpAddr::V6(ip)) = dest {
        if is_ipv6_link_local(&ip) || ip.is_multicast() {
            return None;
        }
    }
    let gateway = find(|a| if let RouteAttribute::Gateway(g) = a { Some(g) } else { None });
    let source = find(|a| if let RouteAttribute::PrefSource(s) = a { Some(s) } else { None });
    let v4 = m.header.address_family == rtnetlink::packet_route::AddressFamily::Inet;
    let text = |ip: Option<IpAddr>| ip.map(|ip| ip.to_string()).unwrap_or_default();
    Some(Route {
        dest: dest.map(|d| format!("{d}/{}", m.header.destination_prefix_length)).unwrap_or_default(),
        gateway: text(gateway),
        device: veth.name.clone(),
        source: text(source),
        scope: u8::from(m.header.scope).into(),
        family: if v4 { IPFamily::IP_FAMILY_V4 } else { IPFamily::IP_FAMILY_V6 }.into(),
        ..Default::default()
    })
}

/// The main table's routes through the interface, IPv4 then IPv6 (see [`route_of`]).
pub async fn routes(handle: &Handle, ctx: &Context, veth: &Veth) -> Result<Vec<Route>, NetworkError> {
    let mut routes = Vec::new();
    for (family, query) in [
        ("IPv4", RouteMessageBuilder::<Ipv4Addr>::new().build()),
        ("IPv6", RouteMessageBuilder::<Ipv6Addr>::new().build()),
    ] {
        let step = format!("listing the {family} routes through {}", veth.name);
        let messages: Vec<RouteMessage> =
            handle.route().get(query).execute().try_collect().await.map_err(ctx.at(step))?;
        routes.extend(messages.iter().filter_map(|m| route_of(m, veth)));
    }
    // Routes without a gateway first: a gateway must be reachable (by one of them, or by a
    // prefix route of an address) when the route through it is added.
    routes.sort_by_key(|r| !r.gateway.is_empty());
    Ok(routes)
}

/// The interface's permanent neighbours (those CNI or an operator set; learnt ones the
/// guest learns again).
pub async fn neighbors(handle: &Handle, ctx: &Context, veth: &Veth) -> Result<Vec<ARPNeighbor>, NetworkError> {
    let step = format!("listing the neighbours of {}", veth.name);
    let messages: Vec<_> = handle.neighbours().get().execute().try_collect().await.map_err(ctx.at(step))?;
    let mut neighbors = Vec::new();
    for m in messages.iter().filter(|m| m.header.ifindex == veth.index && m.header.state == NeighbourState::Permanent) {
        let mut to_ip = None;
        let mut lladdr = None;
        for a in &m.attributes {
            match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => to_ip = Some(IpAddr::V4(*ip)),
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)) => to_ip = Some(IpAddr::V6(*ip)),
                NeighbourAttribute::LinkLayerAddress(mac) if mac.len() == 6 => lladdr = Some(format_mac(mac)),
                _ => {}
            }
        }
        let (Some(ip), Some(lladdr)) = (to_ip, lladdr) else { continue };
        let prefix = if ip.is_ipv4() { 32 } else { 128 };
        neighbors.push(ARPNeighbor {
            to_ip: Some(ip_address(ip, prefix)).into(),
            device: veth.name.clone(),
            lladdr,
            state: i32::from(u16::from(m.header.state)),
            flags: i32::from(m.header.flags.bits()),
            ..Default::default()
        });
    }
    Ok(neighbors)
}

/// The interface as the agent is to configure it (`device` empty: the guest's virtio-net).
pub fn interface(veth: &Veth, addresses: Vec<IPAddress>) -> Interface {
    Interface {
        name: veth.name.clone(),
        hw_addr: format_mac(&veth.mac),
        mtu: veth.mtu.into(),
        addresses,
        device: String::new(),
        ..Default::default()
    }
}
