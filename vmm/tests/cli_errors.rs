//! Bad input never panics the VMM: each case ends with exit code 1 (2 for a malformed
//! command line, as clap reports it) and a message that names the problem.
//! These run as root (the KVM cases change namespaces and users) and boot no guest.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const VMM: &str = env!("CARGO_BIN_EXE_nestbox-vmm");

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nestbox-vmm-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write_file(path: &Path, contents: &[u8]) -> PathBuf {
    std::fs::File::create(path).unwrap().write_all(contents).unwrap();
    path.to_path_buf()
}

/// A real kernel and initramfs need not exist for these cases: each fails before use.
fn vmm(args: &[&str]) -> Output {
    Command::new(VMM).args(args).output().expect("running nestbox-vmm")
}

fn assert_error(out: &Output, code: i32, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "the VMM panicked: {stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{needle:?} not in: {stderr}");
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn kernel_missing() {
    let out = vmm(&["--kernel", "/nonexistent/vmlinux", "--initramfs", "/dev/null"]);
    assert_error(&out, 1, &["kernel /nonexistent/vmlinux", "No such file"]);
}

#[test]
fn kernel_not_elf() {
    let dir = scratch("notelf");
    let text = write_file(&dir.join("vmlinux"), b"this is not a kernel\n");
    let out = vmm(&["--kernel", text.to_str().unwrap(), "--initramfs", "/dev/null"]);
    assert_error(&out, 1, &["is not an ELF vmlinux", "no ELF header"]);

    let mut bz = vec![0u8; 0x400];
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    let bzimage = write_file(&dir.join("bzImage"), &bz);
    let out = vmm(&["--kernel", bzimage.to_str().unwrap(), "--initramfs", "/dev/null"]);
    assert_error(&out, 1, &["it is a bzImage"]);

    // An ELF header with nothing valid behind it.
    let broken = write_file(&dir.join("broken"), b"\x7fELF\x02\x01\x01garbage");
    let out = vmm(&["--kernel", broken.to_str().unwrap(), "--initramfs", "/dev/null"]);
    assert_error(&out, 1, &["could not be loaded"]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn initramfs_missing() {
    let kernel = installed_kernel();
    let out = vmm(&["--kernel", kernel.to_str().unwrap(), "--initramfs", "/nonexistent/initramfs.cpio"]);
    assert_error(&out, 1, &["initramfs /nonexistent/initramfs.cpio", "No such file"]);
}

#[test]
fn initramfs_larger_than_memory() {
    let kernel = installed_kernel();
    let dir = scratch("bigrd");
    let big = dir.join("big.cpio");
    std::fs::File::create(&big).unwrap().set_len(80 << 20).unwrap();
    let out = vmm(&["--kernel", kernel.to_str().unwrap(), "--initramfs", big.to_str().unwrap(), "--memory-mib", "64"]);
    assert_error(&out, 1, &["does not fit in guest memory"]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn memory_too_small_or_too_large() {
    assert_error(&vmm(&["--memory-mib", "16"]), 1, &["memory_mib = 16", "at least 64 MiB"]);
    assert_error(&vmm(&["--memory-mib", "100000000"]), 1, &["memory_mib = 100000000", "more than this host's"]);
    assert_error(&vmm(&["--memory-mib", "lots"]), 2, &["--memory-mib"]);
}

#[test]
fn bad_vcpu_count() {
    assert_error(&vmm(&["--vcpus", "0"]), 1, &["vcpus = 0", "1 to 254"]);
    assert_error(&vmm(&["--vcpus", "255"]), 1, &["vcpus = 255"]);
    assert_error(&vmm(&["--vcpus", "1000"]), 2, &["--vcpus"]);
}

#[test]
fn config_file_errors_name_the_key() {
    let dir = scratch("config");
    let unknown = write_file(&dir.join("unknown.toml"), b"vcpus = 1\nmemory = 128\n");
    assert_error(&vmm(&["--config", unknown.to_str().unwrap()]), 1, &["unknown.toml", "unknown field `memory`"]);
    let bad = write_file(&dir.join("bad.toml"), b"cpu_template = \"turbo\"\n");
    assert_error(&vmm(&["--config", bad.to_str().unwrap()]), 1, &["bad.toml", "turbo"]);
    let bad_vcpus = write_file(&dir.join("vcpus.toml"), b"vcpus = 0\n");
    assert_error(&vmm(&["--config", bad_vcpus.to_str().unwrap()]), 1, &["vcpus = 0"]);
    assert_error(&vmm(&["--config", "/nonexistent.toml"]), 1, &["cannot read config file /nonexistent.toml"]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn console_that_cannot_be_opened() {
    let kernel = installed_kernel();
    let out = vmm(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--initramfs",
        installed_initramfs().to_str().unwrap(),
        "--console",
        "/nonexistent/dir/console.log",
    ]);
    assert_error(&out, 1, &["console /nonexistent/dir/console.log"]);
}

#[test]
fn no_kvm_device() {
    assert!(is_root(), "this test hides /dev/kvm in a mount namespace and must run as root");
    // A private mount namespace whose /dev is an empty tmpfs: the VMM finds no KVM.
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", "mount -t tmpfs none /dev && exec \"$0\"", VMM])
        .output()
        .expect("running unshare");
    assert_error(&out, 1, &["/dev/kvm does not exist"]);
}

#[test]
fn kvm_permission_denied() {
    assert!(is_root(), "this test drops to an unprivileged user and must run as root");
    // The binary is copied where any user can run it; /dev/kvm stays root-only (0600 or
    // group kvm), so user nobody is refused.
    let dir = scratch("perm");
    let copy = dir.join("nestbox-vmm");
    std::fs::copy(VMM, &copy).unwrap();
    let permissive = |p: &Path, mode| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    permissive(&dir, 0o755);
    permissive(&copy, 0o755);
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&copy)
        .arg("--memory-mib=64")
        .output()
        .expect("running setpriv");
    assert_error(&out, 1, &["permission denied opening /dev/kvm"]);
    std::fs::remove_dir_all(dir).unwrap();
}

fn guest_dir() -> PathBuf {
    std::env::var_os("NESTBOX_GUEST_DIR").map(PathBuf::from).unwrap_or_else(|| "/usr/local/share/nestbox".into())
}

fn installed_kernel() -> PathBuf {
    let k = guest_dir().join("vmlinux");
    assert!(k.exists(), "{} missing: run guest-image/build.sh", k.display());
    k
}

fn installed_initramfs() -> PathBuf {
    guest_dir().join("initramfs.cpio")
}

#[test]
fn net_mac_invalid() {
    for (mac, why) in
        [("01:02:03:04:05:06", "multicast"), ("02:00:00:00:00", "six hex bytes"), ("02:00:00:00:00:zz", "\"zz\"")]
    {
        let out = vmm(&["--net-mac", mac, "--kernel", "/nonexistent/vmlinux"]);
        assert_error(&out, 1, &["--net-mac", mac, why]);
    }
}

#[test]
fn net_tap_fd_invalid() {
    let out = vmm(&["--net-tap-fd", "5", "--kernel", "/nonexistent/vmlinux"]);
    assert_error(&out, 1, &["--net-tap-fd 5", "--net-mac"]);
    // The descriptor is checked once KVM is open, before any guest file is read.
    let mac = ["--net-mac", "02:00:00:00:00:01", "--kernel", "/nonexistent/vmlinux", "--initramfs", "/dev/null"];
    let out = vmm(&[&mac[..], &["--net-tap-fd", "77"]].concat());
    assert_error(&out, 1, &["--net-tap-fd 77", "not an open file descriptor"]);
    let out = vmm(&[&mac[..], &["--net-tap-fd", "2"]].concat());
    assert_error(&out, 1, &["--net-tap-fd 2", "not an attached tun/tap device"]);
}
