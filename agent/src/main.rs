//! nestbox-agent: PID 1 of a nestbox guest, serving the agent API.
//!
//! As PID 1 (in the guest) it brings the guest up (/proc, /sys, /dev), announces itself on
//! the console with the guest kernel's release, and then either reboots at once
//! (`nestbox.selftest` on the kernel command line: a boot self-test) or serves the agent API
//! (ttrpc on vsock port 1024) on threads while the main thread reaps orphans. With
//! `nestbox.vsock_test` it also runs the vsock test services (see `vsock_test`).
//!
//! On a host, `nestbox-agent --listen unix:///path/agent.sock` serves the same API on a
//! Unix socket as an ordinary process, so the API is tested without a VM.

mod host;
mod init;
mod rpc;
mod serve;
mod vsock;
mod vsock_test;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

const USAGE: &str = "\
usage: nestbox-agent                                  (as PID 1 of a nestbox guest)
       nestbox-agent --listen unix:///path/agent.sock (host mode: serve the API on a Unix socket)
       nestbox-agent --version";

/// What the command line asks for (outside the guest: as PID 1 the arguments are the
/// kernel's leftovers and are ignored).
#[derive(Debug, PartialEq)]
enum Command {
    Version,
    Help,
    Listen(PathBuf),
    /// No arguments: only PID 1 may do that.
    Init,
}

fn parse_args(args: impl IntoIterator<Item = OsString>) -> Result<Command, String> {
    let mut args = args.into_iter();
    let mut listen = None;
    while let Some(arg) = args.next() {
        let arg = arg.into_string().map_err(|a| format!("argument {a:?} is not UTF-8"))?;
        let value = match arg.as_str() {
            "--version" | "-V" => return Ok(Command::Version),
            "--help" | "-h" => return Ok(Command::Help),
            "--listen" => args
                .next()
                .ok_or("--listen needs a value: unix:///path/to/agent.sock")?
                .into_string()
                .map_err(|a| format!("--listen {a:?} is not UTF-8"))?,
            _ => match arg.strip_prefix("--listen=") {
                Some(value) => value.to_string(),
                None => return Err(format!("unknown argument {arg:?}")),
            },
        };
        if listen.is_some() {
            return Err("--listen given more than once".into());
        }
        listen = Some(host::parse_listen(&value)?);
    }
    Ok(listen.map_or(Command::Init, Command::Listen))
}

fn main() -> ExitCode {
    let is_init = std::process::id() == 1;
    // The kernel hands init the command-line words it does not know, which are not ours.
    let command = if is_init { Ok(Command::Init) } else { parse_args(std::env::args_os().skip(1)) };
    match command {
        Ok(Command::Version) => {
            println!("nestbox-agent {VERSION}");
            ExitCode::SUCCESS
        }
        Ok(Command::Help) => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Ok(Command::Listen(socket)) => match host::run(&socket) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("nestbox-agent: error: {e:#}");
                ExitCode::FAILURE
            }
        },
        // As PID 1, returning would panic the kernel; `init::run` never returns.
        Ok(Command::Init) if is_init => init::run(),
        Ok(Command::Init) => {
            eprintln!(
                "nestbox-agent: not PID 1: in a guest the agent is init (it mounts the guest's file systems and \
                 reboots the VM); on a host, run it with --listen\n{USAGE}"
            );
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("nestbox-agent: error: {e}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Command, String> {
        parse_args(args.iter().map(OsString::from))
    }

    #[test]
    fn command_lines() {
        assert_eq!(parse(&[]), Ok(Command::Init));
        assert_eq!(parse(&["--version"]), Ok(Command::Version));
        assert_eq!(parse(&["-h"]), Ok(Command::Help));
        assert_eq!(parse(&["--listen", "unix:///a.sock"]), Ok(Command::Listen("/a.sock".into())));
        assert_eq!(parse(&["--listen=unix:///a.sock"]), Ok(Command::Listen("/a.sock".into())));
        assert!(parse(&["--listen"]).is_err_and(|e| e.contains("needs a value")));
        assert!(parse(&["--listen", "/a.sock"]).is_err_and(|e| e.contains("expected unix://")));
        assert!(parse(&["--listen=unix:///a", "--listen=unix:///b"]).is_err_and(|e| e.contains("more than once")));
        assert!(parse(&["--frobnicate"]).is_err_and(|e| e.contains("unknown argument")));
    }
}
