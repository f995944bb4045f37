//! virtio-fs benchmark (`cargo bench -p nestbox-tests --bench virtiofs`): the guest program
//! of the virtio-fs test in its benchmark mode (`fscheck.bench`) measures, inside a real
//! guest, sequential write (64 MiB + fsync), sequential read (after dropping the guest's
//! page cache, so the data crosses virtio-fs) and small-file create and stat rates on the
//! shared directory; this side runs the same operations on the same host directory.

use nestbox_tests::{guest_binary, test_initramfs, vmm_command, GUEST_DEADLINE};
use std::fs::File;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

fn host_figures(dir: &std::path::Path) -> Vec<(String, f64, &'static str)> {
    let chunk: Vec<u8> = (0..(1u64 << 20)).map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8).collect();
    let size_mib = 64;
    let path = dir.join("host-seq");
    let t = Instant::now();
    {
        let mut f = File::create(&path).unwrap();
        for _ in 0..size_mib {
            f.write_all(&chunk).unwrap();
        }
        f.sync_all().unwrap();
    }
    let write = t.elapsed();
    let t = Instant::now();
    {
        let mut f = File::open(&path).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        while f.read(&mut buf).unwrap() > 0 {}
    }
    let read = t.elapsed();
    let small = dir.join("host-small");
    std::fs::create_dir_all(&small).unwrap();
    let files = 200;
    let t = Instant::now();
    for i in 0..files {
        File::create(small.join(i.to_string())).unwrap();
    }
    let create = t.elapsed();
    let t = Instant::now();
    for i in 0..files {
        std::fs::metadata(small.join(i.to_string())).unwrap();
    }
    let stat = t.elapsed();
    vec![
        ("seq-write".into(), size_mib as f64 / write.as_secs_f64(), "MiB/s"),
        ("seq-read".into(), size_mib as f64 / read.as_secs_f64(), "MiB/s"),
        ("create".into(), files as f64 / create.as_secs_f64(), "files/s"),
        ("stat".into(), files as f64 / stat.as_secs_f64(), "files/s"),
    ]
}

fn main() {
    let base = std::env::temp_dir().join(format!("nestbox-bench-virtiofs-{}", std::process::id()));
    let shared = base.join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    let host = host_figures(&shared);

    let initramfs = base.join("fscheck.cpio");
    test_initramfs(&guest_binary("guest-fs-check"), &initramfs);
    let console = base.join("console.log");
    let mut vm = vmm_command(Some(&initramfs))
        .args(["--vcpus", "1", "--memory-mib", "512", "--cmdline", "fscheck.bench"])
        .arg("--shared-dir")
        .arg(&shared)
        .arg("--console")
        .arg(&console)
        .spawn()
        .expect("nestbox-vmm");
    eprintln!("booting the guest (about a minute on software-nested KVM), then measuring");
    let start = Instant::now();
    let out = loop {
        let out = std::fs::read_to_string(&console).unwrap_or_default();
        if out.contains("fsbench: done") || vm.try_wait().unwrap().is_some() {
            break out;
        }
        assert!(start.elapsed() < GUEST_DEADLINE * 2, "guest benchmark did not finish");
        std::thread::sleep(Duration::from_millis(500));
    };
    let _ = vm.kill();
    let _ = vm.wait();
    let _ = std::fs::remove_dir_all(&base);

    println!("| figure | guest over virtio-fs | host, same directory | guest / host |");
    println!("|---|---|---|---|");
    for (name, host_value, unit) in host {
        let guest = out
            .lines()
            .find_map(|l| l.strip_prefix(&format!("fsbench: {name} ")))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no fsbench figure {name} in the console:\n{out}"));
        println!("| {name} | {guest:.1} {unit} | {host_value:.1} {unit} | 1/{:.0} |", host_value / guest);
    }
}
