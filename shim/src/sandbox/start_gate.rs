//! A host-wide bound on guest starts in flight: a VM start (restore or boot, until its
//! agent has the sandbox) and each container's create and start in a guest take one of
//! `runtime.concurrent_starts` slots, shared by every shim of the host.
//!
//! Why: a start is the guest's busiest moment, and on a host whose guest kernels run
//! emulated (docs/guest-work.md) it needs about a core for seconds. Started all at once,
//! 50 pods on 2 cores each got 4 % of a core, their agents missed the start bounds, and
//! none started; a few at a time, they all start, and each in about the time it takes
//! alone. Waiting for a slot counts against no bound (the restore and agent timeouts
//! start after it).
//!
//! The slots are byte locks (open-file-description locks, F_OFD_SETLK) on one file beside
//! the sandboxes directory: a holder that dies frees its slot with its descriptor, each
//! acquisition opens its own description (so two containers of one shim contend like two
//! shims do), and waiting is the kernel's (F_OFD_SETLKW), not a poll. A start that finds
//! every slot taken waits on one of them, picked by its process and thread, so waiters
//! spread over the slots; one may wait while another slot is free, for at most one start.
//!
//! Pods already running go first: a new VM's start first passes a turnstile (one more byte
//! lock) that only one new VM at a time may hold while it waits for a slot, so the next
//! steps of pods whose VM runs (their containers' creates and starts) compete with one new
//! VM, not with every pod still queued. Pods then finish one after another instead of all
//! near the end, and fewer restored guests sit waiting (an idle guest is not free where its
//! kernel is emulated).

use crate::config::Config;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The lock file's name, beside the sandboxes directory (whose entries are all pods).
const SLOTS_FILE: &str = "start-slots.lock";
/// The new VMs' turnstile: a byte past every slot, whatever a shim's configuration says.
const TURNSTILE: u32 = crate::config::MAX_CONCURRENT_STARTS;

/// What takes a slot: a new VM's start, or a step in a pod whose VM runs (which goes first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartKind {
    NewVm,
    InRunningVm,
}

/// A held slot: released when dropped (the description closes) or when the process dies.
#[derive(Debug)]
pub struct StartSlot {
    _file: Option<File>,
}

/// Where the slots of `config` live: beside its sandboxes directory, so that shims with
/// one configuration share them and a test's private configuration has its own.
pub fn slots_path(config: &Config) -> PathBuf {
    let parent = config.sandboxes_dir.parent().unwrap_or(Path::new("/"));
    parent.join(SLOTS_FILE)
}

/// Takes a start slot for `what` (logged if it has to wait). A slot that cannot be had
/// for another reason than being taken (the file cannot be opened or locked) lets the
/// start go ahead with a warning: the bound protects starts, it must not fail them.
pub fn enter(config: &Config, kind: StartKind, what: &str) -> StartSlot {
    if config.concurrent_starts == 0 {
        return StartSlot { _file: None };
    }
    match acquire(&slots_path(config), config.concurrent_starts, kind, what) {
        Ok(file) => StartSlot { _file: Some(file) },
        Err(e) => {
            log::warn!("{what}: going ahead without a start slot: {e}");
            StartSlot { _file: None }
        }
    }
}

fn acquire(path: &Path, slots: u32, kind: StartKind, what: &str) -> std::io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    if kind == StartKind::NewVm && !lock_byte(&file, TURNSTILE, false)? {
        log::info!("{what}: another new VM is waiting for a start slot; waiting behind it");
        lock_byte(&file, TURNSTILE, true)?;
    }
    let slot = take_slot(&file, slots, what);
    if kind == StartKind::NewVm {
        unlock_byte(&file, TURNSTILE)?;
    }
    slot.map(|()| file)
}

