//! The hostile guest of the nestbox CRI pod (issue 15): `share-racer` (tests/src/bin) runs as
//! root with CAP_SYS_ADMIN in one of the pod's containers, mounts the pod's virtio-fs share
//! a second time and races symlink swaps, renames, setuid files, device nodes and privileged
//! xattrs in it while the host creates the pod's next containers (their rootfs and volumes
//! mounted in that very share). Then the host checks that nothing outside the containers'
//! own rootfs and volumes changed: its canary directory (the racer's symlink target besides
//! `/`) and `/`, the mounts outside the sandbox, the host-only tree itself, and that every
//! setuid file or device node in the sandbox tree is on a nosuid or nodev mount.

use nestbox_tests::containerd::Containerd;
use nestbox_tests::cri::{Cri, ExecOutput};
use nestbox_tests::{guest_binary, GUEST_DEADLINE};
use sha2::Digest;
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The files in the volumes that tell the racer a writable one from a read-only one.
const VOLUME_RW: &str = "volume-rw";
const VOLUME_RO: &str = "volume-ro";
/// The racer's own bound; the test stops it well before.
const RACER_SECS: u64 = 300;
/// Where the racer's start and stop files are: the emptyDir, as the container sees it.
const STARTED: &str = "racer-started";
const STOP: &str = "racer-stop";

/// Kinds of the racer (`ACTION-PLACE`) aimed at the host-only tree: none may make anything.
const HOST_ONLY_PLACES: [&str; 3] = ["top", "cid", "mounts"];
const HOST_ONLY_ACTIONS: [&str; 10] =
    ["symlink", "rename", "remove", "file", "setuid", "mknod", "mkdir", "link", "xattr", "chmod"];
/// In the guest's own rootfs and in a writable volume these are made (the control that the
/// racer really writes through its share); device nodes and the capability and trusted
/// xattrs are refused there by the virtio-fs guard; nothing at all in a read-only volume.
const OWNED_PLACES: [&str; 2] = ["rootfs", "volume"];
const OWNED_MADE: [&str; 5] = ["file", "setuid", "symlink", "link", "mkdir"];
const GUARDED: [&str; 2] = ["mknod", "xattr"];

/// Puts the racer and the volume markers into the pod's volumes.
pub fn prepare_volumes(empty_dir: &Path, tools: &Path) {
    std::fs::write(empty_dir.join(VOLUME_RW), "the pod's emptyDir\n").expect("writing the emptyDir's marker");
    std::fs::write(tools.join(VOLUME_RO), "read-only tools\n").expect("writing the tools' marker");
    std::fs::copy(guest_binary("share-racer"), tools.join("share-racer")).expect("copying share-racer");
}

/// A running racer and the host's state from before it started.
pub struct Race {
    racer: JoinHandle<Result<ExecOutput, String>>,
    empty_dir: PathBuf,
    sandbox: PathBuf,
    before: HostState,
    started: Instant,
}

