//! The shim's side of the agent API: one ttrpc client over the VMM's hybrid vsock, every
//! call bounded by the configured request timeout (except the long polls, which end when
//! their event happens or the VM goes away), and standard streams opened as their own
//! vsock connections.
//!
//! Everything the shim asks of the guest goes through [`Agent`], so the task service does
//! not depend on the wire details of the agent API.

use nestbox_protocols::agent;
use nestbox_protocols::agent_ttrpc::AgentServiceClient;
use nestbox_protocols::stdio::{StreamHeader, StreamKind};
use nestbox_protocols::types;
use nestbox_protocols::types::Empty;
use nestbox_protocols::{hybrid, ttrpc};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where the guest mounts the sandbox's shared directory (virtio-fs).
pub const GUEST_SHARED_DIR: &str = "/run/nestbox/shared";
/// The virtio-fs tag of the shared directory.
pub const FS_TAG: &str = "nestbox";
/// The pod's shared memory in the guest: one tmpfs that every container of the pod has as
/// its `/dev/shm` (containerd binds one shm per pod from the host, which through virtio-fs
/// would be neither shared nor memory).
pub const GUEST_POD_SHM_DIR: &str = "/run/nestbox/shm";
/// Its mount options: what containerd gives a pod's shm (64 MiB).
const GUEST_POD_SHM_OPTIONS: [&str; 5] = ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"];

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("agent {call}: {source}")]
    Call { call: &'static str, source: Box<ttrpc::Error> },
    #[error("opening {kind} stream of {what}: {source}")]
    Stream { kind: StreamKind, what: String, source: Box<hybrid::Error> },
    #[error("drawing a random seed for the guest from the host's getrandom: {0}")]
    Seed(std::io::Error),
}

/// 32 bytes from the host's kernel RNG (256 bits: a full ChaCha key's worth).
fn host_random_seed() -> Result<Vec<u8>, AgentError> {
    let mut seed = vec![0u8; 32];
    // SAFETY: getrandom writes at most seed.len() bytes into the buffer we own.
    let n = unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), 0) };
    if n != seed.len() as isize {
        return Err(AgentError::Seed(std::io::Error::last_os_error()));
    }
    Ok(seed)
}

impl AgentError {
    /// The ttrpc status the agent answered with, if it answered at all.
    pub fn status_code(&self) -> Option<ttrpc::Code> {
        match self {
            AgentError::Call { source, .. } => match source.as_ref() {
                ttrpc::Error::RpcStatus(s) => Some(s.code()),
                _ => None,
            },
            _ => None,
        }
    }
}

/// Which standard streams a process has and whether it runs on a terminal.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StdioSpec {
    pub terminal: bool,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

impl StdioSpec {
    fn to_proto(self) -> types::Stdio {
        types::Stdio {
            terminal: self.terminal,
            stdin: self.stdin && !self.terminal,
            stdout: self.stdout && !self.terminal,
            stderr: self.stderr && !self.terminal,
            ..Default::default()
        }
    }

    /// The streams to open, in the order they are opened.
    pub fn kinds(self) -> Vec<StreamKind> {
        if self.terminal {
            return vec![StreamKind::Tty];
        }
        let mut kinds = Vec::new();
        for (wanted, kind) in
            [(self.stdin, StreamKind::Stdin), (self.stdout, StreamKind::Stdout), (self.stderr, StreamKind::Stderr)]
        {
            if wanted {
                kinds.push(kind);
            }
        }
        kinds
    }
}

/// A process's exit as the agent reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exit {
    pub status: u32,
    pub at_unix_nanos: i64,
}

pub struct Agent {
    client: AgentServiceClient,
    vsock_socket: PathBuf,
    timeout: Duration,
}

impl Agent {
    /// Connects to the agent through the VMM's hybrid vsock socket, retrying until
    /// `deadline` while the guest boots.
    pub fn connect(vsock_socket: &Path, deadline: Instant, timeout: Duration) -> Result<Agent, hybrid::Error> {
        let client = hybrid::connect_agent(vsock_socket, deadline)?;
        Ok(Agent { client, vsock_socket: vsock_socket.to_path_buf(), timeout })
    }

    fn ctx(&self) -> ttrpc::context::Context {
        ttrpc::context::with_duration(self.timeout)
    }

    /// A context without deadline, for calls that wait for an event (a process's exit, an
    /// OOM kill): they end with the event, or with an error when the connection goes.
    fn unbounded() -> ttrpc::context::Context {
        ttrpc::context::with_timeout(0)
    }

