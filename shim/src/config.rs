//! Configuration: `/etc/nestbox/config.toml` (or `$NESTBOX_CONFIG`), every key optional,
//! over built-in defaults that work on a fresh host; then per-pod overrides from
//! `io.nestbox.*` annotations. Unknown keys and bad values are errors that name the key, so
//! a typo never silently falls back to a default.

use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the configuration file is looked for.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/nestbox/config.toml";
/// Environment variable naming another configuration file (which must then exist).
pub const CONFIG_ENV: &str = "NESTBOX_CONFIG";
/// Where `guest-image/build.sh` installs the guest kernel and initramfs.
pub const DEFAULT_GUEST_DIR: &str = "/usr/local/share/nestbox";
/// Environment variable that moves the default guest image directory (the VMM honours it too).
pub const GUEST_DIR_ENV: &str = "NESTBOX_GUEST_DIR";
pub const DEFAULT_SANDBOXES_DIR: &str = "/run/nestbox/sandboxes";
/// Templates are a cache: lost ones are remade on the next pod start.
pub const DEFAULT_TEMPLATES_DIR: &str = "/var/cache/nestbox/templates";
pub const VMM_BINARY: &str = "nestbox-vmm";

pub const DEFAULT_VCPUS: u8 = 1;
pub const MAX_VCPUS: u8 = 254;
/// More than the VMM's own default (128): the guest then holds the agent and a container's
/// processes with room to spare.
pub const DEFAULT_MEMORY_MIB: u64 = 256;
pub const MIN_MEMORY_MIB: u64 = 64;
/// Generous because a software-nested host (see docs) boots a guest in one to two minutes;
/// on hardware KVM the agent answers in well under a second.
pub const DEFAULT_BOOT_TIMEOUT_SECS: u64 = 300;
/// Creating a container is a few seconds of guest system calls on a software-nested host.
pub const DEFAULT_REQUEST_TIMEOUT_SECS: u64 = 120;
/// The most `runtime.concurrent_starts` may be (the slots are bytes of one lock file).
pub const MAX_CONCURRENT_STARTS: u32 = 4096;

/// Annotation prefix of per-pod overrides.
pub const ANNOTATION_PREFIX: &str = "io.nestbox.";
pub const ANNOTATION_VCPUS: &str = "io.nestbox.vcpus";
pub const ANNOTATION_MEMORY_MIB: &str = "io.nestbox.memory_mib";
/// What containerd's CRI (1.6 and later) puts on a pod sandbox's spec when kubelet sends the
/// pod's resources (PodSandboxConfig.linux.resources: the sum of its containers' limits and
/// the RuntimeClass overhead): CFS quota and period, and memory in bytes. Kata sizes its
/// VMs from the same three.
pub const CRI_SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
pub const CRI_SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
pub const CRI_SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";

const LOG_LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];
/// Each jailed VMM's cgroup is `<cgroup_parent>/<sandbox id>`.
pub const DEFAULT_CGROUP_PARENT: &str = "nestbox";
const CPU_TEMPLATES: [&str; 3] = ["auto", "none", "pvm"];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}", path = path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {reason}", path = path.display())]
    Parse { path: PathBuf, reason: String },
    #[error("config key {key}: {reason}")]
    Invalid { key: String, reason: String },
    #[error("annotation {key}: {reason}")]
    Annotation { key: String, reason: String },
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.to_string(), reason: reason.into() }
}

