//! nestbox-vmm: a small KVM virtual machine monitor on the rust-vmm crates. One process
//! runs one microVM: guest memory, vCPU threads, PVH boot of an uncompressed vmlinux with
//! an initramfs, the in-kernel irqchip and PIT, a serial console and an i8042 reset line.
//!
//! Layers, bottom to top; a module imports only from layers below it (and `util`):
//! - [`util`]: small helpers, no crate imports.
//! - [`seccomp`]: per-thread filters and the device launcher; imports nothing of the crate.
//! - [`arch`]: the x86_64 boot details (layout, PVH, MP table, CPUID, registers).
//! - [`devices`]: the buses and emulated hardware, each device's saved state beside it.
//! - [`vstate`]: the KVM objects (kvm, memory, vm, vcpu), each with its saved state; vCPU
//!   threads route exits to the device buses and report through [`vstate::vcpu::VcpuEvent`].
//! - [`config`]: a validated description of a VM.
//! - [`snapshot`]: the microVM state composed of the components' states, and the files.
//! - [`vmm`]: the running VM ([`Vmm`]) and the [`vmm::VmControl`] handle to it.
//! - [`builder`]: configuration or snapshot → running VM (boot and restore paths).
//! - [`api`]: the control socket, which parses requests and holds only a `VmControl`.
//! - [`jail`]: the confinement `main` enters before the VM starts (mounts, cgroup, capabilities).

pub mod api;
pub mod arch;
pub mod builder;
pub mod config;
pub mod devices;
pub mod jail;
pub mod seccomp;
pub mod snapshot;
pub mod util;
pub mod vmm;
pub mod vstate;

pub use builder::{build_and_start, restore_and_start, RunOptions};
pub use config::VmConfig;
pub use vmm::{VmExit, Vmm};
