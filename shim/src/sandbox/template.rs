//! Templates for warm start: a snapshot of a guest booted to the point where its agent
//! answers, one per guest shape, from which sandboxes are restored instead of booted.
//!
//! ```text
//! <templates_dir>/
//!   <key>/           a finished template: the VMM's snapshot (`state`, `memory`) and
//!     inputs         what it was made from (one line per input, read back by `prune`)
//!   <key>.lock       flock(2)ed while a shim makes or checks the template
//!   <key>.making/    work directory of a template being made (a sandbox directory:
//!                    console.log, vmm.log, vsock.sock, api.sock, empty shared/)
//! ```
//!
//! The key hashes everything the snapshot depends on: the VMM, kernel and initramfs files
//! (path, device, inode, size and modification time: replacing or rebuilding one changes
//! the key), the vCPU count, memory size, kernel parameters (which carry the agent's log
//! level) and CPU template. A changed input therefore means a new key, and a template
//! whose recorded files no longer match is deleted by [`prune`] when the next one is made.
//!
//! Made on first use: the first sandbox of a shape boots a separate template VM, waits
//! for its agent, snapshots it through the VMM's control API (which ends that VM), then is
//! itself restored from the result. Shims starting at the same time wait on the lock
//! instead of booting twice. Every failure here is reported to the caller, which boots
//! cold and logs why.
//!
//! What a restored guest must not share with its siblings (random state, clock, hostname)
//! the agent takes from the host at CreateSandbox (`agent.rs`).

use super::connect::connect;
use super::console::ConsoleTail;
use super::error::SandboxError;
use super::paths::{remove_dir, SandboxPaths};
use super::vmm::{Vmm, VmmSpec, GUEST_NET_MAC};
use crate::config::{Config, VmSize};
use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The VMM's snapshot files, both required for a template to count as made.
const SNAPSHOT_FILES: [&str; 2] = ["state", "memory"];
const INPUTS_FILE: &str = "inputs";
/// The inputs line of the template's network device.
const NET_PARAM: &str = "param net virtio-net";
/// Writing a snapshot is a memory-sized file write; generous for a loaded host.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("template input {what} {path}: {source}", path = path.display())]
    Input { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("template directory {path}: {source}", path = path.display())]
    Dir { path: PathBuf, source: std::io::Error },
    #[error("booting the template VM: {0}")]
    Boot(Box<SandboxError>),
    #[error("snapshotting the template VM through {path}: {reason}", path = path.display())]
    Snapshot { path: PathBuf, reason: String },
}

fn dir_error(path: &Path) -> impl FnOnce(std::io::Error) -> TemplateError {
    let path = path.to_path_buf();
    move |source| TemplateError::Dir { path, source }
}

/// What a template is made from, and the key naming it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateInputs {
    pub key: String,
    /// One line per input: `file <what> <path> <stamp>` or `param <name> <value>`.
    pub description: String,
}

