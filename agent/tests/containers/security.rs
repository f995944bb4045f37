//! Isolation: seccomp, capabilities and users, read-only root, masked and read-only paths.

use nestbox_protocols::ttrpc;
use nestbox_protocols::types::Stdio;
use serde_json::json;

use crate::harness::{expect_code, Agent};

#[test]
fn seccomp_profile_denies_a_syscall() {
    root_only!();
    let agent = Agent::start();
    let rootfs = agent.rootfs("rootfs");
    let mut spec = agent.spec(&rootfs, &["sh", "-c", "touch /tmp/file && echo touched; mkdir /tmp/dir; echo $?"]);
    spec["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EPERM}]
    });
    let (status, out, err) = agent.run("s", &spec);
    assert_eq!(status, 0);
    assert_eq!(out, "touched\n1\n");
    assert!(err.contains("Operation not permitted"), "{err}");

    // Without no_new_privs the filter is installed while still privileged: same effect.
    spec["process"]["noNewPrivileges"] = json!(false);
    let (_, out, _) = agent.run("s2", &spec);
    assert_eq!(out, "touched\n1\n");

    // A profile the agent cannot honour is refused at create, not ignored.
    spec["linux"]["seccomp"]["defaultAction"] = json!("SCMP_ACT_NOTIFY");
    expect_code(agent.create("s3", &spec, Stdio::default()), ttrpc::Code::INVALID_ARGUMENT, "SCMP_ACT_NOTIFY");
}

#[test]
fn dropped_capabilities_are_really_dropped() {
    root_only!();
    let agent = Agent::start();
    let rootfs = agent.rootfs("rootfs");
    let keep = ["CAP_KILL", "CAP_SETUID"];
    let mut spec =
        agent.spec(&rootfs, &["sh", "-c", "grep -E '^Cap(Eff|Bnd)' /proc/self/status; touch /tmp/f; chown 1 /tmp/f"]);
    spec["process"]["capabilities"] = json!({"bounding": keep, "effective": keep, "permitted": keep});
    let (status, out, err) = agent.run("caps", &spec);
    let want = format!("{:016x}", 1u64 << 5 | 1 << 7);
    assert_eq!(out, format!("CapEff:\t{want}\nCapBnd:\t{want}\n"));
    assert_ne!(status, 0);
    assert!(err.contains("Operation not permitted"), "chown without CAP_CHOWN: {err}");

    // A non-root user with additional groups.
    let mut spec = agent.spec(&rootfs, &["id"]);
    spec["process"]["user"] = json!({"uid": 1000, "gid": 1000, "additionalGids": [10, 20]});
    let (status, out, _) = agent.run("user", &spec);
    assert_eq!(status, 0);
    assert!(out.starts_with("uid=1000 gid=1000 groups=10,20"), "{out}");
}

#[test]
fn read_only_rootfs_masked_and_read_only_paths() {
    root_only!();
    let agent = Agent::start();
    let rootfs = agent.rootfs("rootfs");
    let script = "exec 2>&1; touch /x; touch /tmp/ok && echo tmp-writable; wc -c < /proc/cmdline; \
                  echo x > /proc/sys/kernel/domainname; ls /sys/firmware | wc -l; \
                  cat /proc/sys/kernel/shm_rmid_forced /proc/sys/fs/mqueue/msg_max";
    let mut spec = agent.spec(&rootfs, &["sh", "-c", script]);
    spec["root"]["readonly"] = json!(true);
    spec["linux"]["maskedPaths"].as_array_mut().unwrap().push(json!("/proc/cmdline"));
    // Sysctls are applied although /proc/sys is read-only for the program (as containerd
    // lists it), in the container's own IPC namespace: the host's values stay.
    spec["linux"]["sysctl"] = json!({"kernel.shm_rmid_forced": "1", "fs.mqueue.msg_max": "97"});
    let host_msg_max = std::fs::read_to_string("/proc/sys/fs/mqueue/msg_max").expect("host msg_max");
    let (_, out, _) = agent.run("ro", &spec);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].contains("Read-only file system"), "{out}");
    assert_eq!(lines[1], "tmp-writable", "{out}");
    assert_eq!(lines[2].trim(), "0", "masked /proc/cmdline reads empty: {out}");
    assert!(lines[3].contains("Read-only file system"), "{out}");
    assert_eq!(lines[4].trim(), "0", "masked /sys/firmware is empty: {out}");
    assert_eq!(&lines[5..], ["1", "97"], "sysctls: {out}");
    assert_eq!(std::fs::read_to_string("/proc/sys/fs/mqueue/msg_max").expect("host msg_max"), host_msg_max);
    assert!(!rootfs.join("x").exists());
}

