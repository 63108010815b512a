//! The `sparsec` command line: compile, run, eval, bench, inspect (the verbs;
//! their clap definitions are in cli.rs).

use anyhow::{bail, Context, Result};
use clap::Parser;
use cli::{
    BenchArgs, Cli, Command, CompileArgs, CompileFlags, DeviceArg, EvalArgs, GpuMmaActivationsArg, InspectArgs, KvCacheArg,
    QuantActivationsArg, RunArgs, TargetArg, WeightsDTypeArg,
};
use sparsec_compiler::{compile, Cache, CompileOptions, CompileRequest, Compiled, CpuTarget, Emit, TargetKind};
use sparsec_passes::PrintOptions;
use sparsec_runtime::compare::Tolerance;
use sparsec_runtime::execute::{compare_all, reference_outputs, DeviceKind, Executor};
use sparsec_runtime::manifest::MANIFEST_FILE;
use sparsec_runtime::Artifact;
use std::path::{Path, PathBuf};
use std::time::Instant;

mod calibrated;
mod cli;
mod export;
mod factor;
mod from_weights;
mod kv_basis;
mod lm_verbs;
mod nsa_gates;
mod owl;
mod tradeoff;

/// `--trust`: artifacts load without hashing their files.
static TRUST: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Opens an artifact, validated as `--trust` says (every file hashed by default).
pub(crate) fn open_artifact(dir: &std::path::Path) -> sparsec_runtime::RuntimeResult<Artifact> {
    let trust = if TRUST.load(std::sync::atomic::Ordering::Relaxed) {
        sparsec_runtime::Trust::SkipFileHashes
    } else {
        sparsec_runtime::Trust::Verify
    };
    Artifact::open_with(dir, trust)
}

fn main() {
    // Like other Unix tools, end quietly when the reader of stdout goes away
    // (`| head`) instead of failing on a broken pipe.
    // SAFETY: restoring the default disposition of SIGPIPE at start-up, before any threads.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    if cli.trust {
        TRUST.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let result = match cli.command {
        Command::Compile(a) => cmd_compile(a),
        Command::Run(a) => cmd_run(a),
        Command::Eval(a) => cmd_eval(a),
        Command::Bench(a) => cmd_bench(a),
        Command::Inspect(a) => cmd_inspect(a),
        Command::Tradeoff(a) => tradeoff::cmd_tradeoff(a),
        Command::Export(a) => export::cmd_export(a),
    };
    if let Err(e) = result {
        eprintln!("sparsec: error: {e:#}");
        std::process::exit(2);
    }
}

fn options(flags: &CompileFlags) -> Result<CompileOptions> {
    let mut emit = Vec::new();
    for e in &flags.emit {
        emit.push(Emit::parse(e).with_context(|| format!("unknown --emit kind `{e}` (expected ir, mlir, llvm, ptx, asm)"))?);
    }
    let mut cpu = if flags.cpu == "host" {
        CpuTarget::host()
    } else {
        CpuTarget { cpu: flags.cpu.clone(), features: String::new(), ..CpuTarget::host() }
    };
    for f in flags.cpu_features.split(',').map(str::trim).filter(|f| !f.is_empty()) {
        if !(f.starts_with('+') || f.starts_with('-')) || f.len() < 2 {
            bail!("--cpu-features takes `+name` or `-name` entries separated by commas; got `{f}`");
        }
        cpu.features = if cpu.features.is_empty() { f.to_string() } else { format!("{},{f}", cpu.features) };
    }
    let mut target = match flags.target {
        TargetArg::Cpu => TargetKind::Cpu,
        TargetArg::Cuda => TargetKind::Cuda,
        TargetArg::All => TargetKind::All,
    };
    if emit.contains(&Emit::Ptx) && target == TargetKind::Cpu {
        target = TargetKind::All;
    }
    if matches!(flags.gpu_mma_activations, GpuMmaActivationsArg::Half) && !target.cuda() {
        bail!("--gpu-mma-activations half changes only CUDA kernels; compile with --target cuda or --target all");
    }
    Ok(CompileOptions {
        target,
        cpu,
        cuda: sparsec_compiler::CudaTarget { sm: flags.sm.clone(), ..Default::default() },
        opt_level: flags.opt_level.min(3),
        emit,
        bake_budget: sparsec_compiler::BakeBudget { compile_ms: flags.bake_budget_ms, code_bytes: flags.bake_budget_kb << 10 },
        quant_activations: match flags.quant_activations {
            QuantActivationsArg::Int8 => sparsec_compiler::QuantActivations::Int8,
            QuantActivationsArg::F32 => sparsec_compiler::QuantActivations::F32,
        },
        // `--kv-cache` sets both; absent, the CPU keeps f16 and CUDA f32.
        kv_cache: match flags.kv_cache {
            Some(KvCacheArg::F16) | None => sparsec_compiler::KvCacheType::F16,
            Some(KvCacheArg::F32) => sparsec_compiler::KvCacheType::F32,
            Some(KvCacheArg::Q8_0) => sparsec_compiler::KvCacheType::Q8_0,
            Some(KvCacheArg::Q4_0) => sparsec_compiler::KvCacheType::Q4_0,
            Some(KvCacheArg::Q4_1) => sparsec_compiler::KvCacheType::Q4_1,
        },
        cuda_kv_cache: match flags.kv_cache {
            Some(KvCacheArg::F16) => sparsec_compiler::KvCacheType::F16,
            Some(KvCacheArg::F32) | None => sparsec_compiler::KvCacheType::F32,
            Some(q @ (KvCacheArg::Q8_0 | KvCacheArg::Q4_0 | KvCacheArg::Q4_1)) => {
                if target.cuda() {
                    anyhow::bail!("--kv-cache {q:?} is a CPU cache; targets that include CUDA keep f16 or f32 caches");
                }
                sparsec_compiler::KvCacheType::F32
            }
        },
        // `auto` is the checkpoint's type (`do_compile` decides); IR files have none.
        weights_dtype: match flags.weights_dtype {
            WeightsDTypeArg::F32 | WeightsDTypeArg::Auto => sparsec_compiler::WeightsDType::F32,
            WeightsDTypeArg::F16 => sparsec_compiler::WeightsDType::F16,
            WeightsDTypeArg::Bf16 => sparsec_compiler::WeightsDType::Bf16,
            WeightsDTypeArg::Q8_0 => sparsec_compiler::WeightsDType::Q8_0,
            WeightsDTypeArg::Q4_1 => sparsec_compiler::WeightsDType::Q4_1,
        },
        kv_hadamard: flags.kv_hadamard,
        kv_kivi: flags.kv_kivi,
        gpu_mma_activations: match flags.gpu_mma_activations {
            GpuMmaActivationsArg::Split => sparsec_compiler::GpuMmaActivations::Split,
            GpuMmaActivationsArg::Half => sparsec_compiler::GpuMmaActivations::Half,
        },
    })
}

