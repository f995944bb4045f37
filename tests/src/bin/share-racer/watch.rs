//! The racer's watcher: a thread that does nothing but list the share and, the moment a new
//! container directory appears, put symlinks where the host is about to make its `rootfs`
//! and `mounts/<n>` (again in the next listings). The host makes them within milliseconds
//! of the directory, so this is where the guest can be first; the sweep (the main thread)
//! takes seconds per container here.

use crate::at::At;
use crate::tally::{errno_name, Tally};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// `<cid>/mounts/<n>` tried for n below this. n is the mount's index in the container's spec,
/// whose first six (proc, dev, ...) are no binds: a CRI container's binds are 6 and up.
pub const BINDS: u32 = 12;
/// Listings in which the watcher hits a new container directory again.
const HOT_PASSES: u32 = 5;

/// What the watcher did.
pub struct Watched {
    pub tally: Tally,
    pub listings: u64,
    /// Per new container directory: what its first hit met (EROFS where the entry was not
    /// there yet, EEXIST where the host had made it already).
    pub first_hits: Vec<String>,
}

pub struct Watcher {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Watched>,
}

impl Watcher {
    /// Starts watching; what the share holds now is not new (listed here, before the
    /// caller says it is racing, not whenever the thread first runs).
    pub fn start(share: &Path, canary: &Path) -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        let share = At::open(share);
        let known: BTreeMap<String, u32> =
            share.as_ref().map(|s| s.dirs().into_iter().map(|cid| (cid, 0)).collect()).unwrap_or_default();
        let (flag, canary) = (stop.clone(), canary.to_path_buf());
        let thread = std::thread::spawn(move || match share {
            Ok(share) => watch(&share, known, &canary, &flag),
            Err(e) => Watched { tally: Tally::default(), listings: 0, first_hits: vec![format!("race: watcher: {e}")] },
        });
        Watcher { stop, thread }
    }

    pub fn stop(self) -> Watched {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_else(|_| Watched {
            tally: Tally::default(),
            listings: 0,
            first_hits: vec!["race: watcher panicked".into()],
        })
    }
}

/// `passes`: the container directories known, with the hits each has left (none for those
/// there at the start: the sweep takes them).
fn watch(share: &At, mut passes: BTreeMap<String, u32>, canary: &Path, stop: &AtomicBool) -> Watched {
    let mut watched = Watched { tally: Tally::default(), listings: 0, first_hits: Vec::new() };
    while !stop.load(Ordering::Relaxed) {
        watched.listings += 1;
        for cid in share.dirs() {
            passes.entry(cid).or_insert(HOT_PASSES);
        }
        for (cid, left) in passes.iter_mut().filter(|(_, left)| **left > 0) {
            let first = *left == HOT_PASSES;
            *left -= 1;
            let hits = hit(share, cid, canary, &mut watched.tally);
            if first {
                watched.first_hits.push(format!("race: new {cid} listing={} first-hit {hits}", watched.listings));
            }
        }
    }
    watched
}

/// Symlinks at `<cid>/rootfs` and `<cid>/mounts/<n>` (or at `<cid>/mounts` while it is not
/// there); what each met, as `name:ERRNO`.
fn hit(share: &At, cid: &str, canary: &Path, tally: &mut Tally) -> String {
    let Ok(dir) = share.sub(cid) else { return "gone".into() };
    let mut met = Vec::new();
    let mut attempt = |tally: &mut Tally, at: &At, name: &str, place: &str| {
        let result = at.symlink(canary, name);
        met.push(format!(
            "{name}:{}",
            result.as_ref().map_or_else(|e| errno_name(e.raw_os_error().unwrap_or(0)), |_| "MADE".into())
        ));
        tally.note("symlink", place, &at.shown(name), result);
    };
    attempt(tally, &dir, "rootfs", "cid");
    match dir.sub("mounts") {
        Ok(mounts) => (0..BINDS).for_each(|n| attempt(tally, &mounts, &n.to_string(), "mounts")),
        Err(_) => attempt(tally, &dir, "mounts", "cid"),
    }
    met.join(" ")
}
