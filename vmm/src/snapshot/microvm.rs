//! What a snapshot holds besides guest memory: each component's saved state (defined
//! beside the component, in its `persist` module), plus enough about the VM and host to
//! refuse restoring onto something else.
//!
//! The field order is the state file's layout (bincode): changing it means a new
//! [`super::FORMAT_VERSION`].

use super::SnapshotError;
use crate::arch::x86_64::cpuid::CpuTemplate;
use crate::config::FileConfig;
use crate::devices::legacy::serial::persist::SerialState;
use crate::devices::virtio::mmio::persist::TransportState;
use crate::devices::virtio::net::persist::NetState;
use crate::vstate::vcpu::persist::VcpuState;
use crate::vstate::vm::persist::VmState;
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Serialize, Deserialize, Debug)]
pub struct MicrovmState {
    pub memory_mib: u64,
    /// CPU vendor string of the host the snapshot was taken on: vCPU state does not move
    /// between vendors.
    pub cpu_vendor: String,
    pub cpu_template: CpuTemplate,
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    pub serial: SerialState,
    pub virtio: Vec<TransportState>,
    /// The net device (its transport is the last of `virtio`), if the VM had one. New in
    /// format version 2.
    pub net: Option<NetState>,
}

/// Format version 1: the same without a net device. Read so that snapshots (warm
/// templates) taken by an older VMM still restore.
#[derive(Serialize, Deserialize, Debug)]
pub struct MicrovmStateV1 {
    pub memory_mib: u64,
    pub cpu_vendor: String,
    pub cpu_template: CpuTemplate,
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    pub serial: SerialState,
    pub virtio: Vec<TransportState>,
}

impl From<MicrovmStateV1> for MicrovmState {
    fn from(v1: MicrovmStateV1) -> MicrovmState {
        let MicrovmStateV1 { memory_mib, cpu_vendor, cpu_template, vcpus, vm, serial, virtio } = v1;
        MicrovmState { memory_mib, cpu_vendor, cpu_template, vcpus, vm, serial, virtio, net: None }
    }
}

/// What a VM about to be restored is: the snapshot must have been taken of the same.
#[derive(Debug, Clone, Copy)]
pub struct MachineShape<'a> {
    pub vcpus: u8,
    pub memory_mib: u64,
    pub cpu_vendor: &'a str,
    pub cpu_template: CpuTemplate,
}

impl MicrovmState {
    /// Refuses a snapshot (read from `dir`) of another machine than `shape`: vCPU count,
    /// memory size, host CPU vendor and CPU template must all match.
    pub fn check_fits(&self, dir: &Path, shape: MachineShape<'_>) -> Result<(), SnapshotError> {
        let mismatch = |reason: String| Err(SnapshotError::Mismatch { path: dir.to_path_buf(), reason });
        if self.vcpus.len() != usize::from(shape.vcpus) {
            return mismatch(format!("it has {} vCPUs, the configuration {}", self.vcpus.len(), shape.vcpus));
        }
        if self.memory_mib != shape.memory_mib {
            return mismatch(format!("it has {} MiB, the configuration {}", self.memory_mib, shape.memory_mib));
        }
        if self.cpu_vendor != shape.cpu_vendor || self.cpu_template != shape.cpu_template {
            return mismatch(format!(
                "taken on a {} CPU with template {:?}, this host is {} with {:?}",
                self.cpu_vendor, self.cpu_template, shape.cpu_vendor, shape.cpu_template
            ));
        }
        Ok(())
    }

    /// Fills `settings` with the devices the snapshot fixes: the net device and its MAC
    /// come from the snapshot (only its tap from the settings). A MAC other than the
    /// snapshot's, or a net setting for a snapshot without a net device, is refused.
    pub fn apply_devices(&self, dir: &Path, settings: &mut FileConfig) -> Result<(), SnapshotError> {
        let mismatch = |reason: String| Err(SnapshotError::Mismatch { path: dir.to_path_buf(), reason });
        match (&self.net, &settings.net_mac, settings.net_tap_fd) {
            (Some(net), Some(mac), _) if mac.parse().ok() != Some(net.mac) => {
                mismatch(format!("--net-mac {mac}: the snapshot's net device has MAC {}", net.mac))
            }
            (Some(net), _, _) => {
                settings.net_mac = Some(net.mac.to_string());
                Ok(())
            }
            (None, _, Some(fd)) => {
                mismatch(format!("--net-tap-fd {fd}: the snapshot has no net device to attach it to"))
            }
            (None, Some(mac), None) => mismatch(format!("--net-mac {mac}: the snapshot has no net device")),
            (None, None, None) => Ok(()),
        }
    }
}

/// A state with no vCPUs and default device states, for tests of the format.
#[cfg(test)]
pub(crate) fn test_state() -> MicrovmState {
    MicrovmState {
        memory_mib: 128,
        cpu_vendor: "Intel".into(),
        cpu_template: CpuTemplate::Pvm,
        vcpus: Vec::new(),
        vm: VmState {
            pic_master: Default::default(),
            pic_slave: Default::default(),
            ioapic: Default::default(),
            pit: Default::default(),
            clock: Default::default(),
        },
        serial: Default::default(),
        virtio: vec![Default::default()],
        net: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::net::MacAddr;

    #[test]
    fn net_device_and_mac_come_from_the_snapshot() {
        let dir = Path::new("/snap");
        let with_net = MicrovmState {
            net: Some(NetState { mac: MacAddr([2, 0, 0, 0, 0, 7]), acked_features: 0 }),
            ..test_state()
        };
        let mut settings = FileConfig { net_tap_fd: Some(5), ..Default::default() };
        with_net.apply_devices(dir, &mut settings).unwrap();
        assert_eq!(settings.net_mac.as_deref(), Some("02:00:00:00:00:07"));
        assert_eq!(settings.net_tap_fd, Some(5));
        let mut same = FileConfig { net_mac: Some("02:00:00:00:00:07".into()), ..Default::default() };
        assert!(with_net.apply_devices(dir, &mut same).is_ok());
        let mut other = FileConfig { net_mac: Some("02:00:00:00:00:08".into()), ..Default::default() };
        let err = with_net.apply_devices(dir, &mut other).unwrap_err().to_string();
        assert!(err.contains("--net-mac 02:00:00:00:00:08") && err.contains("02:00:00:00:00:07"), "{err}");

        let without = test_state();
        let mut tap = FileConfig { net_tap_fd: Some(5), ..Default::default() };
        let err = without.apply_devices(dir, &mut tap).unwrap_err().to_string();
        assert!(err.contains("--net-tap-fd 5") && err.contains("no net device"), "{err}");
        let mut mac = FileConfig { net_mac: Some("02:00:00:00:00:08".into()), ..Default::default() };
        assert!(without.apply_devices(dir, &mut mac).is_err());
        let mut none = FileConfig::default();
        assert!(without.apply_devices(dir, &mut none).is_ok());
        assert_eq!(none.net_mac, None);
    }
}