pub(crate) fn is_artifact(p: &Path) -> bool {
    p.join(MANIFEST_FILE).is_file()
}

fn do_compile(input: &Path, output: Option<PathBuf>, flags: &CompileFlags, cache: Option<Cache>) -> Result<Compiled> {
    let plan_text = plan_text(flags)?;
    // A checkpoint (GGUF, HF directory, `smollm2`) brings its weights; an IR file
    // takes them from --weights or its `init`s.
    let (graph, mut model) = load_source_with(input, flags.dequantize)?;
    // `from-weights` rules become concrete patterns per weight, read from the checkpoint.
    let plan_text = crate::from_weights::resolve_text(plan_text, model.as_ref())?;
    let output = output.unwrap_or_else(|| PathBuf::from(format!("{}.sparsec", graph.name)));
    // The checkpoint's data, hashed once: it keys the calibration statistics and the compile cache.
    let model_fingerprint = model.as_ref().map(|m| m.fingerprint()).unwrap_or_default();
    // Low-rank factoring (low_rank, share) adds the factors to the model's weights.
    let plan = plan_text.as_deref().map(sparsec_passes::Plan::parse).transpose()?;
    let factored = crate::factor::apply(model.as_mut(), &model_fingerprint, plan.as_ref(), calibration_cache(flags).as_deref())?;
    if let Some(r) = &factored {
        eprintln!("{}", crate::factor::describe(r));
    }
    // Calibrated methods (Wanda, SparseGPT) prune the model's weights before the compile.
    let calibration = match (plan_text.as_deref().map(sparsec_passes::Plan::parse).transpose()?, &model) {
        (Some(plan), Some(m)) => crate::calibrated::apply(m, &model_fingerprint, &plan, calibration_cache(flags).as_deref())?,
        (Some(plan), None) if plan.needs_calibration() => {
            anyhow::bail!(
                "{}: calibrated pruning methods need a model checkpoint (GGUF, HF directory or smollm2) and its tokenizer",
                input.display()
            )
        }
        _ => None,
    };
    if let Some(r) = &calibration {
        eprintln!("{}", crate::calibrated::describe(r));
    }
    // OWL gave layers their own ratios: the compile packs those.
    let plan_text = match (plan_text, &calibration) {
        (Some(t), Some(r)) => Some(t + &crate::calibrated::plan_overrides(r)),
        (t, _) => t,
    };
    // NSA gates fitted on the calibration text become rules; adapters become weights.
    let nsa = match (plan_text.as_deref().map(sparsec_passes::Plan::parse).transpose()?, model.as_mut()) {
        (Some(plan), Some(m)) => crate::nsa_gates::apply(m, &plan)?.map(|r| (r, plan)),
        (Some(plan), None) if plan.fits_nsa_gates() || plan.nsa_adapters().next().is_some() => {
            anyhow::bail!("{}: NSA gate = \"fitted\" and adapters need a model checkpoint (GGUF, HF directory or smollm2)", input.display())
        }
        _ => None,
    };
    if let Some((r, _)) = &nsa {
        eprintln!("{}", crate::nsa_gates::describe(r));
    }
    let plan_text = match (plan_text, &nsa) {
        (Some(t), Some((r, plan))) => Some(t + &crate::nsa_gates::plan_overrides(r, plan)),
        (t, _) => t,
    };
    // Feature-axis K/V bases become weights the plan's projections read.
    let kv_bases = match (plan_text.as_deref().map(sparsec_passes::Plan::parse).transpose()?, model.as_mut()) {
        (Some(plan), Some(m)) => crate::kv_basis::apply(m, &plan)?,
        (Some(plan), None) if plan.kv_bases() => {
            anyhow::bail!("{}: kv bases need a model checkpoint (GGUF, HF directory or smollm2)", input.display())
        }
        _ => None,
    };
    if let Some(r) = &kv_bases {
        eprintln!("{}", crate::kv_basis::describe(r));
    }
    use sparsec_compiler::WeightData;
    let lookup = |role: &str, dt: sparsec_ir::DType| -> Result<Option<(Vec<usize>, WeightData)>, sparsec_compiler::CompileError> {
        let Some(m) = &model else { return Ok(None) };
        let err = |e: sparsec_models::ModelError| sparsec_compiler::CompileError::File { path: m.path.clone(), message: e.to_string() };
        if dt.is_quantized() && m.stored_dtype(role) == dt {
            let shape = m.role_shape(role).map(|s| s.to_vec()).ok_or_else(|| sparsec_compiler::CompileError::File {
                path: m.path.clone(),
                message: format!("role `{role}` has no shape in the checkpoint"),
            })?;
            let (dt, packed) = m.weight_packed(role).map_err(err)?;
            return Ok(Some((shape, WeightData::Packed(dt, packed))));
        }
        m.weight(role).map(|a| Some((a.shape().to_vec(), WeightData::F32(a.iter().copied().collect())))).map_err(err)
    };
    let lm = match &model {
        Some(m) => match &m.tokenizer {
            Some(t) => Some((
                t.to_string(false).map_err(anyhow::Error::msg)?,
                sparsec_runtime::manifest::LmInfo {
                    tokenizer: sparsec_runtime::manifest::TOKENIZER_FILE.into(),
                    eos: m.eos,
                    source: input.display().to_string(),
                    context: Some(m.context_length()),
                },
            )),
            None => None,
        },
        None => None,
    };
    // The weights as pruned: the checkpoint and, when calibrated, the statistics.
    let fingerprint = model_fingerprint
        + &calibration.as_ref().map(|r| format!("+calibration:{}", r.key)).unwrap_or_default()
        + &factored.as_ref().map(|r| format!("+factors:{}", r.key)).unwrap_or_default()
        + &nsa.as_ref().map(|(r, _)| format!("+nsa-adapters:{}", r.adapters_key)).unwrap_or_default()
        + &kv_bases.as_ref().map(|r| format!("+kv-bases:{}", r.key)).unwrap_or_default();
    // `--strip-weights`: which weights are the checkpoint's tensors as it stores them.
    let as_stored = |name: &str| model.as_ref().and_then(|m| m.provenance(name));
    let strip: Option<sparsec_compiler::weights::StripRule<'_>> = flags.strip_weights.then_some(&as_stored);
    let weights = match (&flags.weights, &model) {
        (Some(_), _) if flags.strip_weights => {
            anyhow::bail!("--strip-weights leaves out a checkpoint's tensors: give a MODEL, not --weights")
        }
        (Some(p), _) => sparsec_compiler::WeightSource::File(p),
        (None, Some(_)) => {
            sparsec_compiler::WeightSource::Lookup { lookup: &lookup, fingerprint: &fingerprint, calibrated: calibration.is_some(), strip }
        }
        (None, None) if flags.strip_weights => anyhow::bail!("--strip-weights leaves out a checkpoint's tensors: compile a MODEL"),
        (None, None) => sparsec_compiler::WeightSource::None,
    };
    let print = PrintOptions { after_all: flags.print_after_all, after: flags.print_after.clone(), before: flags.print_before.clone() };
    for name in print.after.iter().chain(&print.before) {
        if !(name == "apply-plan" && plan_text.is_some()) {
            sparsec_passes::pass_by_name(name)?;
        }
    }
    let mut options = options(flags)?;
    // `--weights-dtype auto`: a checkpoint stored in f16 or bf16 stays so
    // (unless --dequantize asks for f32).
    if flags.weights_dtype == WeightsDTypeArg::Auto && !flags.dequantize {
        options.weights_dtype = match model.as_ref().and_then(|m| m.stored_half()) {
            Some(sparsec_ir::DType::F16) => sparsec_compiler::WeightsDType::F16,
            Some(sparsec_ir::DType::BF16) => sparsec_compiler::WeightsDType::Bf16,
            _ => sparsec_compiler::WeightsDType::F32,
        };
    }
    let compiled = compile(CompileRequest { graph, plan_text, weights, options, print, cache, output, lm })?;
    for s in &compiled.snapshots {
        eprintln!("// ----- IR {} -----\n{}", s.label, s.ir);
    }
    if flags.ptxas {
        let ptxas =
            sparsec_compiler::toolchain::find_ptxas().context("ptxas not found (set SPARSEC_PTXAS or `pip install nvidia-cuda-nvcc`)")?;
        for k in &compiled.manifest.kernels {
            if k.cuda.is_some() {
                let p = compiled.artifact.join("cuda").join(format!("{}.ptx", k.name));
                sparsec_compiler::toolchain::check_ptx(&ptxas, &p, &flags.sm)?;
            }
        }
    }
    Ok(compiled)
}

