//! A blocking client of containerd's CRI service (Kubernetes' runtime.v1 API, the one
//! kubelet speaks): what the tests and the benchmark need of it, with a deadline on every
//! call and errors that name the call.
//!
//! The API types are the `k8s-cri` crate's (generated from CRI's api.proto with tonic and
//! prost); containerd 1.6 serves runtime.v1 and the older v1alpha2, and v1 is the one both
//! kubelet and critest use. A current-thread tokio runtime inside turns each call into a
//! plain function call, so tests stay sequential code.

pub use k8s_cri::v1 as api;

use api::runtime_service_client::RuntimeServiceClient;
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint, Uri};

/// A CRI call that failed: which one, and what the runtime (or the transport) said.
#[derive(Debug, Clone)]
pub struct CriError {
    pub call: &'static str,
    pub message: String,
}

impl fmt::Display for CriError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CRI {}: {}", self.call, self.message)
    }
}

impl std::error::Error for CriError {}

pub type Result<T> = std::result::Result<T, CriError>;

/// What ExecSync returned.
#[derive(Debug, Clone)]
pub struct ExecOutput {
    pub stdout: String,
    pub stderr: String,
    pub exit_code: i32,
}

pub struct Cri {
    runtime: tokio::runtime::Runtime,
    client: RuntimeServiceClient<Channel>,
    socket: PathBuf,
}

impl fmt::Debug for Cri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cri").field("socket", &self.socket).finish()
    }
}