/// Takes a free slot, or waits for one.
fn take_slot(file: &File, slots: u32, what: &str) -> std::io::Result<()> {
    for slot in 0..slots {
        if lock_byte(file, slot, false)? {
            return Ok(());
        }
    }
    let slot = spread(slots);
    log::info!("{what}: all {slots} start slots of the host are taken; waiting for slot {slot}");
    let waiting = Instant::now();
    lock_byte(file, slot, true)?;
    log::info!("{what}: got start slot {slot} after {:.3} s", waiting.elapsed().as_secs_f64());
    Ok(())
}

/// The slot a waiter waits on: its process and thread, spread over the slots.
fn spread(slots: u32) -> u32 {
    // SAFETY: gettid takes no arguments and cannot fail.
    let tid = unsafe { libc::gettid() } as u32;
    (std::process::id().wrapping_mul(31).wrapping_add(tid)) % slots
}

/// Write-locks byte `slot` of `file` through its open file description: `Ok(false)` if
/// another description holds it and `wait` is off.
fn lock_byte(file: &File, slot: u32, wait: bool) -> std::io::Result<bool> {
    set_byte_lock(file, slot, libc::F_WRLCK, wait)
}

/// Releases byte `slot`'s lock held through `file`'s description.
fn unlock_byte(file: &File, slot: u32) -> std::io::Result<()> {
    set_byte_lock(file, slot, libc::F_UNLCK, false).map(|_| ())
}

/// The lock request `kind` (F_WRLCK, F_UNLCK) on byte `slot`.
fn byte_lock(slot: u32, kind: libc::c_int) -> libc::flock {
    // SAFETY: a zeroed flock is a valid value; the fields that matter are set below.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = libc::off_t::from(slot);
    lock.l_len = 1;
    lock
}

