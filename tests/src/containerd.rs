//! A private containerd for end-to-end tests and the benchmark: its own root, state,
//! sockets and namespace in a folder of the test's own, nestbox's shim on its PATH,
//! nestbox's configuration in a file of the test's (`NESTBOX_CONFIG`), and a busybox image
//! built locally (no registry).
//!
//! With [`Options::cri`] it also serves CRI with the handlers `runc` and `nestbox`, the
//! pause image imported under its `sandbox_image`, and [`Containerd::cri`] is a client;
//! with [`Options::pod_network`] containerd runs in a network namespace of the test's own
//! and CNI gives pods network namespaces there ([`network`]).
//!
//! containerd 1.6 keeps a few paths fixed whatever its configuration says (shim sockets in
//! /run/containerd/s, ctr's fifos in /run/containerd/fifo, runc's state in
//! /run/containerd/runc/<namespace>); those are shared with any other containerd on the
//! host but never collide (their names hash the socket address, or are container ids).
//!
//! Dropping a [`Containerd`] stops it and removes everything the test left: CRI pods, shims,
//! VMMs, runc containers, mounts and the folder, so a failed test does not leak into the
//! next one. The tests and `cargo bench --bench runc` (scripts/bench) share this harness.

mod cleanup;
pub mod images;
pub mod network;

use crate::{binary, run_with_deadline, workspace_root, Finished};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The image `scripts/busybox-image` builds.
pub const BUSYBOX: &str = "nestbox.local/busybox:latest";
/// The pause image CRI's pod sandboxes run (busybox sleeping; see [`images`]).
pub const PAUSE: &str = "nestbox.local/pause:latest";
/// The runtime name containerd knows nestbox by.
pub const RUNTIME: &str = "io.containerd.nestbox.v2";
/// The test-only host-agent build of the shim (feature `host-agent`: the agent runs on the
/// host instead of in a VM), as the benchmark installs it beside the shim.
pub const RUNTIME_HOST: &str = "io.containerd.nestbox-host.v2";
/// runc's runtime name.
pub const RUNC: &str = "io.containerd.runc.v2";
/// The containerd namespace of CRI's containers and images.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// A ctr call that does not boot a VM.
pub const QUICK: Duration = Duration::from_secs(60);

/// How to start the private containerd; the default is what the shim's tests use.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Serve CRI (the `io.containerd.grpc.v1.cri` plugin) with the handlers `runc` and
    /// `nestbox`; without [`Options::pod_network`] no CNI is configured, so only pods on the
    /// host's network start (which nestbox refuses).
    pub cri: bool,
    /// Run containerd in a network namespace the harness makes and removes, with CNI
    /// (bridge, host-local, portmap, loopback) giving each CRI pod a network namespace of
    /// its own there (see [`network`]).
    pub pod_network: bool,
    /// A folder holding `containerd-shim-nestbox-v2` and `nestbox-vmm` to run (the
    /// benchmark's copies of a release build); by default the workspace's debug build.
    pub binaries: Option<PathBuf>,
    /// Keep warm-start templates in one folder shared by the suites of this build
    /// ([`shared_templates_dir`]) instead of the test's own: the first pod of a shape in a
    /// test run makes the template (one guest boot) and later suites restore from it.
    /// Templates are keyed by the VMM, kernel and initramfs files, so a rebuild makes new ones.
    pub shared_templates: bool,
}

/// The warm-start templates folder that suites with [`Options::shared_templates`] share.
pub fn shared_templates_dir() -> PathBuf {
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"));
    target.join("nestbox-test-templates")
}

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
    serves_cri: bool,
    /// Dropped after containerd and its pods (fields drop after `Drop::drop`).
    network: Option<network::TestNetwork>,
    #[cfg(feature = "cri")]
    cri: Option<crate::cri::Cri>,
}

