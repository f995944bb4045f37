//! virtio-fs inside the VMM (as Dragonball's inline virtio-fs does): the sandbox's shared
//! directory, served to the guest under a tag by fuse-backend-rs's passthrough file
//! system, with no separate virtiofsd process.
//!
//! The guest mounts it with `mount -t virtiofs <tag> <dir>`. The device has one
//! high-priority queue (FORGET, INTERRUPT) and one request queue, both served by the
//! device thread.
//!
//! Cache mode: `auto` with 1 s attribute and entry timeouts. The host adds directories to
//! the shared directory while the guest runs (each container's rootfs is mounted there
//! when the container is created), so a guest must not cache a negative lookup for long;
//! and the guest is the only writer of everything else, so longer caching would buy
//! little on a container's working set. No DAX window: it maps host page cache into the
//! guest, which is faster for large reads but makes the guest's memory footprint depend
//! on the host's page cache and needs a shared-memory region the MMIO transport does not
//! offer yet; without it, every sandbox's memory stays its own and accountable.

pub mod guard;

use super::{read_config_bytes, ActivateError, ActiveQueues, DeviceThread, VirtioDevice, TYPE_FS, VIRTIO_F_VERSION_1};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use guard::SharedDirFs;
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// Longest tag the guest accepts (the config space field's size).
pub const MAX_TAG_LEN: usize = 36;
pub const QUEUE_SIZE: u16 = 256;
/// Queue 0 is the high-priority queue, queue 1 the (single) request queue.
const NUM_QUEUES: usize = 2;
const CACHE_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_LOGGED_ERRORS: u32 = 16;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("virtio-fs tag {0:?}: a tag is 1 to {MAX_TAG_LEN} bytes without NUL")]
    Tag(String),
    #[error("shared directory {path}: {reason}")]
    SharedDir { path: PathBuf, reason: String },
}

pub struct FsDevice {
    tag: String,
    shared_dir: PathBuf,
    server: Arc<Server<SharedDirFs>>,
    worker: Option<DeviceThread>,
}

/// The bytes of the config space: the tag, NUL padded, then the number of request queues.
fn config_space(tag: &str) -> [u8; MAX_TAG_LEN + 4] {
    let mut config = [0u8; MAX_TAG_LEN + 4];
    config[..tag.len()].copy_from_slice(tag.as_bytes());
    config[MAX_TAG_LEN..].copy_from_slice(&((NUM_QUEUES - 1) as u32).to_le_bytes());
    config
}

impl FsDevice {
    pub fn new(tag: &str, shared_dir: &Path) -> Result<FsDevice, FsError> {
        if tag.is_empty() || tag.len() > MAX_TAG_LEN || tag.contains('\0') {
            return Err(FsError::Tag(tag.to_string()));
        }
        let dir_err = |reason: String| FsError::SharedDir { path: shared_dir.to_path_buf(), reason };
        let meta = std::fs::metadata(shared_dir).map_err(|e| dir_err(e.to_string()))?;
        if !meta.is_dir() {
            return Err(dir_err("not a directory".into()));
        }
        let root = shared_dir.to_str().ok_or_else(|| dir_err("the path is not UTF-8".into()))?;
        let config = Config {
            root_dir: root.to_string(),
            cache_policy: CachePolicy::Auto,
            attr_timeout: CACHE_TIMEOUT,
            entry_timeout: CACHE_TIMEOUT,
            xattr: true,
            do_import: true,
            writeback: false,
            // O_PATH descriptors, never file handles: nothing can be opened by a handle.
            inode_file_handles: false,
            ..Default::default()
        };
        let passthrough = PassthroughFs::new(config).map_err(|e| dir_err(e.to_string()))?;
        passthrough.import().map_err(|e| dir_err(e.to_string()))?;
        Ok(FsDevice {
            tag: tag.to_string(),
            shared_dir: shared_dir.to_path_buf(),
            server: Arc::new(Server::new(SharedDirFs::new(passthrough))),
            worker: None,
        })
    }

    pub fn shared_dir(&self) -> &Path {
        &self.shared_dir
    }
}

impl VirtioDevice for FsDevice {
    fn device_type(&self) -> u32 {
        TYPE_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; NUM_QUEUES]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&config_space(&self.tag), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, active: ActiveQueues) -> Result<(), ActivateError> {
        self.worker = None;
        let server = self.server.clone();
        self.worker = Some(DeviceThread::spawn("virtio-fs", move |stop| {
            let worker = Worker {
                server,
                memory: active.memory,
                queues: active.queues,
                queue_events: active.queue_events,
                interrupt: active.interrupt,
                stop,
                logged_errors: 0,
            };
            Ok(move || worker.run())
        })?);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
    }
}