/// A file's identity: replaced or rewritten files get another stamp.
fn stamp(path: &Path) -> std::io::Result<String> {
    let m = std::fs::metadata(path)?;
    Ok(format!("{}:{}:{}:{}.{}", m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
}

/// FNV-1a, 64 bits: stable across builds and releases (std's hasher is not).
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

impl TemplateInputs {
    pub fn read(config: &Config, size: VmSize) -> Result<TemplateInputs, TemplateError> {
        let mut description = String::new();
        for (what, path) in [("vmm", &config.vmm), ("kernel", &config.kernel), ("initramfs", &config.initramfs)] {
            let s = stamp(path).map_err(|source| TemplateError::Input { what, path: path.clone(), source })?;
            let _ = writeln!(description, "file {what} {} {s}", path.display());
        }
        let _ = writeln!(description, "param vcpus {}", size.vcpus);
        let _ = writeln!(description, "param memory_mib {}", size.memory_mib);
        let _ = writeln!(description, "param cpu_template {}", config.cpu_template);
        let _ = writeln!(description, "param kernel_params {}", config.guest_kernel_params());
        let _ = writeln!(description, "param nestbox {}", env!("CARGO_PKG_VERSION"));
        // The template VM has the virtio-net device every pod VM has, without a backend (a
        // restored pod VM attaches its tap); templates made before it have no device.
        let _ = writeln!(description, "{NET_PARAM} {GUEST_NET_MAC} detached");
        Ok(TemplateInputs { key: format!("{:016x}", fnv1a(&description)), description })
    }
}

/// Where the template of `inputs` lives (made or not).
pub fn template_dir(config: &Config, inputs: &TemplateInputs) -> PathBuf {
    config.templates_dir.join(&inputs.key)
}

fn is_made(dir: &Path) -> bool {
    SNAPSHOT_FILES.iter().all(|f| dir.join(f).is_file())
}

/// An exclusive flock(2) on a file, released when dropped (or when the process dies).
struct Lock {
    /// Held open for the lock's lifetime: closing it releases the lock.
    _file: File,
}

impl Lock {
    fn take(path: &Path) -> Result<Lock, TemplateError> {
        let file = File::options().create(true).truncate(false).write(true).open(path).map_err(dir_error(path))?;
        // SAFETY: flock on a descriptor we own; blocks until the lock is ours.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(dir_error(path)(std::io::Error::last_os_error()));
        }
        Ok(Lock { _file: file })
    }
}

/// The template for a pod of `size`: returns its directory (for `nestbox-vmm --restore`),
/// making it first if there is none (or `remake` asks for a new one).
pub fn prepare(config: &Config, size: VmSize, remake: bool) -> Result<PathBuf, TemplateError> {
    let inputs = TemplateInputs::read(config, size)?;
    let dir = template_dir(config, &inputs);
    if !remake && is_made(&dir) {
        return Ok(dir);
    }
    std::fs::create_dir_all(&config.templates_dir).map_err(dir_error(&config.templates_dir))?;
    let _lock = Lock::take(&config.templates_dir.join(format!("{}.lock", inputs.key)))?;
    // Another shim may have made it while this one waited for the lock.
    if is_made(&dir) && !remake {
        return Ok(dir);
    }
    let started = Instant::now();
    log::info!(
        "making template {} ({} vCPUs, {} MiB): booting a template VM",
        dir.display(),
        size.vcpus,
        size.memory_mib
    );
    make(config, size, &inputs, &dir)?;
    log::info!("template {} made in {:.1?}", dir.display(), started.elapsed());
    prune(config, &inputs.key);
    Ok(dir)
}

/// Deletes a template (one that a VMM refused, say); the next pod start makes it again.
pub fn discard(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            log::warn!("removing template {}: {e}", dir.display());
        }
    }
}

/// Boots the template VM in `<key>.making/`, snapshots it, and moves the snapshot to `dir`.
fn make(config: &Config, size: VmSize, inputs: &TemplateInputs, dir: &Path) -> Result<(), TemplateError> {
    let work = SandboxPaths::new(&config.templates_dir, &format!("{}.making", inputs.key));
    // Left by a maker that died (the lock is free, so it is not running): its directory and
    // its jailed VMM's cgroup (empty: that VMM died with its shim).
    remove_dir(&work.dir).map_err(|e| TemplateError::Boot(Box::new(e.into())))?;
    super::vmm::jail_spec(config, &work, size.vcpus).remove_cgroup();
    std::fs::create_dir_all(&work.shared).map_err(dir_error(&work.shared))?;
    let result = boot_and_snapshot(config, size, &work, inputs, dir);
    let _ = remove_dir(&work.dir);
    result
}