/// The plan text of `--plan FILE` or `--preset NAME`, checked.
fn plan_text(flags: &CompileFlags) -> Result<Option<String>> {
    plan_text_of(flags.plan.as_deref(), flags.preset.as_deref())
}

pub(crate) fn plan_text_of(plan: Option<&Path>, preset: Option<&str>) -> Result<Option<String>> {
    let text = match (plan, preset) {
        (Some(p), _) => std::fs::read_to_string(p).with_context(|| format!("reading plan {}", p.display()))?,
        (None, Some(name)) => sparsec_passes::Plan::preset(name)?,
        (None, None) => return Ok(None),
    };
    sparsec_passes::Plan::parse(&text).with_context(|| match plan {
        Some(p) => p.display().to_string(),
        None => format!("preset {}", preset.unwrap_or_default()),
    })?;
    Ok(Some(text))
}

fn is_model(input: &Path) -> bool {
    input.to_string_lossy() == "smollm2"
        || matches!(sparsec_models::classify(input), Ok(sparsec_models::SourceKind::Gguf | sparsec_models::SourceKind::HfDirectory))
}

/// The graph of an IR file, or of a model together with the model.
fn load_source(input: &Path) -> Result<(sparsec_ir::Graph, Option<sparsec_models::checkpoint::Model>)> {
    load_source_with(input, false)
}

