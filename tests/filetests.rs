//! The filetest runner: every `tests/filetests/*.sir` names its test on its first
//! line (`// test passes`, `// test lower-mlir`, `// test run`), optionally
//! followed by options (`quant-activations=f32|int8`, `kv-cache=f16|f32` (the
//! CPU's and CUDA's caches), `kv-cache=q4_1|q8_0` (the CPU's), `kv-kivi` (keys
//! per channel; lowered for the CPU alone, the cache being a CPU cache),
//! `cpu=x86-64-v4`, `cpu=znver4` or `cpu=sapphirerapids` (the CPU code for
//! that LLVM CPU: AVX-512, VNNI for znver4, AMX tiles besides for
//! sapphirerapids; lowered for the CPU alone; run against the reference
//! only where the host has those features, else a SKIPPED line),
//! `tolerance=X`: the atol and rtol of the comparison with the reference,
//! default 1e-4), produces text,
//! and the text is pinned with an insta snapshot under `tests/snapshots/`.
//! Re-bless all of them with `INSTA_UPDATE=always cargo test --test integration filetests::`.

use crate::common;

use anyhow::{bail, Context, Result};
use sparsec_compiler::mlir::pipeline::MlirSession;
use sparsec_compiler::mlir::{emit_kernel, Device};
use sparsec_compiler::partition::partition_with;
use sparsec_compiler::{
    backend, compile, CompileOptions, CompileRequest, CpuTarget, CudaTarget, GpuMmaActivations, KvCacheType, QuantActivations, TargetKind,
};
use sparsec_ir::{parse_graph, Graph};
use sparsec_passes::{PassManager, PrintOptions};
use sparsec_runtime::compare::{compare, Tolerance};
use sparsec_runtime::cpu::CpuExecutor;
use sparsec_runtime::interpreter::interpret;
use sparsec_runtime::Artifact;
use std::fmt::Write;
use std::path::{Path, PathBuf};

fn section(out: &mut String, title: &str, body: &str) {
    let _ = writeln!(out, "==== {title} ====\n{}", body.trim_end());
}

fn run_passes(g: &mut Graph, out: &mut String) -> Result<()> {
    let print = PrintOptions { after_all: true, ..Default::default() };
    for s in PassManager::default_pipeline(print).run(g)? {
        section(out, &format!("IR {}", s.label), &s.ir);
    }
    Ok(())
}

/// The LLVM IR without the module id line, which names nothing stable.
fn normalize_llvm(ir: &str) -> String {
    ir.lines().filter(|l| !l.starts_with("; ModuleID")).collect::<Vec<_>>().join("\n")
}

fn test_passes(g: &mut Graph) -> Result<String> {
    let mut out = String::new();
    run_passes(g, &mut out)?;
    Ok(out)
}

/// What a filetest's header sets beyond its kind.
struct FileOptions {
    compile: CompileOptions,
    tolerance: Tolerance,
    /// Lower for the CPU alone (a CPU-only KV cache: `kv-kivi`).
    cpu_only: bool,
}

impl FileOptions {
    fn parse(words: &[&str]) -> Result<FileOptions> {
        // Snapshots are of portable x86-64-v3 code.
        let mut compile = CompileOptions { target: TargetKind::Cpu, cpu: CpuTarget::x86_64_v3(), ..Default::default() };
        let mut tolerance = Tolerance::default();
        let mut cpu_only = false;
        for w in words {
            match w.split_once('=') {
                Some(("quant-activations", "f32")) => compile.quant_activations = QuantActivations::F32,
                Some(("quant-activations", "int8")) => compile.quant_activations = QuantActivations::Int8,
                Some(("gpu-mma-activations", "half")) => compile.gpu_mma_activations = GpuMmaActivations::Half,
                Some(("kv-cache", "f16")) => (compile.kv_cache, compile.cuda_kv_cache) = (KvCacheType::F16, KvCacheType::F16),
                Some(("kv-cache", "f32")) => (compile.kv_cache, compile.cuda_kv_cache) = (KvCacheType::F32, KvCacheType::F32),
                Some(("kv-cache", "q4_1")) => compile.kv_cache = KvCacheType::Q4_1,
                Some(("kv-cache", "q8_0")) => compile.kv_cache = KvCacheType::Q8_0,
                None if *w == "kv-kivi" => (compile.kv_kivi, cpu_only) = (true, true),
                Some(("cpu", name @ ("x86-64-v4" | "znver4" | "sapphirerapids"))) => {
                    compile.cpu = CpuTarget { cpu: name.into(), ..CpuTarget::x86_64_v3() };
                    cpu_only = true;
                }
                Some(("tolerance", x)) => {
                    let t: f32 = x.parse().with_context(|| format!("tolerance={x}"))?;
                    tolerance = Tolerance { atol: t, rtol: t };
                }
                _ => bail!("unknown filetest option `{w}` (quant-activations=f32|int8, kv-cache=f16|f32|q4_1|q8_0, kv-kivi, cpu=x86-64-v4|znver4|sapphirerapids, tolerance=X)"),
            }
        }
        Ok(FileOptions { compile, tolerance, cpu_only })
    }
}

