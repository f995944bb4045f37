//! The container's OCI runtime spec (`<bundle>/config.json`): reading it, the pod it
//! belongs to, and rewriting it for the guest, through oci-spec's types (the agent reads
//! it with the same types).
//!
//! oci-spec keeps only the fields it knows, so a field of a newer runtime spec that oci-spec
//! does not know is dropped by the rewrite. The agent parses the spec with the same
//! oci-spec types, so it never saw such fields before either: nothing the guest acts on is
//! lost.

use crate::sandbox::agent::{GUEST_POD_SHM_DIR, GUEST_SHARED_DIR};
use crate::sandbox::mounts::{self, MountError};
use crate::sandbox::Dir;
use nestbox_protocols::pod;
use oci_spec::runtime::{LinuxNamespaceType, Mount, Root, Spec};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The annotation containerd's CRI puts on every container of a pod.
pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";
/// CRI's kind of container: `sandbox` (the pod's pause container) or `container`.
pub const CONTAINER_TYPE_ANNOTATION: &str = "io.kubernetes.cri.container-type";
/// The root a spec without `root.path` means (relative to the bundle), as runc reads it.
const DEFAULT_ROOT: &str = "rootfs";

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("reading the OCI spec {path}: {source}", path = path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("parsing the OCI spec {path}: {source}", path = path.display())]
    Parse { path: PathBuf, source: serde_json::Error },
    #[error("no rootfs mounts and the spec's root {path} is not a directory", path = path.display())]
    NoRoot { path: PathBuf },
    #[error("bind mount of {destination}: source {host_path:?} is not an absolute host path")]
    RelativeBindSource { destination: String, host_path: String },
    #[error("sharing {host_path} for {destination}: {error}")]
    Share { host_path: String, destination: String, error: Box<MountError> },
    #[error("encoding the spec: {0}")]
    Encode(serde_json::Error),
    #[error(
        "pod {pod} asks for the host's {namespaces} namespace{s}: nestbox runs each pod in a VM of its own, \
         with its own kernel, and a pod in its own VM cannot share the host kernel's namespaces \
         (Kata Containers documents host networking as unsupported for the same reason); \
         run this pod with another runtime handler (runc)",
        namespaces = namespaces.join(", "),
        s = if namespaces.len() > 1 { "s" } else { "" }
    )]
    HostNamespaces { pod: String, namespaces: Vec<&'static str> },
}

/// What a container is to its pod, which decides the namespaces it gets in the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodRole {
    /// CRI's sandbox (pause) container, or a container that is a pod of its own (`ctr
    /// run`): it is the pod's first container and makes the pod's PID namespace.
    Sandbox,
    /// A further container of a CRI pod: it joins the pod's PID namespace only when its
    /// spec names the pause container's (CRI's NamespaceMode POD).
    Member,
}

impl PodRole {
    pub fn of(annotations: &HashMap<String, String>) -> PodRole {
        match annotations.get(CONTAINER_TYPE_ANNOTATION).map(String::as_str) {
            Some("container") => PodRole::Member,
            _ => PodRole::Sandbox,
        }
    }
}

/// Refuses a CRI pod that asks for the host's network, PID or IPC namespace (CRI's
/// NamespaceMode NODE, which containerd writes as a sandbox spec without that namespace):
/// the VM has its own kernel, so it cannot share the host's. Only CRI sandboxes: a `ctr
/// run --net-host` container keeps the VM's own namespaces, as it always did.
pub fn refuse_host_namespaces(spec: &Spec, annotations: &HashMap<String, String>, pod: &str) -> Result<(), SpecError> {
    if annotations.get(CONTAINER_TYPE_ANNOTATION).map(String::as_str) != Some("sandbox") {
        return Ok(());
    }
    let namespaces = spec.linux().as_ref().and_then(|l| l.namespaces().as_ref());
    let has = |typ: LinuxNamespaceType| namespaces.into_iter().flatten().any(|n| n.typ() == typ);
    let missing: Vec<&'static str> =
        [(LinuxNamespaceType::Network, "network"), (LinuxNamespaceType::Pid, "PID"), (LinuxNamespaceType::Ipc, "IPC")]
            .into_iter()
            .filter(|(typ, _)| !has(*typ))
            .map(|(_, name)| name)
            .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(SpecError::HostNamespaces { pod: pod.to_string(), namespaces: missing })
}

