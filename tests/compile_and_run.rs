//! The whole pipe on the README's MLP block: compile to an artifact, run it on the
//! CPU against the reference interpreter, hit the cache, check the PTX with
//! ptxas, run on CUDA where a GPU exists, and never leave half an artifact.

use crate::common;

use sparsec_compiler::{compile, Cache, CompileError, CompileOptions, CompileRequest, Compiled, TargetKind};
use sparsec_ir::parse_graph;
use sparsec_passes::PrintOptions;
use sparsec_runtime::compare::{compare, Tolerance};
use sparsec_runtime::cpu::{CpuExecutor, WeightPlacement};
use sparsec_runtime::interpreter::interpret;
use sparsec_runtime::Artifact;
use std::path::{Path, PathBuf};

fn example() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/mlp_block.sir")).unwrap()
}

fn build(src: &str, target: TargetKind, out: &Path, cache: Option<&Path>) -> Result<Compiled, CompileError> {
    build_with(src, CompileOptions { target, ..Default::default() }, out, cache)
}

fn build_with(src: &str, options: CompileOptions, out: &Path, cache: Option<&Path>) -> Result<Compiled, CompileError> {
    compile(CompileRequest {
        graph: parse_graph(src)?,
        plan_text: None,
        weights: sparsec_compiler::WeightSource::None,
        options,
        print: PrintOptions::default(),
        cache: cache.map(Cache::new),
        output: out.to_path_buf(),
        lm: None,
    })
}

fn leftovers(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
        .collect()
}

#[test]
fn mlp_block_compiles_runs_equal_to_reference_and_hits_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("mlp.sparsec");
    let cache = tmp.path().join("cache");
    let first = build(&example(), TargetKind::All, &out, Some(&cache)).unwrap();
    assert!(!first.cache_hit);
    assert_eq!(first.manifest.kernels.len(), 8);
    for k in &first.manifest.kernels {
        let cpu = k.cpu.as_ref().expect("cpu stats");
        let cuda = k.cuda.as_ref().expect("cuda stats");
        assert!(cpu.compile_ms > 0.0 && cpu.code_bytes > 0 && cpu.llvm_ir_bytes > 0 && cpu.mlir_bytes > 0, "{k:?}");
        assert!(cuda.code_bytes > 0, "{k:?}");
        assert!(out.join("cuda").join(format!("{}.ptx", k.name)).is_file());
    }

    let art = Artifact::open(&out).unwrap();
    let exec = CpuExecutor::load(&art).unwrap();
    for seq in [1, 2, 31, 128] {
        let inputs = art.random_inputs(seq, seq).unwrap();
        let got = exec.run(&art, &inputs).unwrap();
        let want = interpret(&art.graph, &inputs, &|n| art.weight_array(n).ok().map(std::sync::Arc::new)).unwrap();
        assert_eq!((got.len(), want.len()), (2, 2), "outputs of the compiled graph and of the reference");
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.shape(), w.shape(), "seq {seq}");
            let c = compare(g, w, Tolerance::default());
            assert!(c.passed, "seq {seq}: max abs error {} (atol = rtol = 1e-4)", c.max_abs_error);
        }
    }

    // Weights read into huge-page memory (the default) and weights read from
    // the artifact's file mapping give the same bits.
    let mapped = CpuExecutor::load_placed(&art, WeightPlacement::Mapped).unwrap();
    assert_eq!((exec.placement(), mapped.placement()), (WeightPlacement::Resident, WeightPlacement::Mapped));
    let inputs = art.random_inputs(31, 5).unwrap();
    assert_eq!(exec.run(&art, &inputs).unwrap(), mapped.run(&art, &inputs).unwrap());

    let again = build(&example(), TargetKind::All, &out, Some(&cache)).unwrap();
    assert!(again.cache_hit, "the same graph and options must hit the cache");
    assert_eq!(again.manifest, first.manifest);
    let other = build(&example(), TargetKind::Cpu, &tmp.path().join("cpu-only"), Some(&cache)).unwrap();
    assert!(!other.cache_hit, "different options are a different cache key");
    assert_ne!(other.manifest.cache_key, first.manifest.cache_key);
    assert_eq!(other.manifest.source_hash, first.manifest.source_hash);
    assert!(leftovers(tmp.path()).is_empty(), "staging directories left behind: {:?}", leftovers(tmp.path()));
}

