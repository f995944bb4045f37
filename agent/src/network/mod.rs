//! The pod's network in the guest (issue 13): the shim hands over what CNI made on the
//! host (an interface's MAC, MTU and addresses, routes, permanent neighbours) and the
//! agent gives it to the VM's virtio-net interface, moved into the pod's network
//! namespace. Kata's agent (network.rs, netlink.rs) is the model.
//!
//! rtnetlink is spoken synchronously (netlink-packet-route messages on a netlink-sys
//! socket, `socket`): the agent's calls are synchronous threads and it has no async
//! runtime, which rtnetlink's crate would bring (tokio) for a few requests per pod.
//!
//! Layers, one way: `request` (checks, typed values), `message` (the four rtnetlink
//! message kinds used) and `socket` (the netlink client), then `rtnl` (the requests), `device` (which interface), `interface` and `routes` (the
//! calls); this module holds the lock and the entry points.

mod device;
mod interface;
mod message;
mod request;
mod routes;
mod rtnl;
mod socket;

use std::os::fd::BorrowedFd;
use std::sync::{Mutex, MutexGuard};

use nestbox_protocols::types;

use crate::error::AgentError;
use socket::Netlink;

/// One network change at a time: a call reads the tables and changes them from what it
/// read, which another call's changes in between would make wrong.
static LOCK: Mutex<()> = Mutex::new(());

fn lock() -> MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The pod's network namespace, which every network call works in: before CreateSandbox
/// there is none, and the calls refuse rather than change the namespace the agent runs in
/// (in host mode, maybe the host's own).
fn pod_namespace<'a>(netns: Option<BorrowedFd<'a>>, call: &str) -> Result<BorrowedFd<'a>, AgentError> {
    netns.ok_or_else(|| {
        AgentError::FailedPrecondition(format!(
            "{call}: no sandbox yet: the pod's network namespace is made by CreateSandbox"
        ))
    })
}

/// UpdateInterface takes an interface from the agent's own namespace: in a guest, the
/// guest's, where the VM's interface is. A host-mode agent must be told which one: the
/// guest's rule (the virtio_net interface) would find a host's own network card.
fn named_in_host_mode(guest: bool, iface: &types::Interface) -> Result<(), AgentError> {
    match guest || !iface.device.is_empty() {
        true => Ok(()),
        false => Err(AgentError::FailedPrecondition(
            "UpdateInterface: host mode: name the interface in Interface.device (the guest's rule, its \
             virtio_net interface, would take a host's own network card)"
                .into(),
        )),
    }
}

fn pod_socket(netns: BorrowedFd<'_>) -> Result<Netlink, AgentError> {
    Netlink::open_in(netns).map_err(|e| AgentError::internal("netlink in the pod's network namespace", e))
}

/// UpdateInterface: `netns` is the pod's network namespace (None before CreateSandbox);
/// `guest`: the agent is the guest's init (not host mode).
pub fn update_interface(
    netns: Option<BorrowedFd<'_>>,
    iface: &types::Interface,
    guest: bool,
) -> Result<types::Interface, AgentError> {
    let spec = request::interface(iface)?;
    let netns = pod_namespace(netns, "UpdateInterface")?;
    named_in_host_mode(guest, iface)?;
    let _one = lock();
    interface::update(&spec, netns)
}

/// UpdateRoutes: the main table of the pod's namespace made to match `wanted`.
pub fn update_routes(netns: Option<BorrowedFd<'_>>, wanted: &types::Routes) -> Result<types::Routes, AgentError> {
    let specs = request::routes(&wanted.routes)?;
    let netns = pod_namespace(netns, "UpdateRoutes")?;
    let _one = lock();
    routes::update(&mut pod_socket(netns)?, &specs)
}

/// AddArpNeighbors: static neighbour entries added or replaced in the pod's namespace.
pub fn add_arp_neighbors(netns: Option<BorrowedFd<'_>>, neighbors: &[types::ARPNeighbor]) -> Result<(), AgentError> {
    let specs = neighbors.iter().enumerate().map(|(n, a)| request::neighbour(n, a)).collect::<Result<Vec<_>, _>>()?;
    let netns = pod_namespace(netns, "AddArpNeighbors")?;
    let _one = lock();
    routes::add_neighbours(&mut pod_socket(netns)?, &specs)
}
