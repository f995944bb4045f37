//! The pod's VM over its life: started for the first container (restored or booted by
//! [`Sandbox::boot`]), watched for OOM kills and for the VMM's own death, stopped with the
//! pod's last container or at shutdown.

use super::{Pod, VM_DIED_EXIT_STATUS};
use crate::config::VmSize;
use crate::process::{Process, ProcessTable};
use crate::rpc_status::{internal, RpcResult};
use crate::sandbox::network::PodNetwork;
use crate::sandbox::{Sandbox, SandboxError, SandboxPaths};
use containerd_shim::protos::events::task::TaskOOM;
use std::process::ExitStatus;
use std::sync::{Arc, Weak};

impl Pod {
    /// Starts the pod's VM on its prepared directory and waits for its agent. The VMM's
    /// death is reported to this pod for as long as the pod lives (a weak reference: the
    /// VMM's supervisor must not keep a finished pod alive). The pod's network, if it has
    /// one, goes to the sandbox.
    pub(super) fn boot_vm(
        self: &Arc<Self>,
        sandbox_id: &str,
        size: VmSize,
        paths: SandboxPaths,
        network: Option<PodNetwork>,
    ) -> Result<Arc<Sandbox>, SandboxError> {
        let weak = Arc::downgrade(self);
        let on_exit = Box::new(move |exit| {
            if let Some(pod) = Weak::upgrade(&weak) {
                pod.vmm_died(exit);
            }
        });
        log::info!("pod {sandbox_id}: starting a VM ({} vCPUs, {} MiB)", size.vcpus, size.memory_mib);
        Sandbox::boot(&self.config, sandbox_id, size, paths, network, on_exit).map(Arc::new)
    }

    /// Makes a started VM the pod's: later containers go into it, and its OOM kills are
    /// reported from now on.
    pub(super) fn adopt_vm(self: &Arc<Self>, sandbox: Arc<Sandbox>) {
        self.state().sandbox = Some(sandbox.clone());
        self.watch_oom(sandbox);
    }

    /// The VMM ended on its own: every process of the pod exited with an error status,
    /// containerd is told, and the sandbox's mounts and directory go. Later `delete`
    /// calls then only report the statuses.
    fn vmm_died(&self, exit: ExitStatus) {
        let (sandbox, processes) = {
            let mut state = self.state();
            let sandbox = state.sandbox.take();
            let tail = sandbox.as_ref().map(|s| s.console_tail()).unwrap_or_default();
            let reason = format!("the sandbox VM exited unexpectedly ({exit})");
            log::error!("{reason}{tail}");
            state.vm_gone = Some(reason);
            let processes: Vec<Arc<Process>> = state.processes.all_processes();
            (sandbox, processes)
        };
        for p in processes {
            p.release_io();
            if p.set_exited(VM_DIED_EXIT_STATUS) {
                self.exit_event(&p);
            }
        }
        if let Some(sandbox) = sandbox {
            if let Err(e) = sandbox.stop() {
                log::error!("cleaning up after the VM died: {e}");
            }
        }
    }

    /// Polls the agent for OOM kills for as long as the sandbox lives.
    fn watch_oom(self: &Arc<Self>, sandbox: Arc<Sandbox>) {
        let pod = Arc::downgrade(self);
        let mut foreign = ForeignIds::default();
        let spawned = std::thread::Builder::new().name("oom".into()).spawn(move || loop {
            match sandbox.agent().get_oom_event() {
                Ok(container_id) => match Weak::upgrade(&pod) {
                    Some(pod) => {
                        let event = oom_event(&pod.state().processes, container_id, &mut foreign);
                        match event {
                            Some(event) => {
                                log::warn!("container {}: OOM kill in the guest", event.container_id);
                                pod.publish(event);
                            }
                            None => continue,
                        }
                    }
                    None => return,
                },
                Err(e) => {
                    if !sandbox.vmm_exited() {
                        log::info!("no more OOM events: {e}");
                    }
                    return;
                }
            }
        });
        if let Err(e) = spawned {
            log::warn!("not watching for OOM kills: {e}");
        }
    }

    /// Stops the VM (if it still runs) after the pod's last container went.
    pub(super) fn stop_vm(&self) -> RpcResult<()> {
        let Some(sandbox) = self.state().sandbox.take() else { return Ok(()) };
        log::info!("pod {}: stopping the VM", sandbox.id);
        sandbox.stop().map_err(|e| internal(format!("stopping the VM: {e}")))
    }

    /// containerd's `shutdown`: ignored while containers remain unless `now`; otherwise the
    /// VM stops and the shim's daemon ends.
    pub fn shutdown(&self, now: bool) {
        let sandbox = {
            let mut state = self.state();
            if !state.processes.is_empty() && !now {
                return;
            }
            state.sandbox.take()
        };
        if let Some(sandbox) = sandbox {
            if let Err(e) = sandbox.stop() {
                log::error!("shutdown: {e}");
            }
        }
        log::info!("shutting down");
        self.exit.signal();
    }
}

/// Ids the guest named that are not this pod's (its agent may say anything), counted so
/// that the log says so without the guest being able to flood it.
#[derive(Default)]
struct ForeignIds(u64);

impl ForeignIds {
    fn dropped(&mut self, what: &str, id: &str) {
        self.0 += 1;
        if self.0 <= 10 || self.0.is_power_of_two() {
            let shown: String = id.chars().take(80).collect();
            log::warn!("the guest sent {what} for {shown:?}, not a container of this pod: dropped ({} so far)", self.0);
        }
    }
}

/// The event for an OOM kill the guest reports in container `container_id`, if that is
/// one of this pod's (in `processes`): containerd must never hear of an OOM kill in another pod's
/// container, or in one that does not exist, because a guest said so.
fn oom_event(processes: &ProcessTable, container_id: String, foreign: &mut ForeignIds) -> Option<TaskOOM> {
    if !processes.contains(&container_id) {
        foreign.dropped("an OOM event", &container_id);
        return None;
    }
    Some(TaskOOM { container_id, ..Default::default() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_events_only_for_the_pods_own_containers() {
        let mut processes = ProcessTable::default();
        let init = Process::new("c1", "", Default::default(), Vec::new());
        processes.insert("c1", crate::process::Container::new("/bundle", init));
        let mut foreign = ForeignIds::default();
        let event = oom_event(&processes, "c1".into(), &mut foreign).expect("ours");
        assert_eq!(event.container_id, "c1");
        for id in ["other-pods-container", "", "c1/../c2", &"x".repeat(10_000)] {
            assert!(oom_event(&processes, id.to_string(), &mut foreign).is_none(), "{id}");
        }
        assert_eq!(foreign.0, 4);
    }
}
