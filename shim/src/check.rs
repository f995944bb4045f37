//! `nestbox check`: can this host run sandboxes? Each check says what it found and, when
//! it fails, what to do.

use crate::config::Config;
use std::os::fd::AsRawFd;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// Works, with a caveat worth knowing.
    Warn,
    Fail,
}

#[derive(Clone, Debug)]
pub struct Finding {
    pub what: &'static str,
    pub outcome: Outcome,
    pub detail: String,
}

fn finding(what: &'static str, outcome: Outcome, detail: impl Into<String>) -> Finding {
    Finding { what, outcome, detail: detail.into() }
}

/// KVM_GET_API_VERSION (_IO(KVMIO, 0x00)).
const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
const KVM_API_VERSION: libc::c_int = 12;

fn check_kvm() -> Finding {
    let kvm = match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(f) => f,
        Err(e) => {
            return finding(
                "/dev/kvm",
                Outcome::Fail,
                format!(
                "cannot open /dev/kvm read-write ({e}): enable virtualization (or nested virtualization) and load kvm"
            ),
            )
        }
    };
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns a number.
    let version = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION as _, 0) };
    if version != KVM_API_VERSION {
        return finding(
            "/dev/kvm",
            Outcome::Fail,
            format!("KVM API version {version}, nestbox needs {KVM_API_VERSION}"),
        );
    }
    finding("/dev/kvm", Outcome::Ok, format!("usable, KVM API {version}"))
}

fn check_kvm_kind() -> Finding {
    let module = |m: &str| Path::new("/sys/module").join(m).exists();
    if module("kvm_pvm") {
        finding(
            "virtualization",
            Outcome::Warn,
            "software-nested KVM (kvm_pvm): guests work but boot in about a minute; hardware KVM boots them in well under a second",
        )
    } else if module("kvm_intel") {
        finding("virtualization", Outcome::Ok, "hardware (kvm_intel)")
    } else if module("kvm_amd") {
        finding("virtualization", Outcome::Ok, "hardware (kvm_amd)")
    } else {
        finding("virtualization", Outcome::Warn, "KVM flavour unknown (no kvm_intel, kvm_amd or kvm_pvm module)")
    }
}

fn check_file(what: &'static str, path: &Path, hint: &str) -> Finding {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => finding(what, Outcome::Ok, format!("{} ({} KiB)", path.display(), m.len() / 1024)),
        Ok(_) => finding(what, Outcome::Fail, format!("{} is not a file", path.display())),
        Err(e) => finding(what, Outcome::Fail, format!("{}: {e}; {hint}", path.display())),
    }
}

fn on_path(binary: &str) -> Option<std::path::PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(binary)).find(|p| p.is_file())
}

fn check_containerd() -> Finding {
    let Some(path) = on_path("containerd") else {
        return finding("containerd", Outcome::Fail, "not on PATH: apt-get install containerd");
    };
    let version = std::process::Command::new(&path)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    finding("containerd", Outcome::Ok, format!("{} {version}", path.display()))
}

fn check_shim_on_path() -> Finding {
    match on_path("containerd-shim-nestbox-v2") {
        Some(p) => finding("shim", Outcome::Ok, format!("{} (containerd finds it on its PATH)", p.display())),
        None => finding(
            "shim",
            Outcome::Fail,
            "containerd-shim-nestbox-v2 is not on PATH: install it beside containerd (e.g. /usr/local/bin)",
        ),
    }
}

fn check_filesystems() -> Finding {
    let table = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if table.split_whitespace().any(|fs| fs == "overlay") {
        finding("overlayfs", Outcome::Ok, "available (containerd's snapshots are mounted for the guest)")
    } else {
        finding(
            "overlayfs",
            Outcome::Warn,
            "not listed in /proc/filesystems: containerd's overlay snapshotter needs it",
        )
    }
}

/// The pod network's tap is made on /dev/net/tun (`sandbox/network`).
fn check_tun() -> Finding {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun") {
        Ok(_) => finding("/dev/net/tun", Outcome::Ok, "usable (a CRI pod's network reaches its VM through a tap)"),
        Err(e) => finding(
            "/dev/net/tun",
            Outcome::Warn,
            format!(
                "cannot open /dev/net/tun read-write ({e}): CRI pods with a CNI network fail to start \
                 (`ctr run` containers do not need it); load the tun module"
            ),
        ),
    }
}

fn check_root() -> Finding {
    // SAFETY: geteuid has no failure mode and touches no memory.
    if unsafe { libc::geteuid() } == 0 {
        finding("privileges", Outcome::Ok, "root (mounting rootfs for the guest needs it)")
    } else {
        finding("privileges", Outcome::Fail, "not root: the shim mounts containers' root file systems")
    }
}