/// The device cgroup (an eBPF program on the container's cgroup v2 directory; on a v1 host
/// the one in the cgroup2 hierarchy beside it): containerd's rules let a container make any
/// node (runc's default) but open only the standard devices; allow-all opens everything;
/// UpdateContainer replaces the program.
#[test]
fn devices_follow_the_spec_rules() {
    root_only!();
    let agent = Agent::start();
    let rootfs = agent.rootfs("rootfs");
    let script = "exec 2>&1; while [ ! -e /go ]; do sleep 0.05; done; mknod /dev/sda b 8 0 && echo made; \
                  head -c 1 /dev/sda >/dev/null; echo sda=$?; echo x > /dev/null && echo null-ok; \
                  head -c 1 /dev/zero | wc -c";
    let mut spec = agent.spec(&rootfs, &["sh", "-c", script]);
    let deny_all = json!({"allow": false, "access": "rwm"});
    let mut rules = vec![deny_all.clone()];
    for (major, minor) in [(1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 2)] {
        rules.push(json!({"allow": true, "type": "c", "major": major, "minor": minor, "access": "rwm"}));
    }
    spec["linux"]["resources"] = json!({"devices": rules});
    std::fs::write(rootfs.join("go"), "").expect("go");
    let (status, out, _) = agent.run("dev", &spec);
    assert_eq!(status, 0, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "made", "mknod is allowed: {out}");
    assert!(lines[1].contains("/dev/sda: Operation not permitted"), "opening 8:0 is not: {out}");
    assert_eq!(&lines[2..], ["sda=1", "null-ok", "1"], "{out}");

    // Allow-all (a privileged container's rule) only through an update of a running one.
    std::fs::remove_file(rootfs.join("go")).expect("rm go");
    agent.create("dev2", &spec, Stdio { stdout: true, ..Default::default() }).expect("create");
    let out = crate::harness::read_all(agent.stream(nestbox_protocols::stdio::StreamKind::Stdout, "dev2", ""));
    agent.start_container("dev2").expect("start");
    let resources = json!({"devices": [deny_all, {"allow": true, "access": "rwm"}]});
    let req = nestbox_protocols::agent::UpdateContainerRequest {
        container_id: "dev2".into(),
        oci_resources_json: serde_json::to_vec(&resources).expect("json"),
        ..Default::default()
    };
    agent.client.update_container(crate::harness::ctx(), &req).expect("update");
    std::fs::write(rootfs.join("go"), "").expect("go");
    assert_eq!(agent.wait("dev2", "").expect("wait"), 0);
    let out = crate::harness::join(out);
    assert!(out.starts_with("made\n") && !out.contains("Operation not permitted"), "{out}");
    assert!(out.ends_with("null-ok\n1\n"), "{out}");
    agent.remove("dev2").expect("remove");

    // A rule that is no device rule is refused with its fault, and leaves no cgroup.
    spec["linux"]["resources"] = json!({"devices": [{"allow": true, "type": "c", "access": "rwx"}]});
    expect_code(agent.create("bad", &spec, Stdio::default()), ttrpc::Code::INVALID_ARGUMENT, "unknown access 'x'");
    for dir in agent.cgroup_dirs("bad") {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}

/// A v1 host without a cgroup2 mount (here: unmounted in the agent's own mount namespace):
/// the agent mounts cgroup2 privately for the device program, and removes it at exit.
#[test]
fn devices_without_a_cgroup2_mount() {
    root_only!();
    let unmount =
        "umount /sys/fs/cgroup/unified 2>/dev/null; ! grep -q ' - cgroup2 ' /proc/self/mountinfo && exec \"$@\"";
    let agent = Agent::start_in(&["unshare", "-m", "--propagation", "slave", "sh", "-c", unmount, "sh"]);
    let private = std::env::temp_dir().join(format!("nestbox-agent-{}.cgroup2", agent.pid()));
    assert!(private.is_dir(), "{} made", private.display());
    let rootfs = agent.rootfs("rootfs");
    let mut spec = agent.spec(&rootfs, &["sh", "-c", "exec 2>&1; mknod /dev/sda b 8 0; head -c 1 /dev/sda"]);
    spec["linux"]["resources"] = json!({"devices": [{"allow": false, "access": "rwm"}]});
    let (status, out, _) = agent.run("dev", &spec);
    assert_eq!(status, 1, "{out}");
    assert!(out.contains("/dev/sda: Operation not permitted"), "{out}");
    drop(agent);
    assert!(!private.exists(), "{} removed at exit", private.display());
}
