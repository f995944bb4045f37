//! Guest side of the virtio-fs test (tests/tests/guest_virtiofs.rs): runs as /init of a
//! test initramfs, mounts the shared directory and checks, from inside a real guest, the
//! POSIX behaviour containers need and that nothing outside the directory is reachable.
//! Prints one line per check (`fscheck: ok NAME` or `fscheck: FAIL NAME: REASON`), leaves
//! files for the host to verify, and reboots the VM.
//!
//! With `fscheck.bench` on the kernel command line it instead measures throughput and
//! small-file rates and prints `fsbench: NAME VALUE UNIT` lines.
//!
//! Built for x86_64-unknown-linux-musl (static): it is PID 1 with nothing else around.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

const MNT: &str = "/mnt";
const TAG: &str = "nestbox";
/// Files the many-small-files check creates (each costs several emulated FUSE round trips).
const SMALL_FILES: usize = 150;

fn cstr(s: &str) -> CString {
    CString::new(s).expect("no NUL in paths")
}

fn mount(src: &str, target: &str, fstype: &str) -> Result<(), String> {
    let _ = fs::create_dir_all(target);
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let rc =
        unsafe { libc::mount(cstr(src).as_ptr(), cstr(target).as_ptr(), cstr(fstype).as_ptr(), 0, std::ptr::null()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!("mount {fstype} on {target}: {}", std::io::Error::last_os_error()))
    }
}

fn reboot() -> ! {
    // SAFETY: sync and reboot take no pointers.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Deterministic content: byte i of a test file.
fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
}

fn fnv(data: &[u8], mut h: u64) -> u64 {
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

struct Checks {
    failed: usize,
}

impl Checks {
    fn check(&mut self, name: &str, f: impl FnOnce() -> Result<(), String>) {
        match f() {
            Ok(()) => println!("fscheck: ok {name}"),
            Err(e) => {
                self.failed += 1;
                println!("fscheck: FAIL {name}: {e}");
            }
        }
    }
}

fn err<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{what}: {e}")
}

fn ensure(cond: bool, what: impl Into<String>) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(what.into())
    }
}

