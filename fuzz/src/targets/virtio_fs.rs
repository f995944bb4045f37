//! virtio-fs: raw FUSE requests from guest memory, through the transport, the device's
//! queue worker and the guard, to fuse-backend-rs's passthrough over a scratch directory
//! this target makes afresh for every input.
//!
//! Besides panics, it checks the one thing the share must never allow: a change outside
//! it. Beside the shared directory lies `outside/` with a canary file (which a symlink in
//! the share points at); after every input the canary must be intact and the directory
//! holding both must contain nothing else.
//!
//! The device runs in rounds: each round is the driver's handshake, the requests the
//! input queued, DRIVER_OK (the device thread serves them) and a reset (which waits for
//! the thread), then the rings start over.

use crate::guest::{encode_chain, queue_base, Guest, OP_DEVICE, QUEUE_SIZE};
use crate::input::{Encoder, Input};
use nestbox_vmm::devices::bus::BusDevice;
use nestbox_vmm::devices::virtio::fs::FsDevice;
use nestbox_vmm::devices::virtio::mmio::MmioTransport;
use std::path::Path;

const CANARY: &[u8] = b"the host's file\n";

fn write32(t: &mut MmioTransport, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

/// Handshake, DRIVER_OK (the device serves the queues), reset (the device stops).
fn round(t: &mut MmioTransport) {
    write32(t, 0x70, 1);
    write32(t, 0x70, 3);
    write32(t, 0x24, 1);
    write32(t, 0x20, 1); // VIRTIO_F_VERSION_1
    write32(t, 0x70, 0xb);
    for q in 0..2u32 {
        let base = queue_base(q as usize) as u32;
        write32(t, 0x30, q);
        write32(t, 0x38, u32::from(QUEUE_SIZE));
        for (reg, addr) in [(0x80, base), (0x90, base + 0x1000), (0xa0, base + 0x2000)] {
            write32(t, reg, addr);
        }
        write32(t, 0x44, 1);
    }
    write32(t, 0x70, 0xf);
    write32(t, 0x70, 0);
}

/// A round, unless the device would find no request in it: most rounds of the inputs
/// libFuzzer grows follow another at once (95% of them in a corpus of 537), and each costs
/// a thread start and join that would only find the rings idle. What the device has
/// (its file system's nodes and handles) and the transport (reset) are the same after
/// such a round as before it, so leaving it out changes nothing a later round sees.
fn round_if_work(t: &mut MmioTransport, guest: &Guest) {
    if !guest.rings_idle() {
        round(t);
    }
}

/// A fresh shared directory: a file, a directory with a file, a symlink to the canary.
fn make_share(share: &Path) {
    if share.exists() {
        std::fs::remove_dir_all(share).unwrap_or_else(|e| panic!("removing {}: {e}", share.display()));
    }
    std::fs::create_dir_all(share.join("d")).expect("creating the share");
    std::fs::write(share.join("f"), b"hello\n").expect("writing the share");
    std::fs::write(share.join("d/g"), b"").expect("writing the share");
    std::os::unix::fs::symlink("../outside/canary", share.join("s")).expect("symlink in the share");
}

fn check_outside(base: &Path) {
    let mut names: Vec<_> =
        std::fs::read_dir(base).expect("scratch dir").map(|e| e.expect("entry").file_name()).collect();
    names.sort();
    assert_eq!(names, ["outside", "share"], "entries appeared beside the share in {}", base.display());
    let outside: Vec<_> =
        std::fs::read_dir(base.join("outside")).expect("outside").map(|e| e.expect("e").file_name()).collect();
    assert_eq!(outside, ["canary"], "the directory beside the share changed");
    let canary = std::fs::read(base.join("outside/canary")).expect("the canary file is gone");
    assert_eq!(canary, CANARY, "the canary file beside the share changed");
}

/// Without the small tmpfs that scripts/fuzz and the tests give the scratch files, no
/// file beyond 64 MiB (FALLOCATE, WRITE and SETATTR of any size are the guest's to send),
/// and EFBIG instead of SIGXFSZ.
fn limit_file_size() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    if std::env::var_os("NESTBOX_FUZZ_SCRATCH").is_some() {
        return;
    }
    ONCE.call_once(|| {
        let limit = libc::rlimit { rlim_cur: 64 << 20, rlim_max: 64 << 20 };
        // SAFETY: plain system calls on this process with valid arguments.
        unsafe {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0, "RLIMIT_FSIZE");
        }
    });
}

pub fn run(data: &[u8]) {
    let _cpu = super::SameCpu::pin();
    limit_file_size();
    let base = crate::scratch::dir("virtio_fs");
    let share = base.join("share");
    if !base.join("outside").exists() {
        std::fs::create_dir_all(base.join("outside")).expect("outside dir");
        std::fs::write(base.join("outside/canary"), CANARY).expect("canary");
    }
    make_share(&share);
    let device = FsDevice::new("fuzz", &share).expect("virtio-fs device over the scratch share");
    let mut guest = Guest::new(2);
    let mut t = MmioTransport::new(Box::new(device), guest.mem.clone(), super::interrupt()).expect("transport");
    let mut input = Input::new(data);
    while !input.is_empty() {
        if !guest.step(&mut input) {
            round_if_work(&mut t, &guest);
            guest.restart();
        }
    }
    round_if_work(&mut t, &guest);
    drop(t);
    check_outside(&base);
}

