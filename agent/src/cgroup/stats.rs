//! A container cgroup's statistics (StatsContainer): cpu, memory, pids and, in v2, io,
//! read from the controllers' files; v1 counters are converted to v2's units.

use std::fs;
use std::path::Path;

use nestbox_protocols::types::{CgroupStats, CpuStats, IoEntry, IoStats, MemoryStats, PidsStats};

use super::{read_keyed, Cgroup};

impl Cgroup {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_stat() {
        let io = parse_io_stat("8:0 rbytes=10 wbytes=20 rios=1 wios=2 dbytes=0\n");
        assert_eq!((io[0].major, io[0].minor, io[0].rbytes, io[0].wios), (8, 0, 10, 2));
    }
}