fn load_source_with(input: &Path, dequantize: bool) -> Result<(sparsec_ir::Graph, Option<sparsec_models::checkpoint::Model>)> {
    let spec = input.to_string_lossy().into_owned();
    if is_model(input) {
        let m = if dequantize {
            sparsec_models::checkpoint::Model::load_dequantized(&spec)?
        } else {
            sparsec_models::checkpoint::Model::load(&spec)?
        };
        Ok((m.graph.clone(), Some(m)))
    } else {
        Ok((sparsec_models::load_graph(input)?, None))
    }
}

/// Where calibration statistics are kept (beside the compile cache; none with --no-cache).
fn calibration_cache(flags: &CompileFlags) -> Option<PathBuf> {
    (!flags.no_cache).then(|| flags.cache_dir.clone().unwrap_or_else(Cache::default_location))
}

fn cache_for(flags: &CompileFlags) -> Option<Cache> {
    (!flags.no_cache).then(|| Cache::new(flags.cache_dir.clone().unwrap_or_else(Cache::default_location)))
}

fn cmd_compile(a: CompileArgs) -> Result<()> {
    let c = do_compile(&a.input, a.output, &a.flags, cache_for(&a.flags))?;
    let code: usize = c.manifest.cpu_total(|s| s.code_bytes);
    let ptx: usize = c.manifest.kernels.iter().filter_map(|k| k.cuda.as_ref().map(|s| s.code_bytes)).sum();
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "artifact": c.artifact, "cache_hit": c.cache_hit, "wall_ms": c.wall_ms,
                "compile_ms": c.manifest.compile_ms, "kernels": c.manifest.kernels.len(),
                "cpu_code_bytes": code, "ptx_bytes": ptx, "cache_key": c.manifest.cache_key,
            }))?
        );
    } else {
        println!(
            "compiled {} -> {} ({} kernels, {} B x86-64, {} B PTX) in {:.1} ms{}",
            a.input.display(),
            c.artifact.display(),
            c.manifest.kernels.len(),
            code,
            ptx,
            c.wall_ms,
            if c.cache_hit { format!(" [cache hit; first compile took {:.1} ms]", c.manifest.compile_ms) } else { String::new() }
        );
    }
    Ok(())
}

/// The artifact to run: `input` itself, or `input` compiled (through the cache)
/// into `<cache>/run/<stem>.sparsec`, with CUDA code when running on CUDA.
fn artifact_for(input: &Path, flags: &CompileFlags, device: DeviceArg) -> Result<PathBuf> {
    if is_artifact(input) {
        return Ok(input.to_path_buf());
    }
    let mut flags = flags.clone();
    if device == DeviceArg::Cuda && matches!(flags.target, TargetArg::Cpu) {
        flags.target = TargetArg::All;
    }
    let dir = Cache::default_location().join("run");
    std::fs::create_dir_all(&dir)?;
    let stem = input.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "graph".into());
    Ok(do_compile(input, Some(dir.join(format!("{stem}.sparsec"))), &flags, cache_for(&flags))?.artifact)
}

fn device_kind(device: DeviceArg) -> DeviceKind {
    match device {
        DeviceArg::Cpu => DeviceKind::Cpu,
        DeviceArg::Cuda => DeviceKind::Cuda,
    }
}

fn execute(art: &Artifact, device: DeviceArg, inputs: &[ndarray::ArrayD<f32>], repeat: usize) -> Result<(Vec<ndarray::ArrayD<f32>>, f64)> {
    Ok(Executor::load(art, device_kind(device))?.run_timed(art, inputs, repeat)?)
}

fn cmd_run(a: RunArgs) -> Result<()> {
    if let Some(prompt) = &a.prompt {
        let src = lm_source(&a.input, a.compiled, a.threads, &a.flags, a.device)?;
        return lm_verbs::generate(
            &src,
            lm_verbs::GenerateArgs {
                prompt,
                max_new_tokens: a.max_new_tokens,
                temperature: a.temperature,
                top_k: a.top_k,
                seed: a.seed,
                json: a.json,
            },
        );
    }
    let path = artifact_for(&a.input, &a.flags, a.device)?;
    let art = open_artifact(&path)?;
    let inputs = art.random_inputs(a.seq, a.seed)?;
    let (outputs, ms) = execute(&art, a.device, &inputs, 1)?;
    let mut report = serde_json::json!({ "artifact": path, "seq": a.seq, "run_ms": ms });
    let mut ok = true;
    if a.check {
        let tol = Tolerance::default();
        let reference = reference_outputs(&art, &inputs)?;
        let (passed, cmps) = compare_all(&outputs, &reference, tol);
        ok = passed;
        report["check"] = serde_json::json!({ "passed": ok, "tolerance": tol, "outputs": cmps });
    }
    report["outputs"] = outputs
        .iter()
        .map(|o| serde_json::json!({ "shape": o.shape(), "values": o.iter().copied().collect::<Vec<f32>>() }))
        .collect::<Vec<_>>()
        .into();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "ran {} on {}, seq = {}: {:.3} ms",
            art.manifest.graph_name,
            if a.device == DeviceArg::Cpu { "cpu" } else { "cuda" },
            a.seq,
            ms
        );
        for (i, o) in outputs.iter().enumerate() {
            println!("output {i}: shape {:?}", o.shape());
            let cols = *o.shape().last().unwrap_or(&1);
            for (r, row) in o.as_slice().unwrap_or(&[]).chunks(cols.max(1)).enumerate().take(8) {
                let vals: Vec<String> = row.iter().take(8).map(|v| format!("{v:>9.5}")).collect();
                println!("  [{r}] {}{}", vals.join(" "), if row.len() > 8 { " ..." } else { "" });
            }
        }
        if let Some(c) = report.get("check") {
            let worst =
                c["outputs"].as_array().map(|v| v.iter().filter_map(|o| o["max_abs_error"].as_f64()).fold(0.0, f64::max)).unwrap_or(0.0);
            println!(
                "reference interpreter: {} (max abs error {worst:.2e}; tolerance atol 1e-4 + rtol 1e-4)",
                if ok { "MATCH" } else { "MISMATCH" }
            );
        }
    }
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}

