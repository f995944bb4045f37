//! The sandbox: the pod this VM is, with its containers by id and the pod's namespaces
//! they are created in (`pod_namespaces`).

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nestbox_protocols::agent::{CreateContainerRequest, CreateSandboxRequest};

use crate::container::{mounts, Container, CreateRequest, Env};
use crate::error::AgentError;
use crate::pod_namespaces::{PodNamespaces, PodPidNamespace};

enum Slot {
    /// CreateContainer is in progress: the id is taken.
    Creating,
    Ready(Arc<Container>),
}

pub struct Sandbox {
    pub env: Env,
    /// Running as the guest's init: only then may sandbox setup change the system
    /// (hostname, resolv.conf); in host mode those belong to the host.
    init_daemon: bool,
    containers: Mutex<HashMap<String, Slot>>,
    /// The sandbox's own storages (CreateSandbox), unmounted by DestroySandbox.
    storages: Mutex<Vec<PathBuf>>,
    id: Mutex<Option<String>>,
    /// The pod's network, IPC and UTS namespaces (CreateSandbox), dropped by DestroySandbox.
    namespaces: Mutex<Option<Arc<PodNamespaces>>>,
    /// Made at boot (as the guest's init) for the first CreateSandbox to take: a template's
    /// snapshot holds them, so a restored pod does not pay for new namespaces in its emulated
    /// guest kernel (a new network namespace was most of CreateSandbox's 1.4 s of guest CPU
    /// here, docs/guest-work.md).
    prepared: Mutex<Option<PodNamespaces>>,
    /// The pod's PID namespace once a container made it. Locked for the whole create of a
    /// container that names it, so that two such creates make one namespace.
    pid_namespace: Mutex<Option<PodPidNamespace>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether the process of the PID namespace's holder has exited (and been reaped).
fn process_gone(holder: &PodPidNamespace) -> bool {
    // SAFETY: pidfd_send_signal with signal 0 (a check only) and no siginfo.
    let r = unsafe {
        libc::syscall(libc::SYS_pidfd_send_signal, holder.init_pidfd.as_raw_fd(), 0, std::ptr::null::<u8>(), 0)
    };
    r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

impl Sandbox {
    pub fn new(env: Env, init_daemon: bool) -> Arc<Self> {
        let prepared = init_daemon.then(PodNamespaces::create).and_then(|made| {
            // Not fatal: CreateSandbox makes them then, and reports what fails.
            made.map_err(|e| eprintln!("nestbox-agent: making the pod's namespaces ahead: {e}")).ok()
        });
        Arc::new(Self {
            env,
            init_daemon,
            containers: Mutex::new(HashMap::new()),
            storages: Mutex::new(Vec::new()),
            id: Mutex::new(None),
            namespaces: Mutex::new(None),
            prepared: Mutex::new(prepared),
            pid_namespace: Mutex::new(None),
        })
    }

    fn containers(&self) -> MutexGuard<'_, HashMap<String, Slot>> {
        self.containers.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn create_sandbox(&self, req: &CreateSandboxRequest) -> Result<(), AgentError> {
        let mut id = self.id.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(existing) = id.as_ref() {
            return Err(AgentError::AlreadyExists(format!("sandbox {existing} already exists in this VM")));
        }
        if req.sandbox_id.is_empty() {
            return Err(AgentError::InvalidArgument("sandbox_id is empty".into()));
        }
        let prepared = lock(&self.prepared).take();
        let namespaces = prepared
            .map_or_else(PodNamespaces::create, Ok)
            .and_then(|namespaces| namespaces.set_hostname(&req.hostname).map(|()| namespaces))
            .map_err(|e| AgentError::internal("making the pod's namespaces", e))?;
        let mut mounted = Vec::new();
        for storage in &req.storages {
            let point = PathBuf::from(&storage.mount_point);
            let mounting = match (&self.env.share, storage.fstype.as_str()) {
                // Host mode standing in for a VM: the share is a directory of the host.
                (Some(share), "virtiofs") => {
                    mounts::mount_storage(&share.to_string_lossy(), "", &["rbind".to_string()], &point)
                }
                _ => mounts::mount_storage(&storage.source, &storage.fstype, &storage.options, &point),
            };
            if let Err(e) = mounting {
                for p in mounted.iter().rev() {
                    let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
                }
                return Err(AgentError::InvalidArgument(format!("sandbox storage: {e:#}")));
            }
            mounted.push(point);
        }
        if self.init_daemon {
            // The clock first: a restored guest's is the template's, and the RNG reseed
            // below should not be the only thing that tells restored copies apart.
            crate::identity::set_realtime(req.realtime_ns)
                .map_err(|e| AgentError::internal("setting the guest's clock", e))?;
            crate::identity::reseed_rng(&req.random_seed)
                .map_err(|e| AgentError::internal("reseeding the guest's random number generator", e))?;
            if !req.hostname.is_empty() {
                nix::unistd::sethostname(&req.hostname)
                    .map_err(|e| AgentError::internal("setting the guest's hostname", e))?;
            }
            if !req.dns.is_empty() {
                let conf: String = req.dns.iter().map(|a| format!("nameserver {a}\n")).collect();
                let _ = std::fs::create_dir_all("/etc");
                std::fs::write("/etc/resolv.conf", conf).map_err(|e| AgentError::internal("writing resolv.conf", e))?;
            }
        }
        *self.storages.lock().unwrap_or_else(|e| e.into_inner()) = mounted;
        *lock(&self.namespaces) = Some(Arc::new(namespaces));
        *id = Some(req.sandbox_id.clone());
        Ok(())
    }

    /// Removes every container and unmounts the sandbox's storages.
    pub fn destroy_sandbox(&self) -> Result<(), AgentError> {
        let ids: Vec<String> = self.containers().keys().cloned().collect();
        let mut first_error = None;
        for id in ids {
            if let Err(e) = self.remove_container(&id, Some(Duration::from_secs(30))) {
                first_error.get_or_insert(e);
            }
        }
        for point in self.storages.lock().unwrap_or_else(|e| e.into_inner()).drain(..).rev() {
            let _ = nix::mount::umount2(&point, nix::mount::MntFlags::MNT_DETACH);
        }
        *lock(&self.pid_namespace) = None;
        *lock(&self.namespaces) = None;
        *self.id.lock().unwrap_or_else(|e| e.into_inner()) = None;
        first_error.map_or(Ok(()), Err)
    }

    pub fn create_container(&self, req: &CreateContainerRequest) -> Result<(), AgentError> {
        let id = req.container_id.clone();
        {
            let mut containers = self.containers();
            if containers.contains_key(&id) {
                return Err(AgentError::AlreadyExists(format!("container {id} already exists")));
            }
            containers.insert(id.clone(), Slot::Creating);
        }
        match self.create_in_pod(req) {
            Ok(c) => {
                self.containers().insert(id, Slot::Ready(Arc::new(c)));
                Ok(())
            }
            Err(e) => {
                self.containers().remove(&id);
                Err(e)
            }
        }
    }

    /// Creates the container in the pod's namespaces that its spec names: network, IPC and
    /// UTS from CreateSandbox; the PID namespace of the first container that names it, or
    /// this container's new one, which then becomes the pod's.
    fn create_in_pod(&self, req: &CreateContainerRequest) -> Result<Container, AgentError> {
        let mut request = CreateRequest::check(req)?;
        let id = request.id;
        let pod = request.pod_namespaces;
        let namespaces = match pod & !libc::CLONE_NEWPID {
            0 => None,
            _ => Some(lock(&self.namespaces).clone().ok_or_else(|| {
                AgentError::FailedPrecondition(format!(
                    "container {id} names the pod's namespaces, but there is no sandbox yet (CreateSandbox)"
                ))
            })?),
        };
        let mut enter = namespaces.as_ref().map(|n| n.to_enter(pod)).unwrap_or_default();
        if pod & libc::CLONE_NEWPID == 0 {
            return Container::create(&self.env, &request, &enter);
        }
        let mut pid_namespace = lock(&self.pid_namespace);
        if let Some(holder) = pid_namespace.as_ref() {
            enter.push((holder.init_pidfd.as_fd(), libc::CLONE_NEWPID));
            return Container::create(&self.env, &request, &enter).map_err(|e| match process_gone(holder) {
                true => AgentError::FailedPrecondition(format!(
                    "container {id}: the pod's PID namespace is gone (its init, container {}'s, has exited): {e}",
                    holder.container_id
                )),
                false => e,
            });
        }
        // The first container in the pod's PID namespace makes it; its init is the
        // namespace's init (CRI's pause process).
        request.clone_flags |= libc::CLONE_NEWPID;
        let container = Container::create(&self.env, &request, &enter)?;
        let init_pidfd = container.init_pidfd().try_clone().map_err(|e| {
            let _ = container.destroy(&self.env, Some(Duration::from_secs(30)));
            AgentError::internal("holding the pod's PID namespace", e)
        })?;
        *pid_namespace = Some(PodPidNamespace { container_id: id.to_string(), init_pidfd });
        Ok(container)
    }

    /// The pod's network, IPC and UTS namespaces, None before CreateSandbox.
    pub fn pod_namespaces(&self) -> Option<Arc<PodNamespaces>> {
        lock(&self.namespaces).clone()
    }

    pub fn container(&self, id: &str) -> Result<Arc<Container>, AgentError> {
        match self.containers().get(id) {
            Some(Slot::Ready(c)) => Ok(c.clone()),
            Some(Slot::Creating) => Err(AgentError::FailedPrecondition(format!("container {id} is being created"))),
            None => Err(AgentError::NotFound(format!("no container {id}"))),
        }
    }

    pub fn remove_container(&self, id: &str, timeout: Option<Duration>) -> Result<(), AgentError> {
        let container = self.container(id)?;
        container.destroy(&self.env, timeout)?;
        self.containers().remove(id);
        Ok(())
    }

    /// Host mode, at exit: leave no process or cgroup behind.
    pub fn cleanup(&self) {
        let _ = self.destroy_sandbox();
        if let Ok(h) = &self.env.cgroups {
            h.remove_base();
        }
    }
}
