//! What the install tests share: the binaries to install (the workspace's debug build), a
//! small stand-in guest image, scratch roots, a sample containerd config, and snapshots of a
//! tree to compare before and after.

#![allow(dead_code)] // each test binary uses its own part

use nestbox_tests::{binary, run_with_deadline, Finished};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

pub const QUICK: Duration = Duration::from_secs(120);

/// A containerd config as people have them: comments, other runtimes, odd spacing and
/// quoting, a multi-line array, tabs, and no newline at the end.
pub const SAMPLE_CONFIG: &str = r#"# containerd config of node-7, edited by hand
version = 2
root = "/var/lib/containerd"   # keep

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
	sandbox_image = 'registry.local/pause:3.9'
    [plugins."io.containerd.grpc.v1.cri".containerd]
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type   =   "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = true
      [ plugins . "io.containerd.grpc.v1.cri" . containerd . runtimes . gvisor ]
        runtime_type = "io.containerd.runsc.v1"
        pod_annotations = [
          "dev.gvisor.*",   # flags
        ]

[debug]
  level = "info"
# the end, without a newline"#;

/// What `nestbox install` appends to [`SAMPLE_CONFIG`] (it ends without a newline).
pub const SAMPLE_STANZA: &str = "\n\n# Added by `nestbox install`; `nestbox uninstall` takes it out again.\n\
    [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.nestbox]\n  \
    runtime_type = \"io.containerd.nestbox.v2\"\n  pod_annotations = [\"io.nestbox.*\"]\n  \
    privileged_without_host_devices = true\n";

pub const BINARIES: [&str; 3] = ["containerd-shim-nestbox-v2", "nestbox-vmm", "nestbox"];

/// A folder holding the workspace's debug binaries, built now and stripped (as the packages
/// ship them): a fifth of the bytes to copy and hash.
pub fn bin_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let built = [
            binary("nestbox-shim", "containerd-shim-nestbox-v2"),
            binary("nestbox-vmm", "nestbox-vmm"),
            binary("nestbox-shim", "nestbox"),
        ];
        let dir = built[0].parent().expect("target dir").join("install-test-bins");
        fs::create_dir_all(&dir).expect("making the stripped binaries' folder");
        for path in built {
            let name = path.file_name().expect("a binary's name").to_string_lossy().into_owned();
            let temp = dir.join(format!(".{name}.{}", std::process::id()));
            let mut strip = Command::new("strip");
            strip.arg("-o").arg(&temp).arg(&path);
            let done = run_with_deadline(&mut strip, QUICK);
            assert!(done.status.success(), "strip {}: {done:?}", path.display());
            fs::rename(&temp, dir.join(&name)).expect("moving a stripped binary in place");
        }
        dir
    })
    .clone()
}

/// A scratch folder, emptied now and removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = PathBuf::from(format!("/tmp/nbx-install-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("making a scratch folder");
        Scratch(dir)
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }

    /// Writes `text` at `rel`, making its folders.
    pub fn write(&self, rel: &str, text: &str) -> PathBuf {
        let path = self.path(rel);
        fs::create_dir_all(path.parent().expect("a folder")).expect("making folders");
        fs::write(&path, text).expect("writing a scratch file");
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A stand-in guest image (install copies files; it never boots them).
pub fn fake_guest(scratch: &Scratch) -> PathBuf {
    scratch.write("guest/vmlinux", "not really a kernel\n");
    scratch.write("guest/initramfs.cpio", "not really an initramfs\n");
    scratch.path("guest")
}

/// Runs `nestbox args...` (the debug build).
pub fn nestbox(bin_dir: &Path, args: &[&str]) -> Finished {
    let mut cmd = Command::new(bin_dir.join("nestbox"));
    cmd.args(args);
    run_with_deadline(&mut cmd, QUICK)
}

pub fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Every entry below `root`: its kind, mode and content hash, with `mtimes` its
/// modification time too (to show that nothing was rewritten).
pub fn tree(root: &Path, mtimes: bool) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    walk(root, root, mtimes, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, mtimes: bool, out: &mut BTreeMap<String, String>) {
    let mut entries: Vec<_> = fs::read_dir(dir).expect("reading a folder").filter_map(Result::ok).collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let meta = fs::symlink_metadata(&path).expect("stat");
        let rel = path.strip_prefix(root).expect("below root").display().to_string();
        let mode = meta.permissions().mode() & 0o7777;
        let time = if mtimes { format!(" {}.{}", meta.mtime(), meta.mtime_nsec()) } else { String::new() };
        let what = if meta.is_dir() {
            walk(root, &path, mtimes, out);
            format!("dir {mode:o}")
        } else if meta.file_type().is_symlink() {
            format!("link {}", fs::read_link(&path).expect("readlink").display())
        } else {
            format!("file {mode:o} {}{time}", sha256(&fs::read(&path).expect("reading a file")))
        };
        out.insert(rel, what);
    }
}

/// Asserts that `root<prefix>` holds the binaries of `bin_dir` (`stripped`: as `strip` left
/// them, so only present and executable) and the guest image of `guest`.
pub fn assert_installed(root: &Path, prefix: &str, bin_dir: &Path, guest: &Path, stripped: bool) {
    let prefix = root.join(prefix.trim_start_matches('/'));
    for b in BINARIES {
        let path = prefix.join("bin").join(b);
        let meta = fs::metadata(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(meta.permissions().mode() & 0o777, 0o755, "{}", path.display());
        if !stripped {
            assert_eq!(fs::read(&path).unwrap(), fs::read(bin_dir.join(b)).unwrap(), "{}", path.display());
        }
    }
    for g in ["vmlinux", "initramfs.cpio"] {
        let path = prefix.join("share/nestbox").join(g);
        assert_eq!(
            fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
            fs::read(guest.join(g)).unwrap()
        );
    }
}

/// containerd's own reading of a config file (`containerd config dump`): fails the test if
/// containerd refuses it.
pub fn containerd_reads(config: &Path) -> String {
    let mut cmd = Command::new("containerd");
    cmd.arg("--config").arg(config).args(["config", "dump"]);
    let dump = run_with_deadline(&mut cmd, QUICK);
    assert!(dump.status.success(), "containerd refuses {}: {dump:?}", config.display());
    dump.stdout
}