/// The file's shape: every key optional, unknown keys rejected.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    hypervisor: HypervisorFile,
    #[serde(default)]
    agent: AgentFile,
    #[serde(default)]
    runtime: RuntimeFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HypervisorFile {
    vmm: Option<PathBuf>,
    kernel: Option<PathBuf>,
    initramfs: Option<PathBuf>,
    vcpus: Option<i64>,
    memory_mib: Option<i64>,
    max_vcpus: Option<i64>,
    max_memory_mib: Option<i64>,
    kernel_params: Option<String>,
    cpu_template: Option<String>,
    jail: Option<bool>,
    cgroup_parent: Option<String>,
    oom_score_adj: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentFile {
    log_level: Option<String>,
    boot_timeout_secs: Option<i64>,
    request_timeout_secs: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuntimeFile {
    sandboxes_dir: Option<PathBuf>,
    shared_fs: Option<String>,
    warm_start: Option<bool>,
    templates_dir: Option<PathBuf>,
    concurrent_starts: Option<i64>,
}

/// The configuration in effect: every value present and checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The file it came from, if one was read.
    pub source: Option<PathBuf>,
    pub vmm: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub vcpus: u8,
    pub memory_mib: u64,
    /// Bounds of a pod's VM sized from its resources (the CRI sandbox annotations);
    /// `io.nestbox.*` annotations are not bounded by them.
    pub max_vcpus: u8,
    pub max_memory_mib: u64,
    /// Appended to the VMM's own kernel parameters.
    pub kernel_params: String,
    pub cpu_template: String,
    /// Confine each VMM (`nestbox-vmm --jail`: mount namespace, cgroup, capabilities,
    /// seccomp); see docs/jail.md.
    pub jail: bool,
    /// The cgroup (relative to the cgroup root) under which each jailed VMM gets its own.
    pub cgroup_parent: String,
    /// The jailed VMM's oom_score_adj (only raising the shim's works); inherited if unset.
    pub oom_score_adj: Option<i16>,
    pub agent_log_level: String,
    /// How long the guest's agent may take to answer after the VMM starts.
    pub boot_timeout: Duration,
    /// How long one agent call (other than waiting for a process) may take.
    pub request_timeout: Duration,
    pub sandboxes_dir: PathBuf,
    pub shared_fs: String,
    /// Start pods by restoring a template (a snapshot of a booted guest of the same
    /// shape) instead of booting; see `crate::template`.
    pub warm_start: bool,
    pub templates_dir: PathBuf,
    /// Guest starts (a VM's, a container's) in flight host-wide, 0 for no bound
    /// (`sandbox::start_gate`); the host's CPUs by default.
    pub concurrent_starts: u32,
}

/// Sizing of one pod's VM after annotations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmSize {
    pub vcpus: u8,
    pub memory_mib: u64,
}

impl Config {
    /// Loads `$NESTBOX_CONFIG`, or `/etc/nestbox/config.toml` if it exists, or the defaults.
    pub fn load() -> Result<Config, ConfigError> {
        match std::env::var_os(CONFIG_ENV) {
            Some(path) if !path.is_empty() => Config::load_file(Path::new(&path)),
            _ => {
                let path = Path::new(DEFAULT_CONFIG_PATH);
                match std::fs::read_to_string(path) {
                    Ok(text) => Config::parse(&text, Some(path)),
                    // No file is the normal case: the built-in defaults.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Config::parse("", None),
                    Err(source) => Err(ConfigError::Read { path: path.to_path_buf(), source }),
                }
            }
        }
    }

    pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Config::parse(&text, Some(path))
    }

    /// Parses TOML text (empty text gives the defaults) and checks every value.
    pub fn parse(text: &str, source: Option<&Path>) -> Result<Config, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: source.map(Path::to_path_buf).unwrap_or_default(),
            reason: e.to_string().trim_end().replace('\n', " "),
        })?;
        let guest_dir = default_guest_dir();
        let h = file.hypervisor;
        let mut config = Config {
            source: source.map(Path::to_path_buf),
            vmm: absolute("hypervisor.vmm", h.vmm)?.unwrap_or_else(default_vmm),
            kernel: absolute("hypervisor.kernel", h.kernel)?.unwrap_or_else(|| guest_dir.join("vmlinux")),
            initramfs: absolute("hypervisor.initramfs", h.initramfs)?
                .unwrap_or_else(|| guest_dir.join("initramfs.cpio")),
            vcpus: match h.vcpus {
                Some(v) => vcpus("hypervisor.vcpus", v).map_err(|r| invalid("hypervisor.vcpus", r))?,
                None => DEFAULT_VCPUS,
            },
            memory_mib: match h.memory_mib {
                Some(v) => memory("hypervisor.memory_mib", v).map_err(|r| invalid("hypervisor.memory_mib", r))?,
                None => DEFAULT_MEMORY_MIB,
            },
            max_vcpus: match h.max_vcpus {
                Some(v) => vcpus("hypervisor.max_vcpus", v).map_err(|r| invalid("hypervisor.max_vcpus", r))?,
                None => 0, // below: the host's, at least vcpus
            },
            max_memory_mib: match h.max_memory_mib {
                Some(v) => {
                    memory("hypervisor.max_memory_mib", v).map_err(|r| invalid("hypervisor.max_memory_mib", r))?
                }
                None => 0, // below: the host's, at least memory_mib
            },
            kernel_params: h.kernel_params.unwrap_or_default(),
            cpu_template: one_of("hypervisor.cpu_template", h.cpu_template, &CPU_TEMPLATES, "auto")?,
            jail: h.jail.unwrap_or(true),
            cgroup_parent: cgroup_parent("hypervisor.cgroup_parent", h.cgroup_parent)?,
            oom_score_adj: match h.oom_score_adj {
                None => None,
                Some(v) => Some(
                    i16::try_from(v)
                        .ok()
                        .filter(|v| (-1000..=1000).contains(v))
                        .ok_or_else(|| invalid("hypervisor.oom_score_adj", format!("{v} is not in -1000..=1000")))?,
                ),
            },
            agent_log_level: one_of("agent.log_level", file.agent.log_level, &LOG_LEVELS, "info")?,
            boot_timeout: seconds("agent.boot_timeout_secs", file.agent.boot_timeout_secs, DEFAULT_BOOT_TIMEOUT_SECS)?,
            request_timeout: seconds(
                "agent.request_timeout_secs",
                file.agent.request_timeout_secs,
                DEFAULT_REQUEST_TIMEOUT_SECS,
            )?,
            sandboxes_dir: absolute("runtime.sandboxes_dir", file.runtime.sandboxes_dir)?
                .unwrap_or_else(|| PathBuf::from(DEFAULT_SANDBOXES_DIR)),
            shared_fs: one_of("runtime.shared_fs", file.runtime.shared_fs, &["virtio-fs"], "virtio-fs")?,
            warm_start: file.runtime.warm_start.unwrap_or(true),
            templates_dir: absolute("runtime.templates_dir", file.runtime.templates_dir)?
                .unwrap_or_else(|| PathBuf::from(DEFAULT_TEMPLATES_DIR)),
            concurrent_starts: concurrent_starts(file.runtime.concurrent_starts)?,
        };
        if h.max_vcpus.is_none() {
            config.max_vcpus = host_cpus().max(config.vcpus);
        }
        if h.max_memory_mib.is_none() {
            config.max_memory_mib = host_memory_mib().max(config.memory_mib);
        }
        if config.max_vcpus < config.vcpus {
            return Err(invalid(
                "hypervisor.max_vcpus",
                format!("{} is below vcpus ({})", config.max_vcpus, config.vcpus),
            ));
        }
        if config.max_memory_mib < config.memory_mib {
            let reason = format!("{} is below memory_mib ({})", config.max_memory_mib, config.memory_mib);
            return Err(invalid("hypervisor.max_memory_mib", reason));
        }
        if config.kernel_params.contains('\n') {
            return Err(invalid("hypervisor.kernel_params", "must be one line"));
        }
        Ok(config)
    }

    /// The VM size for a pod: the configuration plus the pod's resources (CRI sandbox
    /// annotations) up to the configured maximum, overridden by the pod's `io.nestbox.*`
    /// annotations. An unknown `io.nestbox.` annotation is an error, like an unknown key.
    pub fn vm_size(&self, annotations: &HashMap<String, String>) -> Result<VmSize, ConfigError> {
        let mut size = self.pod_resources(annotations)?;
        let mut keys: Vec<&String> = annotations.keys().filter(|k| k.starts_with(ANNOTATION_PREFIX)).collect();
        keys.sort();
        for key in keys {
            let value = &annotations[key];
            let bad = |reason: String| ConfigError::Annotation { key: key.clone(), reason };
            let number = || value.trim().parse::<i64>().map_err(|_| bad(format!("{value:?} is not a whole number")));
            match key.as_str() {
                ANNOTATION_VCPUS => size.vcpus = vcpus(key, number()?).map_err(bad)?,
                ANNOTATION_MEMORY_MIB => size.memory_mib = memory(key, number()?).map_err(bad)?,
                _ => {
                    return Err(bad(format!(
                        "unknown nestbox annotation (known: {ANNOTATION_VCPUS}, {ANNOTATION_MEMORY_MIB})"
                    )))
                }
            }
        }
        Ok(size)
    }

    /// Kata's sizing: the configured VM (room for the guest kernel, the agent and the
    /// pause) plus the pod's CPU limit rounded up to whole vCPUs and its memory limit, each
    /// capped at `max_*`. No limit (absent, zero, or a quota of -1) adds nothing, so such a
    /// pod keeps the default shape and its warm-start template.
    fn pod_resources(&self, annotations: &HashMap<String, String>) -> Result<VmSize, ConfigError> {
        let number = |key: &str| -> Result<i64, ConfigError> {
            let Some(value) = annotations.get(key) else { return Ok(0) };
            value.trim().parse::<i64>().map_err(|_| ConfigError::Annotation {
                key: key.to_string(),
                reason: format!("{value:?} is not a whole number"),
            })
        };
        let (quota, period, memory) =
            (number(CRI_SANDBOX_CPU_QUOTA)?, number(CRI_SANDBOX_CPU_PERIOD)?, number(CRI_SANDBOX_MEMORY)?);
        let extra_vcpus = if quota > 0 && period > 0 { (quota as u64).div_ceil(period as u64) } else { 0 };
        let extra_mib = if memory > 0 { (memory as u64).div_ceil(1 << 20) } else { 0 };
        let vcpus = (u64::from(self.vcpus) + extra_vcpus).min(u64::from(self.max_vcpus));
        let memory_mib = self.memory_mib.saturating_add(extra_mib).min(self.max_memory_mib);
        Ok(VmSize { vcpus: vcpus as u8, memory_mib })
    }

    /// The kernel parameters every sandbox VM boots with (a template's included, so they
    /// are part of its key): the agent's log level, read by the agent at boot, then
    /// `hypervisor.kernel_params`.
    pub fn guest_kernel_params(&self) -> String {
        format!("nestbox.log={} {}", self.agent_log_level, self.kernel_params).trim().to_string()
    }

    /// The configuration as TOML-like lines, for `nestbox env`.
    pub fn describe(&self) -> String {
        let source = match &self.source {
            Some(p) => p.display().to_string(),
            None => format!("none ({DEFAULT_CONFIG_PATH} absent: built-in defaults)"),
        };
        format!(
            "# configuration file: {source}\n\
             [hypervisor]\nvmm = {:?}\nkernel = {:?}\ninitramfs = {:?}\nvcpus = {}\nmemory_mib = {}\n\
             max_vcpus = {}\nmax_memory_mib = {}\n\
             kernel_params = {:?}\ncpu_template = {:?}\njail = {}\ncgroup_parent = {:?}\noom_score_adj = {}\n\n\
             [agent]\nlog_level = {:?}\nboot_timeout_secs = {}\nrequest_timeout_secs = {}\n\n\
             [runtime]\nsandboxes_dir = {:?}\nshared_fs = {:?}\nwarm_start = {}\ntemplates_dir = {:?}\n\
             concurrent_starts = {}\n",
            self.vmm.display().to_string(),
            self.kernel.display().to_string(),
            self.initramfs.display().to_string(),
            self.vcpus,
            self.memory_mib,
            self.max_vcpus,
            self.max_memory_mib,
            self.kernel_params,
            self.cpu_template,
            self.jail,
            self.cgroup_parent,
            self.oom_score_adj.map_or("\"inherited\"".to_string(), |v| v.to_string()),
            self.agent_log_level,
            self.boot_timeout.as_secs(),
            self.request_timeout.as_secs(),
            self.sandboxes_dir.display().to_string(),
            self.shared_fs,
            self.warm_start,
            self.templates_dir.display().to_string(),
            self.concurrent_starts,
        )
    }
}

