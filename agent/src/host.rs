//! Host mode: the agent as an ordinary process serving its API on a Unix socket and its
//! I/O port on another (`--io-listen`, by default the API socket's path plus `.io`), so the
//! API and the container logic are tested without a VM.
//!
//! It behaves as PID 1 would where that matters: it is a child subreaper (orphans of its
//! containers come back to it) with the same reaper, and it works in a mount namespace of
//! its own so storage it mounts never shows up on the host. Containers' cgroups go below
//! its own cgroup (see `cgroup`). At exit it removes its containers.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use crate::host_hybrid::Ports;
use anyhow::{bail, Context};
use nix::sys::signal::{SigSet, Signal};

/// The socket path of a `--listen` argument (`unix:///path/to/agent.sock`), or what is
/// wrong with it.
pub fn parse_listen(arg: &str) -> Result<PathBuf, String> {
    let Some(path) = arg.strip_prefix("unix://") else {
        return Err(format!(
            "--listen {arg:?}: expected unix:///path/to/agent.sock (host mode serves on a Unix socket; \
             vsock is the guest's, where the agent runs as PID 1)"
        ));
    };
    if path.is_empty() {
        return Err(format!("--listen {arg:?}: no socket path after unix://"));
    }
    if path.starts_with('@') {
        return Err(format!("--listen {arg:?}: abstract sockets are not supported; give a file system path"));
    }
    Ok(PathBuf::from(path))
}

/// The default I/O socket for an API socket path.
pub fn default_io_socket(socket: &Path) -> PathBuf {
    let mut path = socket.as_os_str().to_owned();
    path.push(".io");
    PathBuf::from(path)
}

/// What host mode serves on.
#[derive(Debug, PartialEq)]
pub struct Options {
    pub socket: PathBuf,
    pub io_socket: PathBuf,
    /// A hybrid vsock socket standing in for a VMM's (`CONNECT <port>`), for the shim's
    /// test-only host-agent build (see `host_hybrid`).
    pub hybrid: Option<PathBuf>,
    /// The directory standing in for the virtio-fs share: CreateSandbox's virtiofs storage
    /// becomes a bind mount of it.
    pub share: Option<PathBuf>,
}

/// Serves until a Shutdown call (or SIGINT/SIGTERM), then removes its containers and the
/// sockets.
pub fn run(options: &Options) -> anyhow::Result<()> {
    let (socket, io_socket) = (options.socket.as_path(), options.io_socket.as_path());
    // Blocked before any thread starts (they inherit the mask): SIGINT and SIGTERM then
    // wait for the signal thread below instead of killing the process mid-call and
    // leaving the socket file behind, and SIGCHLD waits for the reaper.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    let mut blocked = signals;
    blocked.add(Signal::SIGCHLD);
    blocked.thread_block().context("blocking SIGINT, SIGTERM and SIGCHLD")?;

    // Single-threaded still, as unshare(CLONE_NEWNS) requires.
    let private = private_mounts();
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        eprintln!("nestbox-agent: not a child subreaper: {}", io::Error::last_os_error());
    }
    let reaper = crate::reaper::Reaper::new();
    let reaping = reaper.clone();
    std::thread::Builder::new().name("reaper".into()).spawn(move || reaping.run()).context("starting the reaper")?;

    prepare_socket_path(socket)?;
    prepare_socket_path(io_socket)?;
    let io = crate::process::streams::IoHub::new();
    io.serve_unix(io_socket).with_context(|| format!("listening on {}", io_socket.display()))?;
    let env = crate::container::Env {
        reaper,
        io,
        exe: crate::container::spawn::own_executable().context("opening the agent's own executable")?,
        cgroups: crate::cgroup::Hierarchy::host(private).map_err(|e| e.to_string()),
        oom: Default::default(),
        share: options.share.clone(),
        // The host's kernel saves every register its tasks use.
        glibc_avx_off: false,
    };
    if let Err(e) = &env.cgroups {
        eprintln!("nestbox-agent: containers cannot be created: {e}");
    }
    let sandbox = crate::sandbox::Sandbox::new(env, false);
    let forward_socket = crate::port_forward::host_socket(socket);
    prepare_socket_path(&forward_socket)?;
    crate::port_forward::serve_unix(&forward_socket, crate::port_forward::of_sandbox(sandbox.clone()))
        .with_context(|| format!("listening on {}", forward_socket.display()))?;
    let address = format!("unix://{}", socket.display());
    let serving = crate::serve::start(&address, false, sandbox.clone())?;
    if let Some(hybrid) = &options.hybrid {
        serve_hybrid(hybrid, Ports { api: socket.into(), io: io_socket.into(), forward: forward_socket.clone() })?;
    }
    println!(
        "nestbox-agent {}: listening on {address} (host mode), I/O on unix://{}",
        crate::rpc::VERSION,
        io_socket.display()
    );

    let shutdown = serving.shutdown_handle();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(signal) = signals.wait() {
                eprintln!("nestbox-agent: {signal}: shutting down");
                let _ = shutdown.send(());
            }
        })
        .context("starting the signal thread")?;

    serving.wait_for_shutdown();
    sandbox.cleanup();
    for path in [io_socket, socket].into_iter().chain(options.hybrid.as_deref()) {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", path.display()))
            }
            _ => {}
        }
    }
    Ok(())
}