/// Starts the racer in `container` (which has CAP_SYS_ADMIN, the emptyDir on /shared and
/// the tools on /tools) and returns once it has done its first round.
pub fn start(c: &Containerd, pod: &str, container: &str, empty_dir: &Path, tools: &Path) -> Race {
    let canary = c.dir.join("canary");
    std::fs::create_dir_all(canary.join("sub")).expect("creating the canary");
    std::fs::write(canary.join("file"), "canary\n").expect("writing the canary");
    std::fs::write(canary.join("sub/file"), "canary below\n").expect("writing the canary");
    let sandbox = c.sandboxes.join(pod);
    let before = HostState::read(&canary, tools, &sandbox);
    let (socket, container) = (c.socket.clone(), container.to_string());
    let args = [
        "/tools/share-racer".to_string(),
        "--canary".into(),
        canary.display().to_string(),
        "--started".into(),
        format!("/shared/{STARTED}"),
        "--stop".into(),
        format!("/shared/{STOP}"),
        "--secs".into(),
        RACER_SECS.to_string(),
    ];
    let racer = std::thread::spawn(move || {
        let cri = Cri::connect(&socket).map_err(|e| e.to_string())?;
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cri.exec_sync(&container, &args, RACER_SECS as i64 + 60, GUEST_DEADLINE).map_err(|e| e.to_string())
    });
    let started = Instant::now();
    while !empty_dir.join(STARTED).exists() {
        if racer.is_finished() {
            panic!("the racer ended before its first round: {:?}", racer.join());
        }
        assert!(started.elapsed() < Duration::from_secs(240), "the racer did not start racing");
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("hostile guest: racing after {:?}", started.elapsed());
    Race { racer, empty_dir: empty_dir.to_path_buf(), sandbox, before, started }
}

/// `three`, created while the racer ran, sees its volumes as the pod asked: the tools read
/// only with their content, the emptyDir writable and shared with the host.
pub fn check_volumes(cri: &Cri, container: &str, empty_dir: &Path) {
    let script = "cat /tools/volume-ro /shared/volume-rw; touch /tools/x 2>/dev/null && echo tools-writable; \
        echo from-three > /shared/three && echo wrote";
    let out = cri.exec_sync(container, &["sh", "-c", script], 0, GUEST_DEADLINE).expect("ExecSync");
    assert_eq!(out.stdout, "read-only tools\nthe pod's emptyDir\nwrote\n", "{out:?}");
    assert_eq!(std::fs::read_to_string(empty_dir.join("three")).expect("three's file on the host"), "from-three\n");
    std::fs::remove_file(empty_dir.join("three")).expect("removing three's file");
}

impl Race {
    /// Stops the racer and checks what it made and what the host sees. `containers`: every
    /// container of the pod (the pause's included), `during`: those created while it raced.
    /// Returns the host's state from before, for a last look once the pod is gone.
    pub fn finish(self, containers: &[&str], during: &[&str]) -> HostState {
        std::fs::write(self.empty_dir.join(STOP), "").expect("writing the racer's stop file");
        let out =
            self.racer.join().expect("the racer's thread").unwrap_or_else(|e| panic!("the racer's ExecSync: {e}"));
        eprintln!("hostile guest: raced {:?}\n{}{}", self.started.elapsed(), out.stdout, out.stderr);
        assert_eq!(out.exit_code, 0, "the racer failed: {out:?}");
        std::fs::remove_file(self.empty_dir.join(STOP)).expect("removing the stop file");
        let tally = Tally::parse(&out.stdout);
        tally.check();
        // Those created while it raced were hit by its watcher the moment they appeared,
        // and swept whole before it stopped.
        for cid in during {
            assert!(out.stdout.contains(&format!("race: new {cid} ")), "the racer never saw {cid} appear: {out:?}");
            assert!(out.stdout.contains(&format!("race: cid {cid} ")), "the racer never swept {cid}: {out:?}");
        }
        self.before.assert_unchanged("while the racer ran");
        assert_host_only_tree(&self.sandbox, containers);
        let setuid = assert_nosuid_nodev(&self.sandbox);
        let own = out.stdout.lines().find_map(|l| l.strip_prefix("race: steps=")?.split(" own=").nth(1));
        let own = own.unwrap_or_else(|| panic!("the racer's own container: {out:?}")).trim();
        let planted = format!("/{own}/rootfs/racer-suid");
        assert!(
            setuid.iter().any(|p| p.ends_with(&planted)),
            "the racer's setuid file in its rootfs, on a nosuid mount: {setuid:?}"
        );
        self.before
    }
}

/// The racer's summary: (attempts, made) per kind.
struct Tally(BTreeMap<String, (u64, u64)>);

impl Tally {
    fn parse(out: &str) -> Tally {
        let field = |line: &str, key: &str| -> Option<u64> {
            line.split(' ').find_map(|f| f.strip_prefix(key)).and_then(|v| v.parse().ok())
        };
        let kinds = out
            .lines()
            .filter_map(|l| {
                let kind = l.strip_prefix("race: ")?.split(' ').next()?;
                Some((kind.to_string(), (field(l, "attempts=")?, field(l, "made=")?)))
            })
            .collect();
        Tally(kinds)
    }

    fn get(&self, kind: &str) -> (u64, u64) {
        *self.0.get(kind).unwrap_or_else(|| panic!("no tally for {kind}: {:?}", self.0))
    }

    fn check(&self) {
        for place in HOST_ONLY_PLACES {
            for action in HOST_ONLY_ACTIONS {
                let kind = format!("{action}-{place}");
                let (attempts, made) = self.get(&kind);
                assert!(attempts > 0 && made == 0, "{kind}: {attempts} attempts, {made} made in the host-only tree");
            }
        }
        for place in OWNED_PLACES {
            for action in OWNED_MADE {
                let (attempts, made) = self.get(&format!("{action}-{place}"));
                assert!(made > 0, "{action}-{place}: the guest writes its own {place} ({made} of {attempts})");
            }
            for action in GUARDED {
                let (attempts, made) = self.get(&format!("{action}-{place}"));
                assert!(attempts > 0 && made == 0, "{action}-{place}: {made} of {attempts} past the guard");
            }
        }
        let ro: Vec<_> = self.0.iter().filter(|(kind, _)| kind.ends_with("-ro-volume")).collect();
        assert!(!ro.is_empty(), "the racer reached the read-only volume: {:?}", self.0);
        assert!(ro.iter().all(|(_, (_, made))| *made == 0), "made in the read-only volume: {ro:?}");
    }
}

/// What must not change on the host: the canary (the racer's symlink target), the tools
/// (a read-only volume), `/`'s entries, the mount points outside the sandbox.
pub struct HostState {
    canary: PathBuf,
    tools: PathBuf,
    sandbox: PathBuf,
    trees: Vec<Vec<String>>,
    root: BTreeSet<String>,
    mounts: BTreeMap<String, usize>,
}

impl HostState {
    fn read(canary: &Path, tools: &Path, sandbox: &Path) -> HostState {
        let root = std::fs::read_dir("/").expect("listing /");
        HostState {
            canary: canary.to_path_buf(),
            tools: tools.to_path_buf(),
            sandbox: sandbox.to_path_buf(),
            trees: vec![tree(canary), tree(tools)],
            root: root.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect(),
            mounts: mounts_outside(sandbox),
        }
    }

    /// Everything as it was (`when`: for the message). New mounts only: the end of the pod
    /// removes some.
    pub fn assert_unchanged(&self, when: &str) {
        let now = HostState::read(&self.canary, &self.tools, &self.sandbox);
        assert_eq!(now.trees, self.trees, "the canary or the tools changed {when}");
        assert_eq!(now.root, self.root, "the entries of / changed {when}");
        let new: Vec<_> =
            now.mounts.iter().filter(|(p, n)| self.mounts.get(*p).is_none_or(|before| *n > before)).collect();
        assert!(new.is_empty(), "mounts appeared outside the sandbox {when}: {new:?}");
    }
}

/// Every entry below `dir` (itself included) with its kind, mode, size, mtime and, for a
/// file, its contents; symlinks not followed.
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(path) = todo.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut line =
            format!("{} {:o} {} {}.{}", path.display(), meta.mode(), meta.size(), meta.mtime(), meta.mtime_nsec());
        if meta.is_file() {
            let bytes = std::fs::read(&path).unwrap_or_default();
            line.push_str(&format!(" {:x}", sha2::Sha256::digest(&bytes)));
        }
        if meta.is_dir() {
            let entries = std::fs::read_dir(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            todo.extend(entries.flatten().map(|e| e.path()));
        }
        out.push(line);
    }
    out.sort();
    out
}

