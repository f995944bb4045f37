//! The pod's namespaces inside the guest, as a container's OCI spec names them.
//!
//! A VM is one pod. Its network, IPC and UTS namespaces exist once in the guest (the agent
//! makes and holds them at CreateSandbox), and so does its PID namespace when the pod shares
//! one (the first container that names it, CRI's pause container, is its init). The shim
//! rewrites the spec's namespace entries to the reserved paths below (containerd names the
//! pause container's namespaces by host paths, which mean nothing in the guest); the agent
//! resolves them to the namespaces it holds. No file exists at these paths: they are names.

use std::path::Path;

/// The folder of the reserved paths: `<NAMESPACE_DIR>/<kind>`.
pub const NAMESPACE_DIR: &str = "/run/nestbox/pod/ns";

/// The kinds of pod namespace, by their names in `/proc/<pid>/ns/`.
pub const NAMESPACE_KINDS: [&str; 4] = ["net", "ipc", "uts", "pid"];

/// The reserved path of the pod's namespace of `kind` (one of [`NAMESPACE_KINDS`]).
pub fn namespace_path(kind: &str) -> String {
    format!("{NAMESPACE_DIR}/{kind}")
}

/// The kind of pod namespace a reserved path names; `None` for any other path (a path
/// below [`NAMESPACE_DIR`] that names no kind is `Some(Err(path))`, for the caller to refuse).
pub fn namespace_kind(path: &Path) -> Option<Result<&'static str, String>> {
    let rest = path.strip_prefix(NAMESPACE_DIR).ok()?;
    let kind = NAMESPACE_KINDS.into_iter().find(|k| rest == Path::new(k));
    Some(kind.ok_or_else(|| format!("{} names no pod namespace (kinds: {NAMESPACE_KINDS:?})", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_paths_name_their_kind() {
        for kind in NAMESPACE_KINDS {
            assert_eq!(namespace_kind(Path::new(&namespace_path(kind))), Some(Ok(kind)));
        }
        assert_eq!(namespace_kind(Path::new("/proc/42/ns/ipc")), None);
        assert!(matches!(namespace_kind(Path::new("/run/nestbox/pod/ns/mnt")), Some(Err(e)) if e.contains("mnt")));
        assert!(matches!(namespace_kind(Path::new("/run/nestbox/pod/ns/ipc/x")), Some(Err(_))));
    }
}