/// The hybrid vsock socket of `--hybrid-listen`, in front of the host-mode sockets.
fn serve_hybrid(hybrid: &Path, ports: Ports) -> anyhow::Result<()> {
    prepare_socket_path(hybrid)?;
    crate::host_hybrid::serve(hybrid, ports).with_context(|| format!("listening on {}", hybrid.display()))
}

/// A mount namespace of the agent's own, receiving the host's mounts but sending none back;
/// whether it was made.
fn private_mounts() -> bool {
    use nix::mount::{mount, MsFlags};
    let made = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .and_then(|()| mount(None::<&str>, "/", None::<&str>, MsFlags::MS_SLAVE | MsFlags::MS_REC, None::<&str>));
    if let Err(e) = &made {
        eprintln!("nestbox-agent: no mount namespace of its own ({e}): storage mounts would reach the host");
    }
    made.is_ok()
}

/// Makes `socket` bindable: its directory must exist, and a socket file left by an agent
/// that died is removed, but never a live agent's socket or a file that is not a socket.
fn prepare_socket_path(socket: &Path) -> anyhow::Result<()> {
    if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            bail!("cannot listen on {}: directory {} does not exist", socket.display(), dir.display());
        }
    }
    let meta = match std::fs::symlink_metadata(socket) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("checking {}", socket.display())),
        Ok(meta) => meta,
    };
    if !meta.file_type().is_socket() {
        bail!("cannot listen on {}: it exists and is not a socket", socket.display());
    }
    match UnixStream::connect(socket) {
        Ok(_) => bail!("cannot listen on {}: another process is listening there", socket.display()),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(socket).with_context(|| format!("removing the stale socket {}", socket.display()))
        }
        Err(e) => Err(e).with_context(|| format!("checking whether {} is in use", socket.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_arguments() {
        assert_eq!(parse_listen("unix:///run/agent.sock"), Ok(PathBuf::from("/run/agent.sock")));
        assert_eq!(parse_listen("unix://agent.sock"), Ok(PathBuf::from("agent.sock")));
        for bad in ["/run/agent.sock", "vsock://-1:1024", "unix://", "unix://@agent", "tcp://127.0.0.1:1"] {
            let err = parse_listen(bad).expect_err(bad);
            assert!(err.starts_with(&format!("--listen {bad:?}")), "{err}");
        }
    }

    #[test]
    fn stale_sockets_are_replaced_live_ones_and_files_are_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.sock");
        prepare_socket_path(&path).expect("nothing there");

        let live = std::os::unix::net::UnixListener::bind(&path).expect("binding");
        let err = prepare_socket_path(&path).expect_err("in use");
        assert!(err.to_string().contains("another process is listening"), "{err}");
        drop(live);
        prepare_socket_path(&path).expect("stale socket removed");
        assert!(!path.exists());

        std::fs::write(&path, "not a socket").expect("writing");
        let err = prepare_socket_path(&path).expect_err("regular file");
        assert!(err.to_string().contains("is not a socket"), "{err}");

        let err = prepare_socket_path(&dir.path().join("missing/agent.sock")).expect_err("no directory");
        assert!(err.to_string().contains("does not exist"), "{err}");
    }
}