/// Whether the host can run the VMM's jail (`hypervisor.jail`, docs/jail.md): mount
/// namespaces, seccomp filters and a cgroup hierarchy with the memory controller.
fn check_jail(config: &Config) -> Finding {
    const WHAT: &str = "VMM jail";
    if !config.jail {
        return finding(WHAT, Outcome::Warn, "hypervisor.jail = false: each VMM runs as root with every capability");
    }
    if !Path::new("/proc/self/ns/mnt").exists() {
        return finding(WHAT, Outcome::Fail, "no mount namespaces (CONFIG_NAMESPACES): set hypervisor.jail = false");
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if !status.lines().any(|l| l.starts_with("Seccomp_filters:")) {
        return finding(WHAT, Outcome::Fail, "no seccomp filters (CONFIG_SECCOMP_FILTER): set hypervisor.jail = false");
    }
    match crate::sandbox::jail::cgroup_version() {
        Ok(version) => finding(
            WHAT,
            Outcome::Ok,
            format!(
                "mount namespace, seccomp filters, cgroup {version} ({}) under {:?}",
                if version == "v2" { "memory, pids, cpu" } else { "the memory, pids and cpu controllers' hierarchies" },
                config.cgroup_parent
            ),
        ),
        Err(e) => finding(WHAT, Outcome::Fail, format!("{e}: set hypervisor.jail = false")),
    }
}

/// Runs every check with the configuration in effect (or reports why it is invalid).
pub fn run(config: Result<Config, crate::config::ConfigError>) -> Vec<Finding> {
    let mut findings = vec![check_root(), check_kvm(), check_kvm_kind()];
    match config {
        Ok(config) => {
            findings.push(finding(
                "configuration",
                Outcome::Ok,
                match &config.source {
                    Some(p) => format!("{} is valid", p.display()),
                    None => "built-in defaults (no /etc/nestbox/config.toml)".to_string(),
                },
            ));
            findings.push(check_file("VMM", &config.vmm, "build it with `cargo build --release -p nestbox-vmm`"));
            findings.push(check_file("guest kernel", &config.kernel, "run scripts/setup (guest-image/build.sh)"));
            findings.push(check_file("guest initramfs", &config.initramfs, "run scripts/setup (guest-image/build.sh)"));
            findings.push(check_jail(&config));
        }
        Err(e) => findings.push(finding("configuration", Outcome::Fail, e.to_string())),
    }
    findings.push(check_filesystems());
    findings.push(check_tun());
    findings.push(check_containerd());
    findings.push(check_shim_on_path());
    findings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_configuration_fails_the_check_with_its_reason() {
        let bad = Config::parse("[hypervisor]\nvcpus = 0", None);
        let findings = run(bad);
        let config = findings.iter().find(|f| f.what == "configuration").expect("configuration finding");
        assert_eq!(config.outcome, Outcome::Fail);
        assert!(config.detail.contains("hypervisor.vcpus"), "{}", config.detail);
    }

    #[test]
    fn the_jail_is_supported_here_and_a_disabled_one_is_a_warning() {
        let jail = run(Config::parse("", None)).into_iter().find(|f| f.what == "VMM jail").expect("jail finding");
        assert_eq!(jail.outcome, Outcome::Ok, "{}", jail.detail);
        assert!(jail.detail.contains("cgroup v"), "{}", jail.detail);
        let off = run(Config::parse("[hypervisor]\njail = false", None));
        let off = off.into_iter().find(|f| f.what == "VMM jail").expect("jail finding");
        assert_eq!(off.outcome, Outcome::Warn, "{}", off.detail);
    }

    #[test]
    fn the_tun_device_is_checked() {
        let tun = run(Config::parse("", None)).into_iter().find(|f| f.what == "/dev/net/tun").expect("tun finding");
        // This host has the tun module (the pod network tests need it too).
        assert_eq!(tun.outcome, Outcome::Ok, "{}", tun.detail);
    }

    #[test]
    fn missing_guest_image_is_named() {
        let config = Config::parse("[hypervisor]\nkernel = \"/nonexistent/vmlinux\"", None);
        let findings = run(config);
        let kernel = findings.iter().find(|f| f.what == "guest kernel").expect("kernel finding");
        assert_eq!(kernel.outcome, Outcome::Fail);
        assert!(kernel.detail.contains("/nonexistent/vmlinux") && kernel.detail.contains("setup"), "{}", kernel.detail);
    }
}
