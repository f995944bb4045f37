//! Images made locally, since no registry can be reached: busybox comes from
//! `scripts/busybox-image`; CRI's pause image is that busybox image with a command that
//! sleeps (busybox's own `/bin/sh` would exit at once without a terminal, and with it the
//! pod sandbox).

use super::PAUSE;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::fs;
use std::path::Path;
use std::process::Command;

/// Writes to `out` an OCI image-layout tarball of the pause image, made from the busybox
/// image-layout tarball `busybox` in the scratch folder `layout`.
pub fn pause_from_busybox(busybox: &Path, out: &Path, layout: &Path) -> Result<(), String> {
    fs::create_dir_all(layout).map_err(|e| format!("creating {}: {e}", layout.display()))?;
    tar(Command::new("tar").arg("-xf").arg(busybox).arg("-C").arg(layout))?;
    let index_path = layout.join("index.json");
    let mut index = read_json(&index_path)?;
    let entry = index["manifests"].get_mut(0).ok_or("index.json lists no manifest")?;
    let mut manifest = read_json(&blob_path(layout, &entry["digest"])?)?;
    let mut config = read_json(&blob_path(layout, &manifest["config"]["digest"])?)?;
    config["config"]["Cmd"] = json!(["/bin/sleep", "2147483647"]);
    let (digest, size) = put_blob(layout, &config)?;
    manifest["config"]["digest"] = json!(digest);
    manifest["config"]["size"] = json!(size);
    let (digest, size) = put_blob(layout, &manifest)?;
    entry["digest"] = json!(digest);
    entry["size"] = json!(size);
    let tag = PAUSE.rsplit(':').next().unwrap_or("latest");
    entry["annotations"] = json!({"io.containerd.image.name": PAUSE, "org.opencontainers.image.ref.name": tag});
    fs::write(&index_path, index.to_string()).map_err(|e| format!("writing {}: {e}", index_path.display()))?;
    tar(Command::new("tar").arg("-C").arg(layout).arg("-cf").arg(out).arg("."))
}

fn tar(cmd: &mut Command) -> Result<(), String> {
    let done = cmd.output().map_err(|e| format!("running {cmd:?}: {e}"))?;
    if done.status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&done.stderr).trim()))
    }
}

fn read_json(path: &Path) -> Result<Value, String> {
    let text = fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    serde_json::from_slice(&text).map_err(|e| format!("parsing {}: {e}", path.display()))
}

/// Where the blob of digest `sha256:<hex>` is in the layout.
fn blob_path(layout: &Path, digest: &Value) -> Result<std::path::PathBuf, String> {
    let hex =
        digest.as_str().and_then(|d| d.strip_prefix("sha256:")).ok_or(format!("not a sha256 digest: {digest}"))?;
    Ok(layout.join("blobs/sha256").join(hex))
}

/// Stores `value` as a blob; its digest and size.
fn put_blob(layout: &Path, value: &Value) -> Result<(String, usize), String> {
    let data = value.to_string().into_bytes();
    let hex: String = Sha256::digest(&data).iter().map(|b| format!("{b:02x}")).collect();
    let digest = format!("sha256:{hex}");
    let path = blob_path(layout, &json!(digest))?;
    fs::write(&path, &data).map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok((digest, data.len()))
}
