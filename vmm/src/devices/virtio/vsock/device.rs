//! The virtio-vsock device: three queues (RX, TX, events), the guest CID in its config
//! space, and the host socket it listens on from the moment the VMM starts, so host
//! clients can connect (and retry) while the guest still boots.

use super::muxer::Muxer;
use super::{QUEUE_SIZE, RX_QUEUE};
use crate::devices::virtio::{
    read_config_bytes, ActivateError, ActiveQueues, DeviceThread, VirtioDevice, TYPE_VSOCK, VIRTIO_F_VERSION_1,
};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is reserved (0, 1, 2 and 0xffffffff are not guest addresses)")]
    ReservedCid(u64),
    #[error("vsock socket {path}: {source}")]
    Bind { path: PathBuf, source: std::io::Error },
    #[error("vsock socket {0} is in use by a running VM")]
    InUse(PathBuf),
}

pub struct VsockDevice {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    worker: Option<DeviceThread>,
    /// Restored from a snapshot: the guest must be told its connections are gone.
    announce_reset: bool,
}

impl VsockDevice {
    /// Creates the device and binds its host socket. A stale socket file left by a VMM
    /// that died is replaced; one a live VMM listens on is an error.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<VsockDevice, VsockError> {
        if guest_cid <= 2 || guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::ReservedCid(guest_cid));
        }
        let bind_err = |source| VsockError::Bind { path: uds_path.to_path_buf(), source };
        let listener = match UnixListener::bind(uds_path) {
            Ok(l) => l,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                if UnixStream::connect(uds_path).is_ok() {
                    return Err(VsockError::InUse(uds_path.to_path_buf()));
                }
                std::fs::remove_file(uds_path).map_err(bind_err)?;
                UnixListener::bind(uds_path).map_err(bind_err)?
            }
            Err(e) => return Err(bind_err(e)),
        };
        Ok(VsockDevice { guest_cid, uds_path: uds_path.to_path_buf(), listener, worker: None, announce_reset: false })
    }

    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }
}

impl VirtioDevice for VsockDevice {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The guest CID is read-only.
    }

    fn activate(&mut self, active: ActiveQueues) -> Result<(), ActivateError> {
        debug_assert_eq!(active.queues.len(), 3, "queue {RX_QUEUE} and two more");
        self.worker = None;
        let listener = self.listener.try_clone().map_err(ActivateError::Setup)?;
        let (guest_cid, uds_path) = (self.guest_cid, self.uds_path.clone());
        let announce_reset = std::mem::take(&mut self.announce_reset);
        self.worker = Some(DeviceThread::spawn("vsock", move |stop| {
            let muxer = Muxer::new(
                guest_cid,
                uds_path,
                listener,
                active.memory,
                active.queues,
                active.queue_events,
                active.interrupt,
                stop,
            )?;
            Ok(move || muxer.run(announce_reset))
        })?);
        Ok(())
    }

    fn restored(&mut self) {
        self.announce_reset = true;
    }

    fn reset(&mut self) {
        // Every connection is dropped with the muxer; host clients see their streams close.
        self.worker = None;
    }
}

impl Drop for VsockDevice {
    fn drop(&mut self) {
        self.worker = None;
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_socket(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("nestbox-vsock-{}-{name}.sock", std::process::id()))
    }

    #[test]
    fn reserved_cids_are_refused() {
        for cid in [0, 1, 2, u64::from(u32::MAX)] {
            assert!(matches!(VsockDevice::new(cid, &temp_socket("cid")), Err(VsockError::ReservedCid(_))));
        }
    }

    #[test]
    fn config_space_holds_the_cid() {
        let path = temp_socket("config");
        let dev = VsockDevice::new(0x1234_5678, &path).unwrap();
        let mut cid = [0u8; 8];
        dev.read_config(0, &mut cid);
        assert_eq!(u64::from_le_bytes(cid), 0x1234_5678);
        drop(dev);
        assert!(!path.exists(), "the socket is removed with the device");
    }

    #[test]
    fn stale_socket_is_replaced_and_live_one_refused() {
        let path = temp_socket("stale");
        drop(UnixListener::bind(&path).unwrap()); // a dead VMM's leftover
        let dev = VsockDevice::new(3, &path).unwrap();
        assert!(matches!(VsockDevice::new(4, &path), Err(VsockError::InUse(_))));
        drop(dev);
    }
}
