//! KVM objects: the KVM handle, the VM with its memory and interrupt controllers, vCPUs.

pub mod kvm;
pub mod memory;
pub mod vcpu;
pub mod vm;
