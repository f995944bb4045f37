//! `nestbox install` and `nestbox uninstall` against scratch roots: the files put in place,
//! containerd's config gaining exactly the nestbox stanza (containerd itself reads the
//! result), a second install changing nothing, uninstall giving back the original bytes and
//! tree, and what is refused (a config that does not parse, a foreign nestbox runtime, a
//! --root that is no folder) refused before anything changes.

mod install_support;

use install_support::*;
use std::fs;
use std::path::Path;

fn install_args<'a>(root: &'a str, bin: &'a str, guest: &'a str) -> Vec<&'a str> {
    vec!["install", "--root", root, "--bin-dir", bin, "--guest-dir", guest]
}

#[test]
fn install_then_uninstall_gives_back_the_original_bytes() {
    let bins = bin_dir();
    let scratch = Scratch::new("roundtrip");
    let guest = fake_guest(&scratch);
    let config = scratch.write("root/etc/containerd/config.toml", SAMPLE_CONFIG);
    containerd_reads(&config);
    let root = scratch.path("root");
    let before = tree(&root, false);
    let (r, b, g) = (root.to_str().unwrap(), bins.to_str().unwrap(), guest.to_str().unwrap());

    let first = nestbox(&bins, &install_args(r, b, g));
    assert!(first.status.success(), "{first:?}");
    assert!(first.stdout.contains("systemctl restart containerd"), "{}", first.stdout);
    assert_installed(&root, "/usr/local", &bins, &guest, false);
    let installed = fs::read_to_string(&config).unwrap();
    assert_eq!(installed.strip_prefix(SAMPLE_CONFIG), Some(SAMPLE_STANZA), "the config gains exactly the stanza");
    let dump = containerd_reads(&config);
    assert!(dump.contains("runtime_type = \"io.containerd.nestbox.v2\""), "containerd's reading:\n{dump}");
    assert!(dump.contains("runtime_type = \"io.containerd.runsc.v1\""), "containerd's reading:\n{dump}");
    assert!(root.join("var/lib/nestbox/install.json").is_file());

    // A second install finds everything in place: not one byte or time stamp changes.
    let after_first = tree(&root, true);
    let second = nestbox(&bins, &install_args(r, b, g));
    assert!(second.status.success(), "{second:?}");
    assert!(second.stdout.contains("no restart needed"), "{}", second.stdout);
    assert_eq!(tree(&root, true), after_first, "a second install changed something");

    let removed = nestbox(&bins, &["uninstall", "--root", r]);
    assert!(removed.status.success(), "{removed:?}");
    assert_eq!(fs::read_to_string(&config).unwrap(), SAMPLE_CONFIG, "uninstall gives back the original bytes");
    assert_eq!(tree(&root, false), before, "uninstall leaves the root as it was");
    let again = nestbox(&bins, &["uninstall", "--root", r]);
    assert!(again.status.success() && again.stdout.contains("nothing to do"), "{again:?}");
}

#[test]
fn a_missing_config_is_written_and_removed_again() {
    let bins = bin_dir();
    let scratch = Scratch::new("noconfig");
    let guest = fake_guest(&scratch);
    fs::create_dir(scratch.path("root")).unwrap();
    let root = scratch.path("root");
    let (r, b, g) = (root.to_str().unwrap(), bins.to_str().unwrap(), guest.to_str().unwrap());
    let mut args = install_args(r, b, g);
    args.extend(["--prefix", "/opt/nestbox"]);
    let done = nestbox(&bins, &args);
    assert!(done.status.success(), "{done:?}");
    assert_installed(&root, "/opt/nestbox", &bins, &guest, false);
    let config = root.join("etc/containerd/config.toml");
    assert!(fs::read_to_string(&config).unwrap().starts_with("version = 2\n"));
    assert!(containerd_reads(&config).contains("io.containerd.nestbox.v2"));
    let removed = nestbox(&bins, &["uninstall", "--root", r]);
    assert!(removed.status.success(), "{removed:?}");
    assert!(tree(&root, false).is_empty(), "left behind: {:?}", tree(&root, false));
}

#[test]
fn a_file_it_replaces_comes_back() {
    let bins = bin_dir();
    let scratch = Scratch::new("replaced");
    let guest = fake_guest(&scratch);
    scratch.write("root/etc/containerd/config.toml", SAMPLE_CONFIG);
    let old_vmm = scratch.write("root/usr/local/bin/nestbox-vmm", "an older nestbox-vmm copied by hand\n");
    let root = scratch.path("root");
    let before = tree(&root, false);
    let (r, b, g) = (root.to_str().unwrap(), bins.to_str().unwrap(), guest.to_str().unwrap());
    let done = nestbox(&bins, &install_args(r, b, g));
    assert!(done.status.success(), "{done:?}");
    assert!(done.stdout.contains("/usr/local/bin/nestbox-vmm: replaced"), "{}", done.stdout);
    assert_installed(&root, "/usr/local", &bins, &guest, false);
    assert!(root.join("var/lib/nestbox/backup/usr/local/bin/nestbox-vmm").is_file());
    assert!(nestbox(&bins, &["uninstall", "--root", r]).status.success());
    assert_eq!(fs::read_to_string(&old_vmm).unwrap(), "an older nestbox-vmm copied by hand\n");
    assert_eq!(tree(&root, false), before);
}

