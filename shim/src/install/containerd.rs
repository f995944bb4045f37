//! containerd's `config.toml`: the nestbox runtime added and taken out again, read and
//! checked with toml_edit so that everything else in the file stays as it was, byte for byte.
//!
//! The runtime goes in as a table of its own appended at the end of the file (a comment line,
//! the header, two keys), so the rest of the file is untouched and a diff shows exactly the
//! stanza. Only where TOML forbids that (the file defines the `runtimes` table inline or with
//! dotted keys, which a later header may not extend) does toml_edit insert it in place,
//! keeping the formatting of everything around it.

use crate::shim::RUNTIME_ID;
use std::ops::Range;
use std::path::{Path, PathBuf};
use toml_edit::{value, Array, DocumentMut, ImDocument, InlineTable, Item, TableLike};

/// The comment line above the stanza that `nestbox install` adds.
pub const MARK: &str = "# Added by `nestbox install`; `nestbox uninstall` takes it out again.";

/// Why containerd's config cannot be edited.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: line {line}, column {column}: {message} (nestbox changes nothing in a file it cannot parse)", path.display())]
    Parse { path: PathBuf, line: usize, column: usize, message: String },
    #[error("{}: version = {version}: nestbox knows containerd's config versions 1, 2 and 3", path.display())]
    Version { path: PathBuf, version: i64 },
    #[error("{}: {key} is not a table, so the nestbox runtime cannot go below it", path.display())]
    NotTable { path: PathBuf, key: String },
    #[error(
        "{}{}: a runtime named nestbox is already registered with {found}, not runtime_type = {RUNTIME_ID:?}; \
         remove it (or set that runtime_type) and install again",
        path.display(),
        line.map(|l| format!(": line {l}")).unwrap_or_default()
    )]
    Conflict { path: PathBuf, line: Option<usize>, found: String },
}

/// What registering nestbox in a config comes to.
#[derive(Debug, PartialEq, Eq)]
pub enum Registration {
    /// The file already registers nestbox with our runtime_type: nothing to change.
    Present,
    /// The new text of the file; `appended` is the exact text added at its end, when the
    /// stanza could go there (None: toml_edit inserted it in place).
    Changed { text: String, appended: Option<String> },
}

/// The `runtimes` table of containerd's CRI plugin, by config version: 1 names plugins by
/// id, 2 by URI (containerd 1.x), 3 is containerd 2.x's split CRI plugin.
fn runtimes_path(version: i64) -> Option<[&'static str; 4]> {
    let plugin = match version {
        1 => "cri",
        2 => "io.containerd.grpc.v1.cri",
        3 => "io.containerd.cri.v1.runtime",
        _ => return None,
    };
    Some(["plugins", plugin, "containerd", "runtimes"])
}

/// The stanza as TOML text, header keys quoted where they must be.
fn stanza(version: i64) -> String {
    let path = runtimes_path(version).expect("a known version");
    let header: Vec<String> =
        path.iter().chain(["nestbox"].iter()).map(|k| toml_edit::Key::new(*k).display_repr().into_owned()).collect();
    format!(
        "{MARK}\n[{}]\n  runtime_type = \"{RUNTIME_ID}\"\n  pod_annotations = [\"io.nestbox.*\"]\n  privileged_without_host_devices = true\n",
        header.join(".")
    )
}

/// Parses `text`, naming the line and column of the first error.
fn parse(text: &str, path: &Path) -> Result<ImDocument<String>, ConfigError> {
    ImDocument::parse(text.to_string()).map_err(|e| {
        let at = e.span().map(|s| s.start).unwrap_or(0).min(text.len());
        let (line, column) = line_column(text, at);
        let message = e.message().trim().replace('\n', "; ");
        ConfigError::Parse { path: path.to_path_buf(), line, column, message }
    })
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, column)
}

/// The config version containerd reads the file as: its `version` key, else 1 (containerd's
/// rule); an empty file (no keys) counts as none: we then write `version = 2`.
fn version_of(doc: &ImDocument<String>, path: &Path) -> Result<Option<i64>, ConfigError> {
    let version = match doc.get("version") {
        Some(item) => item.as_integer().unwrap_or(0),
        None if doc.as_table().is_empty() => return Ok(None),
        None => 1,
    };
    match runtimes_path(version) {
        Some(_) => Ok(Some(version)),
        None => Err(ConfigError::Version { path: path.to_path_buf(), version }),
    }
}

