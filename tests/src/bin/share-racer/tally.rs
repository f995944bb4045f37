//! The racer's tally: attempts and successes per kind (`ACTION-PLACE`), how often each errno
//! came back, and the first success and error, printed one line per kind.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

#[derive(Default)]
pub struct Count {
    attempts: u64,
    made: u64,
    first_made: Option<String>,
    first_error: Option<String>,
    /// How often each errno came back.
    errors: BTreeMap<i32, u64>,
}

/// Attempts and successes per kind (`ACTION-PLACE`).
#[derive(Default)]
pub struct Tally(BTreeMap<String, Count>);

impl Tally {
    pub fn note(&mut self, action: &str, place: &str, what: &Path, result: io::Result<()>) {
        let count = self.0.entry(format!("{action}-{place}")).or_default();
        count.attempts += 1;
        match result {
            Ok(()) => {
                count.made += 1;
                count.first_made.get_or_insert_with(|| what.display().to_string());
            }
            Err(e) => {
                count.first_error.get_or_insert_with(|| format!("{}: {e}", what.display()));
                *count.errors.entry(e.raw_os_error().unwrap_or(0)).or_default() += 1;
            }
        }
    }

    pub fn merge(&mut self, other: Tally) {
        for (kind, theirs) in other.0 {
            let ours = self.0.entry(kind).or_default();
            ours.attempts += theirs.attempts;
            ours.made += theirs.made;
            if ours.first_made.is_none() {
                ours.first_made = theirs.first_made;
            }
            if ours.first_error.is_none() {
                ours.first_error = theirs.first_error;
            }
            for (errno, n) in theirs.errors {
                *ours.errors.entry(errno).or_default() += n;
            }
        }
    }

    pub fn print(&self) {
        for (kind, c) in &self.0 {
            let first_made = c.first_made.as_deref().unwrap_or("-");
            let first_error = c.first_error.as_deref().unwrap_or("-");
            let errors: Vec<String> = c.errors.iter().map(|(errno, n)| format!("{}x{n}", errno_name(*errno))).collect();
            println!(
                "race: {kind} attempts={} made={} errors={} first-made={first_made} first-error={first_error}",
                c.attempts,
                c.made,
                errors.join(",")
            );
        }
    }
}

pub fn errno_name(errno: i32) -> String {
    let known = [
        (libc::EROFS, "EROFS"),
        (libc::EEXIST, "EEXIST"),
        (libc::EXDEV, "EXDEV"),
        (libc::EBUSY, "EBUSY"),
        (libc::EPERM, "EPERM"),
        (libc::EACCES, "EACCES"),
        (libc::ENOENT, "ENOENT"),
        (libc::ENOTEMPTY, "ENOTEMPTY"),
        (libc::EOPNOTSUPP, "EOPNOTSUPP"),
        (libc::EINVAL, "EINVAL"),
    ];
    known.iter().find(|(n, _)| *n == errno).map_or_else(|| format!("errno{errno}"), |(_, name)| name.to_string())
}
