//! A private containerd for end-to-end tests: its own root, state, sockets and namespace in
//! a folder of the test's own, nestbox's shim on its PATH, nestbox's configuration in a file
//! of the test's (`NESTBOX_CONFIG`), and a busybox image built locally (no registry).
//!
//! containerd 1.6 keeps a few paths fixed whatever its configuration says (shim sockets in
//! /run/containerd/s, ctr's fifos in /run/containerd/fifo); those are shared with any other
//! containerd on the host but never collide (their names hash the socket address).
//!
//! Dropping a [`Containerd`] stops it and removes everything the test left: shims, VMMs,
//! mounts and the folder, so a failed test does not leak into the next one.

use crate::{binary, run_with_deadline, workspace_root, Finished};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The image `scripts/busybox-image` builds.
pub const BUSYBOX: &str = "nestbox.local/busybox:latest";
/// The runtime name containerd knows nestbox by.
pub const RUNTIME: &str = "io.containerd.nestbox.v2";
/// A ctr call that does not boot a VM.
pub const QUICK: Duration = Duration::from_secs(60);

pub struct Containerd {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub namespace: String,
    /// Where the shim puts its sandboxes (`runtime.sandboxes_dir`).
    pub sandboxes: PathBuf,
    /// Where the shim keeps its warm-start templates (`runtime.templates_dir`): the test's
    /// own, so the first pod makes the template.
    pub templates: PathBuf,
    /// The nestbox configuration file the shims read.
    pub nestbox_config: PathBuf,
    vmm: PathBuf,
    log: PathBuf,
    child: Child,
}

