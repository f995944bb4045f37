//! Creating a container: its rootfs and the spec's host files shared into the sandbox, the
//! spec rewritten to the guest's paths, the container created in the guest with its
//! standard streams attached. The pod's first container starts the VM; every step is
//! undone when a later one fails.

use super::Pod;
use crate::io::IoPaths;
use crate::process::{Container, Process};
use crate::rpc_status::{agent_error, internal, sandbox_error, spec_error, status, RpcResult};
use crate::sandbox::mounts::{self, MountSpec};
use crate::sandbox::network::PodNetwork;
use crate::sandbox::start_gate::{self, StartKind};
use crate::sandbox::{self, Sandbox, SandboxPaths};
use crate::spec;
use containerd_shim::api::{CreateTaskRequest, CreateTaskResponse};
use containerd_shim::protos::events::task::{TaskCreate, TaskIO};
use containerd_shim::protos::protobuf::MessageField;
use nestbox_protocols::ttrpc;
use oci_spec::runtime::Spec;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

impl Pod {
    pub fn create(self: &Arc<Self>, req: &CreateTaskRequest) -> RpcResult<CreateTaskResponse> {
        let id = req.id.as_str();
        nestbox_protocols::stdio::validate_id("container id", id)
            .map_err(|reason| status(ttrpc::Code::INVALID_ARGUMENT, reason))?;
        if !req.checkpoint.is_empty() {
            return Err(status(ttrpc::Code::UNIMPLEMENTED, "nestbox cannot restore checkpoints"));
        }
        let mut spec = spec::read(Path::new(&req.bundle)).map_err(spec_error)?;
        let annotations = spec.annotations().clone().unwrap_or_default();
        let sandbox_id = spec::pod_id(&annotations, id);
        // It becomes the sandbox's directory: a path-like one is refused before anything exists.
        sandbox::validate_sandbox_id(&sandbox_id).map_err(|e| status(ttrpc::Code::INVALID_ARGUMENT, e.to_string()))?;
        // Before anything exists: a refused pod leaves nothing behind.
        spec::refuse_host_namespaces(&spec, &annotations, &sandbox_id).map_err(spec_error)?;

        let _creating = self.create_lock.lock().unwrap_or_else(|e| e.into_inner());
        let sandbox = self.claim_pod(id, &sandbox_id)?;
        let paths = IoPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let init = Process::new(id, "", paths, Vec::new());
        let result = match sandbox {
            Some(sandbox) => self.create_container(&sandbox, req, &mut spec, &init),
            None => self.create_pod(&sandbox_id, &annotations, req, &mut spec, &init),
        };
        if let Err(e) = result {
            init.release_io();
            log::error!("creating container {id}: {e:?}");
            return Err(e);
        }

        self.state().processes.insert(id, Container::new(&req.bundle, init));
        self.publish(TaskCreate {
            container_id: id.to_string(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            }),
            checkpoint: req.checkpoint.clone(),
            pid: self.shim_pid,
            ..Default::default()
        });
        Ok(CreateTaskResponse { pid: self.shim_pid, ..Default::default() })
    }

    /// Checks that container `id` may join pod `sandbox_id` here (new, and of the pod this
    /// shim serves, which the first container fixes); the pod's VM if it runs already.
    fn claim_pod(&self, id: &str, sandbox_id: &str) -> RpcResult<Option<Arc<Sandbox>>> {
        let mut state = self.state();
        if state.processes.contains(id) {
            return Err(status(ttrpc::Code::ALREADY_EXISTS, format!("container {id} already exists")));
        }
        if let Some(reason) = &state.vm_gone {
            return Err(status(ttrpc::Code::UNAVAILABLE, reason.clone()));
        }
        match &state.sandbox_id {
            Some(sid) if sid != sandbox_id => {
                return Err(status(
                    ttrpc::Code::FAILED_PRECONDITION,
                    format!("this shim serves pod {sid}, not {sandbox_id}"),
                ))
            }
            _ => state.sandbox_id = Some(sandbox_id.to_string()),
        }
        Ok(state.sandbox.clone())
    }

    /// The pod's first container: its files are mounted first, then the VM boots and the
    /// container is created in it. On failure everything goes (VM, mounts, directory), and
    /// the pod is unclaimed so that another create may try again.
    fn create_pod(
        self: &Arc<Self>,
        sandbox_id: &str,
        annotations: &HashMap<String, String>,
        req: &CreateTaskRequest,
        spec: &mut Spec,
        init: &Process,
    ) -> RpcResult<()> {
        let result = self.start_pod(sandbox_id, annotations, req, spec, init);
        if result.is_err() {
            let mut state = self.state();
            state.sandbox = None;
            state.sandbox_id = None;
        }
        result
    }

    fn start_pod(
        self: &Arc<Self>,
        sandbox_id: &str,
        annotations: &HashMap<String, String>,
        req: &CreateTaskRequest,
        spec: &mut Spec,
        init: &Process,
    ) -> RpcResult<()> {
        let size =
            self.config.vm_size(annotations).map_err(|e| status(ttrpc::Code::INVALID_ARGUMENT, e.to_string()))?;
        let context = format!("starting the VM of pod {sandbox_id}");
        // The pod's network namespace on the host (CNI's, made by containerd's CRI), read
        // before the spec is rewritten to the guest's paths; `ctr run` names none.
        let netns = spec::network_namespace(spec);
        let paths = Sandbox::prepare(&self.config, sandbox_id).map_err(|e| sandbox_error(&context, e))?;
        let cleanup = |e: ttrpc::Error| {
            if let Err(cleanup) = sandbox::remove_dir(&paths.dir) {
                log::error!("pod {sandbox_id}: cleanup after failed create: {cleanup}");
            }
            e
        };
        self.share_files(&paths, req, spec).map_err(cleanup)?;
        let network = match netns {
            Some(netns) => Some(PodNetwork::setup(&netns).map_err(|e| cleanup(internal(format!("{context}: {e}"))))?),
            None => None,
        };
        let sandbox =
            self.boot_vm(sandbox_id, size, paths.clone(), network).map_err(|e| cleanup(sandbox_error(&context, e)))?;
        if let Err(e) = self.create_in_guest(&sandbox, req, spec, init) {
            // The pod's first container failed: the VM has nothing to run.
            if let Err(cleanup) = sandbox.stop() {
                log::error!("pod {sandbox_id}: cleanup after failed create: {cleanup}");
            }
            return Err(e);
        }
        self.adopt_vm(sandbox);
        Ok(())
    }

    /// A further container of a running pod; on failure its files go again.
    fn create_container(
        &self,
        sandbox: &Sandbox,
        req: &CreateTaskRequest,
        spec: &mut Spec,
        init: &Process,
    ) -> RpcResult<()> {
        let result =
            self.share_files(&sandbox.paths, req, spec).and_then(|()| self.create_in_guest(sandbox, req, spec, init));
        if result.is_err() {
            if let Err(cleanup) = sandbox.paths.remove_container_dir(&req.id) {
                log::error!("container {}: cleanup after failed create: {cleanup}", req.id);
            }
        }
        result
    }

    /// Mounts the container's rootfs and the spec's host files in its directory of the
    /// sandbox's host-only tree and rewrites the spec to the guest's paths. The caller
    /// removes the container's directory on failure.
    fn share_files(&self, paths: &SandboxPaths, req: &CreateTaskRequest, spec: &mut Spec) -> RpcResult<()> {
        let container_dir = paths.create_container_dir(&req.id).map_err(|e| internal(e.to_string()))?;
        if req.rootfs.is_empty() {
            // No snapshot mounts (`ctr run --rootfs`): the spec's root is a host directory.
            let root = spec::root_dir(spec, Path::new(&req.bundle)).map_err(spec_error)?;
            mounts::bind(&root, &container_dir, "rootfs", false).map_err(|e| internal(e.to_string()))?;
        } else {
            let rootfs = container_dir.mkdir("rootfs", 0o755);
            rootfs.map_err(|e| internal(format!("creating {}: {e}", container_dir.display("rootfs").display())))?;
        }
        for m in &req.rootfs {
            let mount = MountSpec { kind: m.type_.clone(), source: m.source.clone(), options: m.options.clone() };
            mounts::mount(&mount, &container_dir, "rootfs")
                .map_err(|e| internal(format!("mounting the rootfs: {e}")))?;
        }
        let role = spec::PodRole::of(&spec.annotations().clone().unwrap_or_default());
        let binds = container_dir
            .dir("mounts")
            .map_err(|e| internal(format!("opening {}: {e}", container_dir.display("mounts").display())))?;
        spec::rewrite_for_guest(spec, &req.id, role, &binds).map_err(spec_error)
    }

    /// Creates the container in the guest and attaches its standard streams.
    fn create_in_guest(
        &self,
        sandbox: &Sandbox,
        req: &CreateTaskRequest,
        spec: &Spec,
        init: &Process,
    ) -> RpcResult<()> {
        let id = req.id.as_str();
        let spec_json = spec::encode(spec).map_err(spec_error)?;
        let slot = start_gate::enter(&self.config, StartKind::InRunningVm, &format!("container {id}: create"));
        sandbox
            .agent()
            .create_container(id, spec_json, init.stdio())
            .map_err(|e| agent_error(&format!("creating container {id} in the guest"), e))?;
        drop(slot);
        if let Err(e) = self.attach_io(sandbox, init) {
            // The guest has the container: take it back out, or it outlives this failure.
            let _ = sandbox.agent().remove_container(id);
            return Err(e);
        }
        Ok(())
    }
}
