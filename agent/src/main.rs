//! nestbox-agent: PID 1 of a nestbox guest.
//!
//! Version 0 brings the guest up (/proc, /sys, /dev), announces itself on the console
//! with the guest kernel's release, and then either reboots at once (`nestbox.selftest`
//! on the kernel command line: a boot self-test) or stays up reaping orphans.
//! The agent API (ttrpc over vsock) and container management come next.

mod init;

use std::process::ExitCode;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

fn main() -> ExitCode {
    if std::env::args().any(|a| a == "--version" || a == "-V") {
        println!("nestbox-agent {VERSION}");
        return ExitCode::SUCCESS;
    }
    if std::process::id() != 1 {
        eprintln!(
            "nestbox-agent: must run as PID 1 of a nestbox guest (it mounts the guest's file systems \
             and reboots the VM); host mode arrives with the agent API"
        );
        return ExitCode::from(2);
    }
    // As PID 1, returning would panic the kernel; `init::run` never returns.
    init::run()
}
