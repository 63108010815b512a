//! The compile driver: passes → partition → per-kernel MLIR/LLVM for each target
//! → link → artifact (staged, then published atomically), with the cache in front.

use crate::backend;
use crate::cache::{link_or_copy_dir, publish, staging_dir_for, Cache};
use crate::error::{CompileError, CompileResult};
use crate::mlir::pipeline::MlirSession;
use crate::mlir::{emit_kernel, Device};
use crate::options::{CompileOptions, Emit};
use crate::partition::partition_with;
use crate::toolchain;
use crate::weights::{resolve, write_safetensors, WeightSource};
use sparsec_ir::{print_graph, Graph};
use sparsec_passes::{PassManager, PrintOptions, Snapshot};
use sparsec_runtime::manifest::*;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Everything one compile needs.
pub struct CompileRequest<'a> {
    pub graph: Graph,
    pub plan_text: Option<String>,
    pub weights: WeightSource<'a>,
    pub options: CompileOptions,
    pub print: PrintOptions,
    /// `None` disables the cache.
    pub cache: Option<Cache>,
    /// Where the artifact goes.
    pub output: PathBuf,
    /// For a language model: the tokenizer (JSON), end token and source.
    pub lm: Option<(String, LmInfo)>,
}

/// What a compile produced.
pub struct Compiled {
    pub artifact: PathBuf,
    pub cache_hit: bool,
    pub manifest: Manifest,
    pub snapshots: Vec<Snapshot>,
    /// Wall time of this call, cache lookups and copies included.
    pub wall_ms: f64,
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn write(path: &Path, bytes: impl AsRef<[u8]>) -> CompileResult<()> {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).map_err(CompileError::io(p))?;
    }
    std::fs::write(path, bytes).map_err(CompileError::io(path))
}

fn read_manifest(dir: &Path) -> CompileResult<Manifest> {
    let p = dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&p).map_err(CompileError::io(&p))?;
    serde_json::from_str(&text).map_err(|e| CompileError::File { path: p, message: e.to_string() })
}

/// Gives the kernels that bake a weight's structure (`indices`, `full`) its packed bytes.
pub fn attach_baked_weights(part: &mut crate::partition::Partition, tensors: &[(String, Vec<usize>, crate::weights::WeightData)]) {
    for spec in &mut part.kernels {
        if let Some(c) = spec.sparse.as_mut().filter(|c| c.bakes()) {
            c.data = tensors.iter().find(|(name, _, _)| *name == c.weight).and_then(|(_, _, d)| match d {
                crate::weights::WeightData::Sparse(bytes) => Some(std::sync::Arc::new(bytes.clone())),
                _ => None,
            });
        }
    }
}

