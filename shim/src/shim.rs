//! The shim binary's life cycle, as containerd drives it:
//!
//! - `start` (in the bundle directory): find the pod (annotation
//!   `io.kubernetes.cri.sandbox-id`, else the container is its own pod), start a shim daemon
//!   for it unless one already serves the pod (the socket address is derived from the pod
//!   id, so every container of a pod reaches the same shim, VM and agent), print its address;
//! - the daemon: serve the task API until `shutdown`;
//! - `delete` (after a shim died, or a start failed): clean up what the dead shim left.

use crate::config::Config;
use crate::events::now;
use crate::sandbox;
use crate::spec;
use crate::task::Service;
use containerd_shim::api::DeleteResponse;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{ExitSignal, Flags, StartOpts};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The runtime name containerd knows us by (`runtime_type`).
pub const RUNTIME_ID: &str = "io.containerd.nestbox.v2";

/// The exit status `delete` reports for a task whose shim died (128 + SIGKILL), as
/// containerd's runc shim does.
const KILLED_EXIT_STATUS: u32 = 137;

pub struct NestboxShim {
    id: String,
    namespace: String,
    bundle: PathBuf,
    exit: Arc<ExitSignal>,
}

/// The pod a bundle's container belongs to (read leniently: a spec that cannot be read
/// makes the container its own pod, as `create` would then fail for it anyway). The id
/// names the pod's socket and directory, so one that cannot be a file name is refused.
fn pod_of(bundle: &Path, container_id: &str) -> containerd_shim::Result<String> {
    let text = std::fs::read(bundle.join("config.json")).unwrap_or_default();
    let pod = spec::pod_id(&spec::annotations_of(&text), container_id);
    sandbox::validate_sandbox_id(&pod).map_err(other)?;
    Ok(pod)
}

fn other(e: impl std::fmt::Display) -> containerd_shim::Error {
    containerd_shim::Error::Other(e.to_string())
}

impl containerd_shim::Shim for NestboxShim {
    type T = Service;

    fn new(_runtime_id: &str, args: &Flags, config: &mut containerd_shim::Config) -> Self {
        // The shim waits for its own children (the VMM) itself: a reaper that takes every
        // child's status would steal the VMM's exit from its supervisor.
        config.no_reaper = true;
        config.no_sub_reaper = true;
        let bundle = if args.bundle.is_empty() {
            std::env::current_dir().unwrap_or_default()
        } else {
            PathBuf::from(&args.bundle)
        };
        NestboxShim {
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            bundle,
            exit: Arc::new(ExitSignal::default()),
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        // Fail here, where containerd shows the message, rather than in the daemon.
        Config::load().map_err(other)?;
        let pod = pod_of(&self.bundle, &opts.id)?;
        let (_pid, address) = containerd_shim::spawn(opts, &pod, Vec::new())?;
        containerd_shim::util::write_address(&address)?;
        Ok(address)
    }

    fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        let config = Config::load().map_err(other)?;
        let pod = pod_of(&self.bundle, &self.id)?;
        log::info!("delete: cleaning up container {} of pod {pod} after its shim", self.id);
        sandbox::cleanup_after_shim(&config, &pod, &self.id).map_err(other)?;
        Ok(DeleteResponse {
            pid: 0,
            exit_status: KILLED_EXIT_STATUS,
            exited_at: Some(now()).into(),
            ..Default::default()
        })
    }

    fn wait(&mut self) {
        self.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Service {
        let config = match Config::load() {
            Ok(config) => config,
            Err(e) => {
                // start_shim checked the same file moments ago; if it changed since, the
                // shim cannot serve: say why and end, so containerd reports the failure.
                log::error!("{e}");
                eprintln!("containerd-shim-nestbox-v2: {e}");
                std::process::exit(1);
            }
        };
        log::info!("nestbox shim {} serving namespace {}", env!("CARGO_PKG_VERSION"), self.namespace);
        Service::new(config, &self.namespace, publisher, self.exit.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shim_start_and_delete_refuse_a_path_like_pod_id() {
        let bundle = tempfile::tempdir().expect("tempdir");
        let spec = r#"{"annotations": {"io.kubernetes.cri.sandbox-id": "../../etc"}}"#;
        std::fs::write(bundle.path().join("config.json"), spec).expect("write");
        let err = pod_of(bundle.path(), "c1").expect_err("path-like pod id").to_string();
        assert!(err.contains("sandbox id \"../../etc\""), "{err}");
        std::fs::write(bundle.path().join("config.json"), r#"{"annotations": {}}"#).expect("write");
        assert_eq!(pod_of(bundle.path(), "c1").expect("own pod"), "c1");
    }
}
