//! Failure handling of the nestbox shim under a real containerd, without waiting for a
//! guest to boot: a guest that never answers, a VMM that cannot start, and a shim killed
//! while its VM boots. Each must fail with a clear error and leave nothing behind (no
//! sandbox directory, mount, VMM process or shim). A VMM that dies under running
//! containers is in containerd_shim.rs (it needs a booted guest).

use nestbox_tests::containerd::{Containerd, BUSYBOX, QUICK, RUNTIME};
use std::process::Stdio;
use std::time::{Duration, Instant};

#[test]
fn failures_are_reported_and_leave_nothing_behind() {
    let c = Containerd::start("fail", "[agent]\nboot_timeout_secs = 3\n");
    c.import_busybox();

    // 1. The guest never answers in time (it needs far more than 3 s here): the VM's
    //    directory, the rootfs mounted into it, the VMM and its socket all go.
    let started = Instant::now();
    let run = c.run(&["run", "--rm", "--runtime", RUNTIME, BUSYBOX, "timeout", "true"], QUICK);
    assert!(!run.status.success(), "a guest that cannot answer in 3 s cannot run a container: {run:?}");
    assert!(
        run.stderr.contains("did not answer within") && run.stderr.contains("guest port 1024"),
        "unclear error: {}",
        run.stderr
    );
    assert!(started.elapsed() < Duration::from_secs(45), "the timeout took {:?}", started.elapsed());
    c.assert_clean();

    // 2. The VMM cannot start (no kernel): the error says why, at once.
    c.write_nestbox_config("kernel = \"/nonexistent/vmlinux\"\n");
    let started = Instant::now();
    let run = c.run(&["run", "--rm", "--runtime", RUNTIME, BUSYBOX, "nokernel", "true"], QUICK);
    assert!(!run.status.success(), "{run:?}");
    assert!(run.stderr.contains("VMM exited") && run.stderr.contains("/nonexistent/vmlinux"), "{}", run.stderr);
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
    c.assert_clean();

    // 3. A bad configuration value is named when containerd starts the shim.
    c.write_nestbox_config("vcpus = 0\n");
    let run = c.run(&["run", "--rm", "--runtime", RUNTIME, BUSYBOX, "badconfig", "true"], QUICK);
    assert!(!run.status.success() && run.stderr.contains("hypervisor.vcpus"), "{run:?}");
    c.assert_clean();

    // 4. The shim is killed while its VM boots: containerd runs `shim delete`, which
    //    cleans up; the VMM dies with its shim.
    c.write_nestbox_config("[agent]\nboot_timeout_secs = 600\n");
    let mut ctr = c
        .ctr(&["run", "-d", "--null-io", "--runtime", RUNTIME, BUSYBOX, "killed", "sleep", "600"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ctr run");
    let deadline = Instant::now() + QUICK;
    while c.vmm_pids().is_empty() || c.shim_pids().is_empty() {
        assert!(Instant::now() < deadline, "no VMM started; containerd log:\n{}", c.log_tail(60));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(c.sandbox_dirs().len(), 1, "{:?}", c.sandbox_dirs());
    assert!(!nestbox_tests::containerd::mounts_under(&c.sandboxes).is_empty(), "the rootfs is mounted before boot");
    for pid in c.shim_pids() {
        // SAFETY: kill(2) on the shim's PID; no memory involved.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let deadline = Instant::now() + QUICK;
    let status = loop {
        if let Some(status) = ctr.try_wait().expect("waiting for ctr") {
            break status;
        }
        assert!(Instant::now() < deadline, "ctr still waiting after its shim was killed");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success(), "create cannot succeed without its shim");
    c.assert_clean();
    assert!(c.shim_pids().is_empty(), "shims left: {:?}", c.shim_pids());
    // The jailed VMM's cgroup goes too (`shim delete` removes it; its supervisor is gone).
    for hierarchy in ["", "memory/", "pids/", "cpu/"] {
        let cgroup = format!("/sys/fs/cgroup/{hierarchy}nestbox/killed");
        assert!(!std::path::Path::new(&cgroup).exists(), "{cgroup} is left");
    }
    // containerd's view is clean too: the task is gone.
    let tasks = c.ok(&["task", "ls", "-q"], QUICK);
    assert!(tasks.stdout.trim().is_empty(), "tasks left: {}", tasks.stdout);
}
