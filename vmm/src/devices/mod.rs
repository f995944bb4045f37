//! Emulated devices and the port I/O bus that routes vCPU exits to them.

pub mod bus;
pub mod legacy;
