//! nestbox's containerd shim (`containerd-shim-nestbox-v2`) and host tool (`nestbox`).
//!
//! - [`config`]: `/etc/nestbox/config.toml` and per-pod annotations;
//! - [`sandbox`]: one pod's VM: directory, VMM process, rootfs sharing, agent client;
//! - [`io`]: containerd's fifos copied to and from the guest's process streams;
//! - [`task`]: containerd's task API v2 mapped onto the sandbox;
//! - [`shim`]: the `start` and `delete` subcommands (pod grouping, cleanup after a lost shim);
//! - [`check`]: what `nestbox check` verifies about the host.

pub mod check;
pub mod config;
pub mod io;
pub mod sandbox;
pub mod shim;
pub mod task;
