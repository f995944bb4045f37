//! What each API call costs the guest, logged when the agent's log level is debug: one line
//! per call with the deltas it caused in the whole guest (page faults, forks, context
//! switches, CPU time), the mounts it added to the agent's mount namespace, the mounts of a
//! new container's namespace, and the wall time. The counters are guest-wide: calls that
//! overlap (a WaitProcess long poll and a StartContainer) see each other's work.
//!
//! Off by default, and then it costs one branch: every read here is a few system calls,
//! ~0.5 ms each on an emulated guest kernel. On: `nestbox.log=debug` on the guest kernel's
//! command line (the shim's `agent.log_level = "debug"`); in host mode the environment
//! variable `NESTBOX_AGENT_LOG=debug`.

use std::fmt::Write as _;
use std::time::Instant;

/// The host-mode switch (the guest's is its kernel command line).
pub const ENV: &str = "NESTBOX_AGENT_LOG";
const PARAM: &str = "nestbox.log=debug";

/// Whether to count: read once, when the API is set up (a template's restored guests keep
/// the command line they were made with, which is part of the template's key).
pub fn enabled(init_daemon: bool) -> bool {
    if init_daemon {
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        cmdline.split_whitespace().any(|p| p == PARAM)
    } else {
        std::env::var(ENV).is_ok_and(|v| v == "debug")
    }
}

/// The guest-wide counters, as read at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Counters {
    pub pgfault: u64,
    pub pgmajfault: u64,
    /// Forks and clones since boot (`processes` in /proc/stat).
    pub forks: u64,
    pub ctxt: u64,
    /// CPU time spent not idle, in clock ticks (user, nice, system, irq, softirq).
    pub busy_ticks: u64,
    /// Mounts in the agent's mount namespace.
    pub mounts: u64,
}

impl Counters {
    pub fn read() -> Counters {
        let mut c = Counters::default();
        if let Ok(vmstat) = std::fs::read_to_string("/proc/vmstat") {
            c.parse_vmstat(&vmstat);
        }
        if let Ok(stat) = std::fs::read_to_string("/proc/stat") {
            c.parse_stat(&stat);
        }
        c.mounts = mount_count("/proc/self/mountinfo").unwrap_or(0);
        c
    }

    fn parse_vmstat(&mut self, text: &str) {
        for line in text.lines() {
            match line.split_once(' ') {
                Some(("pgfault", v)) => self.pgfault = v.trim().parse().unwrap_or(0),
                Some(("pgmajfault", v)) => self.pgmajfault = v.trim().parse().unwrap_or(0),
                _ => {}
            }
        }
    }

    fn parse_stat(&mut self, text: &str) {
        for line in text.lines() {
            let mut fields = line.split_whitespace();
            match fields.next() {
                Some("cpu") => {
                    // user nice system idle iowait irq softirq: all but idle and iowait.
                    let v: Vec<u64> = fields.take(7).map(|f| f.parse().unwrap_or(0)).collect();
                    if v.len() == 7 {
                        self.busy_ticks = v[0] + v[1] + v[2] + v[5] + v[6];
                    }
                }
                Some("processes") => self.forks = fields.next().and_then(|f| f.parse().ok()).unwrap_or(0),
                Some("ctxt") => self.ctxt = fields.next().and_then(|f| f.parse().ok()).unwrap_or(0),
                _ => {}
            }
        }
    }
}

/// The number of mounts listed in a mountinfo file.
pub fn mount_count(path: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    Some(text.lines().count() as u64)
}

/// One call being counted: made by [`begin`] before the call, ended by [`Probe::end`].
pub struct Probe {
    started: Instant,
    before: Counters,
}

/// Starts counting a call when counting is on.
pub fn begin(on: bool) -> Option<Probe> {
    on.then(|| Probe { started: Instant::now(), before: Counters::read() })
}

impl Probe {
    /// Logs the call's line. `container_pid`: a process of a new container, whose mount
    /// namespace's size is logged too; `ok`: whether the call succeeded.
    pub fn end(self, call: &str, id: &str, container_pid: Option<i32>, ok: bool) {
        let after = Counters::read();
        let wall = self.started.elapsed();
        let mut line = line(call, id, &self.before, &after, wall.as_secs_f64() * 1000.0);
        if let Some(mounts) = container_pid.and_then(|pid| mount_count(&format!("/proc/{pid}/mountinfo"))) {
            let _ = write!(line, " container_mounts={mounts}");
        }
        if !ok {
            line.push_str(" failed");
        }
        eprintln!("{line}");
    }
}

/// The log line for a call from its counters before and after.
fn line(call: &str, id: &str, before: &Counters, after: &Counters, wall_ms: f64) -> String {
    let d = |a: u64, b: u64| a.saturating_sub(b);
    // Clock ticks are USER_HZ, 100 a second on Linux.
    let cpu_ms = d(after.busy_ticks, before.busy_ticks) * 10;
    let mounts = after.mounts as i64 - before.mounts as i64;
    format!(
        "nestbox-agent: guest work {call} id={id:?} wall_ms={wall_ms:.1} cpu_ms={cpu_ms} pgfault={} \
         pgmajfault={} forks={} ctxt={} mounts={mounts:+}",
        d(after.pgfault, before.pgfault),
        d(after.pgmajfault, before.pgmajfault),
        d(after.forks, before.forks),
        d(after.ctxt, before.ctxt),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_kernels_counters() {
        let mut c = Counters::default();
        c.parse_vmstat("nr_free_pages 100\npgfault 452143092\npgmajfault 80096\npgfree 7\n");
        c.parse_stat(
            "cpu  782189 331966 1072619 379843 7990 0 2663 14048 1747 0\n\
             cpu0 1 2 3 4 5 6 7 8 9 0\nintr 5 6\nctxt 39118058\nbtime 1\nprocesses 8184301\n",
        );
        let want = Counters {
            pgfault: 452143092,
            pgmajfault: 80096,
            forks: 8184301,
            ctxt: 39118058,
            busy_ticks: 782189 + 331966 + 1072619 + 2663,
            mounts: 0,
        };
        assert_eq!(c, want);
    }

    #[test]
    fn a_line_has_every_delta() {
        let before = Counters { pgfault: 10, pgmajfault: 1, forks: 5, ctxt: 100, busy_ticks: 7, mounts: 20 };
        let after = Counters { pgfault: 25, pgmajfault: 1, forks: 7, ctxt: 160, busy_ticks: 9, mounts: 19 };
        let l = line("StartContainer", "c1", &before, &after, 12.34);
        assert_eq!(
            l,
            "nestbox-agent: guest work StartContainer id=\"c1\" wall_ms=12.3 cpu_ms=20 pgfault=15 \
             pgmajfault=0 forks=2 ctxt=60 mounts=-1"
        );
        // Counters that went backwards (a bad read) give 0, never a wrap.
        assert!(line("x", "", &after, &before, 0.0).contains("pgfault=0 "));
    }

    #[test]
    fn counts_this_processs_mounts() {
        assert!(mount_count("/proc/self/mountinfo").is_some_and(|n| n > 0));
        assert_eq!(mount_count("/nonexistent/mountinfo"), None);
    }
}
