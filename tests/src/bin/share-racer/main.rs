//! The hostile guest of the CRI suite (tests/tests/cri_pod.rs): run as root with
//! CAP_SYS_ADMIN in a container of a nestbox pod, it mounts the pod's virtio-fs share (tag
//! `nestbox`) a second time and, until a stop file appears or its time is up, races the host
//! while the host creates containers in the pod. Every step it lists the share: a container
//! directory that has just appeared gets symlinks at once where its `rootfs` and
//! `mounts/<n>` are about to be made (five passes), and one more piece of the sweep over
//! everything runs, in which it tries what a guest would to turn the host's work against it:
//!
//! - `top` (the share's root), `cid` (`<cid>/`, its `rootfs` and `mounts` entries) and
//!   `mounts` (`<cid>/mounts/<n>`, n = 0..11, existing or not yet): the host-only tree, where
//!   the shim creates and mounts. It puts symlinks (to the host's canary directory and to
//!   `/`) where those entries are or will be, renames and removes them, moves a prepared
//!   symlink over them, and plants files, setuid files, device nodes, hard links, symlinks
//!   and directories in their directories, changes their modes, and sets
//!   `security.capability` and `trusted.*` xattrs on them. Nothing of this may be made.
//! - `rootfs` (its own container's rootfs, reached through the share), `volume` (a writable
//!   volume: a `<cid>/mounts/<n>` holding a `volume-rw` file) and `ro-volume` (one holding
//!   `volume-ro`): the same plants. The guest owns a rootfs and a writable volume, so files,
//!   setuid files, links and directories are made there; device nodes and those xattrs are
//!   refused by the VMM's virtio-fs guard; nothing is made in a read-only volume.
//!
//! usage: `share-racer --canary HOST_DIR --started FILE --stop FILE --secs N [--share DIR]
//! [--no-mount]` (`--no-mount`: the share is at DIR already, for a dry run on the host)
//!
//! It writes `--started` once it has found its own container's directory in the share. A stop
//! file ends it once every container directory seen has been swept whole at least once. It
//! prints at the end `race: steps=N sweeps=S secs=T own=CID`, one `race: cid CID
//! first-seen-step=N rootfs=absent|empty|populated binds=K` per container directory seen (what
//! its rootfs and binds were when it first saw it), and one
//! `race: KIND attempts=N made=M errors=EROFSxN,... first-made=PATH first-error=ERROR` per kind
//! (`ACTION-PLACE`). What it planted in volumes (host folders) it removes before it ends; it
//! unmounts its share. Exits 1 when it cannot mount the share.
//!
//! Built for x86_64-unknown-linux-musl (static): it runs in any container image.

mod at;
mod tally;
mod watch;

use at::At;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};
use tally::Tally;
use watch::BINDS;

/// The virtio-fs tag of the pod's share.
const TAG: &str = "nestbox";
/// The files the test puts in its volumes, telling a writable one from a read-only one.
const VOLUME_RW: &str = "volume-rw";
const VOLUME_RO: &str = "volume-ro";
/// Top-level names a guest can guess besides the container directories it sees.
const TOP_GUESSES: [&str; 3] = ["evil", "mounts", "shared"];
/// Entries of a container directory, existing or not yet.
const CID_ENTRIES: [&str; 3] = ["rootfs", "mounts", "evil"];
/// What the plants are called; removed again each sweep where the guest may write.
const PLANTS: [&str; 8] =
    ["racer-file", "racer-suid", "racer-chr", "racer-blk", "racer-hardlink", "racer-link", "racer-dir", "racer-swap"];

struct Args {
    canary: PathBuf,
    started: PathBuf,
    stop: PathBuf,
    secs: u64,
    share: PathBuf,
    /// The share is already at `share` (a dry run on the host against a tree made there).
    no_mount: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        canary: PathBuf::new(),
        started: PathBuf::new(),
        stop: PathBuf::new(),
        secs: 0,
        share: PathBuf::from("/race-share"),
        no_mount: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--no-mount" {
            args.no_mount = true;
            continue;
        }
        let value = it.next().ok_or_else(|| format!("{flag} without a value"))?;
        match flag.as_str() {
            "--canary" => args.canary = value.into(),
            "--started" => args.started = value.into(),
            "--stop" => args.stop = value.into(),
            "--secs" => args.secs = value.parse().map_err(|e| format!("--secs {value}: {e}"))?,
            "--share" => args.share = value.into(),
            _ => return Err(format!("unknown argument {flag}")),
        }
    }
    if args.canary.as_os_str().is_empty() || args.started.as_os_str().is_empty() || args.stop.as_os_str().is_empty() {
        return Err("--canary, --started and --stop are needed".into());
    }
    if args.secs == 0 || args.secs > 3600 {
        return Err(format!("--secs {} is not within 1..=3600", args.secs));
    }
    Ok(args)
}

