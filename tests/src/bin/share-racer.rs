//! The hostile guest of the CRI suite (tests/tests/cri_pod.rs): run as root with
//! CAP_SYS_ADMIN in a container of a nestbox pod, it mounts the pod's virtio-fs share (tag
//! `nestbox`) a second time and, until a stop file appears or its time is up, races the host
//! while the host creates containers in the pod: every round it lists the share and, for every
//! container directory there (those that appear while it runs first), tries what a guest
//! would to turn the host's own work against it:
//!
//! - `top` (the share's root), `cid` (`<cid>/`, its `rootfs` and `mounts` entries) and
//!   `mounts` (`<cid>/mounts/<n>`, n = 0..8, existing or not yet): the host-only tree, where
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
//! It writes `--started` once its first round is done, and prints at the end
//! `race: rounds=R secs=S own=CID`, one `race: cid CID first-seen-round=R rootfs=... binds=K`
//! per container directory seen (the state its rootfs was in then), and one
//! `race: KIND attempts=N made=M errors=EROFSxN,... first-made=PATH first-error=ERROR` per kind
//! (`ACTION-PLACE`). What it planted in volumes (host folders) it removes before it ends; it
//! unmounts its share. Exits 1 when it cannot mount the share.
//!
//! Built for x86_64-unknown-linux-musl (static): it runs in any container image.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The virtio-fs tag of the pod's share.
const TAG: &str = "nestbox";
/// The files the test puts in its volumes, telling a writable one from a read-only one.
const VOLUME_RW: &str = "volume-rw";
const VOLUME_RO: &str = "volume-ro";
/// Top-level names a guest can guess besides the container directories it sees.
const TOP_GUESSES: [&str; 3] = ["evil", "mounts", "shared"];
/// Entries of a container directory, existing or not yet.
const CID_ENTRIES: [&str; 3] = ["rootfs", "mounts", "evil"];
/// `<cid>/mounts/<n>` tried for n below this.
const BINDS: u32 = 9;
/// What the plants are called; removed again each round where the guest may write.
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

#[derive(Default)]
struct Count {
    attempts: u64,
    made: u64,
    first_made: Option<String>,
    first_error: Option<String>,
    /// How often each errno came back.
    errors: BTreeMap<i32, u64>,
}

/// Attempts and successes per kind (`ACTION-PLACE`).
#[derive(Default)]
struct Tally(BTreeMap<String, Count>);