/// The mount points outside the sandbox directory, each with how many mounts are stacked
/// there (a second mount on `/` is new too). Left out, as other tests on this machine make
/// and remove them while this one runs: tempfile's folders (`.tmp*` in the temporary
/// directory: the shim's unit tests), the folders and network namespaces of the other test
/// harnesses (`nbx-*`: the runc pod beside this one, a benchmark) and CNI's network
/// namespaces (`/run/netns`; this pod's was made before the racer started).
fn mounts_outside(sandbox: &Path) -> BTreeMap<String, usize> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").expect("reading mountinfo");
    let scratch = std::env::temp_dir().join(".tmp");
    let harness = sandbox.parent().and_then(Path::parent).expect("the test's containerd folder");
    let ignored = |p: &Path| {
        let other_harness = p.iter().any(|c| c.to_string_lossy().starts_with("nbx-")) && !p.starts_with(harness);
        p.starts_with(sandbox)
            || p.to_string_lossy().starts_with(&*scratch.to_string_lossy())
            || other_harness
            || p.starts_with("/run/netns")
            || p.starts_with("/var/run/netns")
    };
    let mut points = BTreeMap::new();
    for point in table.lines().filter_map(|l| l.split(' ').nth(4)).filter(|p| !ignored(Path::new(p))) {
        *points.entry(point.to_string()).or_insert(0) += 1;
    }
    points
}

