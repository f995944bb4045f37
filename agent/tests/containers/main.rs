//! Containers in host mode: the real agent binary (`--listen`), as root, running busybox
//! containers built in a temporary directory, through the real API and I/O sockets.
//!
//! cgroup features use whatever this host has: cgroup v2 with controllers where the
//! hierarchy is unified, the v1 controllers where they are bound to v1 (the project's
//! development machines). The guest always uses v2 (see docs/agent.md).

//!
//! One test binary, a module per topic, on the harness in `harness`.

/// Containers need root: a test run by another user says so and passes.
macro_rules! root_only {
    () => {
        if !crate::harness::is_root() {
            eprintln!("skipped: containers need root");
            return;
        }
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
