//! Where a nestbox start (or exec) spends its time, from the timestamps of the shim's lines
//! in containerd's debug log.

use regex::Regex;
use serde_json::{json, Value};

/// (phase, where it is spent, the marker that ends it). A phase whose end marker is missing
/// merges into the next one (warm starts have no kernel boot lines, for instance). The last
/// phase ends when ctr returns.
pub const START_PHASES: &[(&str, &str, Option<&str>)] = &[
    ("ctr, containerd, snapshot, shim start", "host", Some(r"create {id} \(bundle")),
    ("shim: rootfs mounts", "host", Some(r"pod {id}: starting a VM")),
    ("shim: template lookup (first warm pod: making it)", "host", Some(r"sandbox {id}: starting ")),
    ("guest kernel boot to /init", "guest", Some(r"guest {id}: \[ *[\d.]+\] Run /init")),
    ("/init to agent ready", "guest", Some(r"guest {id}: nestbox-agent \S+: ready")),
    ("agent ready to shim connected", "guest", Some(r"sandbox {id}: .*answered")),
    ("sandbox setup in the guest", "guest", Some(r"sandbox {id}: ready ")),
    ("container create (in the guest)", "guest", Some(r"create {id}: ok")),
    ("process start (in the guest)", "guest", Some(r"{id} started \(guest pid")),
    ("process run and exit, to the VM's stop", "mixed", Some(r"pod {id}: stopping the VM")),
    ("VM stop (agent shutdown, VMM exit)", "guest", Some(r"sandbox {id}: VMM ended")),
    ("shim delete, ctr exit", "host", None),
];

pub const EXEC_PHASES: &[(&str, &str, Option<&str>)] = &[
    ("ctr, containerd, shim registers the exec", "host", Some(r"exec {id}: ok")),
    ("streams attached + ExecProcess in the guest", "guest", Some(r"{id}/{exec} started \(guest pid")),
    ("process run, exit report, ctr exit", "mixed", None),
];

/// A restored guest has no boot lines: its phases up to the shim's connection are one.
const RESTORE_LABEL: (&str, &str) = (
    "guest kernel boot to /init + /init to agent ready + agent ready to shim connected",
    "VMM restore to agent answering",
);

/// The first timestamp anywhere in a log line, as Unix seconds. (containerd's and the
/// shims' lines share one file and are sometimes interleaved mid-line, so it is searched
/// for rather than expected at the start.)
pub fn log_time(line: &str) -> Option<f64> {
    static STAMP: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
    let stamp = STAMP.get_or_init(|| {
        Regex::new(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(\.\d+)?Z").expect("a valid timestamp pattern")
    });
    let c = stamp.captures(line)?;
    let n = |i: usize| c.get(i).and_then(|m| m.as_str().parse::<i64>().ok());
    let days = days_from_civil(n(1)?, n(2)?, n(3)?);
    let seconds = days * 86_400 + n(4)? * 3600 + n(5)? * 60 + n(6)?;
    let fraction = c.get(7).and_then(|m| format!("0{}", m.as_str()).parse::<f64>().ok()).unwrap_or(0.0);
    Some(seconds as f64 + fraction)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// Seconds per phase of one start of container `id` (or one exec `exec` in it), which began
/// at Unix time `start` and took `total` seconds: `[[label, where, seconds], ...]`.
pub fn breakdown(
    lines: &[String],
    phases: &[(&str, &str, Option<&str>)],
    id: &str,
    exec: &str,
    start: f64,
    total: f64,
) -> Value {
    let mut out = Vec::new();
    let (mut previous, mut pending): (f64, Vec<(&str, &str)>) = (start, Vec::new());
    for (name, place, marker) in phases {
        pending.push((name, place));
        let end = match marker {
            Some(marker) => match marker_time(lines, marker, id, exec) {
                Some(t) => t,
                None => continue,
            },
            None => start + total,
        };
        let mut label = pending.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(" + ");
        if label == RESTORE_LABEL.0 {
            label = RESTORE_LABEL.1.to_string();
        }
        let first = pending[0].1;
        let place = if pending.iter().all(|(_, p)| *p == first) { first } else { "mixed" };
        out.push(json!([label, place, (end - previous).max(0.0)]));
        previous = end;
        pending.clear();
    }
    Value::Array(out)
}

/// When the first line matching `marker` (with `{id}` and `{exec}` filled in) was logged.
fn marker_time(lines: &[String], marker: &str, id: &str, exec: &str) -> Option<f64> {
    let pattern = marker.replace("{id}", &regex::escape(id)).replace("{exec}", &regex::escape(exec));
    let re = Regex::new(&pattern).ok()?;
    lines.iter().filter(|l| re.is_match(l)).find_map(|l| log_time(l))
}

/// The shim's lines about container `id` (kept in the raw results, for warm starts whose
/// markers are not known in advance); the guest's console lines left out.
pub fn lines_about(lines: &[String], id: &str) -> Value {
    let about = format!(" {id}");
    let console = format!("guest {id}: [");
    let kept: Vec<String> = lines
        .iter()
        .filter(|l| l.contains(&about) && !l.contains(&console))
        .take(40)
        .map(|l| l.chars().take(200).collect())
        .collect();
    json!(kept)
}
