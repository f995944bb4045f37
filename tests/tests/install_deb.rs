//! The Debian package (scripts/package-deb) installed, used and removed with dpkg in a scratch
//! root (`dpkg --root` with `--force-script-chrootless`: the maintainer scripts run on this
//! host with DPKG_ROOT set). Its admin directory knows the packages it depends on, as
//! installed here; containerd's config in the root is left alone by the package, registered
//! by `nestbox install --config-only`, and given back byte for byte when the package goes.

mod install_support;

use install_support::*;
use nestbox_tests::{run_with_deadline, workspace_root, Finished};
use std::fs;
use std::path::Path;
use std::process::Command;

fn dpkg(root: &Path, args: &[&str]) -> Finished {
    let mut cmd = Command::new("dpkg");
    cmd.arg(format!("--root={}", root.display())).arg("--force-script-chrootless").args(args);
    let done = run_with_deadline(&mut cmd, QUICK);
    assert!(done.status.success(), "dpkg {args:?}: {done:?}");
    done
}

/// A dpkg admin directory under `root` that knows the package's dependencies as installed
/// on this host (their status stanzas; no files).
fn admin_dir(root: &Path) {
    let admin = root.join("var/lib/dpkg");
    for dir in ["info", "updates", "triggers"] {
        fs::create_dir_all(admin.join(dir)).unwrap();
    }
    fs::write(admin.join("available"), "").unwrap();
    let status = run_with_deadline(Command::new("dpkg-query").args(["-s", "libc6", "libgcc-s1"]), QUICK);
    assert!(status.status.success(), "{status:?}");
    fs::write(admin.join("status"), status.stdout.trim_end().to_string() + "\n\n").unwrap();
    for list in ["libc6:amd64.list", "libgcc-s1:amd64.list"] {
        fs::write(admin.join("info").join(list), "").unwrap();
    }
}

#[test]
fn the_deb_installs_registers_and_removes_cleanly() {
    let bins = bin_dir();
    let scratch = Scratch::new("deb");
    let guest = fake_guest(&scratch);
    let out = scratch.path("out");
    let built = run_with_deadline(
        Command::new(workspace_root().join("scripts/package-deb")).args([
            "--bin-dir",
            bins.to_str().unwrap(),
            "--guest-dir",
            guest.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--compress",
            "none",
        ]),
        QUICK,
    );
    assert!(built.status.success(), "building the package: {built:?}");
    let version = env!("CARGO_PKG_VERSION");
    let deb = out.join(format!("nestbox_{version}_amd64.deb"));
    assert!(deb.is_file(), "{built:?}");

    let config = scratch.write("root/etc/containerd/config.toml", SAMPLE_CONFIG);
    let root = scratch.path("root");
    admin_dir(&root);
    let before = tree(&root.join("etc"), false);

    let installed = dpkg(&root, &["--install", deb.to_str().unwrap()]);
    assert!(installed.stdout.contains("nestbox install --config-only"), "{installed:?}");
    assert_installed(&root, "/usr", &bins, &guest, true);
    assert_eq!(fs::read_to_string(&config).unwrap(), SAMPLE_CONFIG, "the package left containerd's config alone");
    let listed = dpkg(&root, &["--listfiles", "nestbox"]).stdout;
    assert!(listed.contains("/usr/bin/containerd-shim-nestbox-v2"), "{listed}");

    let nestbox = root.join("usr/bin/nestbox");
    let mut register = Command::new(&nestbox);
    register.args(["install", "--config-only", "--root", root.to_str().unwrap()]);
    let registered = run_with_deadline(&mut register, QUICK);
    assert!(registered.status.success(), "{registered:?}");
    assert_eq!(fs::read_to_string(&config).unwrap(), format!("{SAMPLE_CONFIG}{SAMPLE_STANZA}"));

    let removed = dpkg(&root, &["--remove", "nestbox"]);
    assert!(removed.stdout.contains("`nestbox install` is undone"), "{removed:?}");
    assert_eq!(fs::read_to_string(&config).unwrap(), SAMPLE_CONFIG, "removal gave back the original bytes");
    assert!(!nestbox.exists());
    dpkg(&root, &["--purge", "nestbox"]);
    assert_eq!(tree(&root.join("etc"), false), before);
    for gone in ["usr/bin", "usr/share/nestbox", "var/lib/nestbox", "var/cache/nestbox"] {
        assert!(!root.join(gone).exists(), "{gone} is left");
    }
}
