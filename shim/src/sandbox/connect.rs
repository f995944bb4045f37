//! Reaching a starting guest's agent: retried until a deadline, given up at once when the
//! VMM exits (with the VMM's stderr and the console's last lines as the reason).

use super::agent::Agent;
use super::console::ConsoleTail;
use super::error::SandboxError;
use super::paths::SandboxPaths;
use super::vmm::Vmm;
use crate::config::Config;
use std::time::{Duration, Instant};

/// How long one connection attempt may take before the VMM is checked again.
const CONNECT_SLICE: Duration = Duration::from_secs(2);

/// Connects to the agent until `deadline`, giving up at once when the VMM exits.
pub fn connect(
    config: &Config,
    paths: &SandboxPaths,
    vmm: &Vmm,
    console: &ConsoleTail,
    deadline: Instant,
) -> Result<Agent, SandboxError> {
    let started = Instant::now();
    loop {
        if let Some(status) = vmm.exit_status() {
            let log = std::fs::read_to_string(&paths.vmm_log).unwrap_or_default();
            let mut details = String::new();
            if !log.trim().is_empty() {
                details = format!(": {}", log.trim());
            }
            details.push_str(&console.last_lines());
            return Err(SandboxError::VmmExited { status: status.to_string(), details });
        }
        let slice = (Instant::now() + CONNECT_SLICE).min(deadline);
        match Agent::connect(&paths.vsock, slice, config.request_timeout) {
            Ok(agent) => return Ok(agent),
            Err(e) if Instant::now() >= deadline => {
                return Err(SandboxError::BootTimeout {
                    waited: started.elapsed(),
                    pid: vmm.pid(),
                    reason: e.to_string(),
                    details: console.last_lines(),
                })
            }
            // A permanent socket error returns at once: do not spin on it.
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}
