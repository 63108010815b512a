//! The content-addressed artifact cache: `<cache>/<key>/` holds a finished
//! artifact; entries appear atomically (built aside, then renamed in).

use crate::error::{CompileError, CompileResult};
use std::path::{Path, PathBuf};

pub struct Cache {
    root: PathBuf,
}

impl Cache {
    pub fn new(root: impl Into<PathBuf>) -> Cache {
        Cache { root: root.into() }
    }

    /// `$SPARSEC_CACHE_DIR`, else `$XDG_CACHE_HOME/sparsec`, else `~/.cache/sparsec`.
    pub fn default_location() -> PathBuf {
        if let Some(d) = std::env::var_os("SPARSEC_CACHE_DIR") {
            return d.into();
        }
        if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
            return PathBuf::from(d).join("sparsec");
        }
        std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir).join(".cache").join("sparsec")
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn entry(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// The cached artifact for `key`, if complete.
    pub fn lookup(&self, key: &str) -> Option<PathBuf> {
        let e = self.entry(key);
        e.join(sparsec_runtime::manifest::MANIFEST_FILE).is_file().then_some(e)
    }

    /// Copies a finished artifact into the cache under `key`.
    pub fn insert(&self, key: &str, artifact: &Path) -> CompileResult<()> {
        std::fs::create_dir_all(&self.root).map_err(CompileError::io(&self.root))?;
        let tmp = tempfile::Builder::new().prefix(".incoming-").tempdir_in(&self.root).map_err(CompileError::io(&self.root))?;
        link_or_copy_dir(artifact, tmp.path())?;
        let dest = self.entry(key);
        match std::fs::rename(tmp.path(), &dest) {
            Ok(()) => {
                let _ = tmp.keep();
                Ok(())
            }
            // Another compile inserted the same key first: same content, keep theirs.
            Err(_) if self.lookup(key).is_some() => Ok(()),
            Err(e) => Err(CompileError::Io { path: dest, error: e }),
        }
    }
}

/// Recursive copy of a directory's files, hard-linked where the filesystem
/// allows: artifacts are immutable once published, so copies can share files.
pub fn link_or_copy_dir(from: &Path, to: &Path) -> CompileResult<()> {
    std::fs::create_dir_all(to).map_err(CompileError::io(to))?;
    for entry in std::fs::read_dir(from).map_err(CompileError::io(from))? {
        let entry = entry.map_err(CompileError::io(from))?;
        let src = entry.path();
        let dst = to.join(entry.file_name());
        if src.is_dir() {
            link_or_copy_dir(&src, &dst)?;
        } else if std::fs::hard_link(&src, &dst).is_err() {
            std::fs::copy(&src, &dst).map_err(CompileError::io(&src))?;
        }
    }
    Ok(())
}

/// Makes `staged` (a finished artifact directory) appear at `dest` atomically.
/// An existing artifact at `dest` is replaced; any other existing path is an error.
pub fn publish(staged: &Path, dest: &Path) -> CompileResult<()> {
    if dest.exists() {
        if !dest.join(sparsec_runtime::manifest::MANIFEST_FILE).is_file() {
            return Err(CompileError::File {
                path: dest.into(),
                message: "exists and is not a sparsec artifact; refusing to overwrite it".into(),
            });
        }
        let parent = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let old = tempfile::Builder::new().prefix(".old-").tempdir_in(parent).map_err(CompileError::io(parent))?;
        let old_path = old.path().join("a");
        std::fs::rename(dest, &old_path).map_err(CompileError::io(dest))?;
        std::fs::rename(staged, dest).map_err(CompileError::io(dest))?;
        drop(old); // removes the previous artifact
        return Ok(());
    }
    std::fs::rename(staged, dest).map_err(CompileError::io(dest))
}

/// A staging directory beside `dest`, so the final rename stays on one filesystem.
pub fn staging_dir_for(dest: &Path) -> CompileResult<tempfile::TempDir> {
    let parent = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(CompileError::io(parent))?;
    tempfile::Builder::new().prefix(".sparsec-staging-").tempdir_in(parent).map_err(CompileError::io(parent))
}