/// A language model to run: an artifact (compiled), a model compiled through
/// the cache (`compiled`), or a model on the reference interpreter (CPU only:
/// `--device cuda` needs a compiled model).
fn lm_source(input: &Path, compiled: bool, threads: Option<usize>, flags: &CompileFlags, device: DeviceArg) -> Result<lm_verbs::LmSource> {
    if is_artifact(input) {
        return lm_verbs::LmSource::artifact(input, threads, device_kind(device));
    }
    if compiled || device == DeviceArg::Cuda {
        let path = artifact_for(input, flags, device)?;
        return lm_verbs::LmSource::artifact(&path, threads, device_kind(device));
    }
    lm_verbs::LmSource::model(&input.to_string_lossy(), plan_text(flags)?.as_deref(), calibration_cache(flags).as_deref())
}

fn cmd_eval(a: EvalArgs) -> Result<()> {
    // The text is checked before the model loads: its errors name the file.
    let body = std::fs::read_to_string(&a.text).with_context(|| format!("reading {}", a.text.display()))?;
    if body.trim().is_empty() {
        bail!("{}: the text is empty", a.text.display());
    }
    let src = lm_source(Path::new(&a.model), a.compiled, a.threads, &a.flags, a.device)?;
    lm_verbs::eval(&src, &a.text, &body, a.max_tokens, a.stride, a.json)
}

/// Compiles `input` into `dir` twice, with a fresh cache there: cold, then a
/// cache hit; records both wall times in `report` and returns the artifact.
fn compile_cold_and_cached(input: &Path, flags: &CompileFlags, dir: &Path, report: &mut serde_json::Value) -> Result<PathBuf> {
    let cache = Cache::new(dir.join("cache"));
    let out = dir.join("bench.sparsec");
    let cold = do_compile(input, Some(out.clone()), flags, Some(Cache::new(cache.root())))?;
    let warm = do_compile(input, Some(out.clone()), flags, Some(cache))?;
    report["compile_cold_ms"] = cold.wall_ms.into();
    report["compile_cache_hit_ms"] = warm.wall_ms.into();
    Ok(out)
}

