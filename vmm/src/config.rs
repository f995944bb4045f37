//! The VM's configuration: built-in defaults, then a TOML file, then command-line
//! arguments, each overriding the one before. Validated before anything is created so a
//! bad value is reported by name and nothing is left half-built.

use crate::arch::x86_64::cpuid::CpuTemplate;
use crate::arch::x86_64::mptable;
use crate::devices::virtio::net::MacAddr;
use crate::devices::virtio::vsock::DEFAULT_GUEST_CID;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Where `guest-image/build.sh` installs the guest kernel and initramfs.
pub const DEFAULT_GUEST_DIR: &str = "/usr/local/share/nestbox";
/// Environment variable that moves the default guest image directory.
pub const GUEST_DIR_ENV: &str = "NESTBOX_GUEST_DIR";
pub const DEFAULT_VCPUS: u8 = 1;
/// The virtio-fs tag the agent mounts unless told otherwise.
pub const DEFAULT_FS_TAG: &str = "nestbox";
pub const DEFAULT_MEMORY_MIB: u64 = 128;
/// Smallest guest we start: below this the kernel and initramfs leave too little room
/// for the agent and a container.
pub const MIN_MEMORY_MIB: u64 = 64;

/// Where the guest's serial console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Console {
    Stdout,
    File(PathBuf),
}

impl Console {
    pub fn parse(value: &str) -> Console {
        match value {
            "stdout" | "-" => Console::Stdout,
            path => Console::File(PathBuf::from(path)),
        }
    }
}

/// A complete, validated VM description.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub vcpus: u8,
    pub memory_mib: u64,
    /// Kernel parameters appended to nestbox's own.
    pub cmdline: String,
    pub console: Console,
    pub cpu_template: CpuTemplate,
    /// Host socket of the hybrid vsock device; no vsock device without it.
    pub vsock_socket: Option<PathBuf>,
    pub vsock_cid: u64,
    /// Host directory shared with the guest over virtio-fs; no virtio-fs without it.
    pub shared_dir: Option<PathBuf>,
    /// The virtio-fs tag the guest mounts.
    pub fs_tag: String,
    /// MAC of the virtio-net device; no net device without it.
    pub net_mac: Option<MacAddr>,
    /// Inherited tap descriptor the net device is attached to; detached without it.
    pub net_tap_fd: Option<i32>,
}

/// The configuration file: every key optional, unknown keys are errors.
#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub kernel: Option<PathBuf>,
    pub initramfs: Option<PathBuf>,
    pub vcpus: Option<u8>,
    pub memory_mib: Option<u64>,
    pub cmdline: Option<String>,
    pub console: Option<String>,
    pub cpu_template: Option<CpuTemplate>,
    pub vsock_socket: Option<PathBuf>,
    pub vsock_cid: Option<u64>,
    pub shared_dir: Option<PathBuf>,
    pub fs_tag: Option<String>,
    pub net_mac: Option<String>,
    /// Command line only: a descriptor number means nothing in a file, so the key is
    /// unknown there.
    #[serde(skip)]
    pub net_tap_fd: Option<i32>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("config file {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("vcpus = {0}: a guest has 1 to {max} vCPUs", max = mptable::MAX_CPUS)]
    Vcpus(u8),
    #[error("memory_mib = {0}: a guest needs at least {MIN_MEMORY_MIB} MiB")]
    MemoryTooSmall(u64),
    #[error("memory_mib = {requested}: more than this host's {host} MiB of RAM")]
    MemoryTooLarge { requested: u64, host: u64 },
    #[error("vsock_cid = {0}: guest CIDs are 3 to 4294967294 (0-2 and 0xffffffff are reserved)")]
    VsockCid(u64),
    #[error("--net-mac (net_mac) {value:?}: {reason}")]
    NetMac { value: String, reason: String },
    #[error("--net-tap-fd {0}: a tap needs a net device, which --net-mac adds")]
    TapWithoutMac(i32),
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Read { path: path.into(), reason: e.to_string() })?;
        FileConfig::parse(&text).map_err(|reason| ConfigError::Parse { path: path.into(), reason })
    }

    /// Parses TOML text; the error names the offending key and line.
    pub fn parse(text: &str) -> Result<FileConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().replace('\n', " "))
    }

    /// Values from `over` replace those of `self`.
    pub fn merge(self, over: FileConfig) -> FileConfig {
        FileConfig {
            kernel: over.kernel.or(self.kernel),
            initramfs: over.initramfs.or(self.initramfs),
            vcpus: over.vcpus.or(self.vcpus),
            memory_mib: over.memory_mib.or(self.memory_mib),
            cmdline: match (self.cmdline, over.cmdline) {
                // Both add to nestbox's parameters, so the file's and the arguments' add up.
                (Some(a), Some(b)) => Some(format!("{a} {b}")),
                (a, b) => b.or(a),
            },
            console: over.console.or(self.console),
            cpu_template: over.cpu_template.or(self.cpu_template),
            vsock_socket: over.vsock_socket.or(self.vsock_socket),
            vsock_cid: over.vsock_cid.or(self.vsock_cid),
            shared_dir: over.shared_dir.or(self.shared_dir),
            fs_tag: over.fs_tag.or(self.fs_tag),
            net_mac: over.net_mac.or(self.net_mac),
            net_tap_fd: over.net_tap_fd.or(self.net_tap_fd),
        }
    }
}