/// The host path of the spec's network namespace, if it names one: for a CRI pod's sandbox
/// container, the namespace CNI configured (`/var/run/netns/cni-...`).
pub fn network_namespace(spec: &Spec) -> Option<PathBuf> {
    let namespaces = spec.linux().as_ref()?.namespaces().as_ref()?;
    namespaces.iter().find(|n| n.typ() == LinuxNamespaceType::Network)?.path().clone()
}

/// Reads and parses `<bundle>/config.json`.
pub fn read(bundle: &Path) -> Result<Spec, SpecError> {
    let path = bundle.join("config.json");
    let text = std::fs::read(&path).map_err(|source| SpecError::Read { path: path.clone(), source })?;
    serde_json::from_slice(&text).map_err(|source| SpecError::Parse { path, source })
}

/// The spec as the agent receives it.
pub fn encode(spec: &Spec) -> Result<Vec<u8>, SpecError> {
    serde_json::to_vec(spec).map_err(SpecError::Encode)
}

/// The pod a container belongs to: CRI's sandbox id, else the container is its own pod.
pub fn pod_id(annotations: &HashMap<String, String>, container_id: &str) -> String {
    annotations
        .get(SANDBOX_ID_ANNOTATION)
        .filter(|pod| !pod.is_empty())
        .cloned()
        .unwrap_or_else(|| container_id.to_string())
}

/// The annotations of a spec's text, read leniently: `shim start` and `shim delete` must
/// find the pod even in a spec they cannot parse otherwise (a spec that is not JSON, or
/// annotations that are not strings, yield none or fewer).
pub fn annotations_of(config_json: &[u8]) -> HashMap<String, String> {
    #[derive(serde::Deserialize)]
    struct AnnotationsOnly {
        #[serde(default)]
        annotations: HashMap<String, serde_json::Value>,
    }
    let Ok(parsed) = serde_json::from_slice::<AnnotationsOnly>(config_json) else { return HashMap::new() };
    parsed.annotations.into_iter().filter_map(|(k, v)| v.as_str().map(|v| (k, v.to_string()))).collect()
}

/// The host directory the spec names as root (relative paths are relative to the bundle).
pub fn root_dir(spec: &Spec, bundle: &Path) -> Result<PathBuf, SpecError> {
    let root = spec.root().as_ref().map(|r| r.path().as_path()).filter(|p| !p.as_os_str().is_empty());
    let path = bundle.join(root.unwrap_or(Path::new(DEFAULT_ROOT)));
    if !path.is_dir() {
        return Err(SpecError::NoRoot { path });
    }
    Ok(path)
}

