//! Opening /dev/kvm and checking that it offers what nestbox needs.

use kvm_ioctls::{Cap, Kvm};

pub const KVM_DEVICE: &str = "/dev/kvm";
const KVM_API_VERSION: i32 = 12;

#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("{KVM_DEVICE} does not exist: this host offers no KVM (enable hardware virtualization or nested virtualization, and load the kvm module)")]
    Missing,
    #[error(
        "permission denied opening {KVM_DEVICE}: run as root or as a member of the group that owns it (usually `kvm`)"
    )]
    PermissionDenied,
    #[error("cannot open {KVM_DEVICE}: {0}")]
    Open(std::io::Error),
    #[error("{KVM_DEVICE} speaks KVM API version {0}, nestbox needs {KVM_API_VERSION}")]
    ApiVersion(i32),
    #[error("{KVM_DEVICE} lacks the {0:?} capability, which nestbox needs")]
    MissingCapability(Cap),
}

const REQUIRED_CAPS: [Cap; 5] = [Cap::Irqchip, Cap::Irqfd, Cap::Ioeventfd, Cap::UserMemory, Cap::Pit2];

/// Opens /dev/kvm and checks the API version and capabilities.
pub fn open() -> Result<Kvm, KvmError> {
    let kvm = Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT | libc::ENXIO | libc::ENODEV => KvmError::Missing,
        libc::EACCES | libc::EPERM => KvmError::PermissionDenied,
        _ => KvmError::Open(std::io::Error::from_raw_os_error(e.errno())),
    })?;
    let version = kvm.get_api_version();
    if version != KVM_API_VERSION {
        return Err(KvmError::ApiVersion(version));
    }
    for cap in REQUIRED_CAPS {
        if !kvm.check_extension(cap) {
            return Err(KvmError::MissingCapability(cap));
        }
    }
    Ok(kvm)
}
