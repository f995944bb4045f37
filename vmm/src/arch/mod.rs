//! Architecture support. nestbox runs on x86_64 hosts only for now.

pub mod x86_64;