#[test]
fn ptx_passes_ptxas_for_sm_90() {
    let Some(ptxas) = common::require(common::PTXAS, sparsec_compiler::toolchain::find_ptxas().ok_or(common::PTXAS_NOT_FOUND)) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("mlp.sparsec");
    let c = build(&example(), TargetKind::Cuda, &out, None).unwrap();
    for k in &c.manifest.kernels {
        let p = out.join("cuda").join(format!("{}.ptx", k.name));
        sparsec_compiler::toolchain::check_ptx(&ptxas, &p, "sm_90").unwrap_or_else(|e| panic!("{e}"));
    }
    // A broken PTX file is reported with the command that reproduces it.
    let bad = tmp.path().join("bad.ptx");
    std::fs::write(&bad, ".version 8.0\n.target sm_90\n.address_size 64\nthis is not ptx\n").unwrap();
    let err = sparsec_compiler::toolchain::check_ptx(&ptxas, &bad, "sm_90").unwrap_err().to_string();
    assert!(err.contains("reproduce with:") && err.contains("-arch=sm_90"), "{err}");
}

/// Kernels for sm_90 open with `griddepcontrol.wait` (the runtime launches
/// exactly those as programmatic dependents, `cuda::waits_for_prior_grids`);
/// an sm_80 target has no such instruction, so none of its kernels waits and
/// they pass ptxas for sm_80.
#[test]
fn sm_90_kernels_wait_for_their_prior_grids_and_sm_80_kernels_do_not() {
    let tmp = tempfile::tempdir().unwrap();
    let ptxas = sparsec_compiler::toolchain::find_ptxas();
    for (sm, waits) in [("sm_90", true), ("sm_80", false)] {
        let out = tmp.path().join(format!("mlp-{sm}.sparsec"));
        let options = CompileOptions {
            target: TargetKind::Cuda,
            cuda: sparsec_compiler::CudaTarget { sm: sm.into(), ..Default::default() },
            ..Default::default()
        };
        let c = build_with(&example(), options, &out, None).unwrap();
        assert!(!c.manifest.kernels.is_empty());
        for k in &c.manifest.kernels {
            let p = out.join("cuda").join(format!("{}.ptx", k.name));
            let ptx = std::fs::read_to_string(&p).unwrap();
            assert_eq!(sparsec_runtime::cuda::waits_for_prior_grids(&ptx), waits, "{sm} {}", k.name);
            if let Some(ptxas) = &ptxas {
                sparsec_compiler::toolchain::check_ptx(ptxas, &p, sm).unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }
}

#[test]
fn cuda_run_equals_cpu() {
    // Also on the GPU machine: `sparsec-run --device cuda --check --compare-cpu`.
    if !common::require_gpu(sparsec_runtime::cuda::cuda_available()) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("mlp.sparsec");
    build(&example(), TargetKind::All, &out, None).unwrap();
    let art = Artifact::open(&out).unwrap();
    let inputs = art.random_inputs(19, 3).unwrap();
    let cpu = CpuExecutor::load(&art).unwrap().run(&art, &inputs).unwrap();
    let gpu = sparsec_runtime::cuda::CudaExecutor::load(&art).unwrap().run(&art, &inputs).unwrap();
    // As many outputs, each of the same shape, before any value is compared
    // (`zip` alone would stop at the shorter list).
    assert_eq!(gpu.len(), cpu.len(), "CUDA gives {} outputs, the CPU {}", gpu.len(), cpu.len());
    assert!(!cpu.is_empty(), "no outputs to compare");
    for (i, (g, c)) in gpu.iter().zip(&cpu).enumerate() {
        assert_eq!(g.shape(), c.shape(), "output {i}: CUDA shape {:?}, CPU shape {:?}", g.shape(), c.shape());
        let r = compare(g, c, Tolerance::default());
        assert!(r.passed, "output {i}: max abs error {} at {} (atol = rtol = 1e-4)", r.max_abs_error, r.worst_index);
    }
}

#[test]
fn a_failed_compile_leaves_no_artifact_and_no_staging() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("att.sparsec");
    // DCT-compressed K/V has no lowering yet: codegen fails after the first kernel.
    let src = "graph @att {\n  %q = input : f32[seq, 8]\n  %g = gelu %q\n  %y = attention %g, %q, %q {heads = 2, kv_heads = 2} #kv(dct, keep = 0.5)\n  return %y\n}\n";
    let err = build(src, TargetKind::Cpu, &out, None).err().expect("must fail");
    assert!(err.to_string().contains("#kv is not lowered yet"), "{err}");
    assert!(!out.exists(), "half-written artifact left at {}", out.display());
    assert!(leftovers(tmp.path()).is_empty(), "{:?}", leftovers(tmp.path()));

    // A weight without data names itself.
    let src =
        "graph @w {\n  %x = input : f32[seq, 4]\n  %w = weight \"layers.0.mlp.up\" : f32[4, 4]\n  %y = matmul %x, %w\n  return %y\n}\n";
    let err = build(src, TargetKind::Cpu, &out, None).err().expect("must fail").to_string();
    assert!(err.contains("layers.0.mlp.up") && err.contains("no weights file"), "{err}");
    assert!(!out.exists());
}

#[test]
fn compiling_over_a_non_artifact_is_refused_and_over_an_artifact_replaces_it() {
    let tmp = tempfile::tempdir().unwrap();
    let precious = tmp.path().join("precious");
    std::fs::create_dir(&precious).unwrap();
    std::fs::write(precious.join("notes.txt"), "keep me").unwrap();
    let err = build(&example(), TargetKind::Cpu, &precious, None).err().expect("must refuse").to_string();
    assert!(err.contains("not a sparsec artifact"), "{err}");
    assert_eq!(std::fs::read_to_string(precious.join("notes.txt")).unwrap(), "keep me");

    let out = tmp.path().join("a.sparsec");
    build(&example(), TargetKind::Cpu, &out, None).unwrap();
    let src2 = example().replace("seed = 1,", "seed = 11,");
    let second = build(&src2, TargetKind::Cpu, &out, None).unwrap();
    assert_eq!(Artifact::open(&out).unwrap().manifest.source_hash, second.manifest.source_hash);
    assert!(leftovers(tmp.path()).is_empty(), "{:?}", leftovers(tmp.path()));
}

#[test]
fn weights_file_supplies_data_and_shape_mismatches_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let wpath = tmp.path().join("w.safetensors");
    let data: Vec<f32> = (0..12).map(|i| i as f32 * 0.1).collect();
    sparsec_compiler::weights::write_safetensors(&wpath, &[("w".into(), vec![4, 3], sparsec_compiler::WeightData::F32(data.clone()))])
        .unwrap();
    let src = "graph @w {\n  %x = input : f32[seq, 4]\n  %w = weight \"w\" : f32[4, 3]\n  %y = matmul %x, %w\n  return %y\n}\n";
    let out = tmp.path().join("w.sparsec");
    let req = |src: &str| CompileRequest {
        graph: parse_graph(src).unwrap(),
        plan_text: None,
        weights: sparsec_compiler::WeightSource::File(&wpath),
        options: CompileOptions::default(),
        print: PrintOptions::default(),
        cache: None,
        output: out.clone(),
        lm: None,
    };
    compile(req(src)).unwrap();
    let art = Artifact::open(&out).unwrap();
    let x = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[1, 4]), vec![1.0, 0.0, 0.0, 1.0]).unwrap();
    let y = CpuExecutor::load(&art).unwrap().run(&art, &[x]).unwrap();
    // Row 0 plus row 3 of w.
    let want = [0.0 + 0.9, 0.1 + 1.0, 0.2 + 1.1];
    for (g, w) in y[0].iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "{g} vs {w}");
    }
    let err = compile(req(&src.replace("f32[4, 3]", "f32[3, 4]").replace("input : f32[seq, 4]", "input : f32[seq, 3]")))
        .err()
        .expect("shape mismatch")
        .to_string();
    assert!(err.contains("weight `w`") && err.contains("[4, 3]") && err.contains("[3, 4]"), "{err}");
}

