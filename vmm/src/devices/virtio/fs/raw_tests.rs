//! The hostile guest's raw FUSE requests, sent as a guest sends them: bytes in guest memory
//! on the request queue, served by the device's worker through the server and the guard.

use super::{FsDevice, Worker};
use crate::devices::virtio::test_driver::Driver;
use crate::devices::virtio::Interrupt;
use std::path::Path;
use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const REQUEST: u64 = 0x40000;
const REPLY: u64 = 0x50000;
const REPLY_LEN: u32 = 0x1000;

const LOOKUP: u32 = 1;
const MKNOD: u32 = 8;
const OPEN: u32 = 14;
const SETXATTR: u32 = 21;
const GETXATTR: u32 = 22;
const INIT: u32 = 26;

/// The guest's side: guest memory, the request queue's driver and the device's worker.
struct Guest {
    mem: GuestMemoryMmap,
    driver: Driver,
    worker: Worker,
    unique: u64,
}

impl Guest {
    fn new(shared: &Path) -> Guest {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let device = FsDevice::new("nestbox", shared).unwrap();
        let (hiprio, driver) = (Driver::new(0x10000, 16), Driver::new(0x20000, 16));
        let worker = Worker {
            server: device.server.clone(),
            memory: mem.clone(),
            queues: vec![hiprio.device_queue(), driver.device_queue()],
            queue_events: (0..2).map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap()).collect(),
            interrupt: Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())),
            stop: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            logged_errors: 0,
        };
        Guest { mem, driver, worker, unique: 0 }
    }

    /// Sends one request (header, then `body`) for `node`; the reply's error (0 or a
    /// negative errno) and its body.
    fn call(&mut self, opcode: u32, node: u64, body: &[u8]) -> (i32, Vec<u8>) {
        self.unique += 1;
        let len = 40 + body.len() as u32;
        let mut request = Vec::with_capacity(len as usize);
        request.extend_from_slice(&len.to_le_bytes());
        request.extend_from_slice(&opcode.to_le_bytes());
        request.extend_from_slice(&self.unique.to_le_bytes());
        request.extend_from_slice(&node.to_le_bytes());
        request.extend_from_slice(&[0u8; 16]); // uid, gid, pid 0 (root in the guest), padding
        request.extend_from_slice(body);
        self.mem.write_slice(&request, GuestAddress(REQUEST)).unwrap();
        self.mem.write_slice(&[0u8; 16], GuestAddress(REPLY)).unwrap();
        self.driver.add(&self.mem, &[(REQUEST, len, false), (REPLY, REPLY_LEN, true)]);
        self.worker.process_queue(1);
        let used = self.driver.take_used(&self.mem);
        assert_eq!(used.len(), 1, "one reply for opcode {opcode}");
        let mut reply = vec![0u8; used[0].1 as usize];
        self.mem.read_slice(&mut reply, GuestAddress(REPLY)).unwrap();
        assert!(reply.len() >= 16, "a reply header for opcode {opcode}: {reply:?}");
        let error = i32::from_le_bytes(reply[4..8].try_into().unwrap());
        (error, reply[16..].to_vec())
    }

    fn lookup(&mut self, name: &str) -> u64 {
        let (error, entry) = self.call(LOOKUP, 1, &cstr(name));
        assert_eq!(error, 0, "lookup {name}");
        u64::from_le_bytes(entry[..8].try_into().unwrap())
    }
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn words(values: &[u32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[test]
fn raw_fuse_requests_through_the_device_are_held_by_the_guard() {
    let base = std::env::temp_dir().join(format!("nestbox-fs-raw-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let shared = base.join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    let made = |args: &[&str]| std::process::Command::new(args[0]).args(&args[1..]).status().unwrap().success();
    assert!(made(&["mknod", "-m", "666", shared.join("null").to_str().unwrap(), "c", "1", "3"]));
    std::fs::write(shared.join("file"), b"data").unwrap();
    let mut guest = Guest::new(&shared);

    let (error, _) = guest.call(INIT, 0, &words(&[7, 31, 0x20000, 0]));
    assert_eq!(error, 0, "INIT");
    // OPEN of the host's device node, for writing: refused, whatever the flags.
    let null = guest.lookup("null");
    for flags in [libc::O_RDWR, libc::O_RDONLY | libc::O_NONBLOCK] {
        let (error, _) = guest.call(OPEN, null, &words(&[flags as u32, 0]));
        assert_eq!(error, -libc::EPERM, "OPEN of a device node with flags {flags:#o}");
    }
    // MKNOD of a block device (8:0, a disk): refused, nothing made.
    let mut mknod = words(&[libc::S_IFBLK | 0o600, 8 << 8, 0, 0]);
    mknod.extend(cstr("disk"));
    assert_eq!(guest.call(MKNOD, 1, &mknod).0, -libc::EPERM, "MKNOD of a block device");
    assert!(!shared.join("disk").exists());
    // SETXATTR of file capabilities and of a trusted xattr: refused; a user xattr passes.
    let file = guest.lookup("file");
    for (name, value) in [("security.capability", &[1u8, 0, 0, 2, 0, 0, 0x20, 0][..]), ("trusted.overlay.opaque", b"y")]
    {
        let mut body = words(&[value.len() as u32, 0]);
        body.extend(cstr(name));
        body.extend_from_slice(value);
        assert_eq!(guest.call(SETXATTR, file, &body).0, -libc::EPERM, "SETXATTR {name}");
    }
    let mut getxattr = words(&[64, 0]);
    getxattr.extend(cstr("trusted.overlay.opaque"));
    assert_eq!(guest.call(GETXATTR, file, &getxattr).0, -libc::EPERM, "GETXATTR trusted.*");
    let mut user = words(&[2, 0]);
    user.extend(cstr("user.ok"));
    user.extend_from_slice(b"ok");
    assert_eq!(guest.call(SETXATTR, file, &user).0, 0, "a user xattr is the guest's");
    // The control: a regular file opens.
    assert_eq!(guest.call(OPEN, file, &words(&[libc::O_RDONLY as u32, 0])).0, 0, "OPEN of a regular file");
    std::fs::remove_dir_all(&base).unwrap();
}