/// The table-like item at `keys` below `root`, if there is one; an error if something on the
/// way is not a table.
fn walk<'a>(root: &'a dyn TableLike, keys: &[&str], path: &Path) -> Result<Option<&'a dyn TableLike>, ConfigError> {
    let mut table = root;
    for (i, key) in keys.iter().enumerate() {
        match table.get(key) {
            None => return Ok(None),
            Some(item) => match item.as_table_like() {
                Some(t) => table = t,
                None => return Err(ConfigError::NotTable { path: path.to_path_buf(), key: keys[..=i].join(".") }),
            },
        }
    }
    Ok(Some(table))
}

/// Adds the nestbox runtime to containerd's config text (`None`: the file does not exist).
pub fn register(original: Option<&str>, path: &Path) -> Result<Registration, ConfigError> {
    let original = original.unwrap_or("");
    let doc = parse(original, path)?;
    let version = version_of(&doc, path)?;
    let keys = runtimes_path(version.unwrap_or(2)).expect("a known version");
    if let Some(runtimes) = walk(doc.as_table(), &keys, path)? {
        if let Some(existing) = runtimes.get("nestbox") {
            return check_existing(existing, original, path);
        }
    }
    let mut appended = String::new();
    if !original.is_empty() && !original.ends_with('\n') {
        appended.push('\n');
    }
    if version.is_none() {
        appended.push_str("version = 2\n");
    }
    if !original.trim().is_empty() || version.is_none() {
        appended.push('\n');
    }
    appended.push_str(&stanza(version.unwrap_or(2)));
    let text = format!("{original}{appended}");
    // Appending is valid unless the file defines `runtimes` (or a table above it) inline or by
    // dotted keys; then toml_edit inserts the runtime into that table where it is.
    if parse(&text, path).is_ok() {
        return Ok(Registration::Changed { text, appended: Some(appended) });
    }
    let mut doc = doc.into_mut();
    insert_in_place(&mut doc, &keys, path)?;
    Ok(Registration::Changed { text: doc.to_string(), appended: None })
}

/// An existing `nestbox` runtime: ours if its runtime_type is; anything else is refused.
fn check_existing(existing: &Item, text: &str, path: &Path) -> Result<Registration, ConfigError> {
    let runtime_type = existing.as_table_like().and_then(|t| t.get("runtime_type")).and_then(Item::as_str);
    if runtime_type == Some(RUNTIME_ID) {
        return Ok(Registration::Present);
    }
    let found = match runtime_type {
        Some(t) => format!("runtime_type = {t:?}"),
        None => "no runtime_type".to_string(),
    };
    let line = span_of(existing).map(|s| line_column(text, s.start.min(text.len())).0);
    Err(ConfigError::Conflict { path: path.to_path_buf(), line, found })
}

fn span_of(item: &Item) -> Option<Range<usize>> {
    match item {
        Item::Table(t) => t.span(),
        other => other.span(),
    }
}

/// Inserts the runtime as an inline table into the `runtimes` table where it is defined.
fn insert_in_place(doc: &mut DocumentMut, keys: &[&str], path: &Path) -> Result<(), ConfigError> {
    let mut table: &mut dyn TableLike = doc.as_table_mut();
    for (i, key) in keys.iter().enumerate() {
        let item = table.entry(key).or_insert_with(|| {
            let mut t = toml_edit::Table::new();
            t.set_implicit(true);
            Item::Table(t)
        });
        table = item
            .as_table_like_mut()
            .ok_or_else(|| ConfigError::NotTable { path: path.to_path_buf(), key: keys[..=i].join(".") })?;
    }
    let mut runtime = InlineTable::new();
    runtime.insert("runtime_type", RUNTIME_ID.into());
    runtime.insert("pod_annotations", Array::from_iter(["io.nestbox.*"]).into());
    runtime.insert("privileged_without_host_devices", true.into());
    table.insert("nestbox", value(runtime));
    Ok(())
}

