//! `nestbox install` and `nestbox uninstall`: the binaries and the guest image put in place
//! under a prefix, the runtime registered in containerd's config, and a manifest of both so
//! that uninstall takes out exactly what install did (`docs/install.md`).
//!
//! - [`containerd`]: containerd's `config.toml` edited with toml_edit (the rest of the file
//!   byte for byte);
//! - [`manifest`]: the record of an installation;
//! - [`files`]: paths below `--root`, hashes, atomic copies, folders made.
//!
//! Everything that can be checked is checked before the first change: the root, the sources,
//! containerd's config (a file that does not parse is refused with its line named). A second
//! install with the same files changes nothing.

mod containerd;
mod files;
mod manifest;

pub use containerd::ConfigError;
pub use manifest::{Manifest, PATH as MANIFEST_PATH};

use crate::config::{default_guest_dir, VMM_BINARY};
use files::{make_dirs, mode_of, sha256, sha256_of, under, write_atomically};
use manifest::{ContainerdChange, InstalledFile, BACKUP_DIR};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

pub const SHIM_BINARY: &str = "containerd-shim-nestbox-v2";
pub const TOOL_BINARY: &str = "nestbox";
/// The binaries an installation puts in `<prefix>/bin`.
pub const BINARIES: [&str; 3] = [SHIM_BINARY, VMM_BINARY, TOOL_BINARY];
/// The guest image's files, put in `<prefix>/share/nestbox`.
pub const GUEST_FILES: [&str; 2] = ["vmlinux", "initramfs.cpio"];
pub const DEFAULT_PREFIX: &str = "/usr/local";
pub const DEFAULT_CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("--root {}: {reason}", path.display())]
    Root { path: PathBuf, reason: String },
    #[error("{flag} {}: must be an absolute path", path.display())]
    NotAbsolute { flag: &'static str, path: PathBuf },
    #[error("{} is missing ({hint})", path.display())]
    Source { path: PathBuf, hint: &'static str },
    #[error("{what} {}: {source}", path.display())]
    Io { what: &'static str, path: PathBuf, source: io::Error },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{}: {reason}", path.display())]
    Manifest { path: PathBuf, reason: String },
    #[error("{}: {reason}", path.display())]
    Refused { path: PathBuf, reason: String },
}

fn io_error<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> InstallError + 'a {
    move |source| InstallError::Io { what, path: path.to_path_buf(), source }
}

/// What `nestbox install` is asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// The file system to install into (`/`, or a node's root mounted elsewhere).
    pub root: PathBuf,
    /// Where the files go on that file system: `<prefix>/bin`, `<prefix>/share/nestbox`.
    pub prefix: PathBuf,
    /// containerd's config as the host sees it (below `root`).
    pub containerd_config: PathBuf,
    /// The folder holding the binaries to install.
    pub bin_dir: PathBuf,
    /// The folder holding the guest image to install.
    pub guest_dir: PathBuf,
    /// Register the runtime only (the files are in place already: the Debian package).
    pub config_only: bool,
}