/// `sparsec bench` on a model or its artifact: compile cold and cached (for a
/// model), then prefill and decode tokens/s, peak memory and code size.
fn cmd_bench_lm(a: &BenchArgs) -> Result<()> {
    let mut report = serde_json::json!({ "input": a.input });
    let tmp = tempfile::tempdir()?;
    let mut flags = a.flags.clone();
    if a.device == DeviceArg::Cuda && matches!(flags.target, TargetArg::Cpu) {
        flags.target = TargetArg::All;
    }
    let path = if is_artifact(&a.input) { a.input.clone() } else { compile_cold_and_cached(&a.input, &flags, tmp.path(), &mut report)? };
    let src = lm_verbs::LmSource::artifact(&path, a.threads, device_kind(a.device))?;
    let (art, exec) = src.artifact.as_ref().context("no artifact")?;
    let threads = match exec {
        Executor::Cpu(e) => e.threads(),
        Executor::Cuda(_) => 0,
    };
    report["device"] = exec.device_name().into();
    let code: usize = art.manifest.cpu_total(|s| s.code_bytes);
    let weights = std::fs::metadata(path.join(sparsec_runtime::manifest::WEIGHTS_FILE)).map(|m| m.len()).unwrap_or(0);
    report["kernels"] = art.manifest.kernels.len().into();
    report["cpu_code_bytes"] = code.into();
    report["weights_bytes"] = weights.into();
    report["threads"] = threads.into();
    // What was measured: the cache type, how quantized matmuls took their
    // activations, and where the weights were read from.
    let plan = &art.manifest.execution;
    let kv_cache = plan.buffers.iter().find(|b| b.kind == sparsec_runtime::manifest::BufferKind::KvCache).map(|b| b.dtype.name());
    let quantized = plan.buffers.iter().any(|b| b.dtype.is_quantized());
    // int8 only where the target could (AVX2): the options say what was asked.
    let options: Option<CompileOptions> = serde_json::from_value(art.manifest.options.clone()).ok();
    let activations = options.filter(|_| quantized).map(|o| if o.int8_activations() { "int8" } else { "f32" });
    let placement = match exec {
        Executor::Cpu(e) => e.placement(),
        // The GPU holds the weights in device memory, uploaded at load.
        Executor::Cuda(_) => sparsec_runtime::cpu::WeightPlacement::Resident,
    };
    let amx_tiles = plan.buffers.iter().filter(|b| b.tiles.is_some()).count();
    report["kv_cache"] = kv_cache.into();
    report["quant_activations"] = activations.into();
    report["amx_tile_weights"] = amx_tiles.into();
    report["weights_placement"] = placement.name().into();
    let r = lm_verbs::bench_lm(&src, &a.text, a.prompt_len, a.new_tokens, a.repeat.unwrap_or(1))?;
    if let (Some(o), Some(r)) = (report.as_object_mut(), r.as_object()) {
        o.extend(r.clone());
    }
    let positions = report["prompt_tokens"].as_u64().unwrap_or(0) as usize + a.new_tokens;
    // The CUDA session keeps whole caches (rings are the CPU's).
    report["kv"] = kv_report(plan, positions, matches!(exec, Executor::Cpu(_)));
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let f = |k: &str| report[k].as_f64().unwrap_or(0.0);
        if let Some(ranks) = report["chunk_ranks"].as_object().filter(|r| !r.is_empty()) {
            for (role, hist) in ranks {
                let h: Vec<String> = hist.as_object().into_iter().flatten().map(|(r, n)| format!("rank {r}: {n}")).collect();
                println!("chunked-SVD {role} factors (chunk × KV head): {}", h.join(", "));
            }
        }
        if report.get("compile_cold_ms").is_some() {
            println!("compile (cold):      {:>10.1} ms", f("compile_cold_ms"));
            println!("compile (cache hit): {:>10.1} ms", f("compile_cache_hit_ms"));
        }
        let on = match exec {
            Executor::Cpu(_) => format!("{threads} threads"),
            Executor::Cuda(_) => "cuda".to_string(),
        };
        println!(
            "prefill: {:>8.1} tokens/s ({} tokens in {:.3} s, {on})",
            f("prefill_tokens_per_s"),
            report["prompt_tokens"],
            f("prefill_s")
        );
        println!("decode:  {:>8.1} tokens/s ({} tokens in {:.3} s)", f("decode_tokens_per_s"), a.new_tokens, f("decode_s"));
        println!(
            "peak memory: {:.1} MB; weights {:.1} MB; machine code {code} B in {} kernels",
            f("peak_rss_bytes") / 1e6,
            weights as f64 / 1e6,
            art.manifest.kernels.len()
        );
        let placement = match placement {
            sparsec_runtime::cpu::WeightPlacement::Resident => "weights resident on 2 MB pages",
            sparsec_runtime::cpu::WeightPlacement::Mapped => "weights read from the file mapping",
        };
        let kv = &report["kv"];
        let (lo, hi) = (kv["min_cache_bytes_per_position"].as_u64().unwrap_or(0), kv["max_cache_bytes_per_position"].as_u64().unwrap_or(0));
        let per_cache = if lo == hi { format!("{lo} B each") } else { format!("{lo} to {hi} B each") };
        println!(
            "KV caches: {} B per position ({} caches, {per_cache}); {:.1} MB held at {positions} positions{}",
            kv["bytes_per_position"],
            kv["caches"],
            kv["bytes_held"].as_f64().unwrap_or(0.0) / 1e6,
            if kv["ring_caches"].as_u64().unwrap_or(0) > 0 { " (ring caches stop at their capacity)" } else { "" }
        );
        let activations = activations.map(|a| format!("{a} activations for quantized matmuls, ")).unwrap_or_default();
        let tiles = if amx_tiles > 0 { format!(", {amx_tiles} weights as AMX tiles") } else { String::new() };
        println!("setup: {}KV caches {}, {placement}{tiles}", activations, kv_cache.unwrap_or("none"));
    }
    Ok(())
}

/// The KV caches of an execution plan: bytes per position (all caches, and
/// the least and most of one cache), and the bytes they hold at `positions`
/// (a windowed layer's ring stops at its capacity where `rings` holds: the
/// CPU session), per cache too. NSA's block summaries are counted apart
/// (`block_summary_bytes_held`).
fn kv_report(plan: &sparsec_runtime::manifest::ExecutionPlan, positions: usize, rings: bool) -> serde_json::Value {
    use sparsec_runtime::manifest::BufferKind;
    let caches: Vec<_> = plan.buffers.iter().filter(|b| b.kind == BufferKind::KvCache).collect();
    let per_position: Vec<usize> = caches.iter().map(|b| b.position_bytes()).collect();
    let ring = |b: &sparsec_runtime::manifest::BufferSpec| b.ring.filter(|_| rings);
    let held: Vec<usize> = caches
        .iter()
        .zip(&per_position)
        .map(|(b, p)| match b.compressed() {
            // Exact rows, then a record per complete chunk or block.
            Some(_) => b.bytes(positions as u64),
            None => b.fixed_bytes() + p * if rings { b.cache_rows(positions) } else { positions },
        })
        .collect();
    let summaries: usize = plan.buffers.iter().filter_map(|b| b.block_rows(positions).map(|rows| rows * b.bytes(1))).sum();
    serde_json::json!({
        "positions": positions,
        "caches": caches.len(),
        "ring_caches": caches.iter().filter(|b| ring(b).is_some()).count(),
        "bytes_per_position": per_position.iter().sum::<usize>(),
        "min_cache_bytes_per_position": per_position.iter().min().copied().unwrap_or(0),
        "max_cache_bytes_per_position": per_position.iter().max().copied().unwrap_or(0),
        "bytes_held": held.iter().sum::<usize>(),
        "block_summary_bytes_held": summaries,
        "per_cache": caches.iter().zip(per_position.iter().zip(&held)).map(|(b, (p, h))| serde_json::json!({
            "name": b.name, "dtype": b.dtype.name(), "bytes_per_position": p, "bytes_held": h,
            "capacity_positions": ring(b).map(|r| r.capacity()),
        })).collect::<Vec<_>>(),
    })
}