/// Takes the nestbox runtime out of `current`: the appended text cut out if the file still
/// holds it once (byte for byte, wherever later edits left it), else the `nestbox` table
/// removed by toml_edit. None if there is none.
pub fn unregister(current: &str, appended: Option<&str>, path: &Path) -> Result<Option<String>, ConfigError> {
    if let Some(block) = appended.filter(|a| !a.is_empty() && current.matches(*a).count() == 1) {
        let at = current.find(block).expect("found once");
        let (before, after) = (&current[..at], &current[at + block.len()..]);
        // The block began with the newline the original's last line lacked: text added after
        // the block needs it still.
        let joint = if !after.is_empty() && !before.is_empty() && !before.ends_with('\n') { "\n" } else { "" };
        return Ok(Some(format!("{before}{joint}{after}")));
    }
    let doc = parse(current, path)?;
    let keys = runtimes_path(version_of(&doc, path)?.unwrap_or(2)).expect("a known version");
    let mut doc = doc.into_mut();
    let mut table: &mut dyn TableLike = doc.as_table_mut();
    for key in keys {
        match table.get_mut(key).and_then(Item::as_table_like_mut) {
            Some(t) => table = t,
            None => return Ok(None),
        }
    }
    Ok(table.remove("nestbox").map(|_| doc.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH: &str = "/etc/containerd/config.toml";

    fn changed(original: Option<&str>) -> (String, Option<String>) {
        match register(original, Path::new(PATH)).expect("registers") {
            Registration::Changed { text, appended } => (text, appended),
            Registration::Present => panic!("already present"),
        }
    }

    #[test]
    fn a_missing_file_gets_version_2_and_the_stanza() {
        let (text, _) = changed(None);
        assert!(text.starts_with("version = 2\n\n# Added by"), "{text}");
        assert!(text.contains("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.nestbox]\n"), "{text}");
        assert_eq!(register(Some(&text), Path::new(PATH)).unwrap(), Registration::Present);
    }

    #[test]
    fn the_stanza_is_appended_and_the_rest_kept_byte_for_byte() {
        let original = "version = 2\n# mine\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n  runtime_type   =  'io.containerd.runc.v2'   # odd\n";
        let (text, appended) = changed(Some(original));
        assert_eq!(text, format!("{original}{}", appended.clone().unwrap()));
        assert_eq!(unregister(&text, appended.as_deref(), Path::new(PATH)).unwrap().unwrap(), original);
    }

    #[test]
    fn version_1_and_3_use_their_plugin_names() {
        let (v1, _) = changed(Some("root = \"/var/lib/containerd\""));
        assert!(v1.contains("\n[plugins.cri.containerd.runtimes.nestbox]\n"), "{v1}");
        assert!(v1.starts_with("root = \"/var/lib/containerd\"\n\n#"), "{v1}");
        let (v3, _) = changed(Some("version = 3\n"));
        assert!(v3.contains("[plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.nestbox]"), "{v3}");
    }

    #[test]
    fn an_inline_runtimes_table_gets_the_runtime_in_place() {
        let original = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  runtimes = { runc = { runtime_type = \"io.containerd.runc.v2\" } }\n# end\n";
        let (text, appended) = changed(Some(original));
        assert_eq!(appended, None);
        assert!(text.contains("nestbox = { runtime_type = \"io.containerd.nestbox.v2\""), "{text}");
        assert!(text.ends_with("# end\n"), "{text}");
        let back = unregister(&text, None, Path::new(PATH)).unwrap().unwrap();
        assert!(!back.contains("nestbox"), "{back}");
    }

    #[test]
    fn an_edited_file_loses_only_the_stanza() {
        let (text, appended) = changed(Some("version = 2\n"));
        let edited = format!("{text}[debug]\n  level = \"info\"\n");
        let back = unregister(&edited, appended.as_deref(), Path::new(PATH)).unwrap().unwrap();
        assert_eq!(back, "version = 2\n[debug]\n  level = \"info\"\n");
    }

    #[test]
    fn parse_errors_name_the_line() {
        let err = register(Some("version = 2\n\n[plugins\nfoo = 1\n"), Path::new(PATH)).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { line: 3, .. }), "{err}");
        assert!(err.to_string().contains("line 3"), "{err}");
    }

    #[test]
    fn a_foreign_nestbox_runtime_is_refused_with_its_line() {
        let original = "version = 2\n\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.nestbox]\n  runtime_type = \"x\"\n";
        let err = register(Some(original), Path::new(PATH)).unwrap_err();
        assert!(err.to_string().contains("line 3"), "{err}");
        assert!(matches!(register(Some("version = 9"), Path::new(PATH)), Err(ConfigError::Version { version: 9, .. })));
        assert!(matches!(
            register(Some("version = 2\nplugins = 1"), Path::new(PATH)),
            Err(ConfigError::NotTable { .. })
        ));
    }
}