/// `ptxas` checks every PTX kernel; `None` only outside CI (see `tests/common`).
fn test_lower_mlir(g: &mut Graph, opts: &FileOptions, ptxas: Option<&Path>) -> Result<String> {
    let mut out = String::new();
    run_passes(g, &mut out)?;
    // The CPU kernels as a CPU-only compile makes them; the NVPTX ones as a
    // compile that includes CUDA does (its KV caches f32 unless `kv-cache=f16`).
    let mut parts = Vec::new();
    let targets: &[TargetKind] = if opts.cpu_only { &[TargetKind::Cpu] } else { &[TargetKind::Cpu, TargetKind::All] };
    for &target in targets {
        let mut part = partition_with(g, &CompileOptions { target, ..opts.compile.clone() })?;
        let tensors = sparsec_compiler::weights::resolve(g, &part, sparsec_compiler::WeightSource::None)?;
        sparsec_compiler::driver::attach_baked_weights(&mut part, &tensors);
        parts.push(part);
    }
    let session = MlirSession::new();
    let cpu = &opts.compile.cpu;
    let cuda = CudaTarget::default();
    for (i, cpu_spec) in parts[0].kernels.iter().enumerate() {
        let gpu_spec = parts.get(1).map(|p| &p.kernels[i]);
        for (device, spec) in [(Device::Cpu, Some(cpu_spec)), (Device::Nvptx, gpu_spec)] {
            let Some(spec) = spec else { continue };
            let mlir = emit_kernel(spec, device)?;
            let llvm = inkwell::context::Context::create();
            let (module, _) = session.lower_to_llvm(&spec.name, &mlir, device, &llvm)?;
            match device {
                Device::Cpu => {
                    section(&mut out, &format!("{}: MLIR (cpu)", spec.name), &mlir);
                    let code = backend::emit_cpu(&spec.name, &module, cpu, 3, false)?;
                    section(&mut out, &format!("{}: LLVM IR ({}, O3)", spec.name, cpu.cpu), &normalize_llvm(&code.llvm_ir));
                }
                Device::Nvptx => {
                    section(&mut out, &format!("{}: MLIR (nvptx)", spec.name), &mlir);
                    let code = backend::emit_ptx(&spec.name, &module, &cuda, 3)?;
                    if let Some(ptxas) = ptxas {
                        let f = tempfile::Builder::new().suffix(".ptx").tempfile()?;
                        std::fs::write(f.path(), &code.code)?;
                        sparsec_compiler::toolchain::check_ptx(ptxas, f.path(), &cuda.sm)?;
                    }
                    section(&mut out, &format!("{}: PTX ({})", spec.name, cuda.sm), &String::from_utf8_lossy(&code.code));
                }
            }
        }
    }
    // The snapshot pins the code; this checks that the code is right.
    check_against_reference(g, opts)?;
    Ok(out)
}

/// The features code for `cpu` may use that this host lacks (the loader's
/// own check, which would refuse the artifact).
fn lacking_on_host(cpu: &CpuTarget) -> Option<String> {
    use sparsec_runtime::isa::{missing_on_host, required};
    let missing = missing_on_host(&required(&cpu.cpu, &cpu.features));
    (!missing.is_empty()).then(|| missing.join(", "))
}

