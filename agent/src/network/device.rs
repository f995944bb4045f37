//! Which interface UpdateInterface configures.
//!
//! The rule: in the agent's own network namespace (the guest's, where the kernel made the
//! VM's virtio-net interface at boot), the interface named by `device`, or with no
//! `device` the one interface whose driver is virtio_net (`/sys/class/net/*/device/driver`;
//! none or several is an error naming them). Failing that, an interface already named
//! `name` in the pod's namespace is taken as the one an earlier call moved there, so a
//! repeated call (a shim retrying) configures it again rather than failing.

use std::io;
use std::path::Path;

use super::rtnl::{self, Link};
use super::socket::Netlink;
use crate::error::AgentError;

/// Where the interface was found.
pub enum Found {
    /// In the agent's namespace: it is to be moved into the pod's.
    Agent(Link),
    /// Already in the pod's namespace (an earlier call moved it).
    InPlace(Link),
}

/// The guest's sysfs view of its interfaces (the agent mounts /sys in its namespace).
const CLASS_NET: &str = "/sys/class/net";
const VIRTIO_NET: &str = "virtio_net";

/// The interfaces under `class_net` whose device's driver is virtio_net, sorted.
pub fn virtio_net_interfaces(class_net: &Path) -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(class_net)? {
        let entry = entry?;
        // Virtual interfaces (lo, veth, ...) have no `device` link: not an error.
        let Ok(driver) = std::fs::read_link(entry.path().join("device/driver")) else { continue };
        if driver.file_name().is_some_and(|d| d == VIRTIO_NET) {
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    Ok(names)
}

fn lookup(nl: &mut Netlink, name: &str, which: &str) -> Result<Option<Link>, AgentError> {
    rtnl::link_by_name(nl, name).map_err(|e| AgentError::internal(&format!("looking up {name} in {which}"), e))
}

/// The interface in the agent's namespace: `device`, or the virtio_net one. Err(why) when
/// there is none.
fn in_agent_namespace(agent: &mut Netlink, device: Option<&str>) -> Result<Result<Link, String>, AgentError> {
    let ns = "the agent's network namespace";
    if let Some(name) = device {
        return Ok(lookup(agent, name, ns)?.ok_or(format!("no interface {name} in {ns}")));
    }
    let found = virtio_net_interfaces(Path::new(CLASS_NET))
        .map_err(|e| AgentError::internal(&format!("listing {CLASS_NET}"), e))?;
    let name = match found.as_slice() {
        [] => return Ok(Err(format!("no virtio_net interface in the guest ({CLASS_NET}/*/device/driver)"))),
        [one] => one,
        several => {
            return Err(AgentError::FailedPrecondition(format!(
                "several virtio_net interfaces in the guest ({}): name the one to configure in Interface.device",
                several.join(", ")
            )))
        }
    };
    // sysfs shows the namespace it was mounted in: the agent's in a guest (PID 1 mounts
    // it), maybe not elsewhere (a host-mode agent entered into another namespace). The
    // same name with the same index is taken as the same interface.
    let index = std::fs::read_to_string(Path::new(CLASS_NET).join(name).join("ifindex"))
        .ok()
        .and_then(|i| i.trim().parse::<u32>().ok());
    Ok(match lookup(agent, name, ns)? {
        Some(link) if Some(link.index) == index => Ok(link),
        _ => Err(format!("the virtio_net interface {name} that {CLASS_NET} shows is not in {ns}")),
    })
}

/// Finds the interface to configure: in the agent's namespace (`agent`), else already in
/// the pod's (`pod`).
pub fn find(agent: &mut Netlink, pod: &mut Netlink, device: Option<&str>, name: &str) -> Result<Found, AgentError> {
    let here = in_agent_namespace(agent, device)?;
    let there = lookup(pod, name, "the pod's network namespace")?;
    match (here, there) {
        (Ok(link), None) => Ok(Found::Agent(link)),
        (Ok(link), Some(_)) => Err(AgentError::AlreadyExists(format!(
            "the pod's network namespace already has an interface {name}: {} cannot be moved there under that name",
            link.name
        ))),
        (Err(_), Some(link)) => Ok(Found::InPlace(link)),
        (Err(why), None) => {
            Err(AgentError::NotFound(format!("{why}, and none named {name} in the pod's network namespace")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtio_net_is_told_by_the_device_driver_link() {
        let sys = tempfile::tempdir().expect("tempdir");
        let drivers = sys.path().join("bus/virtio/drivers");
        for d in ["virtio_net", "virtio_blk", "e1000"] {
            std::fs::create_dir_all(drivers.join(d)).expect("mkdir");
        }
        let class = sys.path().join("class/net");
        for (ifname, driver) in [
            ("eth1", Some("virtio_net")),
            ("lo", None),
            ("vda0", Some("virtio_blk")),
            ("eth0", Some("virtio_net")),
            ("em0", Some("e1000")),
        ] {
            let dir = class.join(ifname);
            std::fs::create_dir_all(&dir).expect("mkdir");
            if let Some(driver) = driver {
                let device = sys.path().join("devices").join(ifname);
                std::fs::create_dir_all(&device).expect("mkdir");
                std::os::unix::fs::symlink(drivers.join(driver), device.join("driver")).expect("driver link");
                std::os::unix::fs::symlink(&device, dir.join("device")).expect("device link");
            }
        }
        assert_eq!(virtio_net_interfaces(&class).expect("listing"), ["eth0", "eth1"]);
        assert!(virtio_net_interfaces(&sys.path().join("missing")).is_err());
    }
}
