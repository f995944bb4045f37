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
//!
//! Layout: `rpc` is the API surface (`guest_work` counts what its calls cost at debug
//! level); `sandbox` the pod and its containers; `container`
//! turns OCI specs into isolated processes (with the re-executed `--container-helper`);
//! `process` holds their standard I/O; `reaper` owns waitpid; `cgroup` and `oom` the
//! limits and OOM events.

mod cgroup;
mod container;
mod error;
mod guest_work;
mod host;
mod host_hybrid;
mod identity;
mod init;
mod network;
mod oom;
mod pod_namespaces;
mod port_forward;
mod process;
mod reaper;
mod rpc;
mod sandbox;
mod serve;
mod vsock;
mod vsock_test;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "\
usage: nestbox-agent                                  (as PID 1 of a nestbox guest)
       nestbox-agent --listen unix:///path/agent.sock [--io-listen unix:///path/io.sock]
                     [--hybrid-listen unix:///path/vsock.sock --shared-dir DIR]
                                                      (host mode: serve the API, and the standard
                                                      I/O port, on Unix sockets; the I/O socket
                                                      defaults to the API socket's path + .io;
                                                      with --hybrid-listen also every port behind
                                                      a VMM-style hybrid vsock socket, and DIR
                                                      standing in for the virtio-fs share)
       nestbox-agent --version";

/// What the command line asks for (outside the guest: as PID 1 the arguments are the
/// kernel's leftovers and are ignored).
#[derive(Debug, PartialEq)]
enum Command {
    Version,
    Help,
    /// Host mode: the API socket, the I/O socket and what stands in for the VM.
    Listen(host::Options),
    /// No arguments: only PID 1 may do that.
    Init,
}

fn parse_args(args: impl IntoIterator<Item = OsString>) -> Result<Command, String> {
    let mut args = args.into_iter();
    let mut listen = None;
    let mut io_listen = None;
    let mut hybrid = None;
    let mut share = None;
    while let Some(arg) = args.next() {
        let arg = arg.into_string().map_err(|a| format!("argument {a:?} is not UTF-8"))?;
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f.to_string(), Some(v.to_string())),
            None => (arg.clone(), None),
        };
        let slot = match flag.as_str() {
            "--version" | "-V" => return Ok(Command::Version),
            "--help" | "-h" => return Ok(Command::Help),
            "--listen" => &mut listen,
            "--io-listen" => &mut io_listen,
            "--hybrid-listen" => &mut hybrid,
            "--shared-dir" => &mut share,
            _ => return Err(format!("unknown argument {arg:?}")),
        };
        let value = match inline {
            Some(v) => v,
            None => args
                .next()
                .ok_or(format!("{flag} needs a value: unix:///path/to/socket"))?
                .into_string()
                .map_err(|a| format!("{flag} {a:?} is not UTF-8"))?,
        };
        if slot.is_some() {
            return Err(format!("{flag} given more than once"));
        }
        *slot = Some(match flag.as_str() {
            "--shared-dir" => PathBuf::from(value),
            _ => host::parse_listen(&value).map_err(|e| e.replacen("--listen", &flag, 1))?,
        });
    }
    if hybrid.is_some() != share.is_some() {
        return Err("--hybrid-listen and --shared-dir go together (a VMM's socket and its share)".into());
    }
    match (listen, io_listen) {
        (Some(api), io) => {
            let io = io.unwrap_or_else(|| host::default_io_socket(&api));
            Ok(Command::Listen(host::Options { socket: api, io_socket: io, hybrid, share }))
        }
        (None, Some(_)) => Err("--io-listen needs --listen".into()),
        (None, None) if hybrid.is_some() => Err("--hybrid-listen needs --listen".into()),
        (None, None) => Ok(Command::Init),
    }
}

fn main() -> ExitCode {
    // The container helper (re-executed by the agent, see container::spawn) comes first:
    // it is PID 1 of a new PID namespace, which must not make it think it is the guest's init.
    if std::env::args_os().nth(1).is_some_and(|a| a == container::spawn::HELPER_ARG) {
        container::helper::main();
    }
    let is_init = std::process::id() == 1;
    // The kernel hands init the command-line words it does not know, which are not ours.
    let command = if is_init { Ok(Command::Init) } else { parse_args(std::env::args_os().skip(1)) };
    match command {
        Ok(Command::Version) => {
            println!("nestbox-agent {}", rpc::VERSION);
            ExitCode::SUCCESS
        }
        Ok(Command::Help) => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Ok(Command::Listen(options)) => match host::run(&options) {
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
        let listen = |api: &str, io: &str| {
            Command::Listen(host::Options { socket: api.into(), io_socket: io.into(), hybrid: None, share: None })
        };
        assert_eq!(parse(&["--listen", "unix:///a.sock"]), Ok(listen("/a.sock", "/a.sock.io")));
        assert_eq!(parse(&["--listen=unix:///a.sock"]), Ok(listen("/a.sock", "/a.sock.io")));
        assert_eq!(parse(&["--io-listen=unix:///io", "--listen", "unix:///a"]), Ok(listen("/a", "/io")));
        assert_eq!(
            parse(&["--listen=unix:///a", "--hybrid-listen=unix:///v.sock", "--shared-dir", "/s"]),
            Ok(Command::Listen(host::Options {
                socket: "/a".into(),
                io_socket: "/a.io".into(),
                hybrid: Some("/v.sock".into()),
                share: Some("/s".into())
            }))
        );
        assert!(parse(&["--listen=unix:///a", "--shared-dir=/s"]).is_err_and(|e| e.contains("go together")));
        assert!(parse(&["--hybrid-listen=unix:///v", "--shared-dir=/s"]).is_err_and(|e| e.contains("needs --listen")));
        assert!(parse(&["--listen=unix:///a", "--hybrid-listen=/v", "--shared-dir=/s"])
            .is_err_and(|e| e.starts_with("--hybrid-listen")));
        assert!(parse(&["--io-listen=unix:///io"]).is_err_and(|e| e.contains("needs --listen")));
        assert!(parse(&["--io-listen", "/io", "--listen=unix:///a"]).is_err_and(|e| e.starts_with("--io-listen")));
        assert!(parse(&["--listen"]).is_err_and(|e| e.contains("needs a value")));
        assert!(parse(&["--listen", "/a.sock"]).is_err_and(|e| e.contains("expected unix://")));
        assert!(parse(&["--listen=unix:///a", "--listen=unix:///b"]).is_err_and(|e| e.contains("more than once")));
        assert!(parse(&["--frobnicate"]).is_err_and(|e| e.contains("unknown argument")));
    }
}
