//! Artifact integrity: the manifest records a blake3 hash of every file of the
//! artifact and a hash of its own text, so a truncated, bit-flipped or swapped
//! file is refused at load, naming the file, before any byte of it is used.
//!
//! The manifest's own hash (`integrity`) is taken over the manifest text with
//! that field's value left empty; the compiler writes it with `seal`, the
//! runtime checks it with `check_manifest_text` and the files with `check_files`.

use crate::error::{RuntimeError, RuntimeResult};
use crate::manifest::{Manifest, MANIFEST_FILE};
use std::collections::BTreeMap;
use std::path::Path;

/// The key of the manifest's self-hash, as the manifest text spells it.
const FIELD: &str = "\"integrity\": \"";

fn bad(path: &Path, message: String) -> RuntimeError {
    RuntimeError::Artifact { path: path.into(), message }
}

/// The blake3 hash of a file, read through a memory map (both cores hash a
/// large one).
pub fn hash_file(path: &Path) -> RuntimeResult<String> {
    let mut h = blake3::Hasher::new();
    h.update_mmap_rayon(path).map_err(|error| RuntimeError::Io { path: path.into(), error })?;
    Ok(h.finalize().to_hex().to_string())
}

/// Every file under `dir` but the manifest, as `/`-separated relative paths
/// mapped to their blake3 hashes.
pub fn hash_files(dir: &Path) -> RuntimeResult<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let entries = std::fs::read_dir(&d).map_err(|error| RuntimeError::Io { path: d.clone(), error })?;
        for e in entries {
            let e = e.map_err(|error| RuntimeError::Io { path: d.clone(), error })?;
            let p = e.path();
            let ty = e.file_type().map_err(|error| RuntimeError::Io { path: p.clone(), error })?;
            if ty.is_dir() {
                todo.push(p);
                continue;
            }
            let rel = p.strip_prefix(dir).map_err(|e| bad(&p, e.to_string()))?;
            let rel: Vec<String> = rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
            let rel = rel.join("/");
            if rel != MANIFEST_FILE {
                out.insert(rel, hash_file(&p)?);
            }
        }
    }
    Ok(out)
}

/// Records the hashes of every file now in `dir` in `manifest` and returns the
/// manifest's text with its self-hash filled in: what the compiler writes,
/// last, as `manifest.json`.
pub fn seal(dir: &Path, manifest: &mut Manifest) -> RuntimeResult<String> {
    manifest.files = hash_files(dir)?;
    manifest.integrity = String::new();
    let text = serde_json::to_string_pretty(manifest).map_err(|e| bad(&dir.join(MANIFEST_FILE), e.to_string()))?;
    let hash = blake3::hash(text.as_bytes()).to_hex().to_string();
    let empty = format!("{FIELD}\"");
    if text.matches(&empty).count() != 1 {
        return Err(bad(&dir.join(MANIFEST_FILE), "the manifest text must hold its integrity field once".into()));
    }
    manifest.integrity = hash.clone();
    Ok(text.replacen(&empty, &format!("{FIELD}{hash}\""), 1))
}

/// Checks the manifest text's self-hash: the text with the `integrity` value
/// emptied must hash to that value.
pub fn check_manifest_text(path: &Path, text: &str) -> RuntimeResult<()> {
    let starts: Vec<usize> = text.match_indices(FIELD).map(|(i, _)| i + FIELD.len()).collect();
    let [start] = starts[..] else {
        return Err(bad(path, format!("the manifest must hold one integrity hash, found {}", starts.len())));
    };
    let Some(len) = text[start..].find('"') else {
        return Err(bad(path, "the integrity hash is not terminated".into()));
    };
    let recorded = &text[start..start + len];
    let mut emptied = String::with_capacity(text.len());
    emptied.push_str(&text[..start]);
    emptied.push_str(&text[start + len..]);
    let actual = blake3::hash(emptied.as_bytes()).to_hex().to_string();
    if actual != recorded {
        return Err(bad(path, format!("the manifest was modified: its text hashes to {actual}, it records {recorded}")));
    }
    Ok(())
}

/// Checks that every file the manifest records exists with the recorded
/// hash. Names must stay inside the artifact.
pub fn check_files(dir: &Path, manifest: &Manifest) -> RuntimeResult<()> {
    for (rel, want) in &manifest.files {
        let inside =
            !rel.is_empty() && rel.split('/').all(|c| !c.is_empty() && c != "." && c != "..") && !rel.contains('\\') && !rel.contains('\0');
        if !inside {
            return Err(bad(dir, format!("the manifest names a file outside the artifact: `{rel}`")));
        }
        let path = dir.join(rel);
        let got = hash_file(&path)?;
        if &got != want {
            return Err(bad(&path, format!("the file was modified or replaced: it hashes to {got}, the manifest records {want}")));
        }
    }
    Ok(())
}
