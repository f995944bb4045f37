//! The pod's CNI network carried into its VM (Kata's tcfilter model).
//!
//! containerd's CRI makes the pod's network namespace and runs CNI in it (a veth, `eth0`,
//! with the pod's address and routes) before it creates the pod's sandbox container. The
//! shim then, on a thread inside that namespace ([`netns`]):
//!
//! 1. reads CNI's interface, its MAC, MTU, addresses, routes and permanent neighbours
//!    ([`read`]);
//! 2. makes the VM's tap `tap0_nestbox` there ([`tap`]: non-persistent, so it goes with the
//!    last descriptor of it), with the veth's MTU, up;
//! 3. adds an ingress qdisc on both and a match-all filter each way that redirects every
//!    frame to the other's egress ([`tc`]).
//!
//! The VMM gets the tap's descriptor (`--net-tap-fd`) for its virtio-net device; the agent
//! gets the configuration ([`NetworkConfig`]) and gives the guest's interface the veth's
//! name, MAC and addresses, so frames pass unchanged. Nothing runs per packet in the shim.
//! Teardown (the pod stops, or a later start step failed) deletes the veth's ingress qdisc
//! and closes the tap.

mod error;
mod netns;
mod read;
mod tap;
mod tc;

pub use error::NetworkError;
pub use read::{format_mac, NetworkConfig, Veth};
pub use tap::TAP_NAME;

use netns::Netns;
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;

/// A pod's network as the shim made it: the tap (held open, which keeps it), the
/// redirects, and what the guest is to be told. Dropping it tears it down.
pub struct PodNetwork {
    netns: Netns,
    veth: Veth,
    tap: Option<File>,
    tap_index: u32,
    config: NetworkConfig,
    /// CRI port forwarding into the guest, once the VM is up (`forward_ports`).
    forwarder: Option<super::port_forward::PortForwarder>,
}

impl PodNetwork {
    /// Sets up the pod network in the namespace at `netns_path` (see the module's
    /// documentation). A failure names the step, the interface and the namespace, and
    /// leaves nothing made: the tap is closed (so gone) and the veth's qdisc deleted.
    pub fn setup(netns_path: &Path) -> Result<PodNetwork, NetworkError> {
        let started = std::time::Instant::now();
        let netns = Netns::open(netns_path)?;
        let (veth, tap, tap_index, config) = netns.run(|runtime, handle| {
            let ctx = &netns.ctx;
            let (veth, config) = runtime.block_on(async {
                let veth = read::find_veth(&handle, ctx, TAP_NAME).await?;
                let addresses = read::addresses(&handle, ctx, &veth).await?;
                let routes = read::routes(&handle, ctx, &veth).await?;
                let neighbors = read::neighbors(&handle, ctx, &veth).await?;
                if tc::index_of(&handle, ctx, TAP_NAME).await?.is_some() {
                    return Err(ctx.error(format!("creating tap {TAP_NAME}"), "it exists already (another shim's?)"));
                }
                let config = NetworkConfig { interface: read::interface(&veth, addresses), routes, neighbors };
                Ok((veth, config))
            })?;
            let tap = tap::open(TAP_NAME).map_err(ctx.at(format!("creating tap {TAP_NAME} on /dev/net/tun")))?;
            let mut made = Made::default();
            match runtime.block_on(redirect(&handle, ctx, &veth, &mut made)) {
                Ok(tap_index) => Ok((veth, tap, tap_index, config)),
                Err(e) => {
                    if let Err(undo) = runtime.block_on(undo(&handle, ctx, &veth, &made)) {
                        log::error!("undoing a failed pod network setup: {undo}");
                    }
                    Err(e)
                }
            }
        })?;
        let i = &config.interface;
        let addresses: Vec<String> = i.addresses.iter().map(|a| format!("{}/{}", a.address, a.prefix_len)).collect();
        log::info!(
            "pod network {}: {} ({}, MTU {}, addresses [{}]), {} routes, {} permanent neighbours; \
             {TAP_NAME} redirected to and from it by tc (ingress, u32 match-all, mirred); set up in {:.1} ms",
            netns_path.display(),
            veth.name,
            i.hw_addr,
            i.mtu,
            addresses.join(", "),
            config.routes.len(),
            config.neighbors.len(),
            started.elapsed().as_secs_f64() * 1000.0
        );
        Ok(PodNetwork { netns, veth, tap: Some(tap), tap_index, config, forwarder: None })
    }

    /// The tap's descriptor (close-on-exec in the shim; the VMM's spawn clears that flag in
    /// its child only). Valid for as long as this lives.
    pub fn tap_fd(&self) -> Option<RawFd> {
        self.tap.as_ref().map(|t| t.as_raw_fd())
    }

    /// What the guest is to be told (UpdateInterface, UpdateRoutes, AddArpNeighbors).
    pub fn config(&self) -> &NetworkConfig {
        &self.config
    }

    pub fn netns(&self) -> &Path {
        &self.netns.ctx.netns
    }

