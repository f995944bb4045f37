//! What a killed containerd leaves of runc: containers whose shim was killed keep running
//! (they are no child of the shim's once started), and their state stays in
//! /run/containerd/runc/<namespace>, a folder every containerd on the host shares.

use crate::run_bounded;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Kills and deletes the runc containers of containerd namespace `namespace` whose bundle
/// is below `dir` (another containerd's are left alone). Best effort: for Drop.
pub(super) fn remove_runc_containers(namespace: &str, dir: &Path) {
    let root = Path::new("/run/containerd/runc").join(namespace);
    if !root.is_dir() {
        return;
    }
    let runc = |args: &[&str]| {
        let mut cmd = Command::new("runc");
        cmd.arg("--root").arg(&root).args(args);
        run_bounded(&mut cmd, Duration::from_secs(30)).ok().filter(|f| f.status.success())
    };
    let Some(listed) = runc(&["list", "--format", "json"]) else { return };
    let containers: Vec<serde_json::Value> = serde_json::from_str(&listed.stdout).unwrap_or_default();
    for container in containers {
        let (Some(id), Some(bundle)) = (container["id"].as_str(), container["bundle"].as_str()) else { continue };
        if Path::new(bundle).starts_with(dir) {
            let _ = runc(&["kill", "--all", id, "KILL"]);
            let _ = runc(&["delete", "--force", id]);
        }
    }
}
