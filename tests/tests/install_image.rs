//! The DaemonSet installer image (scripts/installer-image, deploy/installer/entrypoint.sh)
//! under a private containerd with runc, against a scratch host root bind-mounted at /host:
//! it installs when it starts and uninstalls when its task gets SIGTERM, restarting
//! containerd (here a command that only counts) after each change.

mod install_support;

use install_support::*;
use nestbox_tests::containerd::{Containerd, QUICK as CTR_QUICK};
use nestbox_tests::{run_with_deadline, workspace_root};
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const IMAGE: &str = "nestbox.local/nestbox-installer:test";

fn wait_for(what: &str, log: &Path, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; the installer's log:\n{}",
            fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn restarts(host: &Path) -> usize {
    fs::read_to_string(host.join("restarts.log")).map(|s| s.lines().count()).unwrap_or(0)
}

#[test]
fn the_installer_image_installs_on_start_and_uninstalls_on_sigterm() {
    let bins = bin_dir();
    let scratch = Scratch::new("image");
    let guest = fake_guest(&scratch);
    let config = scratch.write("host/etc/containerd/config.toml", SAMPLE_CONFIG);
    let host = scratch.path("host");
    let before = tree(&host, false);
    let tarball = scratch.path("installer.tar");
    let built = run_with_deadline(
        Command::new(workspace_root().join("scripts/installer-image")).arg(&tarball).args([
            "--bin-dir",
            bins.to_str().unwrap(),
            "--guest-dir",
            guest.to_str().unwrap(),
            "--name",
            IMAGE,
        ]),
        QUICK,
    );
    assert!(built.status.success(), "building the installer image: {built:?}");

    let c = Containerd::start("installer", "");
    c.ok(&["images", "import", tarball.to_str().unwrap()], CTR_QUICK);
    let log = scratch.path("installer.log");
    let mount = format!("type=bind,src={},dst=/host,options=rbind:rw", host.display());
    c.ok(
        &[
            "run",
            "-d",
            "--log-uri",
            &format!("file://{}", log.display()),
            "--mount",
            &mount,
            "--env",
            "NESTBOX_RESTART_CMD=echo restart >>/host/restarts.log",
            IMAGE,
            "nbx-installer",
        ],
        CTR_QUICK,
    );
    wait_for("the install", &log, || fs::read_to_string(&log).unwrap_or_default().contains("waiting for SIGTERM"));
    assert_installed(&host, "/usr/local", &bins, &guest, true);
    assert_eq!(fs::read_to_string(&config).unwrap(), format!("{SAMPLE_CONFIG}{SAMPLE_STANZA}"));
    assert_eq!(restarts(&host), 1, "containerd restarted once after the install");

    c.ok(&["task", "kill", "nbx-installer"], CTR_QUICK);
    wait_for("the task to stop", &log, || {
        let tasks = c.run(&["task", "ls"], CTR_QUICK).stdout;
        tasks.lines().any(|l| l.starts_with("nbx-installer ") && l.contains("STOPPED"))
    });
    // `ctr task delete` fails with the task's exit status if it is not 0.
    c.ok(&["task", "delete", "nbx-installer"], CTR_QUICK);
    c.ok(&["containers", "delete", "nbx-installer"], CTR_QUICK);
    let output = fs::read_to_string(&log).unwrap_or_default();
    assert!(output.contains("nestbox-installer: uninstalled"), "{output}");
    assert_eq!(fs::read_to_string(&config).unwrap(), SAMPLE_CONFIG, "the original bytes are back");
    assert_eq!(restarts(&host), 2, "containerd restarted again after the uninstall");
    fs::remove_file(host.join("restarts.log")).unwrap();
    assert_eq!(tree(&host, false), before, "the host root is as it was");
}