struct Worker {
    server: Arc<Server<SharedDirFs>>,
    memory: GuestMemoryMmap,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    interrupt: Arc<super::Interrupt>,
    stop: EventFd,
    logged_errors: u32,
}

const TOKEN_STOP: u64 = u64::MAX;

impl Worker {
    fn run(mut self) {
        let epoll = match self.register() {
            Ok(epoll) => epoll,
            Err(e) => {
                eprintln!("nestbox-vmm: virtio-fs: cannot wait for queue events, device stops: {e}");
                return;
            }
        };
        let mut events = vec![EpollEvent::default(); NUM_QUEUES + 1];
        // Requests the guest queued before activation completed.
        for queue in 0..NUM_QUEUES {
            self.process_queue(queue);
        }
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    eprintln!("nestbox-vmm: virtio-fs: epoll failed, device stops: {e}");
                    return;
                }
            };
            for event in &events[..n] {
                match event.data() {
                    TOKEN_STOP => return,
                    queue => {
                        let queue = queue as usize;
                        let _ = self.queue_events[queue].read();
                        self.process_queue(queue);
                    }
                }
            }
        }
    }

    fn register(&self) -> std::io::Result<Epoll> {
        let epoll = Epoll::new()?;
        epoll.ctl(ControlOperation::Add, self.stop.as_raw_fd(), EpollEvent::new(EventSet::IN, TOKEN_STOP))?;
        for (queue, event) in self.queue_events.iter().enumerate() {
            epoll.ctl(ControlOperation::Add, event.as_raw_fd(), EpollEvent::new(EventSet::IN, queue as u64))?;
        }
        Ok(epoll)
    }

    /// Serves every request waiting on `queue`. A malformed request is answered with
    /// nothing (used length 0) and logged; it never stops the device.
    fn process_queue(&mut self, queue: usize) {
        let memory = self.memory.clone();
        let mut used_any = false;
        while let Some(chain) = self.queues[queue].pop_descriptor_chain(&memory) {
            let head = chain.head_index();
            let result =
                Reader::from_descriptor_chain(&memory, chain.clone()).map_err(|e| e.to_string()).and_then(|reader| {
                    let writer = VirtioFsWriter::new(&memory, chain).map_err(|e| e.to_string())?;
                    self.server.handle_message(reader, writer.into(), None, None).map_err(|e| e.to_string())
                });
            let written = match result {
                Ok(n) => n as u32,
                Err(e) => {
                    if self.logged_errors < MAX_LOGGED_ERRORS {
                        self.logged_errors += 1;
                        eprintln!("nestbox-vmm: virtio-fs: bad request from the guest: {e}");
                    }
                    0
                }
            };
            if self.queues[queue].add_used(&memory, head, written).is_err() && self.logged_errors < MAX_LOGGED_ERRORS {
                self.logged_errors += 1;
                eprintln!("nestbox-vmm: virtio-fs: used ring of queue {queue} is not writable");
            }
            used_any = true;
        }
        if used_any && self.queues[queue].needs_notification(&memory).unwrap_or(true) {
            let _ = self.interrupt.signal_used_queue();
        }
    }
}

#[cfg(test)]
mod raw_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_rules() {
        let dir = std::env::temp_dir();
        assert!(matches!(FsDevice::new("", &dir), Err(FsError::Tag(_))));
        assert!(matches!(FsDevice::new(&"x".repeat(37), &dir), Err(FsError::Tag(_))));
        assert!(matches!(FsDevice::new("a\0b", &dir), Err(FsError::Tag(_))));
        assert!(FsDevice::new(&"x".repeat(36), &dir).is_ok());
    }

    #[test]
    fn shared_dir_must_be_a_directory() {
        let err = FsDevice::new("t", Path::new("/nonexistent/shared")).err().unwrap();
        assert!(err.to_string().contains("/nonexistent/shared"), "{err}");
        let err = FsDevice::new("t", Path::new("/etc/hostname")).err().unwrap();
        assert!(err.to_string().contains("not a directory"), "{err}");
    }

    #[test]
    fn config_space_has_tag_and_one_request_queue() {
        let dev = FsDevice::new("nestbox", &std::env::temp_dir()).unwrap();
        let mut tag = [0xffu8; MAX_TAG_LEN];
        dev.read_config(0, &mut tag);
        assert_eq!(&tag[..7], b"nestbox");
        assert!(tag[7..].iter().all(|&b| b == 0));
        let mut queues = [0u8; 4];
        dev.read_config(MAX_TAG_LEN as u64, &mut queues);
        assert_eq!(u32::from_le_bytes(queues), 1);
    }
}