/// Compiles `g` for the CPU, runs it at several `seq` and compares every output
/// with the reference interpreter (atol = rtol = the file's tolerance). Returns a summary.
fn check_against_reference(g: &Graph, opts: &FileOptions) -> Result<String> {
    if let Some(f) = lacking_on_host(&opts.compile.cpu) {
        let why = format!("SKIPPED: {} code needs {f}, which this host lacks; its snapshot is still compared", opts.compile.cpu.cpu);
        eprintln!("{why}");
        return Ok(why);
    }
    let tmp = tempfile::tempdir()?;
    let art_dir = tmp.path().join("a.sparsec");
    let options = opts.compile.clone();
    compile(CompileRequest {
        graph: g.clone(),
        plan_text: None,
        weights: sparsec_compiler::WeightSource::None,
        options,
        print: PrintOptions::default(),
        cache: None,
        output: art_dir.clone(),
        lm: None,
    })?;
    let art = Artifact::open(&art_dir)?;
    let exec = CpuExecutor::load(&art)?;
    let mut summary = String::new();
    for seq in [1u64, 3, 17] {
        let inputs = art.random_inputs(seq, 42)?;
        let got = exec.run(&art, &inputs)?;
        let want = interpret(&art.graph, &inputs, &|n| art.weight_array(n).ok().map(std::sync::Arc::new))?;
        if got.len() != want.len() {
            bail!("seq {seq}: the compiled graph gives {} outputs, the reference {}", got.len(), want.len());
        }
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            if a.shape() != b.shape() {
                bail!("seq {seq}, output {i}: shape {:?}, the reference's {:?}", a.shape(), b.shape());
            }
            let c = compare(a, b, opts.tolerance);
            if !c.passed {
                bail!(
                    "seq {seq}, output {i}: max abs error {} at {} exceeds atol = rtol = {}",
                    c.max_abs_error,
                    c.worst_index,
                    opts.tolerance.atol
                );
            }
            let head: Vec<String> = a.iter().take(6).map(|v| format!("{v:.4}")).collect();
            let _ = writeln!(summary, "seq {seq} output {i} shape {:?}: within tolerance; head [{}]", a.shape(), head.join(", "));
        }
    }
    Ok(summary)
}

fn test_run(g: &mut Graph, opts: &FileOptions) -> Result<String> {
    check_against_reference(g, opts)
}

fn run_file(path: &Path, ptxas: Option<&Path>) -> Result<String> {
    let text = std::fs::read_to_string(path)?;
    let header = text.lines().next().unwrap_or("");
    let words: Vec<&str> = header
        .strip_prefix("// test ")
        .with_context(|| format!("first line must be `// test KIND [OPTIONS]`, got {header:?}"))?
        .split_whitespace()
        .collect();
    let (kind, rest) = words.split_first().with_context(|| format!("{header:?} names no test"))?;
    let opts = FileOptions::parse(rest)?;
    let mut g = parse_graph(&text).with_context(|| format!("parsing {}", path.display()))?;
    match *kind {
        "passes" => test_passes(&mut g),
        "lower-mlir" => test_lower_mlir(&mut g, &opts, ptxas),
        "run" => test_run(&mut g, &opts),
        other => bail!("unknown test kind `{other}` (expected passes, lower-mlir, run)"),
    }
}

#[test]
fn filetests() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/filetests");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/filetests exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "sir"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no filetests found in {}", dir.display());
    // Without ptxas (outside CI) the snapshots are still compared; the PTX is not checked.
    let what = format!("{} to check the PTX of the lower-mlir filetests", common::PTXAS);
    let ptxas = common::require(&what, sparsec_compiler::toolchain::find_ptxas().ok_or(common::PTXAS_NOT_FOUND));
    let mut failures = Vec::new();
    for f in &files {
        let name = f.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let result = std::panic::catch_unwind(|| {
            let out = run_file(f, ptxas.as_deref()).unwrap_or_else(|e| panic!("{}: {e:#}", f.display()));
            insta::with_settings!({ snapshot_path => "snapshots", prepend_module_to_snapshot => false, input_file => f }, {
                insta::assert_snapshot!(name.clone(), out);
            });
        });
        if result.is_err() {
            failures.push(name);
        }
    }
    assert!(failures.is_empty(), "filetests failed: {failures:?} (re-bless intended changes with INSTA_UPDATE=always)");
    println!("{} filetests passed", files.len());
}
