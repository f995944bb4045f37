//! Kata's tcfilter model: an ingress qdisc on CNI's veth and on the VM's tap, each with a
//! u32 match-all filter whose mirred action redirects every frame to the other's egress.
//! Frames pass between the two as they are: the guest's interface has the veth's MAC, so
//! nothing is rewritten, and no bridge or host routing is involved.

use super::error::{Context, NetworkError};
use futures_util::TryStreamExt;
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::tc::TcAttribute;
use rtnetlink::{Handle, LinkUnspec};

/// tc's "protocol all": ETH_P_ALL in network byte order, as tcm_info carries it.
const PROTOCOL_ALL: u16 = (libc::ETH_P_ALL as u16).to_be();
/// The ingress qdisc's handle (ffff:), the parent of its filters.
const INGRESS_PARENT: u32 = 0xffff_0000;

/// The index of interface `name`, if it exists.
pub async fn index_of(handle: &Handle, ctx: &Context, name: &str) -> Result<Option<u32>, NetworkError> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(link) => Ok(link.map(|l| l.header.index)),
        // The kernel answers a lookup of a missing name with ENODEV.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(ctx.error(format!("looking up interface {name}"), e)),
    }
}

/// The name of interface `index`, if it exists.
pub async fn name_of(handle: &Handle, index: u32) -> Option<String> {
    let link = handle.link().get().match_index(index).execute().try_next().await.ok()??;
    link.attributes.into_iter().find_map(|a| if let LinkAttribute::IfName(n) = a { Some(n) } else { None })
}

/// Gives the tap the veth's MTU and brings it up.
pub async fn tap_up(handle: &Handle, ctx: &Context, tap: &str, index: u32, mtu: u32) -> Result<(), NetworkError> {
    let message = LinkUnspec::new_with_index(index).mtu(mtu).up().build();
    handle
        .link()
        .set(message)
        .execute()
        .await
        .map_err(ctx.at(format!("setting {tap} (index {index}) up with MTU {mtu}")))
}

/// Deletes interface `name` (the tap: deleting it here, rather than leaving it to the
/// last close of its descriptor, makes its end not depend on a descriptor that a child
/// forked meanwhile by another thread holds until its exec). One already gone is no error.
pub async fn delete_link(handle: &Handle, ctx: &Context, name: &str, index: u32) -> Result<(), NetworkError> {
    match handle.link().del(index).execute().await {
        Ok(()) => Ok(()),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(()),
        Err(e) => Err(ctx.error(format!("deleting {name} (index {index})"), e)),
    }
}

/// Adds the ingress qdisc on `name` (`tc qdisc add dev NAME ingress`).
pub async fn add_ingress(handle: &Handle, ctx: &Context, name: &str, index: u32) -> Result<(), NetworkError> {
    handle
        .qdisc()
        .add(index as i32)
        .ingress()
        .execute()
        .await
        .map_err(ctx.at(format!("adding the ingress qdisc on {name} (index {index})")))
}

/// Deletes the ingress qdisc on `name`, and its filters with it; one that is not there
/// (the interface went, or it was never added) is no error.
pub async fn delete_ingress(handle: &Handle, ctx: &Context, name: &str, index: u32) -> Result<(), NetworkError> {
    let mut request = handle.qdisc().del(index as i32);
    let message = request.message_mut();
    message.header.parent = rtnetlink::packet_route::tc::TcHandle::INGRESS;
    message.header.handle = INGRESS_PARENT.into();
    message.attributes.push(TcAttribute::Kind("ingress".to_string()));
    match request.execute().await {
        Ok(()) => Ok(()),
        Err(rtnetlink::Error::NetlinkError(e))
            if [-libc::ENOENT, -libc::EINVAL, -libc::ENODEV].contains(&e.raw_code()) =>
        {
            Ok(())
        }
        Err(e) => Err(ctx.error(format!("deleting the ingress qdisc on {name} (index {index})"), e)),
    }
}

/// Redirects every frame arriving on `from` to the egress of `to`
/// (`tc filter add dev FROM parent ffff: protocol all u32 match u8 0 0 action mirred
/// egress redirect dev TO`).
pub async fn redirect(
    handle: &Handle,
    ctx: &Context,
    (from, from_index): (&str, u32),
    (to, to_index): (&str, u32),
) -> Result<(), NetworkError> {
    let step = format!("adding the redirect filter from {from} (index {from_index}) to {to} (index {to_index})");
    handle
        .traffic_filter(from_index as i32)
        .add()
        .parent(INGRESS_PARENT)
        .protocol(PROTOCOL_ALL)
        .redirect(to_index)
        .map_err(ctx.at(&step))?
        .execute()
        .await
        .map_err(ctx.at(step))
}