impl Options {
    /// The defaults: root `/`, prefix `/usr/local`, containerd's usual config, the binaries
    /// beside the running one and the guest image the shim would use.
    pub fn new() -> Options {
        let exe = std::env::current_exe().ok();
        Options {
            root: PathBuf::from("/"),
            prefix: PathBuf::from(DEFAULT_PREFIX),
            containerd_config: PathBuf::from(DEFAULT_CONTAINERD_CONFIG),
            bin_dir: exe.as_deref().and_then(Path::parent).map(Path::to_path_buf).unwrap_or_default(),
            guest_dir: default_guest_dir(),
            config_only: false,
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        Options::new()
    }
}

/// What an install or uninstall did, one line per file or change.
#[derive(Debug, Default)]
pub struct Report {
    pub lines: Vec<String>,
    /// containerd's config changed: containerd must be restarted to read it.
    pub config_changed: bool,
}

/// `nestbox install`.
pub fn install(o: &Options) -> Result<Report, InstallError> {
    check_root(&o.root)?;
    for (flag, path) in [("--prefix", &o.prefix), ("--containerd-config", &o.containerd_config)] {
        if !path.is_absolute() {
            return Err(InstallError::NotAbsolute { flag, path: path.clone() });
        }
    }
    let sources = if o.config_only { Vec::new() } else { sources(o)? };
    let config_path = under(&o.root, &o.containerd_config);
    if fs::symlink_metadata(&config_path).is_ok_and(|m| m.file_type().is_symlink()) {
        // Writing through it would replace the link with a file: name the file itself.
        return Err(InstallError::Refused {
            path: config_path,
            reason: "a symbolic link: name the file it points to with --containerd-config".into(),
        });
    }
    let original = read_optional(&config_path)?;
    let registration = containerd::register(original.as_deref(), &config_path)?;
    let mut manifest = load_manifest(&o.root)?.unwrap_or_default();
    if !manifest.files.is_empty() && !sources.is_empty() && manifest.prefix != o.prefix {
        return Err(InstallError::Manifest {
            path: under(&o.root, Path::new(MANIFEST_PATH)),
            reason: format!("nestbox is installed under {} already: uninstall it first", manifest.prefix.display()),
        });
    }
    manifest.version = env!("CARGO_PKG_VERSION").to_string();
    if !sources.is_empty() {
        manifest.prefix = o.prefix.clone();
    }
    let mut report = Report::default();
    for (source, dest, mode) in &sources {
        install_file(&o.root, source, dest, *mode, &mut manifest, &mut report)?;
    }
    save_manifest(&o.root, &mut manifest)?;
    register_runtime(o, original, registration, &mut manifest, &mut report)?;
    save_manifest(&o.root, &mut manifest)?;
    Ok(report)
}

fn check_root(root: &Path) -> Result<(), InstallError> {
    let reason = match fs::metadata(root) {
        Ok(m) if m.is_dir() => return Ok(()),
        Ok(_) => "not a directory".to_string(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => "does not exist".to_string(),
        Err(e) => e.to_string(),
    };
    Err(InstallError::Root { path: root.to_path_buf(), reason })
}

/// (source, destination on the host, mode) of every file to install; all must exist.
fn sources(o: &Options) -> Result<Vec<(PathBuf, PathBuf, u32)>, InstallError> {
    let bin = o.prefix.join("bin");
    let share = o.prefix.join("share/nestbox");
    let binaries = BINARIES.iter().map(|b| (o.bin_dir.join(b), bin.join(b), 0o755, "name their folder with --bin-dir"));
    let guest = GUEST_FILES.iter().map(|g| {
        (
            o.guest_dir.join(g),
            share.join(g),
            0o644,
            "build it with guest-image/build.sh or name its folder with --guest-dir",
        )
    });
    binaries
        .chain(guest)
        .map(|(source, dest, mode, hint)| match source.is_file() {
            true => Ok((source, dest, mode)),
            false => Err(InstallError::Source { path: source, hint }),
        })
        .collect()
}

fn read_optional(path: &Path) -> Result<Option<String>, InstallError> {
    match fs::read(path) {
        Ok(bytes) => String::from_utf8(bytes).map(Some).map_err(|_| InstallError::Refused {
            path: path.to_path_buf(),
            reason: "not UTF-8 text, so not a TOML file".into(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error("reading", path)(e)),
    }
}

fn load_manifest(root: &Path) -> Result<Option<Manifest>, InstallError> {
    let path = under(root, Path::new(MANIFEST_PATH));
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| InstallError::Manifest { path, reason: format!("not a nestbox install manifest: {e}") }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error("reading", &path)(e)),
    }
}

fn save_manifest(root: &Path, manifest: &mut Manifest) -> Result<(), InstallError> {
    let host = Path::new(MANIFEST_PATH);
    let dir = host.parent().expect("the manifest has a folder");
    make_dirs(root, dir, &mut manifest.dirs).map_err(io_error("making", &under(root, dir)))?;
    let path = under(root, host);
    let json = serde_json::to_vec_pretty(manifest).expect("a manifest serialises");
    if fs::read(&path).ok().as_deref() == Some(json.as_slice()) {
        return Ok(());
    }
    write_atomically(&path, &json, 0o644).map_err(io_error("writing", &path))
}

/// Puts one file in place unless it is there with the same bytes; a file of someone else's
/// that it replaces is kept in the backup folder.
fn install_file(
    root: &Path,
    source: &Path,
    dest: &Path,
    mode: u32,
    manifest: &mut Manifest,
    report: &mut Report,
) -> Result<(), InstallError> {
    let bytes = fs::read(source).map_err(io_error("reading", source))?;
    let hash = sha256(&bytes);
    let target = under(root, dest);
    let current = sha256_of(&target).map_err(io_error("reading", &target))?;
    let ours = manifest.file(dest).is_some();
    if current.as_deref() == Some(hash.as_str()) {
        report.lines.push(match ours {
            true => format!("{}: unchanged", dest.display()),
            false => format!("{}: there already with the same bytes (not ours: uninstall leaves it)", dest.display()),
        });
        return Ok(());
    }
    let parent = dest.parent().expect("an installed file has a folder");
    make_dirs(root, parent, &mut manifest.dirs).map_err(io_error("making", &under(root, parent)))?;
    let mut replaced = manifest.file(dest).and_then(|f| f.replaced.clone());
    if current.is_some() && !ours {
        let kept = Path::new(BACKUP_DIR).join(dest.strip_prefix("/").unwrap_or(dest));
        let kept_parent = kept.parent().expect("a backup has a folder");
        make_dirs(root, kept_parent, &mut manifest.dirs).map_err(io_error("making", &under(root, kept_parent)))?;
        fs::rename(&target, under(root, &kept)).map_err(io_error("keeping", &target))?;
        report.lines.push(format!("{}: replaced; the earlier file is kept as {}", dest.display(), kept.display()));
        replaced = Some(kept);
    } else {
        report.lines.push(format!("{}: installed", dest.display()));
    }
    write_atomically(&target, &bytes, mode).map_err(io_error("writing", &target))?;
    manifest.files.retain(|f| f.path != dest);
    manifest.files.push(InstalledFile { path: dest.to_path_buf(), sha256: hash, replaced });
    Ok(())
}

/// Writes the registration into containerd's config, keeping the original bytes.
fn register_runtime(
    o: &Options,
    original: Option<String>,
    registration: containerd::Registration,
    manifest: &mut Manifest,
    report: &mut Report,
) -> Result<(), InstallError> {
    let host = &o.containerd_config;
    let (text, appended) = match registration {
        containerd::Registration::Present => {
            report.lines.push(match &manifest.containerd {
                Some(_) => format!("{}: registers nestbox already: unchanged", host.display()),
                None => {
                    format!("{}: registers nestbox already (not by nestbox install): left as it is", host.display())
                }
            });
            return Ok(());
        }
        containerd::Registration::Changed { text, appended } => (text, appended),
    };
    let backup = match &original {
        Some(bytes) => {
            let kept = Path::new(BACKUP_DIR).join(host.strip_prefix("/").unwrap_or(host));
            let parent = kept.parent().expect("a backup has a folder");
            make_dirs(&o.root, parent, &mut manifest.dirs).map_err(io_error("making", &under(&o.root, parent)))?;
            let path = under(&o.root, &kept);
            write_atomically(&path, bytes.as_bytes(), 0o600).map_err(io_error("writing", &path))?;
            Some(kept)
        }
        None => None,
    };
    let parent = host.parent().unwrap_or(Path::new("/"));
    make_dirs(&o.root, parent, &mut manifest.dirs).map_err(io_error("making", &under(&o.root, parent)))?;
    let path = under(&o.root, host);
    write_atomically(&path, text.as_bytes(), mode_of(&path).unwrap_or(0o644)).map_err(io_error("writing", &path))?;
    report.lines.push(match &backup {
        Some(kept) => format!("{}: nestbox runtime added (the file as it was: {})", host.display(), kept.display()),
        None => format!("{}: written with the nestbox runtime (there was none)", host.display()),
    });
    report.config_changed = true;
    manifest.containerd = Some(ContainerdChange {
        config: host.clone(),
        existed: original.is_some(),
        backup,
        written_sha256: sha256(text.as_bytes()),
        appended,
    });
    Ok(())
}

/// `nestbox uninstall`: containerd's config as it was, the installed files and folders gone.
pub fn uninstall(root: &Path) -> Result<Report, InstallError> {
    check_root(root)?;
    let mut report = Report::default();
    let Some(manifest) = load_manifest(root)? else {
        report.lines.push(format!("nestbox is not installed here (no {MANIFEST_PATH}): nothing to do"));
        return Ok(report);
    };
    if let Some(change) = &manifest.containerd {
        unregister_runtime(root, change, &mut report)?;
    }
    for file in &manifest.files {
        remove_file(root, file, &mut report)?;
    }
    let path = under(root, Path::new(MANIFEST_PATH));
    files::remove_if_present(&path).map_err(io_error("removing", &path))?;
    for dir in manifest.dirs.iter().rev() {
        // Only folders left empty go: whatever else someone put there stays.
        let _ = fs::remove_dir(under(root, dir));
    }
    Ok(report)
}

fn unregister_runtime(root: &Path, change: &ContainerdChange, report: &mut Report) -> Result<(), InstallError> {
    let host = &change.config;
    let path = under(root, host);
    let backup = change.backup.as_ref().map(|b| under(root, b));
    let Some(current) = read_optional(&path)? else {
        report.lines.push(format!("{}: gone; nothing to restore", host.display()));
        return remove_backup(backup.as_deref());
    };
    let unchanged = sha256(current.as_bytes()) == change.written_sha256;
    let original = match (&backup, change.existed) {
        (Some(b), true) => fs::read(b).ok(),
        _ => None,
    };
    if unchanged && !change.existed {
        files::remove_if_present(&path).map_err(io_error("removing", &path))?;
        report.lines.push(format!("{}: removed (install had written it)", host.display()));
    } else if let (true, Some(bytes)) = (unchanged, original) {
        write_atomically(&path, &bytes, mode_of(&path).unwrap_or(0o644)).map_err(io_error("writing", &path))?;
        report.lines.push(format!("{}: restored as it was before install", host.display()));
    } else {
        match containerd::unregister(&current, change.appended.as_deref(), &path)? {
            Some(text) => {
                let mode = mode_of(&path).unwrap_or(0o644);
                write_atomically(&path, text.as_bytes(), mode).map_err(io_error("writing", &path))?;
                report
                    .lines
                    .push(format!("{}: changed since install; took out only the nestbox runtime", host.display()));
            }
            None => {
                report.lines.push(format!("{}: no nestbox runtime in it any more: left as it is", host.display()));
                return remove_backup(backup.as_deref());
            }
        }
    }
    report.config_changed = true;
    remove_backup(backup.as_deref())
}

fn remove_backup(backup: Option<&Path>) -> Result<(), InstallError> {
    match backup {
        Some(b) => files::remove_if_present(b).map_err(io_error("removing", b)),
        None => Ok(()),
    }
}

/// Removes an installed file if it still holds what was installed; puts back what it replaced.
fn remove_file(root: &Path, file: &InstalledFile, report: &mut Report) -> Result<(), InstallError> {
    let target = under(root, &file.path);
    match sha256_of(&target).map_err(io_error("reading", &target))? {
        Some(hash) if hash != file.sha256 => {
            report.lines.push(format!("{}: changed since install: left in place", file.path.display()));
            return Ok(());
        }
        Some(_) => {
            files::remove_if_present(&target).map_err(io_error("removing", &target))?;
            report.lines.push(format!("{}: removed", file.path.display()));
        }
        None => report.lines.push(format!("{}: gone already", file.path.display())),
    }
    if let Some(kept) = &file.replaced {
        let from = under(root, kept);
        fs::rename(&from, &target).map_err(io_error("restoring", &from))?;
        report.lines.push(format!("{}: the file it had replaced is back", file.path.display()));
    }
    Ok(())
}
