//! Containers in host mode: the real agent binary (`--listen`), as root, running busybox
//! containers built in a temporary directory, through the real API and I/O sockets.
//!
//! cgroup features use whatever this host has: cgroup v2 with controllers where the
//! hierarchy is unified, the v1 controllers where they are bound to v1 (the project's
//! development machines). The guest always uses v2 (see docs/agent.md).

//!
//! One test binary, a module per topic, on the harness in `harness`.

/// Containers need root: a test run by another user fails, saying so.
macro_rules! root_only {
    () => {
        // A test that skipped itself without root would pass without running.
        assert!(crate::harness::is_root(), "container tests need root (namespaces, mounts, cgroups): run them as root");
    };
}

mod bad_input;
mod guest_work;
mod harness;
mod limits;
mod network;
mod pod;
mod port_forward;
mod processes;
mod security;
mod streams;
