//! nestbox's containerd shim (`containerd-shim-nestbox-v2`) and host tool (`nestbox`).
//!
//! From the top down (each module imports only those below it):
//!
//! - [`install`]: `nestbox install` and `uninstall`: the files put in place, containerd's
//!   config edited (toml_edit, the rest of the file kept), a manifest to undo both;
//! - [`shim`]: the `start` and `delete` subcommands (pod grouping, cleanup after a lost shim);
//! - [`task`]: containerd's task API v2, each call mapped onto the pod;
//! - [`pod`]: the pod this shim serves: its containers, their processes, the VM's life;
//! - [`process`]: the process table; [`events`]: task events to containerd, in call order;
//!   [`metrics`]: the agent's statistics as containerd's cgroup v2 metrics;
//! - [`rpc_status`]: failures as the ttrpc statuses containerd sees;
//! - [`spec`]: the OCI spec (oci-spec types): the pod it names, rewritten for the guest;
//! - [`sandbox`]: one pod's VM: directory, VMM process, rootfs sharing, agent client;
//!   [`io`]: containerd's fifos copied to and from the guest's process streams;
//! - [`check`]: what `nestbox check` verifies about the host;
//! - [`config`]: `/etc/nestbox/config.toml` and per-pod annotations.

pub mod check;
pub mod config;
pub mod events;
pub mod install;
pub mod io;
pub mod metrics;
pub mod pod;
pub mod process;
pub mod rpc_status;
pub mod sandbox;
pub mod shim;
pub mod spec;
pub mod task;