/// A FUSE request: the 40-byte `fuse_in_header`, then `body`.
pub fn fuse(opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let mut e = Encoder::default();
    e.u32(40 + body.len() as u32).u32(opcode).u64(unique).u64(nodeid).u32(0).u32(0).u32(1).u32(0);
    e.bytes(body);
    e.0
}

fn body(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn le32(v: u32) -> [u8; 4] {
    v.to_le_bytes()
}

fn le64(v: u64) -> [u8; 8] {
    v.to_le_bytes()
}

/// FUSE opcodes the seeds use.
mod op {
    pub const INIT: u32 = 26;
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const RENAME: u32 = 12;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const SETXATTR: u32 = 21;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASE: u32 = 18;
    pub const CREATE: u32 = 35;
    pub const FALLOCATE: u32 = 43;
}

/// Seed sessions: (name, FUSE requests in order).
fn sessions() -> Vec<(&'static str, Vec<Vec<u8>>)> {
    use op::*;
    let init = fuse(INIT, 1, 0, &body(&[&le32(7), &le32(31), &le32(0x2_0000), &le32(0)]));
    vec![
        (
            "read-write",
            vec![
                init.clone(),
                fuse(LOOKUP, 2, 1, b"f\0"),
                fuse(OPEN, 3, 2, &body(&[&le32(2), &le32(0)])),
                fuse(READ, 4, 2, &body(&[&le64(1), &le64(0), &le32(4096), &le32(0), &le64(0), &le32(0), &le32(0)])),
                fuse(
                    WRITE,
                    5,
                    2,
                    &body(&[&le64(1), &le64(2), &le32(3), &le32(0), &le64(0), &le32(0), &le32(0), b"xyz"]),
                ),
                fuse(GETATTR, 6, 2, &body(&[&le32(0), &le32(0), &le64(0)])),
            ],
        ),
        (
            "hostile",
            vec![
                init.clone(),
                fuse(LOOKUP, 2, 1, b"..\0"),
                fuse(MKNOD, 3, 1, &body(&[&le32(0o20600), &le32(0x103), &le32(0), &le32(0), b"null\0"])),
                fuse(LOOKUP, 4, 1, b"f\0"),
                fuse(SETXATTR, 5, 2, &body(&[&le32(4), &le32(0), b"security.capability\0", b"\x01\x00\x00\x02"])),
                fuse(
                    SETATTR,
                    6,
                    2,
                    &body(&[
                        &le32(1),
                        &le32(0),
                        &le64(0),
                        &le64(0),
                        &le64(0),
                        &le64(0),
                        &le64(0),
                        &le64(0),
                        &le32(0),
                        &le32(0),
                        &le32(0),
                        &le32(0o104755),
                        &le32(0),
                        &le32(0),
                        &le32(0),
                        &le32(0),
                    ]),
                ),
                fuse(LOOKUP, 7, 1, b"s\0"),
                fuse(FALLOCATE, 8, 2, &body(&[&le64(1), &le64(0), &le64(1 << 40), &le32(0), &le32(0)])),
            ],
        ),
        (
            // READ and WRITE carry the guest's file flags, which the passthrough applies to
            // the handle's descriptor with F_SETFL; O_DIRECT on a directory fails that.
            "read-dir-odirect",
            vec![
                init.clone(),
                fuse(OPEN, 2, 1, &body(&[&le32(0), &le32(0)])),
                fuse(READ, 3, 1, &body(&[&le64(1), &le64(0), &le32(64), &le32(0), &le64(0), &le32(0o40000), &le32(0)])),
                fuse(RELEASE, 4, 1, &body(&[&le64(1), &le32(0), &le32(0), &le64(0)])),
            ],
        ),
        (
            "create-dirs",
            vec![
                init,
                fuse(CREATE, 2, 1, &body(&[&le32(0o102), &le32(0o100644), &le32(0), &le32(0), b"new\0"])),
                fuse(MKDIR, 3, 1, &body(&[&le32(0o755), &le32(0), b"sub\0"])),
                fuse(RENAME, 4, 1, &body(&[&le64(1), b"new\0", b"moved\0"])),
                fuse(OPENDIR, 5, 1, &body(&[&le32(0), &le32(0)])),
                fuse(READDIR, 6, 1, &body(&[&le64(1), &le64(0), &le32(4096), &le32(0), &le64(0), &le32(0), &le32(0)])),
                fuse(FORGET, 7, 2, &le64(1)),
            ],
        ),
    ]
}

pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    sessions()
        .into_iter()
        .map(|(name, requests)| {
            let mut e = Encoder::default();
            for (i, request) in requests.iter().enumerate() {
                let slot = i as u16 * 0x200;
                let len = request.len() as u16;
                encode_chain(&mut e, 1, &[(slot, len, false, request), (slot + 0x100, 4096, true, b"")]);
            }
            e.u8(OP_DEVICE);
            (name, e.0)
        })
        .collect()
}