/// The directory holding the default guest kernel and initramfs.
pub fn guest_dir() -> PathBuf {
    std::env::var_os(GUEST_DIR_ENV).map(PathBuf::from).unwrap_or_else(|| PathBuf::from(DEFAULT_GUEST_DIR))
}

impl VmConfig {
    /// Fills defaults and validates. `host_memory_mib` bounds the guest's memory.
    pub fn build(file: FileConfig, host_memory_mib: u64) -> Result<VmConfig, ConfigError> {
        let net_mac = match &file.net_mac {
            None => None,
            Some(value) => {
                Some(value.parse::<MacAddr>().map_err(|reason| ConfigError::NetMac { value: value.clone(), reason })?)
            }
        };
        if let (None, Some(fd)) = (net_mac, file.net_tap_fd) {
            return Err(ConfigError::TapWithoutMac(fd));
        }
        let config = VmConfig {
            kernel: file.kernel.unwrap_or_else(|| guest_dir().join("vmlinux")),
            initramfs: file.initramfs.unwrap_or_else(|| guest_dir().join("initramfs.cpio")),
            vcpus: file.vcpus.unwrap_or(DEFAULT_VCPUS),
            memory_mib: file.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB),
            cmdline: file.cmdline.unwrap_or_default(),
            console: file.console.as_deref().map(Console::parse).unwrap_or(Console::Stdout),
            cpu_template: file.cpu_template.unwrap_or(CpuTemplate::Auto),
            vsock_socket: file.vsock_socket,
            vsock_cid: file.vsock_cid.unwrap_or(DEFAULT_GUEST_CID),
            shared_dir: file.shared_dir,
            fs_tag: file.fs_tag.unwrap_or_else(|| DEFAULT_FS_TAG.to_string()),
            net_mac,
            net_tap_fd: file.net_tap_fd,
        };
        if config.vsock_cid <= 2 || config.vsock_cid >= u64::from(u32::MAX) {
            return Err(ConfigError::VsockCid(config.vsock_cid));
        }
        if config.vcpus == 0 || config.vcpus > mptable::MAX_CPUS {
            return Err(ConfigError::Vcpus(config.vcpus));
        }
        if config.memory_mib < MIN_MEMORY_MIB {
            return Err(ConfigError::MemoryTooSmall(config.memory_mib));
        }
        if config.memory_mib > host_memory_mib {
            return Err(ConfigError::MemoryTooLarge { requested: config.memory_mib, host: host_memory_mib });
        }
        Ok(config)
    }

    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }
}

