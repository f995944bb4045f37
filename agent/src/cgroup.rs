//! Container cgroups: limits (memory, cpu, pids), freezing, statistics, OOM counts.
//!
//! The product is cgroup v2: in a guest the agent mounts cgroup2 on /sys/fs/cgroup and
//! enables every controller the kernel has, and each container gets `nestbox/<id>`. The
//! agent also runs on hosts (host mode), and some hosts, this project's development
//! machines among them, still bind the controllers to cgroup v1 hierarchies with an empty
//! cgroup2 beside them. There the agent uses the v1 controllers (memory, cpu, cpuacct,
//! pids, freezer) with the same meaning, so the container logic is testable on such a
//! host too. Which one is used is decided once, from /proc/self/mountinfo.
//!
//! The spec's `cgroupsPath` is a host path (containerd's pod hierarchy); inside the pod's
//! own VM it means nothing, so it is not used.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nestbox_protocols::types::{CgroupStats, CpuStats, IoEntry, IoStats, MemoryStats, PidsStats};
use oci_spec::runtime::LinuxResources;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("{op} {path}: {source}", path = path.display())]
    Io { op: &'static str, path: PathBuf, source: io::Error },
    #[error("no usable cgroup hierarchy: {0}")]
    NoHierarchy(String),
    #[error("cgroup {path} still busy after {waited:?}", path = path.display())]
    Busy { path: PathBuf, waited: Duration },
    #[error("freezing {}: the cgroup did not report the new state within {timeout:?}", path.display())]
    FreezeTimeout { timeout: Duration, path: PathBuf },
    #[error("resource {0} cannot be set on this cgroup hierarchy")]
    Unsupported(String),
}

type Result<T> = std::result::Result<T, CgroupError>;

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io { op, path: path.to_path_buf(), source }
}

/// The v1 controllers the agent uses, each in its own hierarchy.
const V1_CONTROLLERS: [&str; 5] = ["memory", "cpu", "cpuacct", "pids", "freezer"];

/// Where containers' cgroups are made.
#[derive(Debug, Clone)]
pub enum Hierarchy {
    /// cgroup v2: the parent of every container's cgroup.
    V2 { base: PathBuf },
    /// cgroup v1: per controller, the parent directory in that controller's hierarchy.
    V1 { bases: Vec<(&'static str, PathBuf)> },
}

impl Hierarchy {
    /// The guest's: cgroup2 on /sys/fs/cgroup with every controller enabled for
    /// `/nestbox` and below (the agent mounted it, see `init`).
    pub fn guest(root: &Path) -> Result<Self> {
        let base = root.join("nestbox");
        enable_controllers(root)?;
        mkdir(&base)?;
        enable_controllers(&base)?;
        Ok(Hierarchy::V2 { base })
    }

    /// A host's: below the agent's own cgroup, in `nestbox-<pid>`, so that parallel
    /// agents (tests) do not collide and the host's own limits still apply.
    pub fn host() -> Result<Self> {
        let mountinfo =
            fs::read_to_string("/proc/self/mountinfo").map_err(io_err("reading", Path::new("mountinfo")))?;
        let own = fs::read_to_string("/proc/self/cgroup").map_err(io_err("reading", Path::new("/proc/self/cgroup")))?;
        let leaf = format!("nestbox-{}", std::process::id());
        let mounts = parse_mountinfo(&mountinfo);
        // v1 controllers bound to their own hierarchies win: then cgroup2 has none of them.
        let mut bases = Vec::new();
        for controller in V1_CONTROLLERS {
            let Some(mount) = mounts.iter().find(|m| m.fstype == "cgroup" && m.options.iter().any(|o| o == controller))
            else {
                continue;
            };
            let own_path = own_cgroup(&own, Some(controller)).unwrap_or_default();
            bases.push((controller, mount.point.join(own_path.trim_start_matches('/')).join(&leaf)));
        }
        if !bases.is_empty() {
            for (_, base) in &bases {
                mkdir(base)?;
            }
            return Ok(Hierarchy::V1 { bases });
        }
        let Some(mount) = mounts.iter().find(|m| m.fstype == "cgroup2") else {
            return Err(CgroupError::NoHierarchy("neither cgroup v1 controllers nor cgroup2 are mounted".into()));
        };
        let own_path = own_cgroup(&own, None).unwrap_or_default();
        let base = mount.point.join(own_path.trim_start_matches('/')).join(&leaf);
        mkdir(&base)?;
        // Best effort: a v2 host may not delegate controllers to the agent's cgroup.
        let _ = enable_controllers(&base);
        Ok(Hierarchy::V2 { base })
    }

    /// Creates the cgroup of container `id`.
    pub fn create(&self, id: &str) -> Result<Cgroup> {
        let cgroup = match self {
            Hierarchy::V2 { base } => Cgroup::V2(base.join(id)),
            Hierarchy::V1 { bases } => Cgroup::V1(bases.iter().map(|(c, b)| (*c, b.join(id))).collect()),
        };
        for dir in cgroup.dirs() {
            if let Err(e) = mkdir(dir) {
                let _ = cgroup.remove(Duration::ZERO);
                return Err(e);
            }
        }
        Ok(cgroup)
    }

    /// Removes the hierarchy's own directories (host mode, at exit), if empty.
    pub fn remove_base(&self) {
        match self {
            Hierarchy::V2 { base } => {
                let _ = fs::remove_dir(base);
            }
            Hierarchy::V1 { bases } => {
                for (_, base) in bases {
                    let _ = fs::remove_dir(base);
                }
            }
        }
    }
}

struct Mount {
    point: PathBuf,
    fstype: String,
    options: Vec<String>,
}

fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            // ... mount-point opts [optional fields] - fstype source super-options
            let (left, right) = line.split_once(" - ")?;
            let point = left.split(' ').nth(4)?;
            let mut right = right.split(' ');
            let fstype = right.next()?.to_string();
            let options = right.nth(1).unwrap_or("").split(',').map(str::to_string).collect();
            Some(Mount { point: PathBuf::from(point.replace("\\040", " ")), fstype, options })
        })
        .collect()
}