fn cmd_bench(a: BenchArgs) -> Result<()> {
    // Which bench this is: the manifest says (the artifact is validated when opened below).
    let lm_artifact = is_artifact(&a.input) && sparsec_runtime::manifest::is_lm_artifact(&a.input);
    if is_model(&a.input) || lm_artifact {
        return cmd_bench_lm(&a);
    }
    if a.device == DeviceArg::Cuda {
        bail!(
            "bench --device cuda measures language models (a model or its artifact); for a graph use sparsec-run --device cuda --repeat N"
        );
    }
    let repeat = a.repeat.unwrap_or(20);
    let mut report = serde_json::json!({ "input": a.input, "seq": a.seq });
    let path = if is_artifact(&a.input) {
        a.input.clone()
    } else {
        let tmp = tempfile::tempdir()?;
        let out = compile_cold_and_cached(&a.input, &a.flags, tmp.path(), &mut report)?;
        let keep = std::env::temp_dir().join(format!("sparsec-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&keep);
        sparsec_compiler::cache::link_or_copy_dir(&out, &keep)?;
        keep
    };
    let art = open_artifact(&path)?;
    let inputs = art.random_inputs(a.seq, 0)?;
    let (_, run_ms) = execute(&art, DeviceArg::Cpu, &inputs, repeat)?;
    let t = Instant::now();
    reference_outputs(&art, &inputs)?;
    let interp_ms = t.elapsed().as_secs_f64() * 1e3;
    let code: usize = art.manifest.cpu_total(|s| s.code_bytes);
    let kernel_ms: f64 = art.manifest.cpu_total(|s| s.compile_ms);
    report["run_cpu_ms_median"] = run_ms.into();
    report["reference_interpreter_ms"] = interp_ms.into();
    report["speedup_vs_interpreter"] = (interp_ms / run_ms).into();
    report["cpu_code_bytes"] = code.into();
    report["kernel_compile_ms_sum"] = kernel_ms.into();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        if let Some(c) = report.get("compile_cold_ms") {
            println!("compile (cold):      {:>10.1} ms", c.as_f64().unwrap_or(0.0));
            println!("compile (cache hit): {:>10.1} ms", report["compile_cache_hit_ms"].as_f64().unwrap_or(0.0));
        }
        println!("run, cpu (median of {}): {:.3} ms at seq = {}", repeat, run_ms, a.seq);
        println!("reference interpreter:  {:.3} ms ({:.1}x slower)", interp_ms, interp_ms / run_ms);
        println!("machine code: {code} B in {} kernels", art.manifest.kernels.len());
    }
    if !is_artifact(&a.input) {
        let _ = std::fs::remove_dir_all(&path);
    }
    Ok(())
}

fn cmd_inspect(a: InspectArgs) -> Result<()> {
    if is_artifact(&a.input) {
        let art = open_artifact(&a.input)?;
        let m = &art.manifest;
        if a.json {
            println!("{}", serde_json::to_string_pretty(m)?);
            return Ok(());
        }
        println!("artifact {} (manifest v{}, sparsec {})", a.input.display(), m.version, m.sparsec_version);
        println!("graph @{}  targets {}  compile {:.1} ms", m.graph_name, m.targets.join(","), m.compile_ms);
        println!("source {}\ncache  {}", m.source_hash, m.cache_key);
        if m.targets.iter().any(|t| t == "cpu") {
            // The x86-64 features the CPU code may use (those the loader checks against the host).
            let (cpu, features) = sparsec_runtime::isa::recorded_target(&m.options);
            let known = sparsec_runtime::isa::checked(&sparsec_runtime::isa::required(&cpu, &features));
            println!("cpu    {cpu}: {}", if known.is_empty() { "(features not recorded)".to_string() } else { known.join(" ") });
            // Weights stored for AMX tiles, by layout.
            let mut tiles: std::collections::BTreeMap<String, usize> = Default::default();
            for b in m.execution.buffers.iter().filter_map(|b| b.tiles) {
                *tiles.entry(format!("{b:?}")).or_default() += 1;
            }
            if !tiles.is_empty() {
                let list: Vec<String> = tiles.iter().map(|(t, n)| format!("{n} as {t}")).collect();
                println!("tiles  weights stored for AMX tiles: {}", list.join(", "));
            }
        }
        println!("{:<20} {:<11} {:>10} {:>10} {:>10} {:>10}", "kernel", "op", "cpu ms", "x86 B", "cuda ms", "ptx B");
        for k in &m.kernels {
            let f = |s: &Option<sparsec_runtime::manifest::CodeStats>| match s {
                Some(s) => (format!("{:.2}", s.compile_ms), s.code_bytes.to_string()),
                None => ("-".into(), "-".into()),
            };
            let (cm, cb) = f(&k.cpu);
            let (gm, gb) = f(&k.cuda);
            println!("{:<20} {:<11} {:>10} {:>10} {:>10} {:>10}", k.name, k.op, cm, cb, gm, gb);
            if let Some(why) = &k.specialization {
                println!("    specialization: {why}");
            }
        }
        for b in m.execution.buffers.iter().filter(|b| b.sparse.is_some()) {
            if let Some(st) = &b.sparse {
                println!("sparse weight {:<28} {:<4} {:>10} B  {:?}", b.name, st.format.name(), st.format.bytes(), st.format);
            }
        }
        // K/V caches in pairs: rows held and bytes per row.
        for b in m.execution.buffers.iter().filter(|b| b.kind == sparsec_runtime::manifest::BufferKind::KvCache) {
            let rows = match (b.ring, b.channel_groups) {
                _ if b.chunked.is_some() => match (b.chunked, b.chunk_layout()) {
                    (Some(c), Some(l)) => format!(
                        "every position; factored per chunk of {} (rank {}{}, {} B per chunk), a ring of {} exact rows ({} B)",
                        l.chunk,
                        match c.energy {
                            Some(e) => format!("for {e} of the energy, at most "),
                            None => String::new(),
                        },
                        l.slot,
                        l.chunk_bytes(),
                        l.ring,
                        l.residual_bytes()
                    ),
                    _ => "a chunked layout that does not fit".into(),
                },
                _ if b.sequence.is_some() => match b.sequence_layout() {
                    Some(l) => format!(
                        "every position; {} sinks exact, blocks of {} older than the last {} read as {} low-pass rows ({}; {} B per block), a ring of {} exact rows ({} B)",
                        l.sinks,
                        l.block,
                        l.recent,
                        l.m,
                        match l.basis {
                            sparsec_ir::kv_sequence::SeqBasis::Dct => "DCT".to_string(),
                            sparsec_ir::kv_sequence::SeqBasis::Pswf { bandwidth } => format!("PSWF, bandwidth {bandwidth}"),
                        },
                        l.block_bytes(),
                        l.ring,
                        l.exact_bytes()
                    ),
                    None => "a sequence layout that does not fit".into(),
                },
                (Some(r), _) => format!("ring of {} rows ({} sinks, {} more than one call appends)", r.capacity(), r.sinks, r.max_rows),
                (None, Some(g)) => format!("every position; per channel in groups of {g}, the newest group exact ({} B)", b.fixed_bytes()),
                (None, None) => match b.head_blocks {
                    Some(h) => format!("every position; on the CPU per block of {} positions and KV head ({} heads)", h.block, h.heads),
                    None => "every position".into(),
                },
            };
            println!("kv cache {:<28} {:<4} {:>6} B/position  {rows}", b.name, b.dtype.name(), b.position_bytes());
        }
        for b in &m.execution.buffers {
            if let sparsec_runtime::manifest::BufferKind::BlockCache { block } = b.kind {
                println!("block cache {:<25} {:<4} {:>6} B/block of {block} positions", b.name, b.dtype.name(), b.bytes(1));
            }
        }
        println!("buffers: {}  steps: {}", m.execution.buffers.len(), m.execution.steps.len());
        return Ok(());
    }
    let (mut g, model) = load_source(&a.input)?;
    let plan_text = crate::from_weights::resolve_text(plan_text_of(a.plan.as_deref(), a.preset.as_deref())?, model.as_ref())?;
    let plan = plan_text.map(|t| sparsec_passes::Plan::parse(&t)).transpose()?;
    let with_plan = plan.is_some();
    sparsec_passes::PassManager::with_plan(plan, PrintOptions::default()).run(&mut g)?;
    if with_plan && !a.json {
        // What every matmul and attention op ends up with.
        println!("{:<24} {:<22} {:<16} patterns", "value", "weight", "shape");
        for n in &g.nodes {
            if !matches!(n.op, sparsec_ir::Op::MatMul { .. } | sparsec_ir::Op::Attention { .. }) {
                continue;
            }
            let w = n.operands.get(1).map(|o| &g.nodes[o.0]);
            let (wname, shape) = match (&n.op, w) {
                (sparsec_ir::Op::MatMul { .. }, Some(w)) => (
                    match &w.op {
                        sparsec_ir::Op::Weight { name, .. } => name.clone(),
                        _ => w.name.clone(),
                    },
                    w.ty.as_ref().map(|t| t.to_string()).unwrap_or_default(),
                ),
                _ => ("-".into(), String::new()),
            };
            let pats: Vec<String> = n.patterns.iter().map(|p| format!("#{}({})", p.keyword(), p.to_args())).collect();
            let mut line =
                format!("%{:<23} {:<22} {:<16} {}", n.name, wname, shape, if pats.is_empty() { "dense".into() } else { pats.join(" ") });
            if let sparsec_ir::Op::Attention { .. } = n.op {
                // What its K/V cache holds on the CPU (f16: 2 bytes a value).
                let width = n.operands.get(1).and_then(|k| g.nodes[k.0].ty.as_ref()).and_then(|t| t.dims.last().cloned());
                let window = n.patterns.iter().find_map(|p| match p {
                    sparsec_ir::Pattern::Window(sparsec_ir::Window::Sliding { size, sinks }) => Some((*size, *sinks)),
                    _ => None,
                });
                if let Some(sparsec_ir::Dim::Fixed(w)) = width {
                    let per = 2 * 2 * w;
                    line += &match sparsec_compiler::mlir::kernels::cpu_ring(window) {
                        Some((sinks, rows)) => {
                            let cap = (sinks + rows) as u64;
                            format!("  kv cache: ring of {cap} rows, {:.1} KiB", (cap * per) as f64 / 1024.0)
                        }
                        None => format!("  kv cache: every position, {per} B each"),
                    };
                    // NSA keeps a row of key summaries per block besides.
                    if let Some(nsa) = sparsec_ir::NativeSparse::of(&n.patterns) {
                        let row = 4 * nsa.block_words(w);
                        line += &format!(" + block summaries: {row} B per {} positions", nsa.block);
                    }
                }
            }
            println!("{line}");
        }
        return Ok(());
    }
    if a.json {
        let values: Vec<_> = g
            .nodes
            .iter()
            .map(|n| serde_json::json!({ "name": n.name, "op": n.op.keyword(), "type": n.ty.as_ref().map(|t| t.to_string()) }))
            .collect();
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "graph": g.name, "values": values }))?);
    } else {
        print!("{}", sparsec_ir::print_graph(&g));
    }
    Ok(())
}
