//! The sandbox: the pod this VM is, with its containers by id.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nestbox_protocols::agent::{CreateContainerRequest, CreateSandboxRequest};

use crate::container::{mounts, Container, Env};
use crate::error::AgentError;

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
}

impl Sandbox {
    pub fn new(env: Env, init_daemon: bool) -> Arc<Self> {
        Arc::new(Self {
            env,
            init_daemon,
            containers: Mutex::new(HashMap::new()),
            storages: Mutex::new(Vec::new()),
            id: Mutex::new(None),
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
        let mut mounted = Vec::new();
        for storage in &req.storages {
            let point = PathBuf::from(&storage.mount_point);
            if let Err(e) = mounts::mount_storage(&storage.source, &storage.fstype, &storage.options, &point) {
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
        match Container::create(&self.env, req) {
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