#[test]
fn an_edited_config_loses_only_the_stanza() {
    let bins = bin_dir();
    let scratch = Scratch::new("edited");
    let guest = fake_guest(&scratch);
    let config = scratch.write("root/etc/containerd/config.toml", SAMPLE_CONFIG);
    let root = scratch.path("root");
    let (r, b, g) = (root.to_str().unwrap(), bins.to_str().unwrap(), guest.to_str().unwrap());
    assert!(nestbox(&bins, &install_args(r, b, g)).status.success());
    let edited = format!("{}[metrics]\n  address = \"127.0.0.1:1338\"\n", fs::read_to_string(&config).unwrap());
    fs::write(&config, &edited).unwrap();
    let removed = nestbox(&bins, &["uninstall", "--root", r]);
    assert!(removed.status.success(), "{removed:?}");
    assert!(removed.stdout.contains("took out only the nestbox runtime"), "{}", removed.stdout);
    let left = fs::read_to_string(&config).unwrap();
    assert_eq!(left, format!("{SAMPLE_CONFIG}\n[metrics]\n  address = \"127.0.0.1:1338\"\n"));
}

/// Runs an install that must fail, and checks that it named `expected` and changed nothing.
fn refused(bins: &Path, root: &Path, args: &[&str], expected: &str) {
    let before = if root.is_dir() { tree(root, true) } else { Default::default() };
    let done = nestbox(bins, args);
    assert!(!done.status.success(), "{done:?}");
    assert!(done.stderr.contains(expected), "expected {expected:?} in: {}", done.stderr);
    if root.is_dir() {
        assert_eq!(tree(root, true), before, "a refused install changed something");
    }
}

#[test]
fn what_cannot_be_installed_is_refused_before_any_change() {
    let bins = bin_dir();
    let scratch = Scratch::new("refused");
    let guest = fake_guest(&scratch);
    let root = scratch.path("root");
    let (r, b, g) = (root.to_str().unwrap(), bins.to_str().unwrap(), guest.to_str().unwrap());

    // A config that does not parse: its line named.
    let broken = "version = 2\n\n[plugins.\"io.containerd.grpc.v1.cri\"\n  sandbox_image = \"pause\"\n";
    let config = scratch.write("root/etc/containerd/config.toml", broken);
    refused(&bins, &root, &install_args(r, b, g), &format!("{}: line 3", config.display()));

    // A nestbox runtime that is someone else's.
    let foreign = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.nestbox]\n  runtime_type = \"io.containerd.kata.v2\"\n";
    scratch.write("root/etc/containerd/config.toml", foreign);
    refused(&bins, &root, &install_args(r, b, g), "line 2: a runtime named nestbox is already registered");

    // A config that is a symbolic link (writing would replace the link).
    fs::remove_file(&config).unwrap();
    scratch.write("root/etc/containerd/real.toml", SAMPLE_CONFIG);
    std::os::unix::fs::symlink("real.toml", &config).unwrap();
    refused(&bins, &root, &install_args(r, b, g), "a symbolic link");
    fs::remove_file(&config).unwrap();

    // Roots that are not folders, relative prefixes, missing sources.
    scratch.write("root/etc/containerd/config.toml", SAMPLE_CONFIG);
    let file = scratch.write("a-file", "");
    refused(&bins, &file, &install_args(file.to_str().unwrap(), b, g), "not a directory");
    let missing = scratch.path("missing");
    refused(&bins, &missing, &install_args(missing.to_str().unwrap(), b, g), "does not exist");
    let mut relative = install_args(r, b, g);
    relative.extend(["--prefix", "usr/local"]);
    refused(&bins, &root, &relative, "--prefix usr/local: must be an absolute path");
    let empty = scratch.path("guest-empty");
    fs::create_dir(&empty).unwrap();
    refused(&bins, &root, &install_args(r, b, empty.to_str().unwrap()), "vmlinux is missing");
}

#[test]
fn the_runtime_class_manifest_is_what_nestbox_config_prints() {
    let bins = bin_dir();
    let scratch = Scratch::new("runtimeclass");
    let empty_config = scratch.write("nestbox.toml", "");
    let mut cmd = std::process::Command::new(bins.join("nestbox"));
    cmd.arg("config").env("NESTBOX_CONFIG", &empty_config);
    let printed = nestbox_tests::run_with_deadline(&mut cmd, QUICK);
    assert!(printed.status.success(), "{printed:?}");
    let yaml = |text: &str| -> Vec<String> {
        text.lines().filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty()).map(String::from).collect()
    };
    let from_config = yaml(printed.stdout.split("---\n").nth(1).expect("a RuntimeClass after ---"));
    let file = nestbox_tests::workspace_root().join("deploy/runtimeclass.yaml");
    assert_eq!(
        yaml(&fs::read_to_string(&file).unwrap()),
        from_config,
        "{} differs from `nestbox config`",
        file.display()
    );
}