/// The agent's own cgroup path for `controller` (v1) or in the unified hierarchy (None).
fn own_cgroup(proc_self_cgroup: &str, controller: Option<&str>) -> Option<String> {
    proc_self_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let matches = match controller {
            None => controllers.is_empty(),
            Some(c) => controllers.split(',').any(|x| x == c),
        };
        matches.then(|| path.to_string())
    })
}

fn mkdir(path: &Path) -> Result<()> {
    match fs::create_dir(path) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
            fs::create_dir_all(path).map_err(io_err("creating", path))
        }
        _ => Ok(()),
    }
}

/// Enables every available controller for the children of the v2 cgroup `dir`, one at a
/// time: a controller the kernel refuses (say cpu while a real-time task runs elsewhere)
/// must not keep the others off. Only a directory that cannot be written at all is an error.
fn enable_controllers(dir: &Path) -> Result<()> {
    let available = read(&dir.join("cgroup.controllers"))?;
    let control = dir.join("cgroup.subtree_control");
    let mut refused = Vec::new();
    for controller in available.split_whitespace() {
        if let Err(e) = fs::write(&control, format!("+{controller}")) {
            refused.push(format!("{controller} ({e})"));
        }
    }
    if !refused.is_empty() && refused.len() == available.split_whitespace().count() {
        return Err(CgroupError::Io {
            op: "enabling controllers in",
            path: control,
            source: io::Error::other(refused.join(", ")),
        });
    }
    for r in refused {
        eprintln!("nestbox-agent: cgroup controller {r} not enabled in {}", dir.display());
    }
    Ok(())
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(io_err("reading", path))
}

fn write(path: &Path, value: &str) -> Result<()> {
    fs::write(path, value).map_err(io_err("writing", path))
}

/// A flat-keyed cgroup file (`key value` lines) as a map.
fn read_keyed(path: &Path) -> HashMap<String, u64> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

