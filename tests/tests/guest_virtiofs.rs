//! virtio-fs in a real guest: nestbox-vmm shares a host directory, a test program runs as
//! the guest's /init (tests/src/bin/guest-fs-check.rs) and checks POSIX behaviour and
//! escape attempts from inside; this side prepares the directory, adds files and a bind
//! mount while the guest runs, and verifies on the host what the guest wrote.

use nestbox_tests::{guest_binary, test_initramfs, vmm_command, GUEST_DEADLINE};
use std::ffi::CString;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_encoded_bytes()).unwrap()
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    let name = CString::new(name).unwrap();
    // SAFETY: valid C strings and a buffer with its real length.
    let rc = unsafe { libc::setxattr(cpath(path).as_ptr(), name.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    assert_eq!(rc, 0, "setxattr {}: {}", path.display(), std::io::Error::last_os_error());
}

fn get_xattr(path: &Path, name: &str) -> Vec<u8> {
    let name = CString::new(name).unwrap();
    let mut buf = [0u8; 64];
    // SAFETY: valid C strings; the buffer is 64 bytes long.
    let n = unsafe { libc::getxattr(cpath(path).as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(n >= 0, "getxattr {}: {}", path.display(), std::io::Error::last_os_error());
    buf[..n as usize].to_vec()
}

/// The test's directory; unmounts the bind mount and removes everything on drop.
struct Scratch {
    base: PathBuf,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.base.join("shared/bound")).status();
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

fn prepare(base: &Path) {
    let shared = base.join("shared");
    std::fs::create_dir_all(shared.join("bigdir")).unwrap();
    std::fs::create_dir_all(shared.join("bound")).unwrap();
    std::fs::create_dir_all(base.join("outside")).unwrap();
    std::fs::write(base.join("outside/inside"), "bind mounted by the host\n").unwrap();
    std::fs::write(base.join("secret"), "host secret\n").unwrap();
    let hostfile = shared.join("hostfile");
    std::fs::write(&hostfile, "written by the host\n").unwrap();
    std::os::unix::fs::chown(&hostfile, Some(1234), Some(5678)).unwrap();
    std::fs::set_permissions(&hostfile, std::fs::Permissions::from_mode(0o640)).unwrap();
    set_xattr(&hostfile, "user.host", b"host");
    for i in 0..2000 {
        std::fs::write(shared.join(format!("bigdir/entry-{i:04}")), b"").unwrap();
    }
    let big: Vec<u8> = (0..(8u64 << 20)).map(pattern).collect();
    std::fs::write(shared.join("big"), &big).unwrap();
    std::fs::write(shared.join("big.fnv"), format!("{} {:016x}\n", big.len(), fnv(&big))).unwrap();
    std::os::unix::fs::symlink("../secret", shared.join("escape-rel")).unwrap();
    std::os::unix::fs::symlink(base.join("secret"), shared.join("escape-abs")).unwrap();
}

#[test]
fn virtiofs_in_a_real_guest() {
    let base = std::env::temp_dir().join(format!("nestbox-test-virtiofs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let scratch = Scratch { base: base.clone() };
    prepare(&base);
    let shared = base.join("shared");
    let initramfs = base.join("fscheck.cpio");
    test_initramfs(&guest_binary("guest-fs-check"), &initramfs);
    let console = base.join("console.log");

    let mut child = vmm_command(Some(&initramfs))
        .args(["--vcpus", "1", "--memory-mib", "256"])
        .arg("--shared-dir")
        .arg(&shared)
        .arg("--console")
        .arg(&console)
        .spawn()
        .expect("spawning nestbox-vmm");
    let read_console = || std::fs::read_to_string(&console).unwrap_or_default();

    // Once the guest has run its first checks, the host adds a file and a bind mount.
    let start = Instant::now();
    while !read_console().contains("fscheck: waiting for the host") {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("VMM exited early ({status:?}); console:\n{}", read_console());
        }
        // Boot plus the first checks: twice the boot deadline (the checks are hundreds of
        // emulated FUSE round trips on a software-nested host).
        assert!(start.elapsed() < 2 * GUEST_DEADLINE, "guest never reached its checks; console:\n{}", read_console());
        std::thread::sleep(Duration::from_millis(200));
    }
    std::fs::write(shared.join("late"), "late\n").unwrap();
    let bind =
        Command::new("mount").arg("--bind").arg(base.join("outside")).arg(shared.join("bound")).status().unwrap();
    assert!(bind.success(), "bind mount");

    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > 3 * GUEST_DEADLINE {
            let _ = child.kill();
            panic!("guest did not finish; console:\n{}", read_console());
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = read_console();
    let checks: Vec<&str> = out.lines().filter(|l| l.starts_with("fscheck:")).collect();
    eprintln!("{}", checks.join("\n"));
    assert!(status.success(), "VMM exit {status:?}");
    assert!(!checks.iter().any(|l| l.contains("FAIL")), "guest checks failed:\n{}", checks.join("\n"));
    assert!(out.contains("fscheck: done, 0 failed"), "guest did not finish its checks:\n{out}");
    // Every check of guest-fs-check.rs reported (a check that never ran cannot pass).
    let passed = checks.iter().filter(|l| l.starts_with("fscheck: ok ")).count();
    assert_eq!(passed, 17, "checks that reported ok: {checks:?}");

    // What the guest wrote, seen on the host.
    let written = std::fs::read(shared.join("guest-big")).unwrap();
    assert_eq!(written.len(), 16 << 20);
    assert!(written.chunks(1 << 20).all(|c| c.iter().enumerate().all(|(i, b)| *b == pattern(i as u64))));
    let sparse = std::fs::metadata(shared.join("sparse")).unwrap();
    assert_eq!(sparse.len(), (5 << 30) + 3);
    assert!(sparse.blocks() < 1024, "the sparse file stays sparse on the host");
    let owned = std::fs::metadata(shared.join("owned")).unwrap();
    assert_eq!((owned.uid(), owned.gid(), owned.mode() & 0o7777), (1000, 2000, 0o4710));
    let (a, b) = (std::fs::metadata(shared.join("hl-a")).unwrap(), std::fs::metadata(shared.join("hl-b")).unwrap());
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
    assert!(!shared.join("before").exists());
    assert_eq!(std::fs::read(shared.join("after")).unwrap(), b"moved");
    assert_eq!(get_xattr(&shared.join("xattr"), "user.nestbox"), b"guest");
    assert_eq!(&std::fs::read(shared.join("mapped")).unwrap()[4096..4104], b"via mmap");
    assert_eq!(std::fs::read_dir(shared.join("small")).unwrap().count(), 150);
    assert!(std::fs::symlink_metadata(shared.join("fifo")).unwrap().file_type().is_fifo());
    assert!(!shared.join("devmem").exists(), "the guest created a device node on the host");
    assert_eq!(std::fs::read_link(shared.join("link-rel")).unwrap(), Path::new("hostfile"));
    assert!(shared.join("guest-done").exists());
    drop(scratch);
    assert!(!base.exists());
}
