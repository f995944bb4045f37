//! One pod's sandbox: its directory `<sandboxes_dir>/<id>/`, its VMM, and the agent in
//! its guest.
//!
//! ```text
//! <sandboxes_dir>/<id>/     0700
//!   console.log    the guest's serial console (also forwarded to the shim's log)
//!   vmm.log        the VMM's own stderr
//!   vmm.pid        so a `delete` after a killed shim can find a VMM that outlived it
//!   vsock.sock     the VMM's hybrid vsock socket (agent API and standard streams)
//!   mounts/        host only: where the shim creates and mounts (see `share`)
//!     <cid>/rootfs   containers' root file systems
//!     <cid>/mounts/  and the files the spec binds from the host
//!   shared/        a read-only recursive bind of mounts/, exported to the guest over
//!                  virtio-fs and mounted there at /run/nestbox/shared
//! ```
//!
//! Cleanup (after a stop, a failed start, a dead VMM, or for a shim that is gone) is one
//! function, [`remove_dir`]: unmount everything below the directory per the kernel's
//! mount table, then delete it, through descriptors that follow no symlink.

pub mod agent;
mod beneath;
mod connect;
mod console;
mod error;
#[cfg(feature = "host-agent")]
mod host_agent;
pub mod jail;
pub mod mounts;
pub mod network;
mod paths;
pub mod port_forward;
mod share;
pub mod start_gate;
pub mod template;
pub mod vmm;

pub use beneath::Dir;
pub use error::SandboxError;
pub use paths::{remove_dir, validate_sandbox_id, BadSandboxId, CleanupError, SandboxPaths};

use crate::config::{Config, VmSize};
use agent::{Agent, AgentError};
use connect::connect;
use console::ConsoleTail;
use network::{NetworkConfig, PodNetwork};
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm::{Vmm, VmmSpec};

/// The least a restored guest's agent is given to answer. Alone it answers within a second
/// even on a software-nested host, but many pods restored at once share the host's cores
/// (their guest kernels run in KVM's emulator there): 50 at once on 2 cores did not answer
/// within 60 s, and every one then booted cold, which costs a guest ~60 times the CPU of a
/// restore (docs/guest-work.md). So a restore whose VMM still runs is given as long as a cold
/// boot would be (`agent.boot_timeout_secs`), and at least this; a restore the VMM refuses,
/// or whose guest dies, still falls back at once.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(60);

/// The caller's handler for an unexpected VMM exit, shared by a failed restore attempt
/// and the cold boot after it (only the VMM that serves the pod may run it).
type ExitHandler = Arc<Mutex<Option<Box<dyn FnOnce(ExitStatus) + Send>>>>;

/// A running sandbox.
pub struct Sandbox {
    pub id: String,
    pub paths: SandboxPaths,
    vmm: Vmm,
    agent: Agent,
    stopping: Arc<AtomicBool>,
    console: ConsoleTail,
    /// The pod's network on the host (tap, redirects), torn down at stop.
    network: Mutex<Option<PodNetwork>>,
}

