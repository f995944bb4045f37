//! The spec's resources written to a container's cgroup: memory, cpu, pids, and (v2 only)
//! the `unified` keys. Limits the hierarchy cannot express are errors, not dropped.

use std::collections::HashMap;
use std::path::Path;

use oci_spec::runtime::{LinuxCpu, LinuxMemory, LinuxPids, LinuxResources};

use super::{write, Cgroup, CgroupError, Result};

impl Cgroup {
    /// Applies the spec's resources. Limits the hierarchy cannot express are errors, not
    /// silently dropped.
    pub fn apply(&self, resources: &LinuxResources) -> Result<()> {
        if let Some(memory) = resources.memory() {
            match self {
                Cgroup::V2(dir) => apply_memory_v2(dir, memory)?,
                Cgroup::V1(_) => {
                    let dir = self.v1("memory").ok_or_else(|| CgroupError::Unsupported("memory".into()))?;
                    apply_memory_v1(dir, memory)?;
                }
            }
        }
        if let Some(cpu) = resources.cpu() {
            match self {
                Cgroup::V2(dir) => apply_cpu_v2(dir, cpu)?,
                Cgroup::V1(_) => {
                    let dir = self.v1("cpu").ok_or_else(|| CgroupError::Unsupported("cpu".into()))?;
                    apply_cpu_v1(dir, cpu)?;
                }
            }
            if cpu.cpus().is_some() || cpu.mems().is_some() {
                return Err(CgroupError::Unsupported("cpu.cpus/cpu.mems (cpuset)".into()));
            }
        }
        if let Some(pids) = resources.pids() {
            self.apply_pids(pids)?;
        }
        if let (Cgroup::V2(dir), Some(unified)) = (self, resources.unified()) {
            apply_unified(dir, unified)?;
        }
        Ok(())
    }

    /// pids.max, the same file in v1 and v2.
    fn apply_pids(&self, pids: &LinuxPids) -> Result<()> {
        let value = if pids.limit() > 0 { pids.limit().to_string() } else { "max".to_string() };
        let dir = match self {
            Cgroup::V2(dir) => dir.as_path(),
            Cgroup::V1(_) => self.v1("pids").ok_or_else(|| CgroupError::Unsupported("pids".into()))?,
        };
        write(&dir.join("pids.max"), &value)
    }
}

fn apply_memory_v2(dir: &Path, memory: &LinuxMemory) -> Result<()> {
    let limit = memory.limit().filter(|l| *l != 0);
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
    Ok(())
}

fn apply_memory_v1(dir: &Path, memory: &LinuxMemory) -> Result<()> {
    if let Some(limit) = memory.limit().filter(|l| *l != 0) {
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
    Ok(())
}

fn apply_cpu_v2(dir: &Path, cpu: &LinuxCpu) -> Result<()> {
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
    Ok(())
}

fn apply_cpu_v1(dir: &Path, cpu: &LinuxCpu) -> Result<()> {
    if let Some(shares) = cpu.shares().filter(|s| *s > 0) {
        write(&dir.join("cpu.shares"), &shares.to_string())?;
    }
    if let Some(period) = cpu.period().filter(|p| *p > 0) {
        write(&dir.join("cpu.cfs_period_us"), &period.to_string())?;
    }
    if let Some(quota) = cpu.quota() {
        write(&dir.join("cpu.cfs_quota_us"), &quota.max(-1).to_string())?;
    }
    Ok(())
}

/// The spec's `unified` keys, each a file of the container's own v2 cgroup: a key that
/// would name a path elsewhere is refused.
fn apply_unified(dir: &Path, unified: &HashMap<String, String>) -> Result<()> {
    for (key, value) in unified {
        if key.contains('/') || key.starts_with('.') {
            return Err(CgroupError::Unsupported(format!("unified key {key:?}")));
        }
        write(&dir.join(key), value)?;
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions() {
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(v2_limit(-1), "max");
    }
}
