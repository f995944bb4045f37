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
//!
//! The device cgroup is an eBPF program attached to a cgroup v2 directory (`devices`). On a
//! v1 host the container's cgroup also gets a directory in the cgroup2 hierarchy mounted
//! beside the v1 ones (the "unified" entry, /sys/fs/cgroup/unified under systemd's hybrid
//! layout) so the same program is attached and tested there.
//!
//! Here: the hierarchy, a container's cgroup, freezing, OOM counts and removal; the limits
//! written from the spec are in `limits`, the device program in `devices`, the statistics
//! in `stats`.

mod devices;
mod limits;
mod stats;

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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
    #[error("devices: {0}")]
    Devices(String),
}

type Result<T> = std::result::Result<T, CgroupError>;

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io { op, path: path.to_path_buf(), source }
}

/// The v1 controllers the agent uses, each in its own hierarchy.
const V1_CONTROLLERS: [&str; 5] = ["memory", "cpu", "cpuacct", "pids", "freezer"];
/// On a v1 host, the name of the cgroup2 directory among a cgroup's v1 ones: where the
/// device program is attached.
const UNIFIED: &str = "unified";

/// Where containers' cgroups are made.
#[derive(Debug, Clone)]
pub enum Hierarchy {
    /// cgroup v2: the parent of every container's cgroup.
    V2 { base: PathBuf },
    /// cgroup v1: per controller, the parent directory in that controller's hierarchy (and
    /// the cgroup2 one for the device program, [`UNIFIED`]); `private_cgroup2`: where the
    /// agent mounted cgroup2 itself, in its own mount namespace, for want of one.
    V1 { bases: Vec<(&'static str, PathBuf)>, private_cgroup2: Option<PathBuf> },
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
    /// agents (tests) do not collide and the host's own limits still apply. With
    /// `private_mounts` (the agent has a mount namespace of its own), a v1 host without a
    /// cgroup2 mount gets one there, for the device program.
    pub fn host(private_mounts: bool) -> Result<Self> {
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
        let unified = mounts.iter().find(|m| m.fstype == "cgroup2");
        if !bases.is_empty() {
            let (point, private_cgroup2) = match unified {
                Some(mount) => (Some(mount.point.clone()), None),
                None if private_mounts => match mount_private_cgroup2() {
                    Ok(point) => (Some(point.clone()), Some(point)),
                    Err(e) => {
                        eprintln!("nestbox-agent: no cgroup2 for device programs: {e}");
                        (None, None)
                    }
                },
                None => (None, None),
            };
            // Last: the first directory is the one whose processes are listed.
            if let Some(point) = point {
                let own_path = own_cgroup(&own, None).unwrap_or_default();
                bases.push((UNIFIED, point.join(own_path.trim_start_matches('/')).join(&leaf)));
            }
            for (_, base) in &bases {
                mkdir(base)?;
            }
            return Ok(Hierarchy::V1 { bases, private_cgroup2 });
        }
        let Some(mount) = unified else {
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
            Hierarchy::V1 { bases, .. } => Cgroup::V1(bases.iter().map(|(c, b)| (*c, b.join(id))).collect()),
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
            Hierarchy::V1 { bases, private_cgroup2 } => {
                for (_, base) in bases {
                    let _ = fs::remove_dir(base);
                }
                if let Some(point) = private_cgroup2 {
                    let _ = nix::mount::umount2(point, nix::mount::MntFlags::MNT_DETACH);
                    let _ = fs::remove_dir(point);
                }
            }
        }
    }
}

/// Mounts cgroup2 on a directory of the agent's own (in its own mount namespace).
fn mount_private_cgroup2() -> Result<PathBuf> {
    use nix::mount::MsFlags;
    let point = std::env::temp_dir().join(format!("nestbox-agent-{}.cgroup2", std::process::id()));
    mkdir(&point)?;
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    if let Err(e) = nix::mount::mount(Some("cgroup2"), &point, Some("cgroup2"), flags, None::<&str>) {
        let _ = fs::remove_dir(&point);
        return Err(io_err("mounting cgroup2 on", &point)(e.into()));
    }
    Ok(point)
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
}