impl Sandbox {
    /// Creates the sandbox's directory (and its shared directory), so containers' files
    /// can be mounted there before the VM starts.
    pub fn prepare(config: &Config, id: &str) -> Result<SandboxPaths, SandboxError> {
        let paths = SandboxPaths::of_pod(&config.sandboxes_dir, id)?;
        let dir_error = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SandboxError::Dir { path, source }
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.sandboxes_dir)
            .map_err(dir_error(&config.sandboxes_dir))?;
        let root = Dir::open_root(&config.sandboxes_dir).map_err(dir_error(&config.sandboxes_dir))?;
        let sandbox = match root.mkdir(id, 0o700) {
            Ok(sandbox) => sandbox,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(SandboxError::Exists { id: id.to_string(), path: paths.dir })
            }
            Err(e) => return Err(SandboxError::Dir { path: paths.dir, source: e }),
        };
        if let Err(e) = share::create(&sandbox) {
            let _ = remove_dir(&paths.dir);
            return Err(SandboxError::Share(e));
        }
        // A shared mount before anything is mounted below, so that what is (the pod's
        // rootfs, then its containers') also reaches the jailed VMM's mount namespace (in
        // the test-only host-agent build: the host agent's).
        if config.jail || cfg!(feature = "host-agent") {
            if let Err(e) = jail::share_mounts_below(&paths.shared) {
                let _ = remove_dir(&paths.dir);
                return Err(SandboxError::Dir { path: paths.shared.clone(), source: std::io::Error::other(e) });
            }
        }
        Ok(paths)
    }

    /// Starts the pod's VM on a prepared directory and waits for the agent: restored from
    /// the template of its shape when warm start is on (making the template first if there
    /// is none), booted cold otherwise or when that fails, with the reason logged. On
    /// failure the VMM is killed; the directory stays for the caller, who also owns what it
    /// mounted there. `on_vmm_exit` runs when the VMM ends other than through
    /// [`Sandbox::stop`]. The pod's `network`, if it has one, gives the VM its tap and the
    /// guest its configuration; the sandbox then owns it (a failed boot tears it down).
    pub fn boot(
        config: &Config,
        id: &str,
        size: VmSize,
        paths: SandboxPaths,
        network: Option<PodNetwork>,
        on_vmm_exit: Box<dyn FnOnce(ExitStatus) + Send>,
    ) -> Result<Sandbox, SandboxError> {
        // Until the agent has the sandbox: the guest's busiest part (making a template
        // included), bounded host-wide.
        let _slot = start_gate::enter(config, start_gate::StartKind::NewVm, &format!("sandbox {id}: VM start"));
        if let Some(network) = &network {
            std::fs::write(&paths.network, network.record())
                .map_err(|source| SandboxError::Dir { path: paths.network.clone(), source })?;
        }
        let sandbox = Sandbox::boot_with(config, id, size, paths, network.as_ref(), on_vmm_exit)?;
        let mut network = network;
        if let Some(network) = network.as_mut() {
            network.forward_ports(id, &sandbox.paths.vsock);
        }
        *sandbox.network.lock().unwrap_or_else(|e| e.into_inner()) = network;
        Ok(sandbox)
    }

    fn boot_with(
        config: &Config,
        id: &str,
        size: VmSize,
        paths: SandboxPaths,
        network: Option<&PodNetwork>,
        on_vmm_exit: Box<dyn FnOnce(ExitStatus) + Send>,
    ) -> Result<Sandbox, SandboxError> {
        let on_vmm_exit: ExitHandler = Arc::new(Mutex::new(Some(on_vmm_exit)));
        let net_tap_fd = network.and_then(PodNetwork::tap_fd);
        let guest_network = network.map(PodNetwork::config);
        // The host-agent test build has no guest to snapshot.
        if config.warm_start && !cfg!(feature = "host-agent") {
            match template::prepare(config, size, false) {
                Ok(template) => {
                    let spec = VmmSpec { net_tap_fd, ..VmmSpec::restore(config, size, &paths, &template) };
                    let timeout = config.boot_timeout.max(RESTORE_TIMEOUT);
                    match Sandbox::start(config, id, &spec, paths.clone(), timeout, guest_network, on_vmm_exit.clone())
                    {
                        Ok(sandbox) => return Ok(sandbox),
                        Err(e) => {
                            log::warn!(
                                "sandbox {id}: restoring template {} failed, booting cold: {e}",
                                template.display()
                            );
                            // The VMM refused the snapshot or the restored guest died: the
                            // template is bad; the next pod makes a new one.
                            if matches!(e, SandboxError::VmmExited { .. }) {
                                template::discard(&template);
                            }
                        }
                    }
                }
                Err(e) => log::warn!("sandbox {id}: no template to restore, booting cold: {e}"),
            }
        }
        let spec = VmmSpec { net_tap_fd, ..VmmSpec::boot(config, size, &paths) };
        Sandbox::start(config, id, &spec, paths, config.boot_timeout, guest_network, on_vmm_exit)
    }

    /// Spawns the VMM of `spec` and waits up to `timeout` for its agent, then creates the
    /// sandbox in the guest and configures its network.
    fn start(
        config: &Config,
        id: &str,
        spec: &VmmSpec,
        paths: SandboxPaths,
        timeout: Duration,
        network: Option<&NetworkConfig>,
        on_vmm_exit: ExitHandler,
    ) -> Result<Sandbox, SandboxError> {
        let stopping = Arc::new(AtomicBool::new(false));
        // Set once this VMM serves the pod: the exit of a VMM whose start failed (a
        // refused restore, say, before a cold boot) is that start's error, not the pod's.
        let armed = Arc::new(AtomicBool::new(false));
        let console = ConsoleTail::default();
        let on_exit = exit_handler(id, &stopping, &armed, &console, &on_vmm_exit);
        log::info!("sandbox {id}: starting {:?}", spec.command());
        let started = Instant::now();
        let vmm = Vmm::spawn(spec, on_exit)?;
        console.follow(paths.console.clone(), id.to_string());
        // From here on, a failure must kill the VMM.
        let fail = |vmm: &Vmm, stopping: &AtomicBool| {
            stopping.store(true, Ordering::Release);
            vmm.kill(Duration::from_secs(10));
        };
        if let Err(e) = std::fs::write(&paths.pid_file, vmm.pid().to_string()) {
            fail(&vmm, &stopping);
            return Err(SandboxError::Dir { path: paths.pid_file.clone(), source: e });
        }
        let agent = match connect(config, &paths, &vmm, &console, started + timeout) {
            Ok(agent) => agent,
            Err(e) => {
                fail(&vmm, &stopping);
                return Err(e);
            }
        };
        let network_slot = Mutex::new(None);
        let sandbox = Sandbox { id: id.to_string(), paths, vmm, agent, stopping, console, network: network_slot };
        // The host-agent test build's agent has no guest interface to configure.
        let network = network.filter(|_| !cfg!(feature = "host-agent"));
        let how = if spec.restore.is_some() { "restored" } else { "booted" };
        match sandbox.greet(how, started, network) {
            Ok(()) => sandbox.arm(&armed, &on_vmm_exit, started),
            Err(e) => {
                fail(&sandbox.vmm, &sandbox.stopping);
                Err(e.into())
            }
        }
    }

    /// Asks the agent for its version (logged with how long the VM took), gives the guest
    /// its identity (CreateSandbox) and the pod's network, if it has one.
    fn greet(&self, how: &str, started: Instant, network: Option<&NetworkConfig>) -> Result<(), AgentError> {
        let id = &self.id;
        let v = self.agent.version()?;
        log::info!(
            "sandbox {id}: VM {how}: agent {} on guest kernel {} answered {:.3} s after the VMM started",
            v.agent_version,
            v.kernel_release,
            started.elapsed().as_secs_f64()
        );
        let hostname: String = id.chars().take(12).collect();
        self.agent.create_sandbox(id, &hostname)?;
        let Some(network) = network else { return Ok(()) };
        let configuring = Instant::now();
        self.agent.update_interface(&network.interface)?;
        self.agent.update_routes(&network.routes)?;
        // No permanent neighbours: nothing to add, no call.
        if !network.neighbors.is_empty() {
            self.agent.add_arp_neighbors(&network.neighbors)?;
        }
        log::info!(
            "sandbox {id}: guest network: {} ({}) with {} addresses, {} routes, {} neighbours, configured in {:.3} s",
            network.interface.name,
            network.interface.hw_addr,
            network.interface.addresses.len(),
            network.routes.len(),
            network.neighbors.len(),
            configuring.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// Makes this VMM the pod's: from now on its exit goes to the pod's handler.
    fn arm(self, armed: &AtomicBool, on_vmm_exit: &ExitHandler, started: Instant) -> Result<Sandbox, SandboxError> {
        armed.store(true, Ordering::SeqCst);
        // A VMM that ended before it was armed was not reported by its exit handler: this
        // start fails instead (taking the handler makes sure no report follows).
        if let Some(status) = self.vmm.exit_status() {
            if on_vmm_exit.lock().unwrap_or_else(|e| e.into_inner()).take().is_some() {
                self.stopping.store(true, Ordering::Release);
                return Err(SandboxError::VmmExited { status: status.to_string(), details: self.console.last_lines() });
            }
        }
        log::info!("sandbox {}: ready {:.3} s after the VMM started", self.id, started.elapsed().as_secs_f64());
        Ok(self)
    }

    pub fn agent(&self) -> &Agent {
        &self.agent
    }

    pub fn vmm_pid(&self) -> u32 {
        self.vmm.pid()
    }

    /// Whether the VMM has ended.
    pub fn vmm_exited(&self) -> bool {
        self.vmm.exit_status().is_some()
    }

    /// Ends the VM (asking the guest first, then SIGKILL) and removes the sandbox's
    /// directory with everything mounted below it.
    pub fn stop(&self) -> Result<(), SandboxError> {
        self.stopping.store(true, Ordering::Release);
        if self.vmm.exit_status().is_none() {
            match self.agent.shutdown() {
                Ok(()) => {
                    // The guest reboots at once, which ends the VMM (a second or so in an
                    // emulated guest); past this bound it is killed instead.
                    self.vmm.wait(Duration::from_secs(5));
                }
                Err(e) => log::debug!("sandbox {}: {e}; killing the VMM", self.id),
            }
            if self.vmm.kill(Duration::from_secs(10)).is_none() {
                log::error!("sandbox {}: VMM pid {} did not die after SIGKILL", self.id, self.vmm.pid());
            }
        }
        self.console.stop.store(true, Ordering::Release);
        // After the VMM is gone, so the tap's last descriptor is the one closed here.
        if let Some(mut network) = self.network.lock().unwrap_or_else(|e| e.into_inner()).take() {
            if let Err(e) = network.teardown() {
                log::error!("sandbox {}: {e}", self.id);
            }
        }
        Ok(remove_dir(&self.paths.dir)?)
    }

    /// The last guest console lines, for error messages.
    pub fn console_tail(&self) -> String {
        self.console.last_lines()
    }
}

/// What the VMM's supervisor runs when the VMM ends: the console stops being followed, and
/// the pod's handler runs if this VMM serves the pod (`armed`) and was not stopped on
/// purpose (`stopping`); otherwise the end is only logged.
fn exit_handler(
    id: &str,
    stopping: &Arc<AtomicBool>,
    armed: &Arc<AtomicBool>,
    console: &ConsoleTail,
    on_vmm_exit: &ExitHandler,
) -> Box<dyn FnOnce(ExitStatus) + Send> {
    let (stopping, armed) = (stopping.clone(), armed.clone());
    let console = console.clone();
    let on_vmm_exit = on_vmm_exit.clone();
    let id = id.to_string();
    Box::new(move |status: ExitStatus| {
        console.stop.store(true, Ordering::Release);
        let handler = if armed.load(Ordering::SeqCst) && !stopping.load(Ordering::Acquire) {
            on_vmm_exit.lock().unwrap_or_else(|e| e.into_inner()).take()
        } else {
            None
        };
        match handler {
            Some(handler) => handler(status),
            None => log::info!("sandbox {id}: VMM ended ({status})"),
        }
    })
}

/// Cleanup for containerd's `delete` after the shim is gone: kill a VMM that outlived it
/// (normally the parent-death signal already did), unmount the container's (or, for the
/// pod's own container, the whole sandbox's) mounts and remove the directories.
pub fn cleanup_after_shim(config: &Config, sandbox_id: &str, container_id: &str) -> Result<(), SandboxError> {
    let paths = SandboxPaths::of_pod(&config.sandboxes_dir, sandbox_id)?;
    // containerd's id, but it becomes a path below the sandbox: checked as create checks it.
    nestbox_protocols::stdio::validate_id("container id", container_id).map_err(SandboxError::BadContainerId)?;
    if container_id == sandbox_id {
        if vmm::kill_stale(&paths.pid_file, &paths.vsock) {
            log::warn!("sandbox {sandbox_id}: killed a VMM left by a shim that is gone");
        }
        // The jailed VMM's cgroup, which its supervisor (gone with the shim) did not remove.
        vmm::jail_spec(config, &paths, 1).remove_cgroup();
        if let Ok(record) = std::fs::read_to_string(&paths.network) {
            match network::remove_stale(&record) {
                Ok(()) => log::info!("sandbox {sandbox_id}: removed what its pod network left"),
                Err(e) => log::warn!("sandbox {sandbox_id}: {e}"),
            }
        }
        Ok(remove_dir(&paths.dir)?)
    } else {
        Ok(paths.remove_container_dir(container_id)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A path-like pod id (from a spec's annotation) is refused by name, and neither
    /// creating nor cleaning up touches anything.
    #[test]
    fn a_path_like_pod_id_creates_and_removes_nothing() {
        let root = tempfile::tempdir().expect("tempdir");
        let sandboxes = root.path().join("sandboxes");
        let config = Config::parse(&format!("[runtime]\nsandboxes_dir = {:?}\n", sandboxes), None).expect("config");
        let victim = root.path().join("victim");
        std::fs::create_dir(&victim).expect("mkdir");
        std::fs::write(victim.join("f"), "keep").expect("write");
        for bad in ["../victim", "..", "a/b", "/tmp"] {
            let err = Sandbox::prepare(&config, bad).expect_err(bad).to_string();
            assert!(err.contains("sandbox id") && err.contains(&format!("{bad:?}")), "{err}");
            assert!(!sandboxes.exists(), "prepare({bad}) created {}", sandboxes.display());
            let err = cleanup_after_shim(&config, bad, bad).expect_err(bad).to_string();
            assert!(err.contains("sandbox id"), "{err}");
        }
        let err = cleanup_after_shim(&config, "pod1", "../../victim").expect_err("bad container id").to_string();
        assert!(err.contains("container id") && err.contains("../../victim"), "{err}");
        assert_eq!(std::fs::read_to_string(victim.join("f")).expect("still there"), "keep");
    }
}
