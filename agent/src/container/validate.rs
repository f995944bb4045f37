//! Checks of a request before anything is made for it: ids, the spec and process JSON,
//! the namespaces the agent supports, the seccomp profile, capabilities. A request that
//! fails here is INVALID_ARGUMENT and leaves nothing behind.

use std::path::{Path, PathBuf};

use nestbox_protocols::agent::CreateContainerRequest;
use nestbox_protocols::pod;
use nestbox_protocols::stdio::validate_id;
use nestbox_protocols::types::{Stdio, Storage};
use oci_spec::runtime::{LinuxNamespaceType, Process as OciProcess, Spec};

use super::{caps, seccomp};
use crate::error::{invalid, AgentError};

/// A CreateContainer request that passed every check that needs nothing made.
pub struct CreateRequest<'a> {
    pub id: &'a str,
    /// The spec as received (passed on to the helper, never re-serialised).
    pub spec_json: &'a str,
    pub spec: Spec,
    pub process: OciProcess,
    pub stdio: Stdio,
    /// Mounted before the container is created.
    pub storages: &'a [Storage],
    /// The container's root file system, an absolute guest path.
    pub root: PathBuf,
    /// Clone flags of the namespaces the container gets new.
    pub clone_flags: i32,
    /// The container has a PID namespace other than the agent's (new or the pod's): its
    /// execs join it.
    pub has_pid_ns: bool,
    /// The pod's namespaces the spec names (by their reserved paths, see
    /// `nestbox_protocols::pod`), which the sandbox resolves: as clone flags.
    pub pod_namespaces: i32,
}

impl<'a> CreateRequest<'a> {
    pub fn check(req: &'a CreateContainerRequest) -> Result<Self, AgentError> {
        let id = req.container_id.as_str();
        validate_id("container id", id).map_err(invalid)?;
        let spec_json = std::str::from_utf8(&req.oci_spec_json)
            .map_err(|e| invalid(format!("container {id}: invalid OCI spec JSON: {e}")))?;
        let spec: Spec = serde_json::from_str(spec_json)
            .map_err(|e| invalid(format!("container {id}: invalid OCI spec JSON: {e}")))?;
        let process = spec.process().clone().ok_or_else(|| invalid("the spec has no process"))?;
        let stdio = req.stdio.clone().unwrap_or_default();
        check_process(&process, &stdio)?;
        let root = spec.root().as_ref().ok_or_else(|| invalid("the spec has no root"))?.path().clone();
        if !root.is_absolute() {
            return Err(invalid(format!("root.path {} is not absolute (it must be a guest path)", root.display())));
        }
        let NamespaceFlags { new: clone_flags, pod: pod_namespaces } = namespace_flags(&spec)?;
        let has_pid_ns = (clone_flags | pod_namespaces) & libc::CLONE_NEWPID != 0;
        if let Some(profile) = spec.linux().as_ref().and_then(|l| l.seccomp().as_ref()) {
            seccomp::compile(profile).map_err(|e| invalid(e.to_string()))?;
        }
        Ok(CreateRequest {
            id,
            spec_json,
            spec,
            process,
            stdio,
            storages: &req.storages,
            root,
            clone_flags,
            has_pid_ns,
            pod_namespaces,
        })
    }
}

/// The spec's namespaces as clone flags: those the container gets new, and those of the
/// pod it joins.
struct NamespaceFlags {
    new: i32,
    pod: i32,
}

/// The clone flag of a pod namespace kind (`nestbox_protocols::pod::NAMESPACE_KINDS`).
fn pod_namespace_flag(typ: LinuxNamespaceType, path: &Path) -> Result<Option<i32>, AgentError> {
    let Some(kind) = pod::namespace_kind(path) else { return Ok(None) };
    let kind = kind.map_err(invalid)?;
    let flag = match (typ, kind) {
        (LinuxNamespaceType::Network, "net") => libc::CLONE_NEWNET,
        (LinuxNamespaceType::Ipc, "ipc") => libc::CLONE_NEWIPC,
        (LinuxNamespaceType::Uts, "uts") => libc::CLONE_NEWUTS,
        (LinuxNamespaceType::Pid, "pid") => libc::CLONE_NEWPID,
        _ => {
            return Err(invalid(format!(
                "a {typ:?} namespace cannot be the pod's {kind} namespace ({})",
                path.display()
            )))
        }
    };
    Ok(Some(flag))
}

