//! x86_64 specifics: the guest memory layout, PVH boot, MP table, CPUID, vCPU registers.

pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod regs;