fn boot_and_snapshot(
    config: &Config,
    size: VmSize,
    work: &SandboxPaths,
    inputs: &TemplateInputs,
    dir: &Path,
) -> Result<(), TemplateError> {
    let api_socket = work.dir.join("api.sock");
    let snapshot = work.dir.join("snapshot");
    let spec = VmmSpec { api_socket: Some(api_socket.clone()), ..VmmSpec::boot(config, size, work) };
    let vmm = Vmm::spawn(&spec, Box::new(|_| {})).map_err(|e| TemplateError::Boot(Box::new(e.into())))?;
    let fail = |e: TemplateError| {
        vmm.kill(Duration::from_secs(10));
        e
    };
    let console = ConsoleTail::default();
    console.follow(work.console.clone(), "template".into());
    let answered = connect(config, work, &vmm, &console, Instant::now() + config.boot_timeout)
        .and_then(|agent| agent.version().map_err(Into::into));
    console.stop.store(true, std::sync::atomic::Ordering::Release);
    let version = answered.map_err(|e| fail(TemplateError::Boot(Box::new(e))))?;
    log::info!("template VM's agent {} on kernel {} answered", version.agent_version, version.kernel_release);

    let snapshot_error = |reason: String| TemplateError::Snapshot { path: api_socket.clone(), reason };
    let answer = api_request(&api_socket, &format!("snapshot {}", snapshot.display()))
        .map_err(|e| fail(snapshot_error(e.to_string())))?;
    if answer != "OK" {
        return Err(fail(snapshot_error(format!("the VMM answered {answer:?}"))));
    }
    // The VMM ends once the snapshot is written.
    let deadline = Instant::now() + SNAPSHOT_TIMEOUT;
    let status = loop {
        if let Some(status) = vmm.exit_status() {
            break status;
        }
        if Instant::now() > deadline {
            return Err(fail(snapshot_error(format!("the VMM did not end within {SNAPSHOT_TIMEOUT:?}"))));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if !status.success() || !is_made(&snapshot) {
        let log = std::fs::read_to_string(&work.vmm_log).unwrap_or_default();
        return Err(snapshot_error(format!("the VMM ended ({status}) without a snapshot: {}", log.trim())));
    }
    std::fs::write(snapshot.join(INPUTS_FILE), &inputs.description).map_err(dir_error(&snapshot))?;
    // A template that exists is complete: it appears in one rename.
    discard(dir);
    std::fs::rename(&snapshot, dir).map_err(dir_error(dir))
}

/// One request line to the VMM's control API; its answer line.
fn api_request(socket: &Path, request: &str) -> std::io::Result<String> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(SNAPSHOT_TIMEOUT))?;
    stream.write_all(format!("{request}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    Ok(line.trim().to_string())
}

/// Deletes templates that can never be used again: one of their input files is gone or
/// changed since they were made. Templates of other shapes whose inputs still exist stay.
pub fn prune(config: &Config, keep: &str) {
    let Ok(entries) = std::fs::read_dir(&config.templates_dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_string) else { continue };
        if name == keep || !path.is_dir() {
            continue;
        }
        let Ok(recorded) = std::fs::read_to_string(path.join(INPUTS_FILE)) else { continue };
        if let Some(reason) = stale_input(&recorded) {
            log::info!("removing template {}: {reason}", path.display());
            discard(&path);
            let _ = std::fs::remove_file(config.templates_dir.join(format!("{name}.lock")));
        }
    }
}

/// Why a template's recorded inputs no longer hold, if they do not.
fn stale_input(recorded: &str) -> Option<String> {
    if !recorded.lines().any(|l| l.starts_with(NET_PARAM)) {
        return Some("it was made without a network device".to_string());
    }
    for line in recorded.lines() {
        let mut fields = line.split(' ');
        if fields.next() != Some("file") {
            continue;
        }
        let (Some(what), Some(path), Some(was)) = (fields.next(), fields.next(), fields.next()) else {
            return Some(format!("unreadable input line {line:?}"));
        };
        match stamp(Path::new(path)) {
            Ok(now) if now == was => {}
            Ok(_) => return Some(format!("its {what} {path} changed")),
            Err(e) => return Some(format!("its {what} {path}: {e}")),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> Config {
        for f in ["vmm", "vmlinux", "initramfs"] {
            std::fs::write(dir.join(f), f).expect("write");
        }
        let text = format!(
            "[hypervisor]\nvmm = \"{d}/vmm\"\nkernel = \"{d}/vmlinux\"\ninitramfs = \"{d}/initramfs\"\n\
             [runtime]\ntemplates_dir = \"{d}/templates\"\n",
            d = dir.display()
        );
        Config::parse(&text, None).expect("config")
    }

    const SIZE: VmSize = VmSize { vcpus: 1, memory_mib: 256 };

    #[test]
    fn key_changes_with_every_input() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = config(dir.path());
        let base = TemplateInputs::read(&c, SIZE).expect("inputs");
        assert_eq!(base, TemplateInputs::read(&c, SIZE).expect("inputs"), "the key is stable");
        let mut keys = vec![base.key.clone()];
        keys.push(TemplateInputs::read(&c, VmSize { vcpus: 2, ..SIZE }).expect("vcpus").key);
        keys.push(TemplateInputs::read(&c, VmSize { memory_mib: 512, ..SIZE }).expect("memory").key);
        keys.push(TemplateInputs::read(&Config { kernel_params: "quiet".into(), ..c.clone() }, SIZE).expect("p").key);
        keys.push(TemplateInputs::read(&Config { agent_log_level: "debug".into(), ..c.clone() }, SIZE).expect("l").key);
        keys.push(TemplateInputs::read(&Config { cpu_template: "none".into(), ..c.clone() }, SIZE).expect("t").key);
        // A rebuilt kernel (new contents, so a new size and time) is another template.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(dir.path().join("vmlinux"), "a rebuilt kernel").expect("write");
        keys.push(TemplateInputs::read(&c, SIZE).expect("kernel").key);
        let mut unique = keys.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), keys.len(), "{keys:?}");
    }

    #[test]
    fn missing_input_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = config(dir.path());
        std::fs::remove_file(dir.path().join("vmlinux")).expect("rm");
        let err = prepare(&c, SIZE, false).expect_err("no kernel").to_string();
        assert!(err.contains("kernel") && err.contains("vmlinux"), "{err}");
        assert!(!c.templates_dir.exists(), "nothing made for a missing input");
    }

    #[test]
    fn made_template_is_used_and_stale_ones_are_pruned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = config(dir.path());
        let inputs = TemplateInputs::read(&c, SIZE).expect("inputs");
        let made = template_dir(&c, &inputs);
        std::fs::create_dir_all(&made).expect("mkdir");
        for f in SNAPSHOT_FILES {
            std::fs::write(made.join(f), "x").expect("write");
        }
        std::fs::write(made.join(INPUTS_FILE), &inputs.description).expect("write");
        // Made: no VM is booted (the VMM here is not even executable).
        assert_eq!(prepare(&c, SIZE, false).expect("found"), made);

        // Another shape's template whose inputs are unchanged stays...
        let other = TemplateInputs::read(&c, VmSize { vcpus: 2, ..SIZE }).expect("inputs");
        let other_dir = template_dir(&c, &other);
        std::fs::create_dir_all(&other_dir).expect("mkdir");
        std::fs::write(other_dir.join(INPUTS_FILE), &other.description).expect("write");
        prune(&c, "none-kept");
        assert!(made.exists() && other_dir.exists());
        // ...until the kernel changes: then both can never be used again.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(dir.path().join("vmlinux"), "a rebuilt kernel").expect("write");
        assert_eq!(stale_input(&inputs.description).map(|r| r.contains("kernel")), Some(true));
        let without_net: String =
            inputs.description.lines().filter(|l| !l.starts_with(NET_PARAM)).map(|l| format!("{l}\n")).collect();
        assert_eq!(stale_input(&without_net).as_deref(), Some("it was made without a network device"));
        prune(&c, "none-kept");
        assert!(!made.exists() && !other_dir.exists());
    }
}
