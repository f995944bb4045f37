//! What /proc says about the pods' processes (memory, CPU), and the statistics the report
//! shows.

use nestbox_tests::procmem::kib_field;
use serde_json::{json, Value};
use std::fs;

fn read(path: &str) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

/// Proportional set size of a process (shared pages split among their users), KiB.
pub fn pss_kib(pid: i32) -> u64 {
    kib_field(&read(&format!("/proc/{pid}/smaps_rollup")), "Pss:").unwrap_or(0)
}

/// User plus system CPU time of a process, in clock ticks.
pub fn cpu_ticks(pid: i32) -> u64 {
    let stat = read(&format!("/proc/{pid}/stat"));
    // Fields after the command (which may hold spaces and parentheses): state is the first.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let field = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    field(11) + field(12)
}

/// Every descendant of a process.
pub fn descendants(pid: i32) -> Vec<i32> {
    let children = read(&format!("/proc/{pid}/task/{pid}/children"));
    let mut out = Vec::new();
    for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
        out.push(child);
        out.extend(descendants(child));
    }
    out
}

pub fn mem_available_kib() -> u64 {
    kib_field(&read("/proc/meminfo"), "MemAvailable:").unwrap_or(0)
}

pub fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf reads a constant of the system; no memory involved.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

/// Nearest-rank percentile (p in 0..=100) of a non-empty list.
pub fn percentile(values: &[f64], p: usize) -> f64 {
    let mut ordered = values.to_vec();
    ordered.sort_by(f64::total_cmp);
    let rank = (ordered.len() * p).div_ceil(100).max(1);
    ordered[rank - 1]
}

/// The summary the report reads: n, p50, p95, min, max, mean and every value.
pub fn summary(values: &[f64]) -> Value {
    if values.is_empty() {
        return Value::Null;
    }
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    json!({
        "n": values.len(),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "min": min,
        "max": max,
        "mean": values.iter().sum::<f64>() / values.len() as f64,
        "all": values,
    })
}