fn main() {
    let _ = mount("proc", "/proc", "proc");
    let _ = mount("devtmpfs", "/dev", "devtmpfs");
    if let Ok(console) = OpenOptions::new().read(true).write(true).open("/dev/console") {
        use std::os::fd::AsRawFd;
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors of this single-threaded process.
            unsafe { libc::dup2(console.as_raw_fd(), fd) };
        }
    }
    if let Err(e) = mount(TAG, MNT, "virtiofs") {
        println!("fscheck: FAIL mount: {e}");
        println!("fscheck: done, 1 failed");
        reboot();
    }
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if cmdline.split_whitespace().any(|p| p == "fscheck.bench") {
        bench();
        reboot();
    }
    let mut c = Checks { failed: 0 };
    let m = |p: &str| format!("{MNT}/{p}");

    c.check("read-host-file", || {
        let s = fs::read_to_string(m("hostfile")).map_err(err("read"))?;
        ensure(s == "written by the host\n", format!("content {s:?}"))
    });
    c.check("host-ownership-and-mode", || {
        let md = fs::metadata(m("hostfile")).map_err(err("stat"))?;
        ensure(md.uid() == 1234 && md.gid() == 5678, format!("owner {}:{}", md.uid(), md.gid()))?;
        ensure(md.mode() & 0o7777 == 0o640, format!("mode {:o}", md.mode()))
    });
    c.check("large-directory", || {
        let n = fs::read_dir(m("bigdir")).map_err(err("readdir"))?.count();
        ensure(n == 2000, format!("{n} entries"))
    });
    c.check("read-big-file", || {
        let mut f = File::open(m("big")).map_err(err("open"))?;
        let mut buf = vec![0u8; 1 << 20];
        let (mut off, mut h) = (0u64, 0xcbf2_9ce4_8422_2325u64);
        loop {
            let n = f.read(&mut buf).map_err(err("read"))?;
            if n == 0 {
                break;
            }
            h = fnv(&buf[..n], h);
            off += n as u64;
        }
        let expect = fs::read_to_string(m("big.fnv")).map_err(err("read checksum"))?;
        ensure(format!("{off} {h:016x}") == expect.trim(), format!("got {off} {h:016x}, host says {}", expect.trim()))
    });
    c.check("create-write-large-file", || {
        let mut f = File::create(m("guest-big")).map_err(err("create"))?;
        let chunk: Vec<u8> = (0..(1u64 << 20)).map(pattern).collect();
        for _ in 0..16 {
            f.write_all(&chunk).map_err(err("write"))?;
        }
        f.sync_all().map_err(err("fsync"))
    });
    c.check("sparse-file-beyond-4g", || {
        let f = File::create(m("sparse")).map_err(err("create"))?;
        f.write_all_at(b"end", 5 << 30).map_err(err("pwrite at 5 GiB"))?;
        let len = f.metadata().map_err(err("stat"))?.len();
        ensure(len == (5 << 30) + 3, format!("size {len}"))
    });
    c.check("ownership-and-modes", || {
        fs::write(m("owned"), b"x").map_err(err("create"))?;
        std::os::unix::fs::chown(m("owned"), Some(1000), Some(2000)).map_err(err("chown"))?;
        fs::set_permissions(m("owned"), fs::Permissions::from_mode(0o4710)).map_err(err("chmod"))?;
        let md = fs::metadata(m("owned")).map_err(err("stat"))?;
        ensure(md.uid() == 1000 && md.gid() == 2000 && md.mode() & 0o7777 == 0o4710, format!("{:o}", md.mode()))
    });
    c.check("symlinks", || {
        std::os::unix::fs::symlink("hostfile", m("link-rel")).map_err(err("symlink"))?;
        let t = fs::read_link(m("link-rel")).map_err(err("readlink"))?;
        ensure(t == Path::new("hostfile"), format!("{t:?}"))?;
        let s = fs::read_to_string(m("link-rel")).map_err(err("read through"))?;
        ensure(s.starts_with("written by the host"), "content through link")
    });
    c.check("hard-links", || {
        fs::write(m("hl-a"), b"linked").map_err(err("create"))?;
        fs::hard_link(m("hl-a"), m("hl-b")).map_err(err("link"))?;
        let (a, b) = (fs::metadata(m("hl-a")).map_err(err("stat"))?, fs::metadata(m("hl-b")).map_err(err("stat"))?);
        ensure(a.ino() == b.ino() && a.nlink() == 2, format!("ino {} {} nlink {}", a.ino(), b.ino(), a.nlink()))
    });
    c.check("rename", || {
        fs::write(m("before"), b"moved").map_err(err("create"))?;
        fs::rename(m("before"), m("after")).map_err(err("rename"))?;
        ensure(!Path::new(&m("before")).exists(), "old name still there")?;
        ensure(fs::read(m("after")).map_err(err("read"))? == b"moved", "content")
    });
    c.check("xattrs", || {
        fs::write(m("xattr"), b"").map_err(err("create"))?;
        let (path, name) = (cstr(&m("xattr")), cstr("user.nestbox"));
        // SAFETY: valid C strings and a buffer with its real length.
        let rc = unsafe { libc::setxattr(path.as_ptr(), name.as_ptr(), b"guest".as_ptr().cast(), 5, 0) };
        ensure(rc == 0, format!("setxattr: {}", std::io::Error::last_os_error()))?;
        let mut buf = [0u8; 32];
        // SAFETY: as above, the buffer is 32 bytes long.
        let n = unsafe {
            libc::getxattr(cstr(&m("hostfile")).as_ptr(), cstr("user.host").as_ptr(), buf.as_mut_ptr().cast(), 32)
        };
        ensure(n == 4 && &buf[..4] == b"host", format!("getxattr user.host: {n} {:?}", &buf[..4]))
    });
    c.check("mmap-shared-write", || {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(m("mapped"))
            .map_err(err("open"))?;
        f.set_len(8192).map_err(err("truncate"))?;
        use std::os::fd::AsRawFd;
        // SAFETY: a fresh shared mapping of 8 KiB of an open file; written within bounds,
        // synced and unmapped before the file is closed.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                8192,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            );
            if p == libc::MAP_FAILED {
                return Err(format!("mmap: {}", std::io::Error::last_os_error()));
            }
            std::ptr::copy_nonoverlapping(b"via mmap".as_ptr(), p.cast::<u8>().add(4096), 8);
            libc::msync(p, 8192, libc::MS_SYNC);
            libc::munmap(p, 8192);
        }
        let mut back = [0u8; 8];
        f.read_exact_at(&mut back, 4096).map_err(err("read back"))?;
        ensure(&back == b"via mmap", "mapped write not in the file")
    });
    c.check("many-small-files", || {
        fs::create_dir(m("small")).map_err(err("mkdir"))?;
        for i in 0..SMALL_FILES {
            fs::write(format!("{MNT}/small/f{i}"), i.to_string()).map_err(err("create"))?;
        }
        let n = fs::read_dir(m("small")).map_err(err("readdir"))?.count();
        ensure(n == SMALL_FILES, format!("{n} files"))
    });
    c.check("fifo-allowed-device-node-refused", || {
        // SAFETY: valid C strings.
        let fifo = unsafe { libc::mkfifo(cstr(&m("fifo")).as_ptr(), 0o600) };
        ensure(fifo == 0, format!("mkfifo: {}", std::io::Error::last_os_error()))?;
        // /dev/mem's numbers: a host device node would expose host memory.
        // SAFETY: valid C string.
        let rc = unsafe { libc::mknod(cstr(&m("devmem")).as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 1)) };
        let e = std::io::Error::last_os_error();
        ensure(rc != 0 && e.raw_os_error() == Some(libc::EPERM), format!("mknod of a char device: rc {rc} {e}"))
    });
    c.check("symlinks-do-not-leave-the-share", || {
        for link in ["escape-rel", "escape-abs"] {
            if let Ok(s) = fs::read_to_string(m(link)) {
                ensure(!s.contains("host secret"), format!("{link} reached the host's file"))?;
            }
        }
        Ok(())
    });
    c.check("dotdot-stays-in-the-guest", || {
        // `..` of the mount root is the guest's own /, never the host's parent directory.
        let names: Vec<String> = fs::read_dir(format!("{MNT}/.."))
            .map_err(err("readdir"))?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect();
        ensure(!names.iter().any(|n| n == "secret"), format!("parent lists {names:?}"))?;
        ensure(fs::read_to_string(format!("{MNT}/../secret")).is_err(), "read the host's secret")
    });
    println!("fscheck: waiting for the host");
    c.check("host-adds-files-after-boot", || {
        let deadline = Instant::now() + Duration::from_secs(300);
        while Instant::now() < deadline {
            if let Ok(s) = fs::read_to_string(m("bound/inside")) {
                ensure(s == "bind mounted by the host\n", format!("{s:?}"))?;
                return ensure(fs::read_to_string(m("late")).map_err(err("late file"))? == "late\n", "late file");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        Err("bound/inside never appeared".into())
    });
    let mut f = File::create(m("guest-done")).expect("marker");
    let _ = f.write_all(b"done\n");
    let _ = f.seek(SeekFrom::Start(0));
    println!("fscheck: done, {} failed", c.failed);
    reboot();
}

fn bench() {
    let m = |p: &str| format!("{MNT}/{p}");
    let chunk: Vec<u8> = (0..(1u64 << 20)).map(pattern).collect();
    let size_mib = 64;
    let t = Instant::now();
    {
        let mut f = File::create(m("bench-seq")).expect("create");
        for _ in 0..size_mib {
            f.write_all(&chunk).expect("write");
        }
        f.sync_all().expect("fsync");
    }
    let write = t.elapsed();
    // Drop the guest's page cache so the read goes through virtio-fs.
    let _ = fs::write("/proc/sys/vm/drop_caches", "3");
    let t = Instant::now();
    {
        let mut f = File::open(m("bench-seq")).expect("open");
        let mut buf = vec![0u8; 1 << 20];
        while f.read(&mut buf).expect("read") > 0 {}
    }
    let read = t.elapsed();
    let files = 200;
    let _ = fs::create_dir(m("bench-small"));
    let t = Instant::now();
    for i in 0..files {
        File::create(format!("{MNT}/bench-small/{i}")).expect("create");
    }
    let create = t.elapsed();
    let t = Instant::now();
    for i in 0..files {
        fs::metadata(format!("{MNT}/bench-small/{i}")).expect("stat");
    }
    let stat = t.elapsed();
    println!("fsbench: seq-write {:.1} MiB/s", size_mib as f64 / write.as_secs_f64());
    println!("fsbench: seq-read {:.1} MiB/s", size_mib as f64 / read.as_secs_f64());
    println!("fsbench: create {:.0} files/s", files as f64 / create.as_secs_f64());
    println!("fsbench: stat {:.0} files/s", files as f64 / stat.as_secs_f64());
    println!("fsbench: done");
}
