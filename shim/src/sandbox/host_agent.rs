//! Test-only (cargo feature `host-agent`, off by default and in every release or package):
//! the "VMM" of a sandbox is `nestbox-agent` in host mode, a native process beside the
//! shim, so that a pod costs everything nestbox does except the guest kernel.
//!
//! The agent serves the same API and streams behind a hybrid vsock socket at the sandbox's
//! `vsock.sock` (`--hybrid-listen`: `CONNECT <port>`, as the VMM does), and binds the
//! sandbox's shared directory where CreateSandbox mounts the virtio-fs share
//! (`--shared-dir`), in a mount namespace of its own. Everything else of the shim runs as
//! in production: the same process supervision (the agent is spawned and reaped as the VMM
//! is), the same connect, CreateSandbox, containers, streams and stop. What is left out is
//! what has no host-mode meaning: templates (nothing to snapshot) and the guest's network
//! interface (the host-side tap is still made; the pod's containers get the agent's own
//! network namespace with loopback only).
//!
//! Why a build feature and not a setting: a shim that runs containers without a VM must
//! never be one configuration key away from production. The feature's binary is built
//! apart (its own target directory) by the benchmark, which installs it as
//! `containerd-shim-nestbox-host-v2`, and finds the agent next to it.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The host-mode agent's own API socket, in the sandbox's directory (short: sockets'
/// paths must fit in sun_path with the `.io` and `.pf` the agent adds).
const AGENT_SOCKET: &str = "ha.sock";

/// `nestbox-agent` beside the shim's own executable, else on PATH.
fn agent_binary() -> PathBuf {
    let beside = std::env::current_exe().ok().and_then(|exe| exe.parent().map(|dir| dir.join("nestbox-agent")));
    beside.filter(|p| p.is_file()).unwrap_or_else(|| PathBuf::from("nestbox-agent"))
}

/// The host-mode agent standing in for a VMM with these vsock socket and shared directory.
pub fn command(vsock_socket: &Path, shared_dir: &Path) -> Command {
    let dir = vsock_socket.parent().map(PathBuf::from).unwrap_or_default();
    let mut cmd = Command::new(agent_binary());
    cmd.arg("--listen")
        .arg(format!("unix://{}", dir.join(AGENT_SOCKET).display()))
        .arg("--hybrid-listen")
        .arg(format!("unix://{}", vsock_socket.display()))
        .arg("--shared-dir")
        .arg(shared_dir);
    cmd
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, VmSize};
    use crate::sandbox::vmm::VmmSpec;
    use crate::sandbox::SandboxPaths;

    #[test]
    fn the_vmm_command_is_the_host_mode_agent() {
        let config = Config::parse("", None).expect("the defaults");
        let paths = SandboxPaths::new(std::path::Path::new("/run/sb"), "pod1");
        let spec = VmmSpec::boot(&config, VmSize { vcpus: 1, memory_mib: 128 }, &paths);
        let cmd = spec.command();
        assert!(cmd.get_program().to_string_lossy().ends_with("nestbox-agent"), "{cmd:?}");
        let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(
            args,
            [
                "--listen",
                "unix:///run/sb/pod1/ha.sock",
                "--hybrid-listen",
                &format!("unix://{}", paths.vsock.display()),
                "--shared-dir",
                &paths.shared.display().to_string(),
            ]
        );
    }
}