impl Containerd {
    /// Starts containerd with nestbox registered. `nestbox_config` goes into the nestbox
    /// configuration file after `[hypervisor]` and its `vmm` key: more hypervisor keys
    /// first, then other tables (`[agent]`); the sandboxes directory is set by the harness.
    pub fn start(name: &str, nestbox_config: &str) -> Containerd {
        Self::start_with(name, nestbox_config, Options::default())
    }

    /// [`Containerd::start`] with [`Options`].
    pub fn start_with(name: &str, nestbox_config: &str, options: Options) -> Containerd {
        let (shim_dir, vmm) = match &options.binaries {
            Some(dir) => (dir.clone(), dir.join("nestbox-vmm")),
            None => {
                let shim = binary("nestbox-shim", "containerd-shim-nestbox-v2");
                (shim.parent().expect("target dir").to_path_buf(), binary("nestbox-vmm", "nestbox-vmm"))
            }
        };
        // Short: shim and vsock socket paths must fit in sun_path.
        let dir = PathBuf::from(format!("/tmp/nbx-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("creating the test's containerd folder");
        let socket = dir.join("c.sock");
        let sandboxes = dir.join("sb");
        let templates = if options.shared_templates { shared_templates_dir() } else { dir.join("tpl") };
        let config = dir.join("containerd.toml");
        let network =
            options.pod_network.then(|| network::TestNetwork::create(&format!("nbx-{name}-{}", std::process::id())));
        fs::write(&config, containerd_config(&dir, &socket, options.cri, network.is_some()))
            .expect("writing containerd's config");
        let nestbox_config_path = dir.join("nestbox.toml");
        write_nestbox_config(&nestbox_config_path, &sandboxes, &templates, &vmm, "", nestbox_config);
        let path = format!(
            "{}:{}",
            shim_dir.display(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
        );
        let log = dir.join("containerd.log");
        let log_file = fs::File::create(&log).expect("creating containerd's log");
        let mut command = match &network {
            Some(network) => network.command("containerd"),
            None => Command::new("containerd"),
        };
        let child = command
            .arg("--config")
            .arg(&config)
            .env("PATH", path)
            .env("NESTBOX_CONFIG", &nestbox_config_path)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log fd"))
            .stderr(log_file)
            .spawn()
            .expect("starting containerd (apt-get install containerd)");
        #[cfg_attr(not(feature = "cri"), allow(unused_mut))]
        let mut c = Containerd {
            vmm,
            namespace: format!("nbx-{name}"),
            log,
            child,
            serves_cri: options.cri,
            network,
            nestbox_config: nestbox_config_path,
            sandboxes,
            templates,
            socket,
            dir,
            #[cfg(feature = "cri")]
            cri: None,
        };
        c.wait_until_up();
        if options.cri {
            c.connect_cri();
        }
        c
    }

    fn wait_until_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let up = self.ctr(&["version"]).stdout(Stdio::null()).stderr(Stdio::null()).status();
            if matches!(up, Ok(s) if s.success()) {
                return;
            }
            assert!(Instant::now() < deadline, "containerd did not come up; its log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    #[cfg(feature = "cri")]
    fn connect_cri(&mut self) {
        let cri = crate::cri::Cri::connect(&self.socket).unwrap_or_else(|e| panic!("{e}"));
        // The CRI plugin may answer a moment after containerd's own API does.
        let deadline = Instant::now() + Duration::from_secs(60);
        while let Err(e) = cri.version(QUICK) {
            assert!(Instant::now() < deadline, "{e}; containerd log tail:\n{}", self.log_tail(40));
            std::thread::sleep(Duration::from_millis(200));
        }
        self.cri = Some(cri);
    }

    #[cfg(not(feature = "cri"))]
    fn connect_cri(&mut self) {
        panic!("Options::cri needs nestbox-tests' `cri` feature");
    }

    /// A command running `program` in containerd's network namespace, where the pods'
    /// bridge is (a containerd started with [`Options::pod_network`]).
    pub fn in_pod_network(&self, program: &Path) -> Command {
        let network = self.network.as_ref().expect("containerd was started without Options::pod_network");
        network.command(&program.to_string_lossy())
    }

    /// The CRI client of a containerd started with [`Options::cri`].
    #[cfg(feature = "cri")]
    pub fn cri(&self) -> &crate::cri::Cri {
        self.cri.as_ref().expect("containerd was started without Options::cri")
    }

    /// Replaces the nestbox configuration (shims started from now on read it); `text` as
    /// for [`Containerd::start`].
    pub fn write_nestbox_config(&self, text: &str) {
        self.write_nestbox_config_with("", text);
    }

    /// Like [`Containerd::write_nestbox_config`], with more `[runtime]` keys (`runtime`,
    /// whole lines: `warm_start = false\n`).
    pub fn write_nestbox_config_with(&self, runtime: &str, text: &str) {
        write_nestbox_config(&self.nestbox_config, &self.sandboxes, &self.templates, &self.vmm, runtime, text);
    }

    /// A `ctr` command against this containerd and namespace.
    pub fn ctr(&self, args: &[&str]) -> Command {
        self.ctr_in(&self.namespace, args)
    }

    /// A `ctr` command against this containerd, in containerd namespace `namespace`.
    pub fn ctr_in(&self, namespace: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address").arg(&self.socket).arg("--namespace").arg(namespace).args(args);
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

    /// Builds the busybox image with `scripts/busybox-image` and imports it; with CRI, also
    /// into CRI's namespace, with the pause image made from it.
    pub fn import_busybox(&self) {
        let tarball = self.dir.join("busybox.tar");
        let built = run_with_deadline(
            Command::new(workspace_root().join("scripts/busybox-image")).arg(&tarball).arg(BUSYBOX),
            QUICK,
        );
        assert!(built.status.success(), "building the busybox image: {built:?}");
        self.ok(&["images", "import", &tarball.to_string_lossy()], QUICK);
        if !self.serves_cri {
            return;
        }
        let pause = self.dir.join("pause.tar");
        images::pause_from_busybox(&tarball, &pause, &self.dir.join("pause-layout"))
            .unwrap_or_else(|e| panic!("making the pause image: {e}"));
        for image in [&tarball, &pause] {
            let imported = run_with_deadline(
                &mut self.ctr_in(CRI_NAMESPACE, &["images", "import", &image.to_string_lossy()]),
                QUICK,
            );
            assert!(imported.status.success(), "importing {} into {CRI_NAMESPACE}: {imported:?}", image.display());
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Where containerd's log ends now, for [`Containerd::log_since`].
    pub fn log_offset(&self) -> u64 {
        fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0)
    }

    /// The lines of containerd's log (which carries the shims' lines) after `offset`.
    pub fn log_since(&self, offset: u64) -> Vec<String> {
        let log = fs::read(&self.log).unwrap_or_default();
        let from = usize::try_from(offset).unwrap_or(usize::MAX).min(log.len());
        String::from_utf8_lossy(&log[from..]).lines().map(String::from).collect()
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
        self.shims_of("nestbox")
    }

    /// PIDs of this containerd's shims of runtime `kind` (`nestbox`, `runc`).
    pub fn shims_of(&self, kind: &str) -> Vec<i32> {
        let binary = format!("containerd-shim-{kind}-v2");
        processes_mentioning(&self.socket)
            .into_iter()
            .filter(|(_, cmd)| cmd.contains(&binary))
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
        // CRI pods first, while containerd runs: stopping them removes runc's containers and
        // nestbox's VMs the regular way. Whatever is left after that is killed below.
        #[cfg(feature = "cri")]
        if let Some(cri) = self.cri.take() {
            if let Err(e) = cri.remove_all_pods(Duration::from_secs(120)) {
                eprintln!("containerd harness: removing the CRI pods: {e}");
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let shims = self.shims_of("nestbox").into_iter().chain(self.shims_of("runc"));
        for pid in shims.chain(self.vmm_pids()) {
            // SAFETY: kill(2) on a PID we just found by its command line; no memory involved.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        // runc's containers outlive their shims: remove those whose bundle is in our folder.
        for namespace in [self.namespace.as_str(), CRI_NAMESPACE] {
            cleanup::remove_runc_containers(namespace, &self.dir);
        }
        for point in mounts_under(&self.dir) {
            let _ = Command::new("umount").arg("-l").arg(&point).status();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// containerd's configuration: everything in `dir`; CRI on or off, with CNI or without.
fn containerd_config(dir: &Path, socket: &Path, cri: bool, pod_network: bool) -> String {
    // Tests that do not drive CRI go without it: then no CNI or netns setup runs.
    let disabled = if cri { "" } else { "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n" };
    let mut config = format!(
        "version = 2\n\
         root = \"{root}\"\n\
         state = \"{state}\"\n\
         {disabled}\
         [grpc]\n  address = \"{socket}\"\n\
         [ttrpc]\n  address = \"{socket}.ttrpc\"\n\
         [debug]\n  level = \"debug\"\n",
        root = dir.join("root").display(),
        state = dir.join("state").display(),
        socket = socket.display(),
    );
    if cri {
        config.push_str(&cri_config(&dir.join("cni"), pod_network));
    }
    config
}

/// The CRI plugin's part: the pause image, handlers `runc` and `nestbox`, and CNI folders
/// of the test's own: empty (pods on the host's network only), or with the bridge network of
/// [`network::cni_conflist`] and Debian's plugins. Pods' network namespaces are mounted
/// below containerd's state folder, so they stay in the test's folder.
fn cri_config(cni: &Path, pod_network: bool) -> String {
    let conf = cni.join("conf");
    fs::create_dir_all(&conf).expect("creating the CNI folders");
    let bin = if pod_network {
        let conflist = network::cni_conflist(&cni.join("ipam"));
        fs::write(conf.join("10-nestbox-tests.conflist"), conflist).expect("writing the CNI configuration");
        PathBuf::from(network::CNI_BIN_DIR)
    } else {
        let bin = cni.join("bin");
        fs::create_dir_all(&bin).expect("creating the CNI folders");
        bin
    };
    let plugin = "[plugins.\"io.containerd.grpc.v1.cri\"";
    [
        format!("{plugin}]"),
        format!("  sandbox_image = \"{PAUSE}\""),
        "  # No process here may lower its OOM score (no CAP_SYS_RESOURCE).".into(),
        "  restrict_oom_score_adj = true".into(),
        "  # A port of its own: the default 10010 may be another containerd's.".into(),
        "  stream_server_address = \"127.0.0.1\"".into(),
        "  stream_server_port = \"0\"".into(),
        "  netns_mounts_under_state_dir = true".into(),
        format!("{plugin}.cni]"),
        format!("  bin_dir = \"{}\"", bin.display()),
        format!("  conf_dir = \"{}\"", conf.display()),
        format!("{plugin}.containerd]"),
        "  default_runtime_name = \"runc\"".into(),
        format!("{plugin}.containerd.runtimes.runc]"),
        format!("  runtime_type = \"{RUNC}\""),
        format!("{plugin}.containerd.runtimes.nestbox]"),
        format!("  runtime_type = \"{RUNTIME}\""),
        // As `nestbox install` registers it (docs/install.md).
        "  privileged_without_host_devices = true".into(),
        format!("{plugin}.containerd.runtimes.nestbox-host]"),
        format!("  runtime_type = \"{RUNTIME_HOST}\""),
        "  privileged_without_host_devices = true".into(),
    ]
    .join("\n")
        + "\n"
}

fn write_nestbox_config(path: &Path, sandboxes: &Path, templates: &Path, vmm: &Path, runtime: &str, text: &str) {
    let config = format!(
        "[runtime]\nsandboxes_dir = \"{}\"\ntemplates_dir = \"{}\"\n{runtime}[hypervisor]\nvmm = \"{}\"\n{text}",
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
