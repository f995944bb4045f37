//! UpdateInterface: the guest interface moved into the pod's network namespace and
//! configured there (Kata agent's `update_interface` as the model): down, renamed, MAC and
//! MTU set, addresses replaced (the kernel's IPv6 link-local kept), up; answered as the
//! kernel then reports it.

use std::os::fd::BorrowedFd;

use nestbox_protocols::types::{self, IPFamily};

use super::device::{self, Found};
use super::request::{format_lladdr, is_ipv6_link_local, InterfaceSpec};
use super::rtnl::{self, Link};
use super::socket::Netlink;
use crate::error::{invalid, AgentError};

fn step<T>(what: impl FnOnce() -> String, r: std::io::Result<T>) -> Result<T, AgentError> {
    r.map_err(|e| AgentError::internal(&what(), e))
}

/// Checks what the found interface can take before anything changes: the MTU within the
/// device's bounds.
fn check_fits(spec: &InterfaceSpec, link: &Link) -> Result<(), AgentError> {
    if let (Some(mtu), Some((min, max))) = (spec.mtu, link.mtu_range) {
        if !(min..=max).contains(&mtu) {
            return Err(invalid(format!("interface.mtu {mtu}: {} takes {min} to {max}", link.name)));
        }
    }
    Ok(())
}

/// Moves `link` from the agent's namespace into the pod's, down first (a move takes it
/// down anyway); returns it as the pod's socket sees it (its index may change).
fn move_into_pod(
    agent: &mut Netlink,
    pod: &mut Netlink,
    netns: BorrowedFd<'_>,
    link: &Link,
) -> Result<Link, AgentError> {
    step(|| format!("setting {} down", link.name), rtnl::set_up(agent, link.index, false))?;
    step(|| format!("moving {} into the pod's network namespace", link.name), rtnl::move_to(agent, link.index, netns))?;
    step(|| format!("looking up {} in the pod's network namespace", link.name), rtnl::link_by_name(pod, &link.name))?
        .ok_or_else(|| {
            AgentError::Internal(format!("{} moved into the pod's network namespace is not there", link.name))
        })
}

/// Name, MAC and MTU, with the interface down (a MAC cannot change on a running one).
fn set_link(nl: &mut Netlink, spec: &InterfaceSpec, link: &Link) -> Result<(), AgentError> {
    if link.up {
        step(|| format!("setting {} down", link.name), rtnl::set_up(nl, link.index, false))?;
    }
    if link.name != spec.name {
        let what = || format!("renaming {} to {}", link.name, spec.name);
        step(what, rtnl::rename(nl, link.index, &spec.name))?;
    }
    if let Some(mac) = spec.mac.filter(|m| m.0[..] != link.mac[..]) {
        step(|| format!("setting the MAC of {} to {mac}", spec.name), rtnl::set_mac(nl, link.index, &mac.0))?;
    }
    if let Some(mtu) = spec.mtu.filter(|m| *m != link.mtu) {
        step(|| format!("setting the MTU of {} to {mtu}", spec.name), rtnl::set_mtu(nl, link.index, mtu))?;
    }
    Ok(())
}

/// Makes the interface's addresses those asked for: the others removed (but for IPv6
/// link-local ones, which the kernel made and IPv6 needs), then each added or replaced.
/// Removed first, so that a new address in an old one's subnet does not become its
/// secondary.
fn replace_addresses(nl: &mut Netlink, spec: &InterfaceSpec, index: u32) -> Result<(), AgentError> {
    let name = &spec.name;
    let current = step(|| format!("listing the addresses of {name}"), rtnl::addresses(nl, index))?;
    for old in current.iter().filter(|a| !is_ipv6_link_local(&a.addr) && !spec.addresses.contains(a)) {
        match rtnl::del_address(nl, index, old) {
            // Removing a primary IPv4 address removes its secondaries with it.
            Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {}
            r => step(|| format!("removing address {old} from {name}"), r)?,
        }
    }
    for new in &spec.addresses {
        step(|| format!("adding address {new} to {name}"), rtnl::add_address(nl, index, new))?;
    }
    Ok(())
}

/// The interface as the kernel now reports it; IPv6 link-local addresses left out (the
/// kernel's, and present or not depending on when the link came up).
fn read_back(nl: &mut Netlink, name: &str) -> Result<types::Interface, AgentError> {
    let link = step(|| format!("reading {name} back"), rtnl::link_by_name(nl, name))?
        .ok_or_else(|| AgentError::Internal(format!("{name} vanished once configured")))?;
    let addresses = step(|| format!("reading the addresses of {name} back"), rtnl::addresses(nl, link.index))?;
    Ok(types::Interface {
        name: link.name.clone(),
        hw_addr: format_lladdr(&link.mac),
        mtu: u64::from(link.mtu),
        addresses: addresses
            .into_iter()
            .filter(|a| !is_ipv6_link_local(&a.addr))
            .map(|a| types::IPAddress {
                family: if a.addr.is_ipv4() { IPFamily::IP_FAMILY_V4 } else { IPFamily::IP_FAMILY_V6 }.into(),
                address: a.addr.to_string(),
                prefix_len: u32::from(a.prefix),
                ..Default::default()
            })
            .collect(),
        // Its current name: the answer, sent again, names the same interface.
        device: link.name,
        ..Default::default()
    })
}

/// Configures the interface `spec` names in the pod's namespace `netns`.
pub fn update(spec: &InterfaceSpec, netns: BorrowedFd<'_>) -> Result<types::Interface, AgentError> {
    let open = |r: std::io::Result<Netlink>, which: &str| r.map_err(|e| AgentError::internal(which, e));
    let mut agent = open(Netlink::open(), "netlink in the agent's network namespace")?;
    let mut pod = open(Netlink::open_in(netns), "netlink in the pod's network namespace")?;
    let link = match device::find(&mut agent, &mut pod, spec.device.as_deref(), &spec.name)? {
        Found::Agent(link) => {
            check_fits(spec, &link)?;
            move_into_pod(&mut agent, &mut pod, netns, &link)?
        }
        Found::InPlace(link) => {
            check_fits(spec, &link)?;
            link
        }
    };
    set_link(&mut pod, spec, &link)?;
    replace_addresses(&mut pod, spec, link.index)?;
    step(|| format!("setting {} up", spec.name), rtnl::set_up(&mut pod, link.index, true))?;
    read_back(&mut pod, &spec.name)
}
