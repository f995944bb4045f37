//! The tree the guest sees, built so that the guest cannot steer what the host does in it
//! (Kata's model):
//!
//! ```text
//! <sandbox>/mounts/            host only: the shim creates and mounts here, nothing else
//!   <cid>/rootfs               containerd's rootfs mounts
//!   <cid>/mounts/<n>           the spec's binds (hosts, resolv.conf, volumes)
//! <sandbox>/shared/            what the VMM exports over virtio-fs: a recursive bind of
//!                              mounts/, read-only at its top, a slave of mounts/ so the
//!                              mounts made there later appear in it, each with its own flags
//! ```
//!
//! The guest can write only inside the mounts themselves (a container's rootfs, a writable
//! volume), never in the directories the shim creates and mounts on: those are reached
//! through `shared/`, whose top is read-only, so no symlink or rename of the guest's can
//! stand where the host will create or mount something. The shim still reaches every
//! entry below the sandbox through [`Dir`] (no symlink followed, nothing outside), so even
//! a writable share would not redirect it.
//!
//! `mounts/` is a mount of its own (a bind onto itself) in a peer group of its own
//! (private, then shared), so containers' mounts propagate to `shared/` and nowhere else.

use super::beneath::{fd_path, Dir};
use super::mounts::MountError;
use nix::mount::{MntFlags, MsFlags};
use std::path::Path;

/// The host-only tree, below the sandbox directory.
pub const MOUNTS_DIR: &str = "mounts";
/// The exported view of it, below the sandbox directory.
pub const SHARED_DIR: &str = "shared";

fn mount_at(source: Option<&Path>, target: &Path, flags: MsFlags, shown: &Path) -> Result<(), MountError> {
    nix::mount::mount(source, target, None::<&str>, flags, None::<&str>).map_err(|errno| MountError::Mount {
        kind: format!("{flags:?}"),
        source_path: source.map(|s| s.display().to_string()).unwrap_or_default(),
        target: shown.to_path_buf(),
        errno,
    })
}

/// Creates `mounts/` and `shared/` in a new sandbox directory and exports the one through
/// the other. On failure the caller removes the sandbox directory (which unmounts).
pub fn create(sandbox: &Dir) -> Result<(), MountError> {
    let point = |name: &str| {
        let path = sandbox.display(name);
        move |source| MountError::MountPoint { path, source }
    };
    let (mounts_path, shared_path) = (sandbox.display(MOUNTS_DIR), sandbox.display(SHARED_DIR));
    sandbox.mkdir(MOUNTS_DIR, 0o700).map_err(point(MOUNTS_DIR))?;
    sandbox.mkdir(SHARED_DIR, 0o700).map_err(point(SHARED_DIR))?;
    let mounts = sandbox.path_fd(MOUNTS_DIR).map_err(point(MOUNTS_DIR))?;
    mount_at(Some(&fd_path(&mounts)), &fd_path(&mounts), MsFlags::MS_BIND, &mounts_path)?;
    // The new mount, not the directory beneath it.
    let mounts = sandbox.path_fd(MOUNTS_DIR).map_err(point(MOUNTS_DIR))?;
    mount_at(None, &fd_path(&mounts), MsFlags::MS_PRIVATE, &mounts_path)?;
    mount_at(None, &fd_path(&mounts), MsFlags::MS_SHARED, &mounts_path)?;
    let shared = sandbox.path_fd(SHARED_DIR).map_err(point(SHARED_DIR))?;
    mount_at(Some(&fd_path(&mounts)), &fd_path(&shared), MsFlags::MS_BIND | MsFlags::MS_REC, &shared_path)?;
    let shared = sandbox.path_fd(SHARED_DIR).map_err(point(SHARED_DIR))?;
    mount_at(None, &fd_path(&shared), MsFlags::MS_SLAVE, &shared_path)?;
    let read_only = MsFlags::MS_REMOUNT
        | MsFlags::MS_BIND
        | MsFlags::MS_RDONLY
        | MsFlags::MS_NOSUID
        | MsFlags::MS_NODEV
        | MsFlags::MS_NOEXEC;
    if let Err(e) = mount_at(None, &fd_path(&shared), read_only, &shared_path) {
        let _ = nix::mount::umount2(&fd_path(&shared), MntFlags::MNT_DETACH);
        return Err(e);
    }
    Ok(())
}

