//! External tools: the system linker for `.so` files and `ptxas` for checking PTX.
//! Every failure prints the command that reproduces it.

use crate::error::{CompileError, CompileResult};
use std::path::{Path, PathBuf};
use std::process::Command;

fn shell_line(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Links objects into a shared library with `$CC` (default `cc`).
pub fn link_shared(objects: &[PathBuf], output: &Path) -> CompileResult<()> {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let mut cmd = Command::new(&cc);
    cmd.arg("-shared").arg("-o").arg(output).args(objects);
    let line = shell_line(&cmd);
    let out = cmd.output().map_err(|e| CompileError::Link {
        output: output.into(),
        command: line.clone(),
        stderr: format!("could not run `{cc}`: {e}"),
    })?;
    if !out.status.success() {
        return Err(CompileError::Link { output: output.into(), command: line, stderr: String::from_utf8_lossy(&out.stderr).into_owned() });
    }
    Ok(())
}

/// Finds `ptxas`: `$SPARSEC_PTXAS`, then `PATH`, then the `nvidia-cuda-nvcc` wheel
/// of the `python3` on `PATH`.
pub fn find_ptxas() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SPARSEC_PTXAS") {
        // A set variable that names no file finds nothing (rather than a path
        // that fails later as if ptxas were broken).
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join("ptxas");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    let probe = "import importlib.util, os\n\
                 for m in ('nvidia.cu13', 'nvidia.cuda_nvcc'):\n\
                 \x20   try:\n\
                 \x20       s = importlib.util.find_spec(m)\n\
                 \x20   except Exception:\n\
                 \x20       s = None\n\
                 \x20   if s and s.submodule_search_locations:\n\
                 \x20       p = os.path.join(list(s.submodule_search_locations)[0], 'bin', 'ptxas')\n\
                 \x20       if os.path.isfile(p):\n\
                 \x20           print(p); break\n";
    let out = Command::new("python3").arg("-c").arg(probe).output().ok()?;
    let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!p.is_empty()).then(|| PathBuf::from(p))
}

/// Assembles a PTX file for `sm` with ptxas; the error carries the repro command.
pub fn check_ptx(ptxas: &Path, ptx: &Path, sm: &str) -> CompileResult<()> {
    let mut cmd = Command::new(ptxas);
    cmd.arg(format!("-arch={sm}")).arg(ptx).arg("-o").arg("/dev/null");
    let line = shell_line(&cmd);
    let out = cmd.output().map_err(|e| CompileError::Ptxas { ptx: ptx.into(), command: line.clone(), stderr: e.to_string() })?;
    if !out.status.success() {
        return Err(CompileError::Ptxas { ptx: ptx.into(), command: line, stderr: String::from_utf8_lossy(&out.stderr).into_owned() });
    }
    Ok(())
}