    /// Starts CRI port forwarding into pod `pod`'s guest, whose VMM serves hybrid vsock on
    /// `vsock_socket` (see `port_forward`). A pod works without it: a failure is logged
    /// with its reason, and only PortForward into this pod fails.
    pub fn forward_ports(&mut self, pod: &str, vsock_socket: &Path) {
        match super::port_forward::start(pod, self.netns.fd(), vsock_socket) {
            Ok(forwarder) => self.forwarder = Some(forwarder),
            Err(e) => log::warn!("{e}; CRI PortForward into this pod will fail"),
        }
    }

    /// One line naming what this network left in the namespace, for [`remove_stale`] after
    /// a shim that was killed: the namespace's path, the veth's name and index.
    pub fn record(&self) -> String {
        format!("{}\t{}\t{}\n", self.netns.ctx.netns.display(), self.veth.name, self.veth.index)
    }

    /// Deletes the tap and the veth's ingress qdisc (with its filter) if the veth is still
    /// there, and closes the tap's descriptor. Once.
    pub fn teardown(&mut self) -> Result<(), NetworkError> {
        drop(self.forwarder.take());
        let Some(tap) = self.tap.take() else { return Ok(()) };
        let veth = &self.veth;
        let made = Made { tap_index: Some(self.tap_index), veth_qdisc: true };
        let result = self.netns.run(|runtime, handle| runtime.block_on(undo(&handle, &self.netns.ctx, veth, &made)));
        drop(tap);
        if result.is_ok() {
            log::info!(
                "pod network {}: {TAP_NAME} and the ingress qdisc on {} removed",
                self.netns.ctx.netns.display(),
                veth.name
            );
        }
        result
    }
}

/// Removes what a pod network of a shim that is gone left (its [`PodNetwork::record`]): the
/// tap, if a VMM kept it, and the veth's ingress qdisc, while the namespace exists. A
/// namespace that is gone (containerd removed it) leaves nothing to do.
pub fn remove_stale(record: &str) -> Result<(), NetworkError> {
    let fields: Vec<&str> = record.trim_end_matches('\n').split('\t').collect();
    let (netns_path, name, index) = match fields[..] {
        [path, name, index] => (Path::new(path), name, index.parse::<u32>().ok()),
        _ => (Path::new(""), "", None),
    };
    let Some(index) = index else {
        return Err(error::Context::new(Path::new("?")).error("reading the record", format!("{record:?}")));
    };
    let netns = match Netns::open(netns_path) {
        Ok(netns) => netns,
        Err(_) if !netns_path.exists() => return Ok(()),
        Err(e) => return Err(e),
    };
    let veth = Veth { index, name: name.to_string(), mac: [0; 6], mtu: 0 };
    netns.run(|runtime, handle| {
        runtime.block_on(async {
            let tap_index = tc::index_of(&handle, &netns.ctx, TAP_NAME).await?;
            undo(&handle, &netns.ctx, &veth, &Made { tap_index, veth_qdisc: true }).await
        })
    })
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            log::error!("tearing down the pod network: {e}");
        }
    }
}

/// What setup made so far, for undoing it (the tap's qdisc and filter go with the tap).
#[derive(Default)]
struct Made {
    tap_index: Option<u32>,
    veth_qdisc: bool,
}

/// Step 2 and 3 after the tap exists: the tap up with the veth's MTU, both ingress qdiscs,
/// both redirects; the tap's index.
async fn redirect(
    handle: &rtnetlink::Handle,
    ctx: &error::Context,
    veth: &Veth,
    made: &mut Made,
) -> Result<u32, NetworkError> {
    let tap_index = tc::index_of(handle, ctx, TAP_NAME)
        .await?
        .ok_or_else(|| ctx.error(format!("finding tap {TAP_NAME}"), "not there after TUNSETIFF"))?;
    made.tap_index = Some(tap_index);
    tc::tap_up(handle, ctx, TAP_NAME, tap_index, veth.mtu).await?;
    tc::add_ingress(handle, ctx, &veth.name, veth.index).await?;
    made.veth_qdisc = true;
    tc::add_ingress(handle, ctx, TAP_NAME, tap_index).await?;
    tc::redirect(handle, ctx, (&veth.name, veth.index), (TAP_NAME, tap_index)).await?;
    tc::redirect(handle, ctx, (TAP_NAME, tap_index), (&veth.name, veth.index)).await?;
    Ok(tap_index)
}

/// Removes what `made` says was made. Each interface is checked by index and name first:
/// after CNI deleted the veth, another interface could have its index.
async fn undo(handle: &rtnetlink::Handle, ctx: &error::Context, veth: &Veth, made: &Made) -> Result<(), NetworkError> {
    if let Some(index) = made.tap_index {
        if tc::name_of(handle, index).await.as_deref() == Some(TAP_NAME) {
            tc::delete_link(handle, ctx, TAP_NAME, index).await?;
        }
    }
    if made.veth_qdisc && tc::name_of(handle, veth.index).await.as_deref() == Some(veth.name.as_str()) {
        tc::delete_ingress(handle, ctx, &veth.name, veth.index).await?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests;