fn vcpus(_key: &str, value: i64) -> Result<u8, String> {
    match u8::try_from(value) {
        Ok(v) if (1..=MAX_VCPUS).contains(&v) => Ok(v),
        _ => Err(format!("{value} vCPUs: must be 1 to {MAX_VCPUS}")),
    }
}

fn memory(_key: &str, value: i64) -> Result<u64, String> {
    match u64::try_from(value) {
        Ok(v) if v >= MIN_MEMORY_MIB => Ok(v),
        _ => Err(format!("{value} MiB: must be at least {MIN_MEMORY_MIB}")),
    }
}

/// `runtime.concurrent_starts`: 0 up to the most, the host's CPUs when absent.
fn concurrent_starts(value: Option<i64>) -> Result<u32, ConfigError> {
    let Some(v) = value else { return Ok(u32::from(host_cpus())) };
    u32::try_from(v)
        .ok()
        .filter(|v| *v <= MAX_CONCURRENT_STARTS)
        .ok_or_else(|| invalid("runtime.concurrent_starts", format!("{v} is not in 0..={MAX_CONCURRENT_STARTS}")))
}

/// The default `max_vcpus`: the host's CPUs (a VM with more would only contend with itself).
fn host_cpus() -> u8 {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    u8::try_from(n).unwrap_or(MAX_VCPUS).clamp(DEFAULT_VCPUS, MAX_VCPUS)
}