    /// Asks the agent whether it serves, and its version; the first call after boot.
    pub fn version(&self) -> Result<agent::VersionResponse, AgentError> {
        let call = "Version";
        self.client
            .version(self.ctx(), &agent::VersionRequest::new())
            .map_err(|source| AgentError::Call { call, source: Box::new(source) })
    }

    pub fn create_sandbox(&self, sandbox_id: &str, hostname: &str) -> Result<(), AgentError> {
        let req = agent::CreateSandboxRequest {
            sandbox_id: sandbox_id.to_string(),
            hostname: hostname.to_string(),
            storages: vec![
                types::Storage {
                    driver: "virtiofs".into(),
                    source: FS_TAG.into(),
                    fstype: "virtiofs".into(),
                    options: vec!["nodev".into()],
                    mount_point: GUEST_SHARED_DIR.into(),
                    ..Default::default()
                },
                types::Storage {
                    driver: "tmpfs".into(),
                    source: "shm".into(),
                    fstype: "tmpfs".into(),
                    options: GUEST_POD_SHM_OPTIONS.iter().map(|o| o.to_string()).collect(),
                    mount_point: GUEST_POD_SHM_DIR.into(),
                    ..Default::default()
                },
            ],
            // Every sandbox, cold or restored, gets its own seed and the host's time: a
            // restored guest otherwise shares both with every other copy of its template.
            random_seed: host_random_seed()?,
            realtime_ns: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as i64)
                .unwrap_or(0),
            ..Default::default()
        };
        self.unit("CreateSandbox", self.client.create_sandbox(self.ctx(), &req))
    }

    /// Configures the guest's interface as CNI's (its name, MAC, MTU, addresses) in the
    /// pod's network namespace.
    pub fn update_interface(&self, interface: &types::Interface) -> Result<(), AgentError> {
        let req = agent::UpdateInterfaceRequest { interface: Some(interface.clone()).into(), ..Default::default() };
        let call = "UpdateInterface";
        self.client
            .update_interface(self.ctx(), &req)
            .map(|_| ())
            .map_err(|source| AgentError::Call { call, source: Box::new(source) })
    }

    /// Makes `routes` the pod network namespace's routing table.
    pub fn update_routes(&self, routes: &[types::Route]) -> Result<(), AgentError> {
        let routes = types::Routes { routes: routes.to_vec(), ..Default::default() };
        let req = agent::UpdateRoutesRequest { routes: Some(routes).into(), ..Default::default() };
        let call = "UpdateRoutes";
        self.client
            .update_routes(self.ctx(), &req)
            .map(|_| ())
            .map_err(|source| AgentError::Call { call, source: Box::new(source) })
    }

    pub fn add_arp_neighbors(&self, neighbors: &[types::ARPNeighbor]) -> Result<(), AgentError> {
        let req = agent::AddArpNeighborsRequest { neighbors: neighbors.to_vec(), ..Default::default() };
        self.unit("AddArpNeighbors", self.client.add_arp_neighbors(self.ctx(), &req))
    }

    pub fn create_container(&self, id: &str, spec_json: Vec<u8>, stdio: StdioSpec) -> Result<(), AgentError> {
        let req = agent::CreateContainerRequest {
            container_id: id.to_string(),
            exec_id: id.to_string(),
            oci_spec_json: spec_json,
            stdio: Some(stdio.to_proto()).into(),
            ..Default::default()
        };
        self.unit("CreateContainer", self.client.create_container(self.ctx(), &req))
    }

    pub fn start_container(&self, id: &str) -> Result<u32, AgentError> {
        let req = agent::StartContainerRequest { container_id: id.to_string(), ..Default::default() };
        let call = "StartContainer";
        let resp = self
            .client
            .start_container(self.ctx(), &req)
            .map_err(|source| AgentError::Call { call, source: Box::new(source) })?;
        Ok(resp.pid)
    }

    pub fn exec_process(
        &self,
        id: &str,
        exec_id: &str,
        process_json: Vec<u8>,
        stdio: StdioSpec,
    ) -> Result<u32, AgentError> {
        let req = agent::ExecProcessRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            oci_process_json: process_json,
            stdio: Some(stdio.to_proto()).into(),
            ..Default::default()
        };
        let call = "ExecProcess";
        let resp = self
            .client
            .exec_process(self.ctx(), &req)
            .map_err(|source| AgentError::Call { call, source: Box::new(source) })?;
        Ok(resp.pid)
    }

    pub fn signal_process(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<(), AgentError> {
        let req = agent::SignalProcessRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            signal,
            all,
            ..Default::default()
        };
        self.unit("SignalProcess", self.client.signal_process(self.ctx(), &req))
    }

    /// Blocks until the process has exited.
    pub fn wait_process(&self, id: &str, exec_id: &str) -> Result<Exit, AgentError> {
        let req = agent::WaitProcessRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            ..Default::default()
        };
        let call = "WaitProcess";
        let resp = self
            .client
            .wait_process(Self::unbounded(), &req)
            .map_err(|source| AgentError::Call { call, source: Box::new(source) })?;
        Ok(Exit { status: resp.exit_status, at_unix_nanos: resp.exited_at_unix_nanos })
    }

    pub fn remove_container(&self, id: &str) -> Result<(), AgentError> {
        // The agent's own wait for the processes stays inside our request timeout.
        let timeout_secs = u32::try_from(self.timeout.as_secs().saturating_sub(5).max(1)).unwrap_or(u32::MAX);
        let req = agent::RemoveContainerRequest { container_id: id.to_string(), timeout_secs, ..Default::default() };
        self.unit("RemoveContainer", self.client.remove_container(self.ctx(), &req))
    }

    pub fn update_container(&self, id: &str, resources_json: Vec<u8>) -> Result<(), AgentError> {
        let req = agent::UpdateContainerRequest {
            container_id: id.to_string(),
            oci_resources_json: resources_json,
            ..Default::default()
        };
        self.unit("UpdateContainer", self.client.update_container(self.ctx(), &req))
    }

    pub fn stats_container(&self, id: &str) -> Result<agent::StatsContainerResponse, AgentError> {
        let req = agent::StatsContainerRequest { container_id: id.to_string(), ..Default::default() };
        let call = "StatsContainer";
        self.client
            .stats_container(self.ctx(), &req)
            .map_err(|source| AgentError::Call { call, source: Box::new(source) })
    }

    pub fn pause_container(&self, id: &str) -> Result<(), AgentError> {
        let req = agent::PauseContainerRequest { container_id: id.to_string(), ..Default::default() };
        self.unit("PauseContainer", self.client.pause_container(self.ctx(), &req))
    }

    pub fn resume_container(&self, id: &str) -> Result<(), AgentError> {
        let req = agent::ResumeContainerRequest { container_id: id.to_string(), ..Default::default() };
        self.unit("ResumeContainer", self.client.resume_container(self.ctx(), &req))
    }

    pub fn tty_win_resize(&self, id: &str, exec_id: &str, rows: u32, columns: u32) -> Result<(), AgentError> {
        let req = agent::TtyWinResizeRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            rows,
            columns,
            ..Default::default()
        };
        self.unit("TtyWinResize", self.client.tty_win_resize(self.ctx(), &req))
    }

    pub fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), AgentError> {
        let req = agent::CloseStdinRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            ..Default::default()
        };
        self.unit("CloseStdin", self.client.close_stdin(self.ctx(), &req))
    }

    /// Long poll: the id of the next container that hits an OOM kill.
    pub fn get_oom_event(&self) -> Result<String, AgentError> {
        let call = "GetOOMEvent";
        let resp = self
            .client
            .get_oom_event(Self::unbounded(), &agent::GetOOMEventRequest::new())
            .map_err(|source| AgentError::Call { call, source: Box::new(source) })?;
        Ok(resp.container_id)
    }

    /// Asks the guest to end the VM (it reboots, which ends the VMM).
    pub fn shutdown(&self) -> Result<(), AgentError> {
        self.unit("Shutdown", self.client.shutdown(self.ctx(), &agent::ShutdownRequest::new()))
    }

    /// Opens one standard stream of a process (see `nestbox_protocols::stdio`).
    pub fn open_stream(&self, kind: StreamKind, id: &str, exec_id: &str) -> Result<UnixStream, AgentError> {
        let header = StreamHeader::new(kind, id, exec_id);
        let deadline = Instant::now() + self.timeout;
        nestbox_protocols::stdio::connect_hybrid(&self.vsock_socket, &header, deadline).map_err(|source| {
            AgentError::Stream {
                kind,
                what: if exec_id.is_empty() { id.to_string() } else { format!("{id}/{exec_id}") },
                source: Box::new(source),
            }
        })
    }

    fn unit(&self, call: &'static str, result: ttrpc::Result<Empty>) -> Result<(), AgentError> {
        result.map(|_| ()).map_err(|source| AgentError::Call { call, source: Box::new(source) })
    }
}