/// Rewrites the spec for the guest: its root becomes the shared rootfs, and every bind
/// mount of a host path is shared through `<n>` of `binds` (the container's `mounts/`) and
/// read from there in the guest. `/dev/shm` (containerd binds the pod's shm from the host)
/// becomes the pod's shm in the guest, one tmpfs for all its containers: shared memory
/// through virtio-fs would be neither shared nor memory. The namespaces become the pod's
/// in the guest (see [`pod_namespaces`]). On failure the caller removes the container's
/// directory (with what was bound there).
pub fn rewrite_for_guest(spec: &mut Spec, id: &str, role: PodRole, binds: &Dir) -> Result<(), SpecError> {
    pod_namespaces(spec, id, role);
    let guest_dir = format!("{GUEST_SHARED_DIR}/{id}");
    let mut root = spec.root().clone().unwrap_or_else(|| {
        // A spec without a root: give it only a path, as before, not oci-spec's default
        // (which is read-only).
        let mut root = Root::default();
        root.set_readonly(None);
        root
    });
    root.set_path(PathBuf::from(format!("{guest_dir}/rootfs")));
    spec.set_root(Some(root));
    let Some(spec_mounts) = spec.mounts_mut().as_mut() else { return Ok(()) };
    for (n, mount) in spec_mounts.iter_mut().enumerate() {
        if !is_bind(mount) {
            continue;
        }
        if mount.destination() == Path::new("/dev/shm") {
            mount.set_source(Some(PathBuf::from(GUEST_POD_SHM_DIR)));
            continue;
        }
        let destination = mount.destination().display().to_string();
        let source = mount.source().clone().unwrap_or_default();
        if !source.is_absolute() {
            return Err(SpecError::RelativeBindSource { destination, host_path: source.display().to_string() });
        }
        let read_only = mount.options().iter().flatten().any(|o| o == "ro");
        mounts::bind(&source, binds, &n.to_string(), read_only).map_err(|error| SpecError::Share {
            host_path: source.display().to_string(),
            destination,
            error: Box::new(error),
        })?;
        mount.set_source(Some(PathBuf::from(format!("{guest_dir}/mounts/{n}"))));
    }
    Ok(())
}

/// A bind mount by its type or by its options (containerd writes both forms).
fn is_bind(mount: &Mount) -> bool {
    mount.typ().as_deref() == Some("bind") || mount.options().iter().flatten().any(|o| o == "bind" || o == "rbind")
}