impl Containerd {
    /// Starts containerd with nestbox registered. `nestbox_config` goes into the nestbox
    /// configuration file after `[hypervisor]` and its `vmm` key: more hypervisor keys
    /// first, then other tables (`[agent]`); the sandboxes directory is set by the harness.
    pub fn start(name: &str, nestbox_config: &str) -> Containerd {
        let shim = binary("nestbox-shim", "containerd-shim-nestbox-v2");
        let vmm = binary("nestbox-vmm", "nestbox-vmm");
        // Short: shim and vsock socket paths must fit in sun_path.
        let dir = PathBuf::from(format!("/tmp/nbx-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("creating the test's containerd folder");
        let socket = dir.join("c.sock");
        let sandboxes = dir.join("sb");
        let templates = dir.join("tpl");
        let config = dir.join("containerd.toml");
        fs::write(
            &config,
            format!(
                "version = 2\n\
                 root = \"{root}\"\n\
                 state = \"{state}\"\n\
                 # CRI is not what these tests drive; without it no CNI or netns setup runs.\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{socket}\"\n\
                 [ttrpc]\n  address = \"{socket}.ttrpc\"\n\
                 [debug]\n  level = \"debug\"\n",
                root = dir.join("root").display(),
                state = dir.join("state").display(),
                socket = socket.display(),
            ),
        )
        .expect("writing containerd's config");
        let nestbox_config_path = dir.join("nestbox.toml");
        write_nestbox_config(&nestbox_config_path, &sandboxes, &templates, &vmm, nestbox_config);
        let path = format!(
            "{}:{}",
            shim.parent().expect("target dir").display(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
        );
        let log = dir.join("containerd.log");
        let log_file = fs::File::create(&log).expect("creating containerd's log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .env("PATH", path)
            .env("NESTBOX_CONFIG", &nestbox_config_path)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log fd"))
            .stderr(log_file)
            .spawn()
            .expect("starting containerd (apt-get install containerd)");
        let c = Containerd {
            vmm,
            namespace: format!("nbx-{name}"),
            log,
            child,
            nestbox_config: nestbox_config_path,
            sandboxes,
            templates,
            socket,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let up = c.ctr(&["version"]).stdout(Stdio::null()).stderr(Stdio::null()).status();
            if matches!(up, Ok(s) if s.success()) {
                break;
            }
            assert!(Instant::now() < deadline, "containerd did not come up; its log:\n{}", c.log());
            std::thread::sleep(Duration::from_millis(200));
        }
        c
    }

    /// Replaces the nestbox configuration (shims started from now on read it); `text` as
    /// for [`Containerd::start`].
    pub fn write_nestbox_config(&self, text: &str) {
        write_nestbox_config(&self.nestbox_config, &self.sandboxes, &self.templates, &self.vmm, text);
    }

    /// A `ctr` command against this containerd and namespace.
    pub fn ctr(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address").arg(&self.socket).arg("--namespace").arg(&self.namespace).args(args);
        cmd
    }

    /// Runs `ctr args...` to completion within `deadline`.
    pub fn run(&self, args: &[&str], deadline: Duration) -> Finished {
        run_with_deadline(&mut self.ctr(args), deadline)
    }

    /// Like [`Containerd::run`], asserting success.
    pub fn ok(&self, args: &[&str], deadline: Duration) -> Finished {
        let f = self.run(args, deadline);
        assert!(f.status.success(), "ctr {args:?} failed: {f:?}\ncontainerd log tail:\n{}", self.log_tail(60));
        f
    }

    /// Builds the busybox image with `scripts/busybox-image` and imports it.
    pub fn import_busybox(&self) {
        let tarball = self.dir.join("busybox.tar");
        let built = run_with_deadline(
            Command::new(workspace_root().join("scripts/busybox-image")).arg(&tarball).arg(BUSYBOX),
            QUICK,
        );
        assert!(built.status.success(), "building the busybox image: {built:?}");
        self.ok(&["images", "import", &tarball.to_string_lossy()], QUICK);
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Sandbox directories that exist now.
    pub fn sandbox_dirs(&self) -> Vec<PathBuf> {
        match fs::read_dir(&self.sandboxes) {
            Ok(entries) => entries.filter_map(|e| e.ok().map(|e| e.path())).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// PIDs of VMM processes of this containerd's sandboxes and templates.
    pub fn vmm_pids(&self) -> Vec<i32> {
        processes_mentioning(&self.dir)
            .into_iter()
            .filter(|(_, cmd)| cmd.contains("nestbox-vmm"))
            .map(|(p, _)| p)
            .collect()
    }

    /// PIDs of this containerd's nestbox shims.
    pub fn shim_pids(&self) -> Vec<i32> {
        processes_mentioning(&self.socket)
            .into_iter()
            .filter(|(_, cmd)| cmd.contains("containerd-shim-nestbox-v2"))
            .map(|(p, _)| p)
            .collect()
    }

    /// Asserts that nothing of any sandbox is left: directories, VMM processes, mounts.
    pub fn assert_clean(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let dirs = self.sandbox_dirs();
            let vmms = self.vmm_pids();
            let mounts = mounts_under(&self.sandboxes);
            if dirs.is_empty() && vmms.is_empty() && mounts.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "left behind: sandbox dirs {dirs:?}, VMM pids {vmms:?}, mounts {mounts:?}\ncontainerd log tail:\n{}",
                self.log_tail(80)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in self.shim_pids().into_iter().chain(self.vmm_pids()) {
            // SAFETY: kill(2) on a PID we just found by its command line; no memory involved.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        for point in mounts_under(&self.dir) {
            let _ = Command::new("umount").arg("-l").arg(&point).status();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn write_nestbox_config(path: &Path, sandboxes: &Path, templates: &Path, vmm: &Path, text: &str) {
    let config = format!(
        "[runtime]\nsandboxes_dir = \"{}\"\ntemplates_dir = \"{}\"\n[hypervisor]\nvmm = \"{}\"\n{text}",
        sandboxes.display(),
        templates.display(),
        vmm.display()
    );
    fs::write(path, config).expect("writing the nestbox config");
}

/// (pid, command line) of every process whose command line contains `needle`.
pub fn processes_mentioning(needle: &Path) -> Vec<(i32, String)> {
    let needle = needle.to_string_lossy().into_owned();
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
            cmd.contains(&needle).then_some((pid, cmd))
        })
        .collect()
}

/// Mount points at or below `dir`.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let prefix = dir.to_string_lossy().into_owned();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(String::from))
        .filter(|p| p == &prefix || p.starts_with(&format!("{prefix}/")))
        .collect()
}
