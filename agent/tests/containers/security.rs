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