fn read_u64(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// v1's "unlimited" is a huge number, v2's is "max": both become 0 (unlimited) here.
fn limit_of(path: &Path) -> u64 {
    match fs::read_to_string(path) {
        Ok(s) if s.trim() == "max" => 0,
        Ok(s) => s.trim().parse().ok().filter(|v| *v < i64::MAX as u64 / 2).unwrap_or(0),
        Err(_) => 0,
    }
}

/// One container's cgroup.
#[derive(Debug, Clone)]
pub enum Cgroup {
    V2(PathBuf),
    V1(Vec<(&'static str, PathBuf)>),
}

impl Cgroup {
    fn dirs(&self) -> Vec<&PathBuf> {
        match self {
            Cgroup::V2(p) => vec![p],
            Cgroup::V1(dirs) => dirs.iter().map(|(_, p)| p).collect(),
        }
    }

    fn v1(&self, controller: &str) -> Option<&Path> {
        match self {
            Cgroup::V2(_) => None,
            Cgroup::V1(dirs) => dirs.iter().find(|(c, _)| *c == controller).map(|(_, p)| p.as_path()),
        }
    }

    /// The directory that lists the cgroup's processes.
    fn procs_dir(&self) -> Option<&Path> {
        match self {
            Cgroup::V2(p) => Some(p),
            Cgroup::V1(dirs) => dirs.first().map(|(_, p)| p.as_path()),
        }
    }

    /// Whether the cgroup (its first directory) still exists.
    pub fn exists(&self) -> bool {
        self.dirs().first().is_some_and(|d| d.exists())
    }

    /// Moves process `pid` into the cgroup (every hierarchy of it).
    pub fn add(&self, pid: i32) -> Result<()> {
        for dir in self.dirs() {
            write(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// PIDs in the cgroup (as the agent sees them).
    pub fn pids(&self) -> Vec<i32> {
        let Some(dir) = self.procs_dir() else { return Vec::new() };
        fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Applies the spec's resources. Limits the hierarchy cannot express are errors, not
    /// silently dropped.
    pub fn apply(&self, resources: &LinuxResources) -> Result<()> {
        if let Some(memory) = resources.memory() {
            let limit = memory.limit().filter(|l| *l != 0);
            match self {
                Cgroup::V2(dir) => {
                    if let Some(limit) = limit {
                        write(&dir.join("memory.max"), &v2_limit(limit))?;
                    }
                    if let Some(reservation) = memory.reservation() {
                        write(&dir.join("memory.low"), &v2_limit(reservation))?;
                    }
                    // OCI swap is memory + swap; v2's swap.max is the swap alone.
                    if let Some(swap) = memory.swap() {
                        let value = match (swap, limit) {
                            (-1, _) => "max".to_string(),
                            (swap, Some(limit)) if limit > 0 => (swap - limit).max(0).to_string(),
                            (swap, _) => swap.to_string(),
                        };
                        let path = dir.join("memory.swap.max");
                        if path.exists() {
                            write(&path, &value)?;
                        }
                    }
                }
                Cgroup::V1(_) => {
                    let dir = self.v1("memory").ok_or_else(|| CgroupError::Unsupported("memory".into()))?;
                    if let Some(limit) = limit {
                        write(&dir.join("memory.limit_in_bytes"), &limit.to_string())?;
                        // Without swap accounting memsw is missing; then there is no swap to limit.
                        let memsw = dir.join("memory.memsw.limit_in_bytes");
                        if memsw.exists() {
                            let swap = memory.swap().unwrap_or(limit);
                            write(&memsw, &swap.to_string())?;
                        }
                    }
                    if let Some(reservation) = memory.reservation() {
                        write(&dir.join("memory.soft_limit_in_bytes"), &reservation.to_string())?;
                    }
                }
            }
        }
        if let Some(cpu) = resources.cpu() {
            match self {
                Cgroup::V2(dir) => {
                    if let Some(shares) = cpu.shares().filter(|s| *s > 0) {
                        write(&dir.join("cpu.weight"), &shares_to_weight(shares).to_string())?;
                    }
                    if cpu.quota().is_some() || cpu.period().is_some() {
                        let quota = match cpu.quota() {
                            Some(q) if q > 0 => q.to_string(),
                            _ => "max".to_string(),
                        };
                        let period = cpu.period().filter(|p| *p > 0).unwrap_or(100_000);
                        write(&dir.join("cpu.max"), &format!("{quota} {period}"))?;
                    }
                }
                Cgroup::V1(_) => {
                    let dir = self.v1("cpu").ok_or_else(|| CgroupError::Unsupported("cpu".into()))?;
                    if let Some(shares) = cpu.shares().filter(|s| *s > 0) {
                        write(&dir.join("cpu.shares"), &shares.to_string())?;
                    }
                    if let Some(period) = cpu.period().filter(|p| *p > 0) {
                        write(&dir.join("cpu.cfs_period_us"), &period.to_string())?;
                    }
                    if let Some(quota) = cpu.quota() {
                        write(&dir.join("cpu.cfs_quota_us"), &quota.max(-1).to_string())?;
                    }
                }
            }
            if cpu.cpus().is_some() || cpu.mems().is_some() {
                return Err(CgroupError::Unsupported("cpu.cpus/cpu.mems (cpuset)".into()));
            }
        }
        if let Some(pids) = resources.pids() {
            let value = if pids.limit() > 0 { pids.limit().to_string() } else { "max".to_string() };
            let dir = match self {
                Cgroup::V2(dir) => dir.as_path(),
                Cgroup::V1(_) => self.v1("pids").ok_or_else(|| CgroupError::Unsupported("pids".into()))?,
            };
            write(&dir.join("pids.max"), &value)?;
        }
        if let (Cgroup::V2(dir), Some(unified)) = (self, resources.unified()) {
            for (key, value) in unified {
                if key.contains('/') || key.starts_with('.') {
                    return Err(CgroupError::Unsupported(format!("unified key {key:?}")));
                }
                write(&dir.join(key), value)?;
            }
        }
        Ok(())
    }

    /// Freezes (pause) or thaws (resume) every process of the cgroup, returning once the
    /// kernel reports the new state.
    pub fn set_frozen(&self, frozen: bool, timeout: Duration) -> Result<()> {
        // (file to write, value, file that reports the state, the line that says done)
        let (state_file, value, check_file, done) = match self {
            Cgroup::V2(dir) => (
                dir.join("cgroup.freeze"),
                if frozen { "1" } else { "0" },
                dir.join("cgroup.events"),
                if frozen { "frozen 1" } else { "frozen 0" },
            ),
            Cgroup::V1(_) => {
                let dir = self.v1("freezer").ok_or_else(|| CgroupError::Unsupported("freezer".into()))?;
                let want = if frozen { "FROZEN" } else { "THAWED" };
                (dir.join("freezer.state"), want, dir.join("freezer.state"), want)
            }
        };
        let start = Instant::now();
        loop {
            // v1's freezer can stay FREEZING while a task is busy in the kernel: writing
            // again retries the freeze.
            write(&state_file, value)?;
            if read(&check_file)?.lines().any(|l| l.trim() == done) {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(CgroupError::FreezeTimeout { timeout, path: state_file });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The OOM kill count so far (memory.events in v2, memory.oom_control in v1).
    pub fn oom_kills(&self) -> u64 {
        match self {
            Cgroup::V2(dir) => read_keyed(&dir.join("memory.events")).get("oom_kill").copied().unwrap_or(0),
            Cgroup::V1(_) => self
                .v1("memory")
                .map(|d| read_keyed(&d.join("memory.oom_control")).get("oom_kill").copied().unwrap_or(0))
                .unwrap_or(0),
        }
    }

    /// The file whose changes announce an OOM: v2 memory.events (inotify IN_MODIFY), v1
    /// memory.oom_control (an eventfd registered in cgroup.event_control).
    pub fn oom_source(&self) -> Option<OomSource> {
        match self {
            Cgroup::V2(dir) => Some(OomSource::V2Events(dir.join("memory.events"))),
            Cgroup::V1(_) => self.v1("memory").map(|d| OomSource::V1Control(d.to_path_buf())),
        }
    }

    pub fn stats(&self) -> CgroupStats {
        let mut stats = CgroupStats::new();
        let mut cpu = CpuStats::new();
        let mut memory = MemoryStats::new();
        let mut pids = PidsStats::new();
        match self {
            Cgroup::V2(dir) => {
                let c = read_keyed(&dir.join("cpu.stat"));
                let get = |k: &str| c.get(k).copied().unwrap_or(0);
                cpu.usage_usec = get("usage_usec");
                cpu.user_usec = get("user_usec");
                cpu.system_usec = get("system_usec");
                cpu.nr_periods = get("nr_periods");
                cpu.nr_throttled = get("nr_throttled");
                cpu.throttled_usec = get("throttled_usec");
                memory.usage = read_u64(&dir.join("memory.current")).unwrap_or(0);
                memory.limit = limit_of(&dir.join("memory.max"));
                memory.max_usage = read_u64(&dir.join("memory.peak")).unwrap_or(0);
                memory.swap_usage = read_u64(&dir.join("memory.swap.current")).unwrap_or(0);
                memory.stat = read_keyed(&dir.join("memory.stat"));
                let events = read_keyed(&dir.join("memory.events"));
                memory.oom_events = events.get("oom").copied().unwrap_or(0);
                memory.oom_kill_events = events.get("oom_kill").copied().unwrap_or(0);
                pids.current = read_u64(&dir.join("pids.current")).unwrap_or(0);
                pids.limit = limit_of(&dir.join("pids.max"));
                let mut io = IoStats::new();
                io.entries = parse_io_stat(&fs::read_to_string(dir.join("io.stat")).unwrap_or_default());
                stats.io = Some(io).into();
            }
            Cgroup::V1(_) => {
                if let Some(dir) = self.v1("cpuacct") {
                    cpu.usage_usec = read_u64(&dir.join("cpuacct.usage")).unwrap_or(0) / 1000;
                    // cpuacct.stat counts USER_HZ ticks, which Linux fixes at 100 per second.
                    let ticks = read_keyed(&dir.join("cpuacct.stat"));
                    cpu.user_usec = ticks.get("user").copied().unwrap_or(0) * 10_000;
                    cpu.system_usec = ticks.get("system").copied().unwrap_or(0) * 10_000;
                }
                if let Some(dir) = self.v1("cpu") {
                    let c = read_keyed(&dir.join("cpu.stat"));
                    cpu.nr_periods = c.get("nr_periods").copied().unwrap_or(0);
                    cpu.nr_throttled = c.get("nr_throttled").copied().unwrap_or(0);
                    cpu.throttled_usec = c.get("throttled_time").copied().unwrap_or(0) / 1000;
                }
                if let Some(dir) = self.v1("memory") {
                    memory.usage = read_u64(&dir.join("memory.usage_in_bytes")).unwrap_or(0);
                    memory.limit = limit_of(&dir.join("memory.limit_in_bytes"));
                    memory.max_usage = read_u64(&dir.join("memory.max_usage_in_bytes")).unwrap_or(0);
                    memory.stat = read_keyed(&dir.join("memory.stat"));
                    memory.oom_events = read_u64(&dir.join("memory.failcnt")).unwrap_or(0);
                    memory.oom_kill_events = self.oom_kills();
                }
                if let Some(dir) = self.v1("pids") {
                    pids.current = read_u64(&dir.join("pids.current")).unwrap_or(0);
                    pids.limit = limit_of(&dir.join("pids.max"));
                }
            }
        }
        stats.cpu = Some(cpu).into();
        stats.memory = Some(memory).into();
        stats.pids = Some(pids).into();
        stats
    }

    /// Removes the cgroup, waiting up to `timeout` for its last processes to be gone (a
    /// killed process leaves the cgroup only once it is reaped).
    pub fn remove(&self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        for dir in self.dirs() {
            loop {
                match fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) && start.elapsed() < timeout => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                        return Err(CgroupError::Busy { path: dir.clone(), waited: start.elapsed() })
                    }
                    Err(e) => return Err(io_err("removing", dir)(e)),
                }
            }
        }
        Ok(())
    }
}

fn v2_limit(value: i64) -> String {
    if value < 0 {
        "max".into()
    } else {
        value.to_string()
    }
}

/// cgroup v1 cpu.shares [2, 262144] to v2 cpu.weight [1, 10000], as runc and crun map it.
fn shares_to_weight(shares: u64) -> u64 {
    let shares = shares.clamp(2, 262_144);
    1 + ((shares - 2) * 9999) / 262_142
}

fn parse_io_stat(text: &str) -> Vec<IoEntry> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let (major, minor) = words.next()?.split_once(':')?;
            let mut entry = IoEntry::new();
            entry.major = major.parse().ok()?;
            entry.minor = minor.parse().ok()?;
            for word in words {
                let Some((key, value)) = word.split_once('=') else { continue };
                let value = value.parse().unwrap_or(0);
                match key {
                    "rbytes" => entry.rbytes = value,
                    "wbytes" => entry.wbytes = value,
                    "rios" => entry.rios = value,
                    "wios" => entry.wios = value,
                    _ => {}
                }
            }
            Some(entry)
        })
        .collect()
}

/// What to watch for a container's OOM kills.
#[derive(Debug, Clone)]
pub enum OomSource {
    V2Events(PathBuf),
    V1Control(PathBuf),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_and_own_cgroup() {
        let info = "30 1 0:26 / /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory\n\
                    31 1 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw,nsdelegate\n";
        let mounts = parse_mountinfo(info);
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[0].point, PathBuf::from("/sys/fs/cgroup/memory"));
        assert!(mounts[0].options.iter().any(|o| o == "memory"));
        assert_eq!(mounts[1].fstype, "cgroup2");
        let own = "4:memory:/a/b\n1:cpu,cpuacct:/c\n0::/u\n";
        assert_eq!(own_cgroup(own, Some("memory")).as_deref(), Some("/a/b"));
        assert_eq!(own_cgroup(own, Some("cpuacct")).as_deref(), Some("/c"));
        assert_eq!(own_cgroup(own, None).as_deref(), Some("/u"));
        assert_eq!(own_cgroup(own, Some("pids")), None);
    }

    #[test]
    fn conversions() {
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(v2_limit(-1), "max");
        let io = parse_io_stat("8:0 rbytes=10 wbytes=20 rios=1 wios=2 dbytes=0\n");
        assert_eq!((io[0].major, io[0].minor, io[0].rbytes, io[0].wios), (8, 0, 10, 2));
    }
}
