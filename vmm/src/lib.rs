//! nestbox-vmm: a small KVM virtual machine monitor on the rust-vmm crates. One process
//! runs one microVM: guest memory, vCPU threads, PVH boot of an uncompressed vmlinux with
//! an initramfs, the in-kernel irqchip and PIT, a serial console and an i8042 reset line.
//!
//! [`config`] describes a VM, [`builder`] turns the description into a running VM,
//! [`vstate`] holds the KVM objects, [`arch`] the x86_64 boot details and [`devices`]
//! the emulated hardware.

pub mod api;
pub mod arch;
pub mod builder;
pub mod config;
pub mod devices;
pub mod machine;
pub mod snapshot;
pub mod vstate;

pub use builder::{build_and_start, restore_and_start, RunOptions};
pub use config::VmConfig;
pub use machine::Vmm;
pub use vstate::vcpu::VmExit;
