//! UpdateRoutes and AddArpNeighbors in the pod's network namespace.
//!
//! UpdateRoutes makes the main table match the request: each route asked for added or
//! replaced (link-scope ones, without a gateway, first, so that the route to a gateway
//! exists before a route via it), then every other route removed, except those the kernel
//! keeps for itself: the prefix routes of the interfaces' addresses (proto kernel) and
//! IPv6 link-local and multicast routes.

use std::collections::HashMap;
use std::net::IpAddr;

use nestbox_protocols::types::{self, IPFamily};

use super::request::{is_ipv6_link_local, NeighbourSpec, RouteSpec, SCOPE_LINK, SCOPE_UNIVERSE};
use super::rtnl::{self, NewRoute, Route};
use super::socket::Netlink;
use crate::error::{invalid, AgentError};

/// The index of each interface a request names, in the request's order, looked up before
/// anything changes; an interface that is not in the namespace is NOT_FOUND naming the
/// field.
fn indexes<'a>(nl: &mut Netlink, names: impl Iterator<Item = (String, &'a str)>) -> Result<Vec<u32>, AgentError> {
    let mut known: HashMap<&str, u32> = HashMap::new();
    let mut out = Vec::new();
    for (field, name) in names {
        if let Some(index) = known.get(name) {
            out.push(*index);
            continue;
        }
        let link = rtnl::link_by_name(nl, name)
            .map_err(|e| AgentError::internal(&format!("looking up {field} {name}"), e))?
            .ok_or_else(|| {
                AgentError::NotFound(format!("{field} {name}: no such interface in the pod's network namespace"))
            })?;
        known.insert(name, link.index);
        out.push(link.index);
    }
    Ok(out)
}

/// A kernel error adding what the request asked for: the kernel refusing a well-formed
/// route (a gateway no route reaches, ...) is the request's fault.
fn refused(what: String, e: std::io::Error) -> AgentError {
    match e.raw_os_error() {
        Some(
            libc::EINVAL | libc::ENETUNREACH | libc::EHOSTUNREACH | libc::ENODEV | libc::ESRCH | libc::EADDRNOTAVAIL,
        ) => invalid(format!("{what}: the kernel refused it: {e}")),
        _ => AgentError::internal(&what, e),
    }
}

/// Routes the kernel makes and keeps: not the request's to remove.
fn kernels_own(r: &Route) -> bool {
    r.kernel || is_ipv6_link_local(&r.dest.addr) || r.dest.addr.is_multicast()
}

fn wanted(r: &Route, specs: &[(RouteSpec, u32)]) -> bool {
    specs.iter().any(|(s, oif)| s.dest == r.dest && s.gateway == r.gateway && Some(*oif) == r.oif)
}

pub fn update(nl: &mut Netlink, specs: &[RouteSpec]) -> Result<types::Routes, AgentError> {
    let index = indexes(nl, specs.iter().enumerate().map(|(n, s)| (format!("routes[{n}].device"), s.device.as_str())))?;
    let mut specs: Vec<(RouteSpec, u32)> = specs.iter().cloned().zip(index).collect();
    // Stable: the request's order within each group.
    specs.sort_by_key(|(s, _)| s.gateway.is_some());
    for (s, oif) in &specs {
        // `ip route`'s default: a route without a gateway that says nothing of its scope
        // reaches its destination on the link.
        let scope = if s.gateway.is_none() && s.v4 && s.scope == SCOPE_UNIVERSE { SCOPE_LINK } else { s.scope };
        let route = NewRoute { dest: s.dest, gateway: s.gateway, oif: *oif, source: s.source, scope };
        rtnl::add_route(nl, &route).map_err(|e| refused(format!("adding route {s}"), e))?;
    }
    let current = rtnl::routes(nl).map_err(|e| AgentError::internal("listing the pod's routes", e))?;
    for old in current.iter().filter(|r| !kernels_own(r) && !wanted(r, &specs)) {
        match rtnl::del_route(nl, old) {
            // Gone with another (a route through an interface whose address went).
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            r => r.map_err(|e| AgentError::internal(&format!("removing route {}", describe(old)), e))?,
        }
    }
    read_back(nl)
}

fn describe(r: &Route) -> String {
    let mut s = if r.dest.prefix == 0 { "default".to_string() } else { r.dest.to_string() };
    if let Some(gw) = r.gateway {
        s += &format!(" via {gw}");
    }
    if let Some(oif) = r.oif {
        s += &format!(" dev #{oif}");
    }
    s
}

/// The main table as it now is, less the IPv6 link-local and multicast routes the kernel
/// keeps (present or not depending on when links came up).
fn read_back(nl: &mut Netlink) -> Result<types::Routes, AgentError> {
    let names: HashMap<u32, String> = rtnl::links(nl)
        .map_err(|e| AgentError::internal("listing the pod's interfaces", e))?
        .into_iter()
        .map(|l| (l.index, l.name))
        .collect();
    let routes = rtnl::routes(nl).map_err(|e| AgentError::internal("reading the pod's routes back", e))?;
    let text = |ip: Option<IpAddr>| ip.map(|a| a.to_string()).unwrap_or_default();
    let routes = routes
        .into_iter()
        .filter(|r| !is_ipv6_link_local(&r.dest.addr) && !r.dest.addr.is_multicast())
        .map(|r| types::Route {
            dest: if r.dest.prefix == 0 { String::new() } else { r.dest.to_string() },
            gateway: text(r.gateway),
            device: r.oif.and_then(|i| names.get(&i).cloned()).unwrap_or_default(),
            source: text(r.source),
            scope: u32::from(r.scope),
            family: if r.dest.addr.is_ipv4() { IPFamily::IP_FAMILY_V4 } else { IPFamily::IP_FAMILY_V6 }.into(),
            ..Default::default()
        })
        .collect();
    Ok(types::Routes { routes, ..Default::default() })
}

pub fn add_neighbours(nl: &mut Netlink, specs: &[NeighbourSpec]) -> Result<(), AgentError> {
    let index =
        indexes(nl, specs.iter().enumerate().map(|(n, s)| (format!("neighbors[{n}].device"), s.device.as_str())))?;
    for (n, (s, index)) in specs.iter().zip(index).enumerate() {
        rtnl::add_neighbour(nl, index, s)
            .map_err(|e| refused(format!("neighbors[{n}]: adding {} lladdr {} dev {}", s.ip, s.mac, s.device), e))?;
    }
    Ok(())
}