impl Cri {
    /// Connects to the CRI service on containerd's gRPC socket.
    pub fn connect(socket: &Path) -> Result<Cri> {
        let fail = |message: String| CriError { call: "connect", message };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| fail(format!("starting a tokio runtime: {e}")))?;
        let path = socket.to_path_buf();
        // The URI is a placeholder: tonic wants one, the connector ignores it.
        let endpoint = Endpoint::from_static("http://localhost").connect_timeout(Duration::from_secs(10));
        let channel = runtime
            .block_on(endpoint.connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move { tokio::net::UnixStream::connect(path).await.map(TokioIo::new) }
            })))
            .map_err(|e| fail(format!("{}: {e}", socket.display())))?;
        Ok(Cri { runtime, client: RuntimeServiceClient::new(channel), socket: socket.to_path_buf() })
    }

    /// Runs one call to completion within `deadline`.
    fn call<T, F>(
        &self,
        call: &'static str,
        deadline: Duration,
        request: impl FnOnce(RuntimeServiceClient<Channel>) -> F,
    ) -> Result<T>
    where
        F: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let future = request(self.client.clone());
        // The timer is made inside the runtime: tokio's timers need its context.
        match self.runtime.block_on(async { tokio::time::timeout(deadline, future).await }) {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(CriError { call, message: format!("{:?}: {}", status.code(), status.message()) }),
            Err(_) => Err(CriError { call, message: format!("no answer within {deadline:?}") }),
        }
    }

    /// The runtime's name and version (`containerd`, `1.6.20...`).
    pub fn version(&self, deadline: Duration) -> Result<api::VersionResponse> {
        self.call("Version", deadline, |mut c| async move { c.version(api::VersionRequest::default()).await })
    }

    /// Starts a pod sandbox with the runtime handler `handler` (`runc`, `nestbox`); its id.
    pub fn run_pod_sandbox(&self, config: &api::PodSandboxConfig, handler: &str, deadline: Duration) -> Result<String> {
        let request = api::RunPodSandboxRequest { config: Some(config.clone()), runtime_handler: handler.into() };
        self.call("RunPodSandbox", deadline, |mut c| async move { c.run_pod_sandbox(request).await })
            .map(|r| r.pod_sandbox_id)
    }

    pub fn stop_pod_sandbox(&self, pod: &str, deadline: Duration) -> Result<()> {
        let request = api::StopPodSandboxRequest { pod_sandbox_id: pod.into() };
        self.call("StopPodSandbox", deadline, |mut c| async move { c.stop_pod_sandbox(request).await }).map(drop)
    }

    pub fn remove_pod_sandbox(&self, pod: &str, deadline: Duration) -> Result<()> {
        let request = api::RemovePodSandboxRequest { pod_sandbox_id: pod.into() };
        self.call("RemovePodSandbox", deadline, |mut c| async move { c.remove_pod_sandbox(request).await }).map(drop)
    }

    pub fn pod_sandbox_status(&self, pod: &str, deadline: Duration) -> Result<api::PodSandboxStatus> {
        let request = api::PodSandboxStatusRequest { pod_sandbox_id: pod.into(), verbose: false };
        self.call("PodSandboxStatus", deadline, |mut c| async move { c.pod_sandbox_status(request).await })?
            .status
            .ok_or_else(|| CriError { call: "PodSandboxStatus", message: format!("no status for pod {pod}") })
    }

    /// Every pod sandbox the runtime knows.
    pub fn list_pod_sandbox(&self, deadline: Duration) -> Result<Vec<api::PodSandbox>> {
        let request = api::ListPodSandboxRequest { filter: None };
        self.call("ListPodSandbox", deadline, |mut c| async move { c.list_pod_sandbox(request).await }).map(|r| r.items)
    }

    /// Creates a container in pod `pod` (whose config was `sandbox`); its id.
    pub fn create_container(
        &self,
        pod: &str,
        config: &api::ContainerConfig,
        sandbox: &api::PodSandboxConfig,
        deadline: Duration,
    ) -> Result<String> {
        let request = api::CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(config.clone()),
            sandbox_config: Some(sandbox.clone()),
        };
        self.call("CreateContainer", deadline, |mut c| async move { c.create_container(request).await })
            .map(|r| r.container_id)
    }

    pub fn start_container(&self, container: &str, deadline: Duration) -> Result<()> {
        let request = api::StartContainerRequest { container_id: container.into() };
        self.call("StartContainer", deadline, |mut c| async move { c.start_container(request).await }).map(drop)
    }

    /// Stops a container: SIGTERM, then SIGKILL after `grace_secs`.
    pub fn stop_container(&self, container: &str, grace_secs: i64, deadline: Duration) -> Result<()> {
        let request = api::StopContainerRequest { container_id: container.into(), timeout: grace_secs };
        self.call("StopContainer", deadline, |mut c| async move { c.stop_container(request).await }).map(drop)
    }

    /// New resources for a running container (kubelet's in-place update).
    pub fn update_container_resources(
        &self,
        container: &str,
        linux: api::LinuxContainerResources,
        deadline: Duration,
    ) -> Result<()> {
        let request = api::UpdateContainerResourcesRequest {
            container_id: container.into(),
            linux: Some(linux),
            ..Default::default()
        };
        self.call(
            "UpdateContainerResources",
            deadline,
            |mut c| async move { c.update_container_resources(request).await },
        )
        .map(drop)
    }

    pub fn remove_container(&self, container: &str, deadline: Duration) -> Result<()> {
        let request = api::RemoveContainerRequest { container_id: container.into() };
        self.call("RemoveContainer", deadline, |mut c| async move { c.remove_container(request).await }).map(drop)
    }

    pub fn container_status(&self, container: &str, deadline: Duration) -> Result<api::ContainerStatus> {
        let request = api::ContainerStatusRequest { container_id: container.into(), verbose: false };
        self.call("ContainerStatus", deadline, |mut c| async move { c.container_status(request).await })?
            .status
            .ok_or_else(|| CriError { call: "ContainerStatus", message: format!("no status for {container}") })
    }

    /// The containers of pod `pod`, or of every pod when `None`.
    pub fn list_containers(&self, pod: Option<&str>, deadline: Duration) -> Result<Vec<api::Container>> {
        let filter = pod.map(|p| api::ContainerFilter { pod_sandbox_id: p.into(), ..Default::default() });
        let request = api::ListContainersRequest { filter };
        self.call("ListContainers", deadline, |mut c| async move { c.list_containers(request).await })
            .map(|r| r.containers)
    }

    pub fn container_stats(&self, container: &str, deadline: Duration) -> Result<api::ContainerStats> {
        let request = api::ContainerStatsRequest { container_id: container.into() };
        self.call("ContainerStats", deadline, |mut c| async move { c.container_stats(request).await })?
            .stats
            .ok_or_else(|| CriError { call: "ContainerStats", message: format!("no stats for {container}") })
    }

    /// Runs `cmd` in a container and waits for it (the runtime kills it after `timeout_secs`;
    /// 0 is no limit); the call itself gives up after `deadline`.
    pub fn exec_sync(
        &self,
        container: &str,
        cmd: &[&str],
        timeout_secs: i64,
        deadline: Duration,
    ) -> Result<ExecOutput> {
        let request = api::ExecSyncRequest {
            container_id: container.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: timeout_secs,
        };
        let r = self.call("ExecSync", deadline, |mut c| async move { c.exec_sync(request).await })?;
        Ok(ExecOutput {
            stdout: String::from_utf8_lossy(&r.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&r.stderr).into_owned(),
            exit_code: r.exit_code,
        })
    }

    /// Stops and removes every pod sandbox (and so its containers); the first error, after
    /// trying them all.
    pub fn remove_all_pods(&self, deadline: Duration) -> Result<()> {
        let mut first_error = None;
        for pod in self.list_pod_sandbox(deadline)? {
            let done =
                self.stop_pod_sandbox(&pod.id, deadline).and_then(|()| self.remove_pod_sandbox(&pod.id, deadline));
            if let Err(e) = done {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Namespace modes of a pod and its containers. `Node` shares the host's, which nestbox
/// refuses (a pod in its own VM cannot share the host kernel's namespaces); a pod network
/// (`Pod`) needs CNI: the harness's `Options::pod_network`.
pub fn namespaces(
    network: api::NamespaceMode,
    ipc: api::NamespaceMode,
    pid: api::NamespaceMode,
) -> api::NamespaceOption {
    api::NamespaceOption { network: network as i32, ipc: ipc as i32, pid: pid as i32, ..Default::default() }
}

/// A pod sandbox's configuration: name `name` (its uid made from it and `unique`), logs in
/// `log_directory`, the given namespaces.
pub fn pod_config(name: &str, unique: &str, log_directory: &Path, ns: api::NamespaceOption) -> api::PodSandboxConfig {
    api::PodSandboxConfig {
        metadata: Some(api::PodSandboxMetadata {
            name: name.into(),
            uid: format!("{name}-{unique}"),
            namespace: "nestbox-tests".into(),
            attempt: 0,
        }),
        log_directory: log_directory.to_string_lossy().into_owned(),
        linux: Some(api::LinuxPodSandboxConfig {
            security_context: Some(api::LinuxSandboxSecurityContext {
                namespace_options: Some(ns),
                ..Default::default()
            }),
            ..Default::default()
        }),
        labels: HashMap::from([("nestbox-tests".to_string(), name.to_string())]),
        ..Default::default()
    }
}

/// A container's configuration: `image` running `command`, its log at `log_path` (relative
/// to the pod's log directory), the given namespaces.
pub fn container_config(
    name: &str,
    image: &str,
    command: &[&str],
    log_path: &str,
    ns: api::NamespaceOption,
) -> api::ContainerConfig {
    api::ContainerConfig {
        metadata: Some(api::ContainerMetadata { name: name.into(), attempt: 0 }),
        image: Some(api::ImageSpec { image: image.into(), ..Default::default() }),
        command: command.iter().map(|s| s.to_string()).collect(),
        log_path: log_path.into(),
        linux: Some(api::LinuxContainerConfig {
            security_context: Some(api::LinuxContainerSecurityContext {
                namespace_options: Some(ns),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}