/// A session truncated to position p continues at p: re-running positions
/// p.. gives what the uninterrupted session gave there (the caches are
/// overwritten, not appended after stale rows).
#[test]
fn a_truncated_session_continues_where_it_was_cut() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("attn.sparsec");
    let src = "graph @attn {\n  %q = input : f32[seq, 32]\n  %k = input : f32[seq, 16]\n  %v = input : f32[seq, 16]\n  %y = attention %q, %k, %v {heads = 2, kv_heads = 1}\n  return %y\n}\n";
    build(src, TargetKind::Cpu, &out, None).unwrap();
    let art = Artifact::open(&out).unwrap();
    let exec = CpuExecutor::load(&art).unwrap();
    let all = art.random_inputs(12, 3).unwrap();
    let rows = |a: &ndarray::ArrayD<f32>, r: std::ops::Range<usize>| a.slice_axis(ndarray::Axis(0), r.into()).to_owned();
    let mut s = exec.session(&art).unwrap();
    let whole = s.run(&all).unwrap().remove(0);
    assert_eq!(s.pos(), 12);
    s.truncate(7).unwrap();
    assert_eq!(s.pos(), 7);
    let tail: Vec<_> = all.iter().map(|a| rows(a, 7..12)).collect();
    let again = s.run(&tail).unwrap().remove(0);
    assert_eq!(again, rows(&whole, 7..12), "positions 7.. after truncating to 7");
    // Without the truncation the same rows sit at positions 12.. and see more keys.
    let later = s.run(&tail).unwrap().remove(0);
    assert_ne!(later, again);
}