/// A file capability (vfs_cap_data revision 2) granting every capability, effective.
fn all_capabilities() -> Vec<u8> {
    [0x0200_0001u32, u32::MAX, 0, 0x1ff, 0].iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// One piece of the sweep.
enum Step {
    Top,
    Own,
    Entries(String),
    Binds(String),
    Plants(String),
}

fn steps_of(cid: &str) -> Vec<Step> {
    vec![Step::Entries(cid.to_string()), Step::Binds(cid.to_string()), Step::Plants(cid.to_string())]
}

struct Racer {
    args: Args,
    tally: Tally,
    share: Rc<At>,
    /// The directory the stop file will appear in, and its name.
    stop: (At, String),
    /// The racer's own container: its directory's name and its rootfs in the share.
    own: Option<(String, At)>,
    /// The file it made in its own root to find that directory.
    self_mark: String,
    /// Directories below the share opened so far, by their path below it.
    open: BTreeMap<String, Rc<At>>,
    /// Container directories seen, with the step they were first seen in, and their state then.
    seen: BTreeMap<String, u64>,
    first_state: Vec<String>,
    queue: VecDeque<Step>,
    /// What has been swept whole at least once: container directories, "top", "own".
    swept: BTreeSet<String>,
    /// The writable volume planted in this sweep (it is one host folder whoever mounts it),
    /// and the read-only one tried.
    volume: Option<Rc<At>>,
    ro_volume_done: bool,
    steps: u64,
    sweeps: u64,
}

impl Racer {
    fn new(args: Args) -> io::Result<Racer> {
        let share = Rc::new(At::open(&args.share)?);
        let stop_dir = At::open(args.stop.parent().unwrap_or(Path::new("/")))?;
        let stop_name = args.stop.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        Ok(Racer {
            args,
            tally: Tally::default(),
            share,
            stop: (stop_dir, stop_name),
            own: None,
            self_mark: format!("racer-self-{}", std::process::id()),
            open: BTreeMap::new(),
            seen: BTreeMap::new(),
            first_state: Vec::new(),
            queue: VecDeque::new(),
            swept: BTreeSet::new(),
            volume: None,
            ro_volume_done: false,
            steps: 0,
            sweeps: 0,
        })
    }

    /// `rel` below the share (`<cid>` or `<cid>/mounts`...), opened once.
    fn dir(&mut self, rel: &str) -> Option<Rc<At>> {
        if let Some(dir) = self.open.get(rel) {
            return Some(dir.clone());
        }
        let mut dir = None::<At>;
        for part in rel.split('/') {
            dir = Some(dir.as_ref().unwrap_or(&self.share).sub(part).ok()?);
        }
        let dir = Rc::new(dir?);
        self.open.insert(rel.to_string(), dir.clone());
        Some(dir)
    }

    fn find_own(&mut self) {
        for cid in self.share.dirs() {
            if let Ok(rootfs) = self.share.sub(&cid).and_then(|d| d.sub("rootfs")) {
                if rootfs.exists(&self.self_mark) {
                    self.own = Some((cid, rootfs));
                    return;
                }
            }
        }
    }

    fn covered(&self) -> bool {
        let own = self.own.is_none() || self.swept.contains("own");
        own && self.swept.contains("top") && self.seen.keys().all(|cid| self.swept.contains(cid))
    }

    fn stop_requested(&self) -> bool {
        self.stop.0.exists(&self.stop.1)
    }

    /// One step: the share listed, new container directories noted (and queued first), and
    /// one piece of the sweep.
    fn step(&mut self) {
        self.steps += 1;
        if self.own.is_none() {
            self.find_own();
        }
        for cid in self.share.dirs() {
            if !self.seen.contains_key(&cid) {
                self.first_seen(&cid);
                for step in steps_of(&cid).into_iter().rev() {
                    self.queue.push_front(step);
                }
            }
        }
        match self.queue.pop_front() {
            Some(step) => self.run(step),
            None => self.refill(),
        }
    }

    fn refill(&mut self) {
        self.sweeps += 1;
        self.volume = None;
        self.ro_volume_done = false;
        self.queue.extend([Step::Top, Step::Own]);
        let cids: Vec<String> = self.seen.keys().cloned().collect();
        for cid in cids {
            self.queue.extend(steps_of(&cid));
        }
    }

    fn first_seen(&mut self, cid: &str) {
        let rootfs = match self.share.sub(cid).and_then(|d| d.sub("rootfs")).map(|r| r.entries()) {
            Err(_) => "absent",
            Ok(0) => "empty",
            Ok(_) => "populated",
        };
        let binds = self.share.sub(cid).and_then(|d| d.sub("mounts")).map_or(0, |m| m.entries());
        let line = format!("race: cid {cid} first-seen-step={} rootfs={rootfs} binds={binds}", self.steps);
        self.first_state.push(line);
        self.seen.insert(cid.to_string(), self.steps);
    }

    fn run(&mut self, step: Step) {
        match step {
            Step::Top => {
                let share = self.share.clone();
                let names: Vec<String> = self.seen.keys().cloned().chain(TOP_GUESSES.map(String::from)).collect();
                for name in names {
                    self.swap(&share, &name, "top");
                }
                self.plant(&share, "top", true);
                self.swept.insert("top".into());
            }
            Step::Own => {
                let Some((cid, rootfs)) = self.own.take() else { return };
                clear(&rootfs);
                self.plant(&rootfs, "rootfs", false);
                self.own = Some((cid, rootfs));
                self.swept.insert("own".into());
            }
            Step::Entries(cid) => {
                let Some(dir) = self.dir(&cid) else { return };
                for name in CID_ENTRIES {
                    self.swap(&dir, name, "cid");
                }
            }
            Step::Binds(cid) => (0..BINDS).for_each(|n| self.bind(&cid, n)),
            Step::Plants(cid) => {
                if let Some(dir) = self.dir(&cid) {
                    self.plant(&dir, "cid", true);
                }
                if let Some(mounts) = self.dir(&format!("{cid}/mounts")) {
                    self.plant(&mounts, "mounts", true);
                }
                self.swept.insert(cid);
            }
        }
    }

    /// Puts symlinks where `name` in `dir` is or will be; if it is there, moves a prepared
    /// symlink over it, renames and removes it.
    fn swap(&mut self, dir: &At, name: &str, place: &str) {
        let shown = dir.shown(name);
        for target in [self.args.canary.clone(), PathBuf::from("/")] {
            self.tally.note("symlink", place, &shown, dir.symlink(&target, name));
        }
        if !dir.exists(name) {
            return;
        }
        if let Some((_, own)) = &self.own {
            // Made where the guest may write (its rootfs), then moved over the entry.
            if own.exists("racer-swap") || own.symlink(&self.args.canary, "racer-swap").is_ok() {
                self.tally.note("rename", place, &shown, own.rename("racer-swap", dir, name));
            }
        }
        self.tally.note("rename", place, &shown, dir.rename(name, dir, &format!("{name}.racer")));
        self.tally.note("remove", place, &shown, dir.remove(name));
    }

    /// `<cid>/mounts/<n>` swapped; a volume mounted there planted in, once per sweep.
    fn bind(&mut self, cid: &str, n: u32) {
        let Some(mounts) = self.dir(&format!("{cid}/mounts")) else { return };
        let name = n.to_string();
        self.swap(&mounts, &name, "mounts");
        let Ok(bind) = mounts.sub(&name) else { return };
        if bind.exists(VOLUME_RW) && self.volume.is_none() {
            clear(&bind);
            self.plant(&bind, "volume", false);
            self.volume = Some(Rc::new(bind));
        } else if bind.exists(VOLUME_RO) && !self.ro_volume_done {
            self.plant(&bind, "ro-volume", false);
            self.ro_volume_done = true;
        }
    }

    /// Plants every kind of entry in `dir`. `host_only`: a directory where the host works,
    /// whose own mode and xattrs are tried too (elsewhere the xattrs go on a file of the
    /// guest's and the directory's mode is the guest's business).
    fn plant(&mut self, dir: &At, place: &str, host_only: bool) {
        let t = &mut self.tally;
        let canary = &self.args.canary;
        t.note("file", place, &dir.shown("racer-file"), dir.create("racer-file", 0o644));
        t.note("setuid", place, &dir.shown("racer-suid"), dir.create("racer-suid", 0o4755));
        t.note("mknod", place, &dir.shown("racer-chr"), dir.mknod("racer-chr", libc::S_IFCHR, 1, 3));
        t.note("mknod", place, &dir.shown("racer-blk"), dir.mknod("racer-blk", libc::S_IFBLK, 8, 0));
        t.note("mkdir", place, &dir.shown("racer-dir"), dir.mkdir("racer-dir"));
        t.note("symlink", place, &dir.shown("racer-link"), dir.symlink(canary, "racer-link"));
        let hardlink = dir.shown("racer-hardlink");
        match (&self.own, host_only) {
            (Some((_, own)), true) => {
                t.note("link", place, &hardlink, dir.link(own, &self.self_mark, "racer-hardlink"))
            }
            _ => t.note("link", place, &hardlink, dir.link(dir, "racer-file", "racer-hardlink")),
        }
        let (on, shown) =
            if host_only { (None, dir.path().to_path_buf()) } else { (Some("racer-file"), dir.shown("racer-file")) };
        t.note("xattr", place, &shown, dir.set_xattr(on, "security.capability", &all_capabilities()));
        t.note("xattr", place, &shown, dir.set_xattr(on, "trusted.overlay.opaque", b"y"));
        if host_only {
            t.note("chmod", place, dir.path(), dir.chmod(0o777));
        }
    }
}

/// Removes the previous sweep's plants where the guest may write.
fn clear(dir: &At) {
    for name in PLANTS {
        let _ = dir.remove(name);
    }
}

fn mount_share(share: &Path) -> Result<(), String> {
    std::fs::create_dir_all(share).map_err(|e| format!("creating {}: {e}", share.display()))?;
    let target = std::ffi::CString::new(share.as_os_str().as_encoded_bytes()).unwrap_or_default();
    let source = std::ffi::CString::new(TAG).unwrap_or_default();
    // SAFETY: NUL-terminated strings and no data.
    let res = unsafe { libc::mount(source.as_ptr(), target.as_ptr(), c"virtiofs".as_ptr(), 0, std::ptr::null()) };
    match res {
        0 => Ok(()),
        _ => Err(format!("mounting virtio-fs {TAG} on {}: {}", share.display(), io::Error::last_os_error())),
    }
}

fn main() {
    let args = parse_args().unwrap_or_else(|e| {
        eprintln!("share-racer: {e}\nusage: share-racer --canary HOST_DIR --started FILE --stop FILE --secs N [--share DIR] [--no-mount]");
        std::process::exit(2)
    });
    // The agent and the host's work in the guest come first; the racer takes the rest.
    // SAFETY: no memory arguments.
    unsafe { libc::setpriority(libc::PRIO_PROCESS as _, 0, 19) };
    if !args.no_mount {
        if let Err(e) = mount_share(&args.share) {
            println!("race: FAIL {e}");
            std::process::exit(1);
        }
    }
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.secs);
    let self_mark = format!("racer-self-{}", std::process::id());
    let _ = std::fs::write(Path::new("/").join(self_mark), "the racer's own root");
    let mut racer = Racer::new(args).unwrap_or_else(|e| {
        println!("race: FAIL opening the share or the stop file's directory: {e}");
        std::process::exit(1)
    });
    racer.find_own();
    let watcher = watch::Watcher::start(&racer.args.share, &racer.args.canary);
    let _ = std::fs::write(&racer.args.started, "racing\n");
    while Instant::now() < deadline && !(racer.covered() && racer.stop_requested()) {
        racer.step();
    }
    let watched = watcher.stop();
    finish(&mut racer, watched, started.elapsed());
}

/// Removes the plants from the volume (a host folder), unmounts, prints the tally (the
/// watcher's merged in).
fn finish(racer: &mut Racer, watched: watch::Watched, took: Duration) {
    if let Some(volume) = &racer.volume {
        clear(volume);
    }
    if let Some((_, own)) = &racer.own {
        let _ = own.remove("racer-swap");
    }
    let _ = std::fs::remove_file(&racer.args.started);
    if !racer.args.no_mount {
        let target = std::ffi::CString::new(racer.args.share.as_os_str().as_encoded_bytes()).unwrap_or_default();
        // SAFETY: a NUL-terminated path.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
    let own = racer.own.as_ref().map_or("-", |(cid, _)| cid.as_str());
    let secs = took.as_secs_f64();
    println!("race: steps={} sweeps={} secs={secs:.1} own={own}", racer.steps, racer.sweeps);
    println!("race: watcher listings={}", watched.listings);
    for line in racer.first_state.iter().chain(&watched.first_hits) {
        println!("{line}");
    }
    racer.tally.merge(watched.tally);
    racer.tally.print();
}