/// The default `max_memory_mib`: the host's memory (MemTotal), or the default VM size if it
/// cannot be read.
fn host_memory_mib() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
    kib.map_or(DEFAULT_MEMORY_MIB, |k| (k / 1024).max(DEFAULT_MEMORY_MIB))
}

fn seconds(key: &str, value: Option<i64>, default: u64) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(Duration::from_secs(default)),
        Some(v) if v > 0 => Ok(Duration::from_secs(v.unsigned_abs())),
        Some(v) => Err(invalid(key, format!("{v}: must be a positive number of seconds"))),
    }
}

fn one_of(key: &str, value: Option<String>, allowed: &[&str], default: &str) -> Result<String, ConfigError> {
    match value {
        None => Ok(default.to_string()),
        Some(v) if allowed.contains(&v.as_str()) => Ok(v),
        Some(v) => Err(invalid(key, format!("{v:?}: must be one of {}", allowed.join(", ")))),
    }
}

/// A cgroup path relative to the cgroup root: plain names, no `..`, `.` or empty parts.
fn cgroup_parent(key: &str, value: Option<String>) -> Result<String, ConfigError> {
    let Some(value) = value else { return Ok(DEFAULT_CGROUP_PARENT.to_string()) };
    let ok = !value.is_empty()
        && value
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != ".." && !part.contains(char::is_whitespace));
    if ok {
        Ok(value)
    } else {
        Err(invalid(
            key,
            format!("{value:?} must be a relative cgroup path such as \"nestbox\" (no leading /, no . or ..)"),
        ))
    }
}

fn absolute(key: &str, value: Option<PathBuf>) -> Result<Option<PathBuf>, ConfigError> {
    match value {
        Some(p) if !p.is_absolute() => Err(invalid(key, format!("{}: must be an absolute path", p.display()))),
        other => Ok(other),
    }
}

/// The guest image's folder: `$NESTBOX_GUEST_DIR`, else `share/nestbox` beside the running
/// binary's `bin/` when it holds a kernel (an installation under another prefix: `/usr` from
/// the Debian package, `/opt/nestbox`), else where `guest-image/build.sh` installs it.
pub fn default_guest_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(GUEST_DIR_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().ok();
    let prefix = exe.as_deref().and_then(Path::parent).and_then(Path::parent);
    match prefix.map(|p| p.join("share/nestbox")) {
        Some(beside) if beside.join("vmlinux").is_file() => beside,
        _ => PathBuf::from(DEFAULT_GUEST_DIR),
    }
}

/// `nestbox-vmm` installed beside the running binary (an installation or a cargo build
/// directory), else found on PATH, else the install location.
fn default_vmm() -> PathBuf {
    if let Some(dir) = std::env::current_exe().ok().and_then(|exe| exe.parent().map(Path::to_path_buf)) {
        let beside = dir.join(VMM_BINARY);
        if beside.is_file() {
            return beside;
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(VMM_BINARY);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    PathBuf::from("/usr/local/bin").join(VMM_BINARY)
}

#[cfg(test)]
mod tests;