/// Clone flags for the spec's namespaces, after checking they are ones the agent supports.
fn namespace_flags(spec: &Spec) -> Result<NamespaceFlags, AgentError> {
    let (mut flags, mut pod) = (0, 0);
    let namespaces = spec.linux().as_ref().and_then(|l| l.namespaces().as_ref());
    for ns in namespaces.into_iter().flatten() {
        if let Some(flag) = ns.path().as_deref().map(|p| pod_namespace_flag(ns.typ(), p)).transpose()?.flatten() {
            pod |= flag;
            continue;
        }
        let flag = match ns.typ() {
            // Not the pod's (only a spec the shim did not rewrite): the VM's network.
            LinuxNamespaceType::Network => continue,
            LinuxNamespaceType::Pid if ns.path().is_none() => libc::CLONE_NEWPID,
            LinuxNamespaceType::Mount if ns.path().is_none() => libc::CLONE_NEWNS,
            LinuxNamespaceType::Ipc | LinuxNamespaceType::Uts | LinuxNamespaceType::Cgroup if ns.path().is_some() => {
                continue; // the helper joins these by path
            }
            LinuxNamespaceType::Ipc => libc::CLONE_NEWIPC,
            LinuxNamespaceType::Uts => libc::CLONE_NEWUTS,
            LinuxNamespaceType::Cgroup => continue, // the helper unshares it once in its cgroup
            other => {
                let how = if ns.path().is_some() { "joining an existing" } else { "a new" };
                return Err(invalid(format!("{how} {other:?} namespace is not supported")));
            }
        };
        flags |= flag;
    }
    if flags & libc::CLONE_NEWNS == 0 {
        return Err(invalid("the spec must ask for a new mount namespace (the container gets its own root)"));
    }
    Ok(NamespaceFlags { new: flags, pod })
}

/// The namespaces (clone flags) an exec joins besides the PID one: those of the spec's
/// kinds that the helper can enter through the init's pidfd.
pub fn exec_join_flags(spec: &Spec) -> i32 {
    let namespaces = spec.linux().as_ref().and_then(|l| l.namespaces().as_ref());
    [
        (LinuxNamespaceType::Mount, libc::CLONE_NEWNS),
        (LinuxNamespaceType::Network, libc::CLONE_NEWNET),
        (LinuxNamespaceType::Ipc, libc::CLONE_NEWIPC),
        (LinuxNamespaceType::Uts, libc::CLONE_NEWUTS),
        (LinuxNamespaceType::Cgroup, libc::CLONE_NEWCGROUP),
    ]
    .into_iter()
    .filter(|(t, _)| namespaces.into_iter().flatten().any(|n| n.typ() == *t))
    .fold(0, |acc, (_, f)| acc | f)
}

/// An exec's process from its JSON (kept as received, for the helper).
pub fn exec_process<'a>(exec_id: &str, process_json: &'a [u8]) -> Result<(&'a str, OciProcess), AgentError> {
    let json = std::str::from_utf8(process_json)
        .map_err(|e| invalid(format!("exec {exec_id}: invalid OCI process JSON: {e}")))?;
    let process: OciProcess =
        serde_json::from_str(json).map_err(|e| invalid(format!("exec {exec_id}: invalid OCI process JSON: {e}")))?;
    Ok((json, process))
}

pub fn check_process(process: &OciProcess, stdio: &Stdio) -> Result<(), AgentError> {
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(invalid("process.args is empty: nothing to run"));
    }
    if process.terminal().unwrap_or(false) != stdio.terminal {
        return Err(invalid(format!(
            "process.terminal is {} but stdio.terminal is {}: they must agree",
            process.terminal().unwrap_or(false),
            stdio.terminal
        )));
    }
    if let Some(c) = process.capabilities() {
        caps::validate(c).map_err(|e| invalid(e.to_string()))?;
    }
    Ok(())
}

/// The spec's initial terminal size as (rows, columns).
pub fn console_size(process: &OciProcess) -> Option<(u16, u16)> {
    process
        .console_size()
        .as_ref()
        .map(|b| (b.height().min(u16::MAX as u64) as u16, b.width().min(u16::MAX as u64) as u16))
}