/// The host-only tree without its mounts (a non-recursive bind of it, in a mount namespace
/// of its own) holds only what the shim made: a directory per container, in each `rootfs`
/// and `mounts`, in `mounts` empty numbered mount points, nothing setuid, no symlink.
fn assert_host_only_tree(sandbox: &Path, containers: &[&str]) {
    let view = sandbox.parent().expect("the sandboxes folder").with_file_name("host-only-view");
    std::fs::create_dir_all(&view).expect("creating the view's mount point");
    let script = format!(
        "mount --bind {} {} && find {} -mindepth 1 -printf '%y %m %s %P\\n'",
        sandbox.join("mounts").display(),
        view.display(),
        view.display()
    );
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .output()
        .expect("running unshare");
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "listing the host-only tree: {out:?}");
    std::fs::remove_dir(&view).expect("removing the view's mount point");
    let mut cids = BTreeSet::new();
    for line in listing.lines() {
        let mut fields = line.splitn(4, ' ');
        let (kind, mode, size, path) = (fields.next(), fields.next(), fields.next(), fields.next().unwrap_or(""));
        let parts: Vec<&str> = path.split('/').collect();
        let mode = u32::from_str_radix(mode.unwrap_or(""), 8).unwrap_or(u32::MAX);
        let shape = match parts.as_slice() {
            [cid] => {
                cids.insert(cid.to_string());
                kind == Some("d")
            }
            [_, "rootfs" | "mounts"] => kind == Some("d"),
            [_, "mounts", n] => {
                n.parse::<u32>().is_ok() && (kind == Some("d") || kind == Some("f") && size == Some("0"))
            }
            _ => false,
        };
        assert!(shape && mode & 0o7000 == 0, "an entry the shim did not make in the host-only tree: {line}\n{listing}");
    }
    let want: BTreeSet<String> = containers.iter().map(|c| c.to_string()).collect();
    assert_eq!(cids, want, "the host-only tree's container directories:\n{listing}");
}

/// Every setuid or setgid file and device node in the sandbox tree (the host-only tree and
/// its export, mounts crossed, symlinks not followed) is on a nosuid, nodev mount; the
/// setuid files found.
fn assert_nosuid_nodev(sandbox: &Path) -> Vec<String> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").expect("reading mountinfo");
    let options: BTreeMap<u64, String> = table
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            Some((f.next()?.parse().ok()?, f.nth(4)?.to_string()))
        })
        .collect();
    let mut found = Vec::new();
    let mut todo = vec![sandbox.join("mounts"), sandbox.join("shared")];
    while let Some(path) = todo.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        let kind = meta.file_type();
        let setuid = meta.is_file() && meta.mode() & 0o6000 != 0;
        let device = kind.is_char_device() || kind.is_block_device();
        if setuid || device {
            let flags = options.get(&mount_id(&path)).cloned().unwrap_or_default();
            let flags: Vec<&str> = flags.split(',').collect();
            let needed = if device { "nodev" } else { "nosuid" };
            assert!(
                flags.contains(&needed),
                "{} ({:o}) on a mount without {needed}: {flags:?}",
                path.display(),
                meta.mode()
            );
            found.push(path.display().to_string());
        }
        if meta.is_dir() {
            todo.extend(std::fs::read_dir(&path).into_iter().flatten().flatten().map(|e| e.path()));
        }
    }
    found
}

/// The id of the mount `path` is on (statx's STATX_MNT_ID), as mountinfo's first field.
fn mount_id(path: &Path) -> u64 {
    let name = CString::new(path.as_os_str().as_bytes()).expect("a path without NUL");
    // SAFETY: an all-zero statx is a valid value of this plain C struct.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a statx struct the kernel fills.
    let res =
        unsafe { libc::statx(libc::AT_FDCWD, name.as_ptr(), libc::AT_SYMLINK_NOFOLLOW, libc::STATX_MNT_ID, &mut stx) };
    assert_eq!(res, 0, "statx {}: {}", path.display(), std::io::Error::last_os_error());
    stx.stx_mnt_id
}
