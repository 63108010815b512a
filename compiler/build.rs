//! Hashes the sources that decide what the compiler generates (this crate's and
//! the IR's, whose packing code writes artifact weights) into
//! `SPARSEC_GENERATOR_HASH`, part of the artifact cache key: a changed kernel
//! generator never gets a stale artifact from the cache.

use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into()));
    let dirs = [root.join("src"), root.join("../ir/src")];
    let mut files = Vec::new();
    for d in &dirs {
        println!("cargo:rerun-if-changed={}", d.display());
        sources(d, &mut files);
    }
    files.sort();
    let mut h = blake3::Hasher::new();
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
        h.update(f.strip_prefix(&root).unwrap_or(f).to_string_lossy().as_bytes());
        h.update(&std::fs::read(f).unwrap_or_default());
    }
    println!("cargo:rustc-env=SPARSEC_GENERATOR_HASH={}", h.finalize().to_hex());
}
