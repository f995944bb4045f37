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

/// A static x86_64 ELF that makes one system call (`code` sets eax, then `int 0x80` for
/// the i386 ABI or `syscall` for x86_64 and x32) and exits with the call's result, so a
/// container's shell sees the verdict: the result or `-errno & 0xff`, or 159 (SIGSYS) when
/// the filter kills it.
fn call_elf(code: &[u8]) -> Vec<u8> {
    let tail = [0x89, 0xc7, 0xb8, 0xe7, 0, 0, 0, 0x0f, 0x05]; // mov edi,eax; exit_group (231)
    let len = (64 + 56 + code.len() + tail.len()) as u64;
    let mut elf = b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0".to_vec();
    elf.extend(2u16.to_le_bytes()); // ET_EXEC
    elf.extend(0x3eu16.to_le_bytes()); // EM_X86_64
    elf.extend(1u32.to_le_bytes());
    elf.extend((0x40_0000u64 + 120).to_le_bytes()); // entry: right after the headers
    elf.extend(64u64.to_le_bytes()); // program headers
    elf.extend(0u64.to_le_bytes()); // no sections
    elf.extend(0u32.to_le_bytes());
    for half in [64u16, 56, 1, 0, 0, 0] {
        elf.extend(half.to_le_bytes());
    }
    elf.extend(1u32.to_le_bytes()); // PT_LOAD
    elf.extend(5u32.to_le_bytes()); // R+X
    for word in [0u64, 0x40_0000, 0x40_0000, len, len, 0x1000] {
        elf.extend(word.to_le_bytes());
    }
    elf.extend(code);
    elf.extend(tail);
    elf
}

#[test]
fn seccomp_follows_the_profiles_architectures() {
    root_only!();
    let agent = Agent::start();
    let rootfs = agent.rootfs("rootfs");
    let i386 = call_elf(&[0xb8, 20, 0, 0, 0, 0xcd, 0x80]); // mov eax,20; int 0x80
    let x32 = call_elf(&[0xb8, 0x27, 0, 0, 0x40, 0x0f, 0x05]); // mov eax,0x40000027; syscall
    for (name, elf) in [("i386-getpid", i386), ("x32-getpid", x32)] {
        let path = rootfs.join("bin").join(name);
        std::fs::write(&path, elf).expect("writing the test program");
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    }
    let mut spec = agent.spec(&rootfs, &["sh", "-c", "i386-getpid; echo $?; x32-getpid; echo $?"]);
    let profile = |archs: &[&str]| {
        json!({"defaultAction": "SCMP_ACT_ALLOW", "architectures": archs,
               "syscalls": [{"names": ["getpid"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::E2BIG}]})
    };
    let e2big = 256 - libc::E2BIG;
    // Only x86_64: both other ABIs get libseccomp's bad-arch action (SIGSYS, 128 + 31).
    spec["linux"]["seccomp"] = profile(&["SCMP_ARCH_X86_64"]);
    let (_, out, _) = agent.run("x86_64", &spec);
    assert_eq!(out, "159\n159\n");
    // i386 listed: its getpid (20 there) is refused by the rule; x32 still killed.
    spec["linux"]["seccomp"] = profile(&["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"]);
    let (_, out, _) = agent.run("i386", &spec);
    assert_eq!(out, format!("{e2big}\n159\n"));
    // x32 listed too: its getpid (0x40000027) is refused by the same named rule.
    spec["linux"]["seccomp"] = profile(&["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]);
    let (_, out, _) = agent.run("x32", &spec);
    assert_eq!(out, format!("{e2big}\n{e2big}\n"));
}

/// A `syscall` instruction for x86_64 number `nr`, for `call_elf`.
fn x86_64_call(nr: u32) -> Vec<u8> {
    let mut code = vec![0xb8]; // mov eax, nr
    code.extend(nr.to_le_bytes());
    code.extend([0x0f, 0x05]);
    code
}

#[test]
fn containerds_default_seccomp_profile_in_a_container() {
    root_only!();
    let agent = Agent::start();
    let rootfs = agent.rootfs("rootfs");
    for (name, code) in [
        ("i386-getpid", vec![0xb8, 20, 0, 0, 0, 0xcd, 0x80]),
        ("set_mempolicy", x86_64_call(238)), // not in the profile: EPERM, the default
        ("clone3", x86_64_call(435)),        // the profile's ERRNO 38 (ENOSYS) rule
        ("fchmodat2", x86_64_call(452)),     // past the profile's highest: runc's stub, ENOSYS
    ] {
        let path = rootfs.join("bin").join(name);
        std::fs::write(&path, call_elf(&code)).expect("writing the test program");
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    }
    let script =
        "ls / >/dev/null && echo ls 0; for p in i386-getpid set_mempolicy clone3 fchmodat2; do $p; echo $p $?; done";
    let mut spec = agent.spec(&rootfs, &["sh", "-c", script]);
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("../../src/container/seccomp/testdata/containerd-1.6.20-default.json"))
            .expect("fixture JSON");
    spec["linux"]["seccomp"] = fixture["seccomp"].clone();
    let (status, out, err) = agent.run("containerd-default", &spec);
    assert_eq!(status, 0, "{err}");
    let (eperm, enosys) = (256 - libc::EPERM, 256 - libc::ENOSYS);
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("ls 0"));
    // i386 is listed: getpid is allowed there and returns the pid (small: a new PID namespace).
    let i386: u32 = lines.next().and_then(|l| l.strip_prefix("i386-getpid ")).and_then(|n| n.parse().ok()).expect(&out);
    assert!((1..100).contains(&i386), "{out}");
    assert_eq!(
        lines.collect::<Vec<_>>(),
        [format!("set_mempolicy {eperm}"), format!("clone3 {enosys}"), format!("fchmodat2 {enosys}")]
    );
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
