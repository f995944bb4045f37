//! KVM objects: the KVM handle, guest memory, the VM with its interrupt controllers, and
//! vCPUs. The VM and vCPUs keep their saved state in a `persist` module beside them.

pub mod kvm;
pub mod memory;
pub mod vcpu;
pub mod vm;
