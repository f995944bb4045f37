//! The agent's cgroup v2 statistics (`StatsContainer`) in containerd's cgroups v2 metrics
//! message, which is what `ctr task metrics` and the CRI's stats decode.

use containerd_shim::protos::cgroups_v2::metrics as cg2;
use containerd_shim::protos::protobuf::MessageField;
use nestbox_protocols::agent::StatsContainerResponse;
use nestbox_protocols::types::{CgroupStats, CpuStats, IoStats, MemoryStats, NetworkStats, PidsStats};

/// containerd's v2 metrics for one container, from the agent's figures.
pub fn cgroup_v2_metrics(stats: &StatsContainerResponse) -> cg2::Metrics {
    let mut m = cg2::Metrics::new();
    if let Some(cg) = stats.cgroup_stats.as_ref() {
        add_cgroup(&mut m, cg);
    }
    m.network = stats.network_stats.iter().map(network).collect();
    m
}

fn add_cgroup(m: &mut cg2::Metrics, cg: &CgroupStats) {
    if let Some(c) = cg.cpu.as_ref() {
        m.cpu = MessageField::some(cpu(c));
    }
    if let Some(mem) = cg.memory.as_ref() {
        m.memory = MessageField::some(memory(mem));
        m.memory_events = MessageField::some(memory_events(mem));
    }
    if let Some(p) = cg.pids.as_ref() {
        m.pids = MessageField::some(pids(p));
    }
    if let Some(i) = cg.io.as_ref() {
        m.io = MessageField::some(io(i));
    }
}

fn cpu(cpu: &CpuStats) -> cg2::CPUStat {
    cg2::CPUStat {
        usage_usec: cpu.usage_usec,
        user_usec: cpu.user_usec,
        system_usec: cpu.system_usec,
        nr_periods: cpu.nr_periods,
        nr_throttled: cpu.nr_throttled,
        throttled_usec: cpu.throttled_usec,
        ..Default::default()
    }
}

fn memory(mem: &MemoryStats) -> cg2::MemoryStat {
    // memory.stat keys the agent read; a key the guest kernel does not have reads as 0.
    let stat = |k: &str| mem.stat.get(k).copied().unwrap_or(0);
    cg2::MemoryStat {
        usage: mem.usage,
        usage_limit: mem.limit,
        max_usage: mem.max_usage,
        swap_usage: mem.swap_usage,
        anon: stat("anon"),
        file: stat("file"),
        kernel_stack: stat("kernel_stack"),
        slab: stat("slab"),
        sock: stat("sock"),
        shmem: stat("shmem"),
        file_mapped: stat("file_mapped"),
        file_dirty: stat("file_dirty"),
        pgfault: stat("pgfault"),
        pgmajfault: stat("pgmajfault"),
        ..Default::default()
    }
}

fn memory_events(mem: &MemoryStats) -> cg2::MemoryEvents {
    cg2::MemoryEvents { max: mem.oom_events, oom: mem.oom_events, oom_kill: mem.oom_kill_events, ..Default::default() }
}

fn pids(pids: &PidsStats) -> cg2::PidsStat {
    cg2::PidsStat { current: pids.current, limit: pids.limit, ..Default::default() }
}

fn io(io: &IoStats) -> cg2::IOStat {
    let usage = io
        .entries
        .iter()
        .map(|e| cg2::IOEntry {
            major: e.major,
            minor: e.minor,
            rbytes: e.rbytes,
            wbytes: e.wbytes,
            rios: e.rios,
            wios: e.wios,
            ..Default::default()
        })
        .collect();
    cg2::IOStat { usage, ..Default::default() }
}

fn network(n: &NetworkStats) -> cg2::NetworkStat {
    cg2::NetworkStat {
        name: n.name.clone(),
        rx_bytes: n.rx_bytes,
        rx_packets: n.rx_packets,
        rx_errors: n.rx_errors,
        rx_dropped: n.rx_dropped,
        tx_bytes: n.tx_bytes,
        tx_packets: n.tx_packets,
        tx_errors: n.tx_errors,
        tx_dropped: n.tx_dropped,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_carry_the_agent_figures() {
        let stats = StatsContainerResponse {
            cgroup_stats: MessageField::some(CgroupStats {
                cpu: MessageField::some(CpuStats { usage_usec: 7, ..Default::default() }),
                memory: MessageField::some(MemoryStats {
                    usage: 4096,
                    limit: 8192,
                    stat: [("anon".to_string(), 100)].into_iter().collect(),
                    ..Default::default()
                }),
                pids: MessageField::some(PidsStats { current: 3, limit: 0, ..Default::default() }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let m = cgroup_v2_metrics(&stats);
        assert_eq!(m.cpu.usage_usec, 7);
        assert_eq!((m.memory.usage, m.memory.usage_limit, m.memory.anon), (4096, 8192, 100));
        assert_eq!(m.pids.current, 3);
        let any = containerd_shim::util::convert_to_any(Box::new(m)).expect("any");
        // The name containerd's typeurl registry knows the v2 metrics by.
        assert_eq!(any.type_url, "io.containerd.cgroups.v2.Metrics");
    }
}