impl Tally {
    fn note(&mut self, action: &str, place: &str, what: &Path, result: io::Result<()>) {
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

    fn print(&self) {
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

fn errno_name(errno: i32) -> String {
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

fn cstr(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap_or_default()
}

fn check(res: libc::c_int) -> io::Result<()> {
    if res == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn mknod(path: &Path, kind: libc::mode_t, major: u32, minor: u32) -> io::Result<()> {
    let path = cstr(path);
    // SAFETY: a NUL-terminated path; no memory is written.
    check(unsafe { libc::mknod(path.as_ptr(), kind | 0o666, libc::makedev(major, minor)) })
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let (path, name) = (cstr(path), CString::new(name).unwrap_or_default());
    // SAFETY: NUL-terminated path and name, and a value of the length passed, only read.
    check(unsafe { libc::lsetxattr(path.as_ptr(), name.as_ptr(), value.as_ptr().cast(), value.len(), 0) })
}

/// A file capability (vfs_cap_data revision 2) granting every capability, effective.
fn all_capabilities() -> Vec<u8> {
    [0x0200_0001u32, u32::MAX, 0, 0x1ff, 0].iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// A new file with `mode` (setuid bits set again after the create, as a guest would).
fn create(path: &Path, mode: u32) -> io::Result<()> {
    std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    let now = std::fs::symlink_metadata(path)?.permissions().mode() & 0o7777;
    match now == mode {
        true => Ok(()),
        false => Err(io::Error::other(format!("mode {now:o} instead of {mode:o}"))),
    }
}

fn exists(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

fn remove(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path)?.is_dir() {
        true => std::fs::remove_dir(path),
        false => std::fs::remove_file(path),
    }
}

/// Names of the directories in `dir`, or none when it cannot be read.
fn dirs_in(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

struct Racer {
    args: Args,
    tally: Tally,
    /// The share's directory of the racer's own container, once found.
    own: Option<String>,
    /// The file it made in its own root to find that directory.
    self_mark: String,
    /// Container directories seen, with the round they were first seen in.
    seen: BTreeMap<String, u64>,
    /// What each seen container's rootfs held when first seen, and its binds then.
    first_state: Vec<String>,
    round: u64,
}

impl Racer {
    fn new(args: Args) -> Racer {
        let self_mark = format!("racer-self-{}", std::process::id());
        Racer {
            args,
            tally: Tally::default(),
            own: None,
            self_mark,
            seen: BTreeMap::new(),
            first_state: Vec::new(),
            round: 0,
        }
    }

    /// One round over the whole share. The share is listed again before each container, and
    /// a container that appeared since is taken next: the sooner the guest is at a new
    /// directory, the likelier it is there before the host has made its entries.
    fn round(&mut self) {
        self.round += 1;
        let share = self.args.share.clone();
        let mut done: Vec<String> = Vec::new();
        loop {
            let mut cids = dirs_in(&share);
            cids.retain(|cid| !done.contains(cid));
            cids.sort_by_key(|cid| self.seen.contains_key(cid));
            let Some(cid) = cids.into_iter().next() else { break };
            if !self.seen.contains_key(&cid) {
                self.first_seen(&cid);
            }
            if self.own.is_none() && exists(&share.join(&cid).join("rootfs").join(&self.self_mark)) {
                self.own = Some(cid.clone());
            }
            self.container(&share.join(&cid));
            done.push(cid);
        }
        let top: Vec<PathBuf> = done.iter().map(String::as_str).chain(TOP_GUESSES).map(|n| share.join(n)).collect();
        for entry in &top {
            self.swap(entry, "top");
        }
        self.plant(&share, "top", true);
        if let Some(own) = self.own.clone() {
            let rootfs = share.join(own).join("rootfs");
            self.clear(&rootfs);
            self.plant(&rootfs, "rootfs", false);
        }
    }

    fn first_seen(&mut self, cid: &str) {
        let dir = self.args.share.join(cid);
        let rootfs = match std::fs::read_dir(dir.join("rootfs")).map(|mut e| e.next().is_some()) {
            Err(_) => "absent",
            Ok(false) => "empty",
            Ok(true) => "populated",
        };
        let binds = std::fs::read_dir(dir.join("mounts")).map_or(0, |e| e.count());
        self.first_state.push(format!("race: cid {cid} first-seen-round={} rootfs={rootfs} binds={binds}", self.round));
        self.seen.insert(cid.to_string(), self.round);
    }

    /// Everything tried in and below one container's directory.
    fn container(&mut self, dir: &Path) {
        for name in CID_ENTRIES {
            self.swap(&dir.join(name), "cid");
        }
        self.plant(dir, "cid", true);
        let binds = dir.join("mounts");
        for n in 0..BINDS {
            let bind = binds.join(n.to_string());
            self.swap(&bind, "mounts");
            let place = match (exists(&bind.join(VOLUME_RW)), exists(&bind.join(VOLUME_RO))) {
                (true, _) => "volume",
                (_, true) => "ro-volume",
                _ => continue,
            };
            self.clear(&bind);
            self.plant(&bind, place, false);
        }
        self.plant(&binds, "mounts", true);
    }

    /// Puts a symlink where `entry` is or will be, moves and removes it.
    fn swap(&mut self, entry: &Path, place: &str) {
        for target in [self.args.canary.clone(), PathBuf::from("/")] {
            let result = std::os::unix::fs::symlink(&target, entry);
            self.tally.note("symlink", place, entry, result);
        }
        if let Some(own) = &self.own {
            // A symlink made where the guest may write, moved over the entry.
            let swap = self.args.share.join(own).join("rootfs").join("racer-swap");
            let _ = std::fs::remove_file(&swap);
            if std::os::unix::fs::symlink(&self.args.canary, &swap).is_ok() {
                let result = std::fs::rename(&swap, entry);
                self.tally.note("rename", place, entry, result);
            }
        }
        if exists(entry) {
            let mut moved = entry.as_os_str().to_owned();
            moved.push(".racer");
            let result = std::fs::rename(entry, &moved);
            self.tally.note("rename", place, entry, result);
            self.tally.note("remove", place, entry, remove(entry));
        }
    }

    /// Plants every kind of entry in `dir`; `host_only` adds a mode change of `dir` itself
    /// (in a rootfs or a volume that is the guest's own business).
    fn plant(&mut self, dir: &Path, place: &str, host_only: bool) {
        let at = |name: &str| dir.join(name);
        self.tally.note("file", place, &at("racer-file"), create(&at("racer-file"), 0o644));
        self.tally.note("setuid", place, &at("racer-suid"), create(&at("racer-suid"), 0o4755));
        self.tally.note("mknod", place, &at("racer-chr"), mknod(&at("racer-chr"), libc::S_IFCHR, 1, 3));
        self.tally.note("mknod", place, &at("racer-blk"), mknod(&at("racer-blk"), libc::S_IFBLK, 8, 0));
        self.tally.note("mkdir", place, &at("racer-dir"), std::fs::create_dir(at("racer-dir")));
        let link = std::os::unix::fs::symlink(&self.args.canary, at("racer-link"));
        self.tally.note("symlink", place, &at("racer-link"), link);
        if let Some(own) = &self.own {
            let source = self.args.share.join(own).join("rootfs").join(&self.self_mark);
            let source = if exists(&at("racer-file")) { at("racer-file") } else { source };
            self.tally.note("link", place, &at("racer-hardlink"), std::fs::hard_link(source, at("racer-hardlink")));
        }
        // On the directory where the host works; on a file of the guest's own elsewhere.
        let target = if host_only { dir.to_path_buf() } else { at("racer-file") };
        let caps = all_capabilities();
        self.tally.note("xattr", place, &target, set_xattr(&target, "security.capability", &caps));
        self.tally.note("xattr", place, &target, set_xattr(&target, "trusted.overlay.opaque", b"y"));
        if host_only {
            let result = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777));
            self.tally.note("chmod", place, dir, result);
        }
    }

    /// Removes the previous round's plants where the guest may write.
    fn clear(&self, dir: &Path) {
        for name in PLANTS {
            let _ = remove(&dir.join(name));
        }
    }

    fn stop_requested(&self) -> bool {
        exists(&self.args.stop)
    }
}

fn mount_share(share: &Path) -> Result<(), String> {
    std::fs::create_dir_all(share).map_err(|e| format!("creating {}: {e}", share.display()))?;
    let (source, target, kind) = (CString::new(TAG).unwrap_or_default(), cstr(share), c"virtiofs");
    // SAFETY: NUL-terminated strings and no data.
    let res = unsafe { libc::mount(source.as_ptr(), target.as_ptr(), kind.as_ptr(), 0, std::ptr::null()) };
    check(res).map_err(|e| format!("mounting virtio-fs {TAG} on {}: {e}", share.display()))
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
    let mut racer = Racer::new(args);
    let _ = std::fs::write(Path::new("/").join(&racer.self_mark), "the racer's own root");
    while Instant::now() < deadline && !racer.stop_requested() {
        racer.round();
        if racer.round == 1 {
            let _ = std::fs::write(&racer.args.started, "racing\n");
        }
    }
    finish(&racer, started.elapsed());
}

/// Removes the plants from the volumes (the host's folders), unmounts, prints the tally.
fn finish(racer: &Racer, took: Duration) {
    let share = &racer.args.share;
    for cid in racer.seen.keys() {
        for n in 0..BINDS {
            let bind = share.join(cid).join("mounts").join(n.to_string());
            if exists(&bind.join(VOLUME_RW)) {
                racer.clear(&bind);
            }
        }
    }
    if let Some(own) = &racer.own {
        let _ = std::fs::remove_file(share.join(own).join("rootfs").join("racer-swap"));
    }
    let _ = std::fs::remove_file(&racer.args.started);
    if !racer.args.no_mount {
        let target = cstr(share);
        // SAFETY: a NUL-terminated path.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
    let own = racer.own.as_deref().unwrap_or("-");
    println!("race: rounds={} secs={:.1} own={own}", racer.round, took.as_secs_f64());
    for line in &racer.first_state {
        println!("{line}");
    }
    racer.tally.print();
}
