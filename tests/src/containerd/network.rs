//! Pod networks for CRI tests that stay inside the test: containerd runs in a network
//! namespace the harness makes (as `run-critest` does), and CNI gives each pod a network
//! namespace of its own on a bridge in that namespace, with Debian's
//! containernetworking-plugins (bridge, host-local, portmap, loopback; `scripts/setup`).
//! No traffic reaches the host's interfaces; the namespace goes when the harness drops.
//!
//! A network namespace of the pod's own is kubelet's default, and what a nestbox pod needs
//! (a VM cannot share the host kernel's namespaces). Until nestbox has networking a nestbox
//! pod's guest has only its loopback; CNI's setup on the host side works anyway.

use crate::run_bounded;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Where Debian's containernetworking-plugins put the CNI plugins.
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";

/// A network namespace of the test's own (`ip netns add`), deleted on drop.
pub struct TestNetwork {
    name: String,
}

impl TestNetwork {
    /// Makes network namespace `name` with its loopback up; panics saying what is missing.
    pub fn create(name: &str) -> TestNetwork {
        for plugin in ["bridge", "host-local", "portmap", "loopback"] {
            let path = Path::new(CNI_BIN_DIR).join(plugin);
            assert!(path.exists(), "{} is missing: apt-get install containernetworking-plugins", path.display());
        }
        // portmap's teardown runs iptables even for pods without ports.
        assert!(Path::new("/usr/sbin/iptables").exists(), "iptables is missing: apt-get install iptables");
        let _ = ip(&["netns", "del", name]); // a namespace a killed run left behind
        ip(&["netns", "add", name]).unwrap_or_else(|e| panic!("ip netns add {name}: {e}"));
        let network = TestNetwork { name: name.to_string() };
        ip(&["-n", name, "link", "set", "lo", "up"]).unwrap_or_else(|e| panic!("lo up in {name}: {e}"));
        network
    }

    /// The namespace's file, for `nsenter --net=`.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// A command that runs `program` inside the namespace (its network only: mounts and
    /// everything else stay the test's).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path().display())).arg("--").arg(program);
        cmd
    }
}

impl Drop for TestNetwork {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("containerd harness: ip netns del {}: {e}", self.name);
        }
    }
}

/// The CNI network list: a bridge with host-local addresses (state in `ipam_dir`), portmap
/// for host ports, loopback. Written as CRI's `conf_dir` expects it.
pub fn cni_conflist(ipam_dir: &Path) -> String {
    serde_json::json!({
        "cniVersion": "0.4.0",
        "name": "nestbox-tests",
        "plugins": [
            {
                "type": "bridge", "bridge": "nbx0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
                "ipam": {
                    "type": "host-local", "dataDir": ipam_dir, "ranges": [[{"subnet": "10.99.0.0/16"}]],
                    "routes": [{"dst": "0.0.0.0/0"}]
                }
            },
            {"type": "portmap", "capabilities": {"portMappings": true}},
            {"type": "loopback"}
        ]
    })
    .to_string()
}

fn ip(args: &[&str]) -> Result<(), String> {
    match run_bounded(Command::new("ip").args(args), Duration::from_secs(30)) {
        Ok(f) if f.status.success() => Ok(()),
        Ok(f) => Err(f.stderr.trim().to_string()),
        Err(killed) => Err(format!("timed out: {}", killed.stderr.trim())),
    }
}