/// Compiles `req.graph` into an artifact at `req.output`.
pub fn compile(req: CompileRequest<'_>) -> CompileResult<Compiled> {
    let start = Instant::now();
    let mut g = req.graph;
    let plan = req.plan_text.as_deref().map(sparsec_passes::Plan::parse).transpose()?;
    // Calibrated methods are applied to the weights before a compile (by the
    // CLI, which has the model and its tokenizer); here they would silently
    // become magnitude pruning.
    let calibrated = matches!(req.weights, WeightSource::Lookup { calibrated: true, .. });
    if let Some(r) = plan.iter().flat_map(|p| &p.rules).find(|r| r.sparsity.is_some() && r.method.calibrated() && !calibrated) {
        return Err(sparsec_passes::PlanError::Rule {
            rule: r.index,
            message: format!(
                "method = \"{}\" needs calibration: compile a model checkpoint with this plan (sparsec compile MODEL --plan ...)",
                r.method.name()
            ),
        }
        .into());
    }
    let params_before = sparsec_runtime::manifest::weight_params(&g);
    let snapshots = PassManager::with_plan(plan, req.print.clone()).run(&mut g)?;
    // `--weights-dtype f16|bf16|q8_0|q4_1`: dense matmul weights and tables
    // stored in 16 bits or quantized blocks.
    if let Some(dt) = req.options.weights_dtype.stored() {
        crate::half_weights::apply(&mut g, dt);
    }
    let part = partition_with(&g, &req.options)?;
    let graph_text = print_graph(&g);

    // The source is the graph, the plan and the weights as stored (checkpoint or
    // weights file bytes; `init`s are in the graph text): hashing it needs no
    // decoding, so a cache hit never touches the weight data.
    let mut src = blake3::Hasher::new();
    src.update(graph_text.as_bytes());
    src.update(req.plan_text.as_deref().unwrap_or("").as_bytes());
    match req.weights {
        WeightSource::None => {}
        WeightSource::File(p) => {
            let f = std::fs::File::open(p).map_err(CompileError::io(p))?;
            // SAFETY: read-only map of the user's weights file for hashing.
            let map = unsafe { memmap2::Mmap::map(&f) }.map_err(CompileError::io(p))?;
            src.update(b"file:");
            src.update(&map);
        }
        WeightSource::Lookup { fingerprint, strip, .. } => {
            src.update(b"checkpoint:");
            src.update(fingerprint.as_bytes());
            if strip.is_some() {
                src.update(b"|stripped");
            }
        }
    }
    let source_hash = src.finalize().to_hex().to_string();
    let options_json = req.options.canonical_json();
    let mut key = blake3::Hasher::new();
    key.update(source_hash.as_bytes());
    key.update(options_json.to_string().as_bytes());
    key.update(env!("CARGO_PKG_VERSION").as_bytes());
    // The generator's own sources (compiler/build.rs): a changed kernel emitter
    // misses the cache instead of being served what the old one wrote.
    key.update(env!("SPARSEC_GENERATOR_HASH").as_bytes());
    key.update(&MANIFEST_VERSION.to_le_bytes());
    let cache_key = key.finalize().to_hex().to_string();

    if let Some(hit) = req.cache.as_ref().and_then(|c| c.lookup(&cache_key)) {
        let staged = staging_dir_for(&req.output)?;
        let inner = staged.path().join("artifact");
        link_or_copy_dir(&hit, &inner)?;
        publish(&inner, &req.output)?;
        let manifest = read_manifest(&req.output)?;
        return Ok(Compiled { artifact: req.output, cache_hit: true, manifest, snapshots, wall_ms: ms(start) });
    }

    let tensors = resolve(&g, &part, req.weights)?;
    let checkpoint_weights = match req.weights {
        WeightSource::Lookup { strip: Some(rule), .. } => crate::weights::stripped(&g, &part, rule)?,
        _ => Vec::new(),
    };
    let mut part = part;
    attach_baked_weights(&mut part, &tensors);
    let staged = staging_dir_for(&req.output)?;
    let dir = staged.path().join("artifact");
    std::fs::create_dir_all(&dir).map_err(CompileError::io(&dir))?;
    let opts = &req.options;
    let session = MlirSession::new();
    let mut records = Vec::new();
    let mut objects = Vec::new();
    let obj_dir = staged.path().join("objects");
    for spec in &part.kernels {
        let mut rec = KernelRecord {
            name: spec.name.clone(),
            op: spec.op.keyword().into(),
            cpu: None,
            cuda: None,
            specialization: spec.sparse.as_ref().map(|c| c.reason.clone()),
        };
        for device in [Device::Cpu, Device::Nvptx] {
            if (device == Device::Cpu && !opts.target.cpu()) || (device == Device::Nvptx && !opts.target.cuda()) {
                continue;
            }
            let t = Instant::now();
            let mlir = emit_kernel(spec, device)?;
            let llvm = inkwell::context::Context::create();
            let (module, lowered) = session.lower_to_llvm(&spec.name, &mlir, device, &llvm)?;
            let tag = if device == Device::Cpu { "cpu" } else { "cuda" };
            let out = match device {
                Device::Cpu => backend::emit_cpu(&spec.name, &module, &opts.cpu, opts.opt_level, opts.wants(Emit::Asm))?,
                Device::Nvptx => backend::emit_ptx(&spec.name, &module, &opts.cuda, opts.opt_level)?,
            };
            let stats =
                CodeStats { compile_ms: ms(t), mlir_bytes: mlir.len(), llvm_ir_bytes: out.llvm_ir.len(), code_bytes: out.code_bytes };
            let emit_dir = dir.join("emit").join(tag);
            if opts.wants(Emit::Mlir) {
                write(&emit_dir.join(format!("{}.mlir", spec.name)), &mlir)?;
                write(&emit_dir.join(format!("{}.llvm.mlir", spec.name)), &lowered)?;
            }
            if opts.wants(Emit::Llvm) {
                write(&emit_dir.join(format!("{}.ll", spec.name)), &out.llvm_ir)?;
            }
            if let Some(asm) = &out.asm {
                write(&emit_dir.join(format!("{}.s", spec.name)), asm)?;
            }
            match device {
                Device::Cpu => {
                    let p = obj_dir.join(format!("{}.o", spec.name));
                    write(&p, &out.code)?;
                    objects.push(p);
                    rec.cpu = Some(stats);
                }
                Device::Nvptx => {
                    write(&dir.join(CUDA_DIR).join(format!("{}.ptx", spec.name)), &out.code)?;
                    if opts.wants(Emit::Ptx) {
                        write(&emit_dir.join(format!("{}.ptx", spec.name)), &out.code)?;
                    }
                    rec.cuda = Some(stats);
                }
            }
        }
        records.push(rec);
    }
    if opts.target.cpu() {
        let lib = dir.join(CPU_LIBRARY);
        if let Some(p) = lib.parent() {
            std::fs::create_dir_all(p).map_err(CompileError::io(p))?;
        }
        // The ABI table (also what a graph with no compute links).
        let p = obj_dir.join("sparsec_abi.o");
        write(&p, crate::abi::object(&part.plan, &opts.cpu)?.code)?;
        objects.push(p);
        toolchain::link_shared(&objects, &lib)?;
    }
    // `--strip-weights`: the checkpoint's tensors stay out (the runtime packs them).
    if checkpoint_weights.is_empty() {
        write_safetensors(&dir.join(WEIGHTS_FILE), &tensors)?;
    } else {
        let kept: Vec<_> = tensors.iter().filter(|(name, _, _)| !checkpoint_weights.contains(name)).cloned().collect();
        write_safetensors(&dir.join(WEIGHTS_FILE), &kept)?;
    }
    write(&dir.join(GRAPH_FILE), &graph_text)?;
    if let Some(plan) = &req.plan_text {
        write(&dir.join(PLAN_FILE), plan)?;
    }
    if let Some((tokenizer, info)) = &req.lm {
        write(&dir.join(&info.tokenizer), tokenizer)?;
    }
    if opts.wants(Emit::Ir) {
        write(&dir.join("emit").join("graph.sir"), &graph_text)?;
    }
    let mut targets = Vec::new();
    if opts.target.cpu() {
        targets.push("cpu".to_string());
    }
    if opts.target.cuda() {
        targets.push("cuda".to_string());
    }
    let mut manifest = Manifest {
        version: MANIFEST_VERSION,
        sparsec_version: env!("CARGO_PKG_VERSION").into(),
        graph_name: g.name.clone(),
        source_hash,
        cache_key: cache_key.clone(),
        plan: req.plan_text.clone(),
        options: options_json,
        targets,
        kernels: records,
        execution: part.plan,
        compile_ms: ms(start),
        lm: req.lm.as_ref().map(|(_, info)| info.clone()),
        files: Default::default(),
        integrity: String::new(),
        params: Some(sparsec_runtime::manifest::ParamCounts { before: params_before, after: sparsec_runtime::manifest::weight_params(&g) }),
        checkpoint_weights,
    };
    // Every file's hash, and the manifest's own (`integrity`): checked at load.
    let json = sparsec_runtime::integrity::seal(&dir, &mut manifest)
        .map_err(|e| CompileError::File { path: dir.clone(), message: e.to_string() })?;
    // The manifest is written last: a directory without one is never an artifact.
    write(&dir.join(MANIFEST_FILE), json)?;
    publish(&dir, &req.output)?;
    if let Some(c) = &req.cache {
        c.insert(&cache_key, &req.output)?;
    }
    Ok(Compiled { artifact: req.output, cache_hit: false, manifest, snapshots, wall_ms: ms(start) })
}