/// The spec's namespaces as the guest has them, named by the reserved paths of
/// `nestbox_protocols::pod`: network, IPC and UTS are always the pod's (a VM is one pod,
/// and CRI shares these within a pod); the PID namespace is the pod's for its sandbox
/// container, which makes it, and for a member whose spec names the pause container's by
/// a host path (NamespaceMode POD), otherwise a new one. Other namespaces given by host
/// paths (`/proc/<pid>/ns/...` of the host) mean nothing in the guest: new ones there.
fn pod_namespaces(spec: &mut Spec, id: &str, role: PodRole) {
    let Some(namespaces) = spec.linux_mut().as_mut().and_then(|linux| linux.namespaces_mut().as_mut()) else {
        return;
    };
    for ns in namespaces.iter_mut() {
        let kind = match ns.typ() {
            LinuxNamespaceType::Network => Some("net"),
            LinuxNamespaceType::Ipc => Some("ipc"),
            LinuxNamespaceType::Uts => Some("uts"),
            LinuxNamespaceType::Pid if role == PodRole::Sandbox || ns.path().is_some() => Some("pid"),
            _ => None,
        };
        match (kind, ns.path().clone()) {
            (Some(kind), host_path) => {
                if let Some(host_path) = host_path {
                    log::info!(
                        "container {id}: {} namespace {} is the pod's in the guest",
                        ns.typ(),
                        host_path.display()
                    );
                }
                ns.set_path(Some(PathBuf::from(pod::namespace_path(kind))));
            }
            (None, Some(host_path)) => {
                log::info!(
                    "container {id}: {} namespace {} is a host path; a new one in the guest instead",
                    ns.typ(),
                    host_path.display()
                );
                ns.set_path(None);
            }
            (None, None) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn spec_of(value: Value) -> Spec {
        serde_json::from_value(value).expect("a valid spec")
    }

    fn json_of(spec: &Spec) -> Value {
        serde_json::to_value(spec).expect("encodes")
    }

    #[test]
    fn spec_is_rewritten_for_the_guest_and_binds_are_shared() {
        let dir = tempfile::tempdir().expect("tempdir");
        let host = dir.path().join("host");
        std::fs::create_dir(&host).expect("mkdir");
        std::fs::write(host.join("hosts"), "127.0.0.1 localhost\n").expect("write");
        let container_dir = dir.path().join("shared/c1");
        std::fs::create_dir_all(container_dir.join("mounts")).expect("mkdir");
        let binds = Dir::open_root(&container_dir.join("mounts")).expect("open");
        let mut spec = json!({
            "root": {"path": "rootfs", "readonly": false},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind", "source": host.join("hosts"), "options": ["rbind", "ro"]},
                {"destination": "/data", "source": host, "options": ["rbind"]},
                {"destination": "/dev/shm", "type": "bind", "source": "/run/whatever/shm", "options": ["rbind"]}
            ]
        });
        spec["linux"] = json!({"namespaces": [
            {"type": "mount"},
            {"type": "ipc", "path": "/proc/4242/ns/ipc"},
            {"type": "network", "path": "/proc/4242/ns/net"},
            {"type": "pid"}
        ]});
        let mut typed = spec_of(spec);
        assert_eq!(network_namespace(&typed), Some(PathBuf::from("/proc/4242/ns/net")), "the host's path");
        rewrite_for_guest(&mut typed, "c1", PodRole::Member, &binds).expect("shared");
        let spec = json_of(&typed);
        assert_eq!(spec["root"]["path"], "/run/nestbox/shared/c1/rootfs");
        assert_eq!(
            spec["linux"]["namespaces"],
            json!([
                {"type": "mount"},
                {"type": "ipc", "path": "/run/nestbox/pod/ns/ipc"},
                {"type": "network", "path": "/run/nestbox/pod/ns/net"},
                {"type": "pid"}
            ]),
            "host namespace paths are the pod's; a member's new PID namespace stays its own"
        );
        assert_eq!(spec["mounts"][0]["source"], "proc");
        assert_eq!(network_namespace(&typed), Some(PathBuf::from("/run/nestbox/pod/ns/net")), "rewritten");
        assert_eq!(spec["mounts"][1]["source"], "/run/nestbox/shared/c1/mounts/1");
        assert_eq!(spec["mounts"][2]["source"], "/run/nestbox/shared/c1/mounts/2");
        assert_eq!(spec["mounts"][3]["source"], GUEST_POD_SHM_DIR, "the pod's shm in the guest");
        assert_eq!(std::fs::read_to_string(container_dir.join("mounts/1")).expect("bound"), "127.0.0.1 localhost\n");
        assert!(container_dir.join("mounts/2/hosts").exists());
        crate::sandbox::remove_dir(&container_dir).expect("cleanup");
        assert!(mounts::mounts_under(dir.path()).expect("table").is_empty());

        let mut relative = spec_of(json!({"mounts": [{"destination": "/x", "type": "bind", "source": "rel"}]}));
        let err = rewrite_for_guest(&mut relative, "c2", PodRole::Sandbox, &binds).expect_err("relative");
        assert!(err.to_string().contains("/x"));
    }

    #[test]
    fn a_spec_without_root_gets_only_the_guest_path() {
        let mut spec = spec_of(json!({}));
        let binds = tempfile::tempdir().expect("tempdir");
        let binds = Dir::open_root(binds.path()).expect("open");
        rewrite_for_guest(&mut spec, "c1", PodRole::Sandbox, &binds).expect("nothing to share");
        assert_eq!(json_of(&spec)["root"], json!({"path": "/run/nestbox/shared/c1/rootfs"}));
        assert_eq!(network_namespace(&spec), None);
        let ctr_run = spec_of(json!({"linux": {"namespaces": [{"type": "network"}, {"type": "pid"}]}}));
        assert_eq!(network_namespace(&ctr_run), None, "ctr run: a new namespace, no network work");
    }

    #[test]
    fn pid_namespaces_by_role() {
        let namespaces = |role: PodRole, pid: Value| {
            let mut spec = spec_of(
                json!({"linux": {"namespaces": [pid, {"type": "uts"}, {"type": "cgroup", "path": "/proc/1/ns/cgroup"}]}}),
            );
            pod_namespaces(&mut spec, "c", role);
            json_of(&spec)["linux"]["namespaces"].clone()
        };
        let pod_pid = json!({"type": "pid", "path": "/run/nestbox/pod/ns/pid"});
        let rest = [json!({"type": "uts", "path": "/run/nestbox/pod/ns/uts"}), json!({"type": "cgroup"})];
        let want = |pid: &Value| json!([pid, rest[0], rest[1]]);
        assert_eq!(namespaces(PodRole::Sandbox, json!({"type": "pid"})), want(&pod_pid), "the sandbox makes it");
        let shared = json!({"type": "pid", "path": "/proc/77/ns/pid"});
        assert_eq!(namespaces(PodRole::Member, shared), want(&pod_pid), "POD mode: the pause's is the pod's");
        let own = json!({"type": "pid"});
        assert_eq!(namespaces(PodRole::Member, own.clone()), want(&own), "CONTAINER mode: its own");

        let cri = |kind: &str| HashMap::from([(CONTAINER_TYPE_ANNOTATION.to_string(), kind.to_string())]);
        assert_eq!(PodRole::of(&cri("container")), PodRole::Member);
        assert_eq!(PodRole::of(&cri("sandbox")), PodRole::Sandbox);
        assert_eq!(PodRole::of(&HashMap::new()), PodRole::Sandbox, "ctr run: a pod of its own");
    }

    #[test]
    fn host_namespaces_of_a_cri_pod_are_refused_by_name() {
        let cri = |kind: &str| HashMap::from([(CONTAINER_TYPE_ANNOTATION.to_string(), kind.to_string())]);
        let with = |types: &[&str]| {
            let namespaces: Vec<Value> = types.iter().map(|t| json!({"type": t})).collect();
            spec_of(json!({"linux": {"namespaces": namespaces}}))
        };
        let all = with(&["pid", "ipc", "uts", "mount", "network"]);
        refuse_host_namespaces(&all, &cri("sandbox"), "p").expect("a pod of its own namespaces");
        let host_net = with(&["pid", "ipc", "mount"]);
        let err = refuse_host_namespaces(&host_net, &cri("sandbox"), "p1").expect_err("host network").to_string();
        assert!(err.contains("pod p1 asks for the host's network namespace:"), "{err}");
        assert!(err.contains("cannot share the host kernel's namespaces"), "{err}");
        let host_pid_ipc = with(&["uts", "mount", "network"]);
        let err = refuse_host_namespaces(&host_pid_ipc, &cri("sandbox"), "p2").expect_err("host PID, IPC").to_string();
        assert!(err.contains("the host's PID, IPC namespaces:"), "{err}");
        refuse_host_namespaces(&host_net, &HashMap::new(), "ctr").expect("not a CRI pod: the VM's own");
        refuse_host_namespaces(&host_net, &cri("container"), "p3").expect("a member: its pod was checked");
    }

    #[test]
    fn annotations_and_root_are_read_leniently() {
        let text = |v: Value| serde_json::to_vec(&v).expect("encodes");
        let a = annotations_of(&text(json!({"annotations": {SANDBOX_ID_ANNOTATION: "pod", "n": 1}})));
        assert_eq!(a.get(SANDBOX_ID_ANNOTATION).map(String::as_str), Some("pod"));
        assert!(!a.contains_key("n"));
        assert!(annotations_of(&text(json!([]))).is_empty());
        assert!(annotations_of(b"not json").is_empty());
        assert_eq!(pod_id(&a, "c1"), "pod");
        assert_eq!(pod_id(&HashMap::new(), "c1"), "c1");
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("rootfs")).expect("mkdir");
        assert_eq!(root_dir(&spec_of(json!({})), dir.path()).expect("default rootfs"), dir.path().join("rootfs"));
        assert!(root_dir(&spec_of(json!({"root": {"path": "missing"}})), dir.path()).is_err());
    }
}