fn set_byte_lock(file: &File, slot: u32, kind: libc::c_int, wait: bool) -> std::io::Result<bool> {
    let lock = byte_lock(slot, kind);
    let command = if wait { libc::F_OFD_SETLKW } else { libc::F_OFD_SETLK };
    loop {
        // SAFETY: a valid descriptor and a pointer to a flock that outlives the call.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), command, &lock) };
        if rc == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) | Some(libc::EACCES) if !wait => return Ok(false),
            _ => return Err(std::io::Error::new(e.kind(), format!("locking start slot {slot}: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Barrier};

    /// Whether another description holds byte `slot` (F_OFD_GETLK: asks, takes nothing).
    fn held_elsewhere(file: &File, slot: u32) -> bool {
        let mut lock = byte_lock(slot, libc::F_WRLCK);
        // SAFETY: a valid descriptor and a pointer to a flock that outlives the call;
        // F_OFD_GETLK only fills it in.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut lock) };
        assert_eq!(rc, 0, "F_OFD_GETLK: {}", std::io::Error::last_os_error());
        lock.l_type != libc::F_UNLCK as libc::c_short
    }

    fn config(dir: &Path, slots: u32) -> Config {
        let text = format!("[runtime]\nsandboxes_dir = {:?}\nconcurrent_starts = {slots}\n", dir.join("sb"));
        Config::parse(&text, None).expect("config")
    }

    /// Never more holders than slots, however many threads (each its own description,
    /// as separate shims would be) want one at once; and everyone gets one in the end.
    #[test]
    fn at_most_the_configured_number_hold_a_slot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = Arc::new(config(dir.path(), 2));
        let (inside, most, done) =
            (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let barrier = Arc::new(Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let (config, inside, most, done, barrier) =
                    (config.clone(), inside.clone(), most.clone(), done.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    let _slot = enter(&config, StartKind::NewVm, &format!("start {i}"));
                    let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(std::time::Duration::from_millis(30));
                    inside.fetch_sub(1, Ordering::SeqCst);
                    done.fetch_add(1, Ordering::SeqCst);
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        assert_eq!(done.load(Ordering::SeqCst), 8);
        assert_eq!(most.load(Ordering::SeqCst), 2, "two slots: two at once, no more, no fewer");
        assert!(slots_path(&config).starts_with(dir.path()), "the slots are the configuration's");
    }

    /// A holder's slot is free again once it is dropped, or once its holder dies.
    #[test]
    fn a_slot_is_freed_by_drop_and_by_the_death_of_its_holder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = config(dir.path(), 1);
        let first = enter(&config, StartKind::InRunningVm, "first");
        let path = slots_path(&config);
        let other = File::options().read(true).write(true).open(&path).expect("open");
        assert!(!lock_byte(&other, 0, false).expect("try"), "the slot is held");
        drop(first);
        assert!(lock_byte(&other, 0, false).expect("try"), "dropped: free");
        drop(other);
        // A forked child inherits the holder's description (as a VMM spawned with it
        // would): the slot stays held while the child lives, and is freed at its death.
        let holder = enter(&config, StartKind::NewVm, "holder");
        // SAFETY: fork in a test process; the child only pauses until it is killed
        // (async-signal-safe calls only).
        let child = unsafe { libc::fork() };
        if child == 0 {
            // SAFETY: see above.
            unsafe {
                libc::pause();
                libc::_exit(0)
            }
        }
        assert!(child > 0, "fork: {}", std::io::Error::last_os_error());
        drop(holder);
        // The child still holds the description...
        let probe = File::options().read(true).write(true).open(&path).expect("open");
        assert!(!lock_byte(&probe, 0, false).expect("try"), "held through the child's copy");
        // ...until the child dies.
        // SAFETY: signalling and reaping our own child.
        unsafe {
            libc::kill(child, libc::SIGKILL);
            libc::waitpid(child, std::ptr::null_mut(), 0);
        }
        assert!(lock_byte(&probe, 0, false).expect("try"), "the holder died: free");
    }

    /// A new VM waits behind the one new VM already waiting for a slot (at the turnstile),
    /// while a step in a running VM competes for the slot at once: with one slot held, new
    /// VMs B then C and a running pod's step D queued, C never gets the slot before B.
    #[test]
    fn new_vms_queue_at_the_turnstile_and_running_pods_do_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = Arc::new(config(dir.path(), 1));
        let held = enter(&config, StartKind::InRunningVm, "a");
        let path = slots_path(&config);
        let probe = File::options().read(true).write(true).open(&path).expect("open");
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let start = |name: &'static str, kind: StartKind| {
            let (config, order) = (config.clone(), order.clone());
            std::thread::spawn(move || {
                let _slot = enter(&config, kind, name);
                order.lock().expect("order").push(name);
                std::thread::sleep(std::time::Duration::from_millis(20));
            })
        };
        let wait_until = |what: &str, done: &dyn Fn() -> bool| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !done() {
                assert!(std::time::Instant::now() < deadline, "{what}");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        };
        let b = start("b", StartKind::NewVm);
        wait_until("b holds the turnstile", &|| held_elsewhere(&probe, TURNSTILE));
        let c = start("c", StartKind::NewVm);
        let d = start("d", StartKind::InRunningVm);
        // Let c reach the turnstile and d the slot before the slot frees.
        std::thread::sleep(std::time::Duration::from_millis(100));
        drop(held);
        for t in [b, c, d] {
            t.join().expect("thread");
        }
        let order = order.lock().expect("order").clone();
        assert_eq!(order.len(), 3, "{order:?}");
        let at = |n: &str| order.iter().position(|o| *o == n).expect("ran");
        assert!(at("b") < at("c"), "a new VM overtook the one waiting before it: {order:?}");
        assert!(!held_elsewhere(&probe, TURNSTILE), "the turnstile is free again");
    }

    #[test]
    fn zero_slots_means_no_bound() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = config(dir.path(), 0);
        let slots: Vec<_> = (0..5).map(|i| enter(&config, StartKind::NewVm, &format!("{i}"))).collect();
        assert!(slots.iter().all(|s| s._file.is_none()));
        assert!(!slots_path(&config).exists(), "no lock file without a bound");
    }
}