/// Creates container `id`'s directory in the host-only tree (`mounts/<id>/` with an empty
/// `mounts/` for the spec's binds) and returns it; it must not exist yet.
pub fn container_dir(sandbox: &Dir, id: &str) -> Result<Dir, MountError> {
    let rel = Path::new(MOUNTS_DIR).join(id);
    let point = |source| MountError::MountPoint { path: sandbox.display(&rel), source };
    let dir = sandbox.dir(MOUNTS_DIR).map_err(point)?.mkdir(id, 0o755).map_err(point)?;
    dir.mkdir("mounts", 0o755).map_err(point)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::super::mounts::{self, mounts_under, MountSpec};
    use super::super::paths::remove_dir;
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A sandbox directory `sb` with its share, below a fresh temporary directory.
    fn sandbox() -> (tempfile::TempDir, Dir) {
        let root = tempfile::tempdir().expect("tempdir");
        let sandbox = Dir::open_root(root.path()).expect("open").mkdir("sb", 0o700).expect("mkdir");
        create(&sandbox).expect("share");
        (root, sandbox)
    }

    fn mount_options(point: &Path) -> String {
        let table = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let line = table.lines().rfind(|l| l.split(' ').nth(4) == Some(&*point.to_string_lossy()));
        line.and_then(|l| l.split(' ').nth(5)).unwrap_or_default().to_string()
    }

    /// What the shim mounts in the host-only tree appears in the export with its own
    /// flags, while the export's own directories are read-only: the guest writes in a
    /// container's rootfs, never where the host creates or mounts.
    #[test]
    fn the_export_shows_later_mounts_and_is_read_only_above_them() {
        let (root, sandbox) = sandbox();
        let sb = sandbox.path().to_path_buf();
        for d in ["lower", "upper", "work", "data"] {
            std::fs::create_dir(root.path().join(d)).expect("mkdir");
        }
        std::fs::write(root.path().join("lower/hello"), "from lower").expect("write");
        let c1 = container_dir(&sandbox, "c1").expect("container dir");
        c1.mkdir("rootfs", 0o755).expect("mkdir");
        let overlay = MountSpec {
            kind: "overlay".into(),
            source: "overlay".into(),
            options: ["lower", "upper", "work"]
                .iter()
                .map(|d| format!("{d}dir={}", root.path().join(d).display()))
                .collect(),
        };
        mounts::mount(&overlay, &c1, "rootfs").expect("overlay");
        mounts::bind(&root.path().join("data"), &c1.dir("mounts").expect("open"), "0", true).expect("bind");

        assert_eq!(std::fs::read_to_string(sb.join("shared/c1/rootfs/hello")).expect("propagated"), "from lower");
        std::fs::write(sb.join("shared/c1/rootfs/new"), "guest").expect("the rootfs keeps its own flags: writable");
        for (what, result) in [
            ("a file", std::fs::write(sb.join("shared/c1/x"), "x")),
            ("a symlink", std::os::unix::fs::symlink("/etc", sb.join("shared/c1/evil"))),
            ("a rename", std::fs::rename(sb.join("shared/c1/mounts"), sb.join("shared/c1/m"))),
            ("a removal", std::fs::remove_dir(sb.join("shared/c1/mounts/0"))),
        ] {
            let err = result.expect_err(what);
            assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{what}: {err}");
        }
        assert!(std::fs::write(sb.join("shared/c1/mounts/0/x"), "x").is_err(), "the read-only volume stays so");
        let export = mount_options(&sb.join("shared"));
        assert!(export.starts_with("ro,") && export.contains("nosuid") && export.contains("nodev"), "{export}");
        let volume = mount_options(&sb.join("shared/c1/mounts/0"));
        assert!(volume.starts_with("ro,") && volume.contains("nosuid") && volume.contains("nodev"), "{volume}");
        let rootfs = mount_options(&sb.join("shared/c1/rootfs"));
        assert!(rootfs.starts_with("rw,") && rootfs.contains("nosuid") && rootfs.contains("nodev"), "{rootfs}");
        for dir in [&sb, &sb.join("mounts"), &sb.join("shared")] {
            let mode = std::fs::metadata(dir).expect("stat").permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", dir.display());
        }
        // Nothing leaks to the mounts around the sandbox: all its mounts are below it.
        let outside = mounts_under(root.path()).expect("table");
        assert!(outside.iter().all(|p| p.starts_with(&sb)), "{outside:?}");

        remove_dir(&sb).expect("removed");
        assert!(mounts_under(root.path()).expect("table").is_empty());
        assert!(!sb.exists());
        assert_eq!(std::fs::read_to_string(root.path().join("upper/new")).expect("kept"), "guest");
    }

    /// Symlinks where the host expects its own directories (what a guest could plant if
    /// the export were writable) are refused, not followed, and cleanup leaves their
    /// targets alone.
    #[test]
    fn symlinks_in_the_tree_are_refused_and_not_followed_by_cleanup() {
        let (root, sandbox) = sandbox();
        let sb = sandbox.path().to_path_buf();
        let victim = root.path().join("victim");
        std::fs::create_dir(&victim).expect("mkdir");
        std::fs::write(victim.join("keep"), "host file").expect("write");
        std::fs::create_dir(root.path().join("data")).expect("mkdir");

        let c1 = container_dir(&sandbox, "c1").expect("container dir");
        std::fs::remove_dir(sb.join("mounts/c1/mounts")).expect("rmdir");
        std::os::unix::fs::symlink(&victim, sb.join("mounts/c1/mounts")).expect("symlink");
        let err = c1.dir("mounts").expect_err("symlink");
        assert_eq!(err.raw_os_error(), Some(libc::ELOOP), "{err}");
        std::os::unix::fs::symlink(&victim, sb.join("mounts/c1/rootfs")).expect("symlink");
        assert!(mounts::bind(&root.path().join("data"), &c1, "rootfs", false).is_err());
        let overlay = MountSpec { kind: "bind".into(), source: "/tmp".into(), options: vec!["rbind".into()] };
        assert!(mounts::mount(&overlay, &c1, "rootfs").is_err());
        std::os::unix::fs::symlink(&victim, sb.join("mounts/c2")).expect("symlink");
        assert!(container_dir(&sandbox, "c2").is_err(), "an existing entry is never reused");
        std::os::unix::fs::symlink("../../../victim", sb.join("mounts/c1/up")).expect("symlink");
        assert!(c1.dir("up").is_err() && c1.path_fd("up/keep").is_err());

        assert!(mounts_under(&victim).expect("table").is_empty(), "nothing mounted on the victim");
        remove_dir(&sb).expect("removed");
        assert!(!sb.exists());
        assert_eq!(std::fs::read_to_string(victim.join("keep")).expect("untouched"), "host file");
    }

    /// Removal never deletes through a mount: one still there stops it with its name.
    #[test]
    fn removal_does_not_cross_a_mount() {
        let (root, sandbox) = sandbox();
        std::fs::create_dir(root.path().join("data")).expect("mkdir");
        std::fs::write(root.path().join("data/keep"), "volume").expect("write");
        let c1 = container_dir(&sandbox, "c1").expect("container dir");
        mounts::bind(&root.path().join("data"), &c1.dir("mounts").expect("open"), "0", false).expect("bind");
        let err = sandbox.remove_tree(Path::new("mounts/c1")).expect_err("a mount inside");
        assert!(err.to_string().contains("mount point"), "{err}");
        assert_eq!(std::fs::read_to_string(root.path().join("data/keep")).expect("kept"), "volume");
        remove_dir(sandbox.path()).expect("removed");
        assert_eq!(std::fs::read_to_string(root.path().join("data/keep")).expect("kept"), "volume");
    }

    /// A hostile guest's race, played on the host: while the shim's share functions
    /// create containers' directories, rootfs binds and volume binds, a thread keeps
    /// swapping every entry they use for a symlink to a host directory. It does so in the
    /// host-only tree itself (which the guest cannot even write: this is the defence in
    /// depth below the read-only export) and in the export (where every attempt fails).
    /// Afterwards nothing outside the pod's tree was mounted on or changed.
    #[test]
    fn symlink_swaps_racing_the_share_change_nothing_outside_the_pod() {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let (root, sandbox) = sandbox();
        let sb = sandbox.path().to_path_buf();
        let victim = root.path().join("victim");
        std::fs::create_dir(&victim).expect("mkdir");
        std::fs::write(victim.join("keep"), "host file").expect("write");
        let data = root.path().join("data");
        std::fs::create_dir(&data).expect("mkdir");
        std::fs::write(data.join("volume"), "volume").expect("write");
        // The racer works on the container being made; the shim goes on until it has made
        // 40 and the racer has won the race (a symlink in place) at least 20 times.
        let current = std::sync::Arc::new(AtomicUsize::new(0));
        let swaps = std::sync::Arc::new(AtomicUsize::new(0));
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let racer = {
            let (stop, current, swaps, sb, victim) =
                (stop.clone(), current.clone(), swaps.clone(), sb.clone(), victim.clone());
            std::thread::spawn(move || {
                let mut refused = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let n = current.load(Ordering::Relaxed);
                    let c = sb.join(format!("mounts/c{n}"));
                    for entry in [c.join("rootfs"), c.join("mounts/0"), c.join("mounts")] {
                        // Only below a real directory: the racer must not write through
                        // its own symlinks (the guest's resolve in the guest).
                        let parent = entry.parent().and_then(|p| std::fs::symlink_metadata(p).ok());
                        if !parent.is_some_and(|m| m.is_dir()) {
                            continue;
                        }
                        let _ = std::fs::remove_dir(&entry).or_else(|_| std::fs::remove_file(&entry));
                        if std::os::unix::fs::symlink(&victim, &entry).is_ok() {
                            swaps.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    let exported = sb.join(format!("shared/c{n}/mounts"));
                    if std::fs::remove_dir(&exported).is_err()
                        && std::os::unix::fs::symlink(&victim, sb.join(format!("shared/c{n}/x"))).is_err()
                    {
                        refused += 1;
                    }
                }
                refused
            })
        };
        let (mut n, mut mounted) = (0, 0);
        while n < 40 || swaps.load(Ordering::Relaxed) < 20 {
            assert!(n < 5000, "the racer never got a symlink in");
            current.store(n, Ordering::Relaxed);
            if let Ok(c) = container_dir(&sandbox, &format!("c{n}")) {
                mounted += usize::from(mounts::bind(&data, &c, "rootfs", false).is_ok());
                if let Ok(binds) = c.dir("mounts") {
                    mounted += usize::from(mounts::bind(&data, &binds, "0", true).is_ok());
                }
            }
            n += 1;
        }
        stop.store(true, Ordering::Relaxed);
        let refused = racer.join().expect("racer");
        let swaps = swaps.load(Ordering::Relaxed);
        assert!(refused > 0, "the racer tried the export");

        let table = mounts_under(root.path()).expect("table");
        assert!(table.iter().all(|p| p.starts_with(&sb)), "a mount outside the pod: {table:?}");
        assert!(mounts_under(&victim).expect("table").is_empty());
        let names: Vec<_> = std::fs::read_dir(&victim).expect("list").map(|e| e.expect("entry").file_name()).collect();
        assert_eq!(names, ["keep"], "the victim directory changed");
        remove_dir(&sb).expect("removed");
        assert!(mounts_under(root.path()).expect("table").is_empty());
        assert_eq!(std::fs::read_to_string(victim.join("keep")).expect("untouched"), "host file");
        assert_eq!(std::fs::read_to_string(data.join("volume")).expect("untouched"), "volume");
        eprintln!("{n} containers: {mounted} mounts made, {swaps} symlink swaps, {refused} refused in the export");
    }

    /// What the guest writes is never a setuid program for the host: nestbox relies on
    /// nosuid mounts (and the 0700 sandbox directory), not on stripping the bits, which
    /// the guest's own containers need. A setuid-root `id` in a container's rootfs, run by
    /// nobody through the share, stays nobody; the same file in the overlay's upper
    /// directory (an ordinary host directory) would run as root.
    #[test]
    fn a_setuid_file_in_the_share_does_not_run_setuid_on_the_host() {
        use std::os::unix::process::CommandExt;
        let (root, sandbox) = sandbox();
        let sb = sandbox.path().to_path_buf();
        for d in ["lower", "upper", "work"] {
            std::fs::create_dir(root.path().join(d)).expect("mkdir");
        }
        let c1 = container_dir(&sandbox, "c1").expect("container dir");
        c1.mkdir("rootfs", 0o755).expect("mkdir");
        let overlay = MountSpec {
            kind: "overlay".into(),
            source: "overlay".into(),
            options: ["lower", "upper", "work"]
                .iter()
                .map(|d| format!("{d}dir={}", root.path().join(d).display()))
                .collect(),
        };
        mounts::mount(&overlay, &c1, "rootfs").expect("overlay");
        // As the guest would make it: written into the rootfs, then chmod u+s.
        std::fs::copy("/usr/bin/id", sb.join("shared/c1/rootfs/id")).expect("copy");
        std::fs::set_permissions(sb.join("shared/c1/rootfs/id"), std::fs::Permissions::from_mode(0o4755))
            .expect("chmod");
        // Let nobody reach the files (the test's tree only).
        // (`shared/` is `mounts/` itself, read-only.)
        for dir in [root.path(), &sb, &sb.join("mounts")] {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        let euid_of = |program: &Path| {
            let out = std::process::Command::new(program).arg("-u").uid(65534).gid(65534).output().expect("run");
            assert!(out.status.success(), "{}: {}", program.display(), String::from_utf8_lossy(&out.stderr));
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        assert_eq!(euid_of(&root.path().join("upper/id")), "0", "the control: setuid works outside the share");
        assert_eq!(euid_of(&sb.join("shared/c1/rootfs/id")), "65534", "through the export");
        assert_eq!(euid_of(&sb.join("mounts/c1/rootfs/id")), "65534", "through the host-only tree");
        remove_dir(&sb).expect("removed");
    }
}