/// This host's RAM in MiB (`MemTotal` of /proc/meminfo).
pub fn host_memory_mib() -> std::io::Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib / 1024)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "no MemTotal in /proc/meminfo"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: u64 = 16 * 1024;

    #[test]
    fn defaults_need_no_file() {
        let c = VmConfig::build(FileConfig::default(), HOST).unwrap();
        assert_eq!(c.vcpus, DEFAULT_VCPUS);
        assert_eq!(c.memory_mib, DEFAULT_MEMORY_MIB);
        assert_eq!(c.console, Console::Stdout);
        assert_eq!(c.cpu_template, CpuTemplate::Auto);
        assert!(c.kernel.ends_with("vmlinux"));
        assert!(c.initramfs.ends_with("initramfs.cpio"));
    }

    #[test]
    fn file_keys_parse() {
        let f = FileConfig::parse(
            "kernel = \"/k\"\ninitramfs = \"/i\"\nvcpus = 2\nmemory_mib = 256\ncmdline = \"quiet\"\nconsole = \"/tmp/c.log\"\ncpu_template = \"pvm\"\nvsock_socket = \"/run/v.sock\"\nvsock_cid = 7\nshared_dir = \"/run/s\"\nfs_tag = \"t\"\nnet_mac = \"02:00:00:00:00:01\"\n",
        )
        .unwrap();
        let c = VmConfig::build(f, HOST).unwrap();
        assert_eq!(c.kernel, PathBuf::from("/k"));
        assert_eq!(c.vcpus, 2);
        assert_eq!(c.memory_mib, 256);
        assert_eq!(c.console, Console::File("/tmp/c.log".into()));
        assert_eq!(c.cpu_template, CpuTemplate::Pvm);
        assert_eq!(c.vsock_socket, Some(PathBuf::from("/run/v.sock")));
        assert_eq!(c.vsock_cid, 7);
        assert_eq!(c.shared_dir, Some(PathBuf::from("/run/s")));
        assert_eq!(c.fs_tag, "t");
        assert_eq!(c.net_mac, Some(MacAddr([2, 0, 0, 0, 0, 1])));
        assert_eq!(c.net_tap_fd, None);
    }

    #[test]
    fn net_settings_are_checked() {
        let mac = |m: &str| FileConfig { net_mac: Some(m.into()), ..Default::default() };
        for bad in ["01:00:00:00:00:01", "00:00:00:00:00:00", "aa:bb:cc:dd:ee", "aa:bb:cc:dd:ee:gg", "aabbccddeeff"] {
            match VmConfig::build(mac(bad), HOST) {
                Err(ConfigError::NetMac { value, .. }) => assert_eq!(value, bad),
                other => panic!("{bad}: {other:?}"),
            }
        }
        let err = VmConfig::build(mac("01:00:00:00:00:01"), HOST).unwrap_err().to_string();
        assert!(err.contains("--net-mac") && err.contains("01:00:00:00:00:01") && err.contains("multicast"), "{err}");
        assert_eq!(
            VmConfig::build(mac("AA:bb:cc:dd:ee:ff"), HOST).unwrap().net_mac.unwrap().to_string(),
            "aa:bb:cc:dd:ee:ff"
        );
        let tap_only = FileConfig { net_tap_fd: Some(7), ..Default::default() };
        assert_eq!(VmConfig::build(tap_only, HOST), Err(ConfigError::TapWithoutMac(7)));
        // A descriptor number is a command-line setting only.
        let err = FileConfig::parse("net_tap_fd = 3\n").unwrap_err();
        assert!(err.contains("unknown field `net_tap_fd`"), "{err}");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = FileConfig::parse("vcpu = 2\n").unwrap_err();
        assert!(err.contains("unknown field `vcpu`"), "{err}");
    }

    #[test]
    fn bad_value_is_named() {
        let err = FileConfig::parse("cpu_template = \"fast\"\n").unwrap_err();
        assert!(err.contains("cpu_template") || err.contains("fast"), "{err}");
        let err = FileConfig::parse("vcpus = 300\n").unwrap_err();
        assert!(err.contains("vcpus"), "{err}");
    }

    #[test]
    fn arguments_override_file_and_cmdlines_add_up() {
        let file = FileConfig { vcpus: Some(2), cmdline: Some("a=1".into()), ..Default::default() };
        let args = FileConfig { vcpus: Some(4), cmdline: Some("b=2".into()), ..Default::default() };
        let merged = file.merge(args);
        assert_eq!(merged.vcpus, Some(4));
        assert_eq!(merged.cmdline.as_deref(), Some("a=1 b=2"));
    }

    #[test]
    fn limits_are_checked() {
        let with =
            |vcpus, memory_mib| FileConfig { vcpus: Some(vcpus), memory_mib: Some(memory_mib), ..Default::default() };
        assert_eq!(VmConfig::build(with(0, 128), HOST), Err(ConfigError::Vcpus(0)));
        assert_eq!(VmConfig::build(with(255, 128), HOST), Err(ConfigError::Vcpus(255)));
        assert_eq!(VmConfig::build(with(1, 16), HOST), Err(ConfigError::MemoryTooSmall(16)));
        assert_eq!(
            VmConfig::build(with(1, HOST + 1), HOST),
            Err(ConfigError::MemoryTooLarge { requested: HOST + 1, host: HOST })
        );
        assert!(VmConfig::build(with(254, HOST), HOST).is_ok());
        let cid = |c| FileConfig { vsock_cid: Some(c), ..Default::default() };
        assert_eq!(VmConfig::build(cid(2), HOST), Err(ConfigError::VsockCid(2)));
        assert!(VmConfig::build(cid(3), HOST).is_ok());
    }

    #[test]
    fn host_memory_is_read() {
        assert!(host_memory_mib().unwrap() > 0);
    }
}
