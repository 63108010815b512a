//! Which NVPTX path each prefill kernel takes, as its manifest records the
//! launch (`KernelStep::gpu_mma_warps`, `gpu_mma_rows`, `gpu_mma_block`):
//! shared-memory tiles of 64 rows for wide f16/bf16 and quantized matmuls
//! and of 32 below 1024 features (f32 weights: 32 rows at every width), a
//! warp per 16×8 tile for widths that are not a multiple of 64, the tensor-core attention for plain attention over f16 caches, and the
//! thread-per-unit kernels otherwise, and `--gpu-mma-activations half`'s
//! single MMA per k-step; these run without a GPU. Where one exists, the
//! tensor-core prefill kernels' filetests also run on it against the
//! interpreter and the CPU (else SKIPPED). Sparse matmuls take a warp per
//! output element in every format (N:M groups wider than 25 a thread), and
//! the sparse filetests run on the GPU against the interpreter.

use crate::common;

use sparsec_compiler::{compile, CompileOptions, CompileRequest, Emit, GpuMmaActivations, KvCacheType, QuantActivations, TargetKind};
use sparsec_ir::parse_graph;
use sparsec_passes::PrintOptions;
use sparsec_runtime::compare::{compare, Tolerance};
use sparsec_runtime::cpu::CpuExecutor;
use sparsec_runtime::interpreter::interpret;
use sparsec_runtime::manifest::{KernelStep, Step};
use sparsec_runtime::Artifact;
use std::path::Path;

/// `src` compiled for CPU and CUDA with `cuda_kv` caches into `out`.
fn build(src: &str, cuda_kv: KvCacheType, out: &Path) {
    build_with(src, CompileOptions { target: TargetKind::All, cuda_kv_cache: cuda_kv, ..Default::default() }, out);
}

fn build_with(src: &str, options: CompileOptions, out: &Path) {
    compile(CompileRequest {
        graph: parse_graph(src).unwrap(),
        plan_text: None,
        weights: sparsec_compiler::WeightSource::None,
        options,
        print: PrintOptions::default(),
        cache: None,
        output: out.to_path_buf(),
        lm: None,
    })
    .unwrap();
}

/// The kernel steps of `src` compiled for CPU and CUDA with `cuda_kv` caches.
fn steps(src: &str, cuda_kv: KvCacheType) -> Vec<KernelStep> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("a.sparsec");
    build(src, cuda_kv, &out);
    let art = Artifact::open(&out).unwrap();
    art.manifest
        .execution
        .steps
        .iter()
        .filter_map(|s| match s {
            Step::Kernel(k) => Some(k.clone()),
            Step::KvAppend { .. } => None,
        })
        .collect()
}

/// `(gpu_mma_warps, gpu_mma_rows, gpu_mma_block)` of the one kernel whose name contains `name`.
fn shape(steps: &[KernelStep], name: &str) -> (Option<u64>, Option<u64>, Option<u32>) {
    let k: Vec<&KernelStep> = steps.iter().filter(|k| k.kernel.contains(name)).collect();
    assert_eq!(k.len(), 1, "one `{name}` kernel among {:?}", steps.iter().map(|k| &k.kernel).collect::<Vec<_>>());
    (k[0].gpu_mma_warps, k[0].gpu_mma_rows, k[0].gpu_mma_block)
}

#[test]
fn matmuls_take_shared_memory_tiles_by_width_and_warp_tiles_otherwise() {
    let src = "graph @m {
  %x = input : f32[seq, 768]
  %wide = weight \"wide\" init normal(seed = 1, std = 0.05) : f16[2304, 768]
  %narrow = weight \"narrow\" init normal(seed = 2, std = 0.05) : bf16[576, 768]
  %odd = weight \"odd\" init normal(seed = 3, std = 0.05) : f16[40, 768]
  %f32 = weight \"f32\" init normal(seed = 4, std = 0.05) : f32[128, 768]
  %q8 = weight \"q8\" init normal(seed = 5, std = 0.05) : q8_0[1536, 768]
  %q41 = weight \"q41\" init normal(seed = 6, std = 0.05) : q4_1[192, 768]
  %q40 = weight \"q40\" init normal(seed = 7, std = 0.05) : q4_0[40, 768]
  %a = matmul %x, %wide {transpose_b = true}
  %b = matmul %x, %narrow {transpose_b = true}
  %c = matmul %x, %odd {transpose_b = true}
  %d = matmul %x, %f32 {transpose_b = true}
  %e = matmul %x, %q8 {transpose_b = true}
  %f = matmul %x, %q41 {transpose_b = true}
  %g = matmul %x, %q40 {transpose_b = true}
  return %a, %b, %c, %d, %e, %f, %g
}";
    let s = steps(src, KvCacheType::F32);
    let mm: Vec<&KernelStep> = s.iter().filter(|k| k.kernel.contains("matmul")).collect();
    assert_eq!(mm.len(), 7, "{:?}", s.iter().map(|k| &k.kernel).collect::<Vec<_>>());
    // In graph order: 64-row tiles, 8 warps per 64 features; 32-row tiles;
    // a warp per 16×8 tile (40 is no multiple of 64); f32 weights: 32-row
    // tiles; quantized weights take the shared-memory tiles by width as
    // 16-bit ones do, and the warp GEMV where the width is no multiple of 64.
    let shapes: Vec<_> = mm.iter().map(|k| (k.gpu_mma_warps, k.gpu_mma_rows, k.gpu_mma_block)).collect();
    assert_eq!(
        shapes,
        vec![
            (Some(288), Some(64), None),
            (Some(72), Some(32), None),
            (Some(5), None, None),
            (Some(16), Some(32), None),
            (Some(192), Some(64), None),
            (Some(24), Some(32), None),
            (None, None, None)
        ]
    );
    // Launches: a 512-row call of the wide matmul is 8 bands of 36 blocks.
    assert_eq!(mm[0].gpu_launch_at(512), Some((8 * 36, sparsec_runtime::cuda::BLOCK)));
    assert_eq!(mm[1].gpu_launch_at(512), Some((16 * 9, sparsec_runtime::cuda::BLOCK)));
}

#[test]
fn plain_attention_over_f16_caches_takes_the_tensor_core_prefill_in_blocks_of_four_warps() {
    let attn = |pattern: &str| {
        format!(
            "graph @a {{
  %q = input : f32[seq, 384]
  %k = input : f32[seq, 128]
  %v = input : f32[seq, 128]
  %y = attention %q, %k, %v {{heads = 6, kv_heads = 2}}{pattern}
  return %y
}}"
        )
    };
    let plain = steps(&attn(""), KvCacheType::F16);
    assert_eq!(shape(&plain, "attention"), (Some(24), None, Some(128)));
    let k = plain.iter().find(|k| k.kernel.contains("attention")).unwrap();
    // 37 rows: 3 bands of 16 rows × 6 heads, a block of 4 warps each (the
    // keys split over them).
    assert_eq!(k.gpu_launch_at(37), Some((18, 128)));
    // A decode row keeps its split blocks of the runtime's size.
    assert_eq!(k.gpu_launch_at(1).map(|(_, b)| b), Some(sparsec_runtime::cuda::BLOCK));
    // f32 caches (not exact in f16) and windows keep a block per (row, head).
    assert_eq!(shape(&steps(&attn(""), KvCacheType::F32), "attention"), (None, None, None));
    let windowed = steps(&attn(" #window(sliding, size = 64, sinks = 4)"), KvCacheType::F16);
    assert_eq!(shape(&windowed, "attention"), (None, None, None));
}

/// `--gpu-mma-activations half` gives the tiled matmul one MMA per k-step
/// where `split` gives two (counted in the kernel's emitted MLIR, before
/// LLVM unrolls anything), and leaves its launch shape alone.
#[test]
fn half_mma_activations_halve_the_tiled_matmuls_mmas() {
    let src = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/filetests/lower-matmul-mma-tiled.sir")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut found = Vec::new();
    for mode in [GpuMmaActivations::Split, GpuMmaActivations::Half] {
        let out = dir.path().join(format!("{mode:?}.sparsec"));
        let options = CompileOptions { target: TargetKind::All, gpu_mma_activations: mode, emit: vec![Emit::Mlir], ..Default::default() };
        build_with(&src, options, &out);
        let art = Artifact::open(&out).unwrap();
        let shapes: Vec<_> = art
            .manifest
            .execution
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::Kernel(k) => Some((k.gpu_mma_warps, k.gpu_mma_rows, k.gpu_mma_block)),
                _ => None,
            })
            .collect();
        let mmas: Vec<usize> = ["k0_matmul_add", "k1_matmul"]
            .iter()
            .map(|k| std::fs::read_to_string(out.join(format!("emit/cuda/{k}.mlir"))).unwrap().matches("nvvm.mma.sync").count())
            .collect();
        found.push((mmas, shapes));
    }
    let ((split, split_shapes), (half, half_shapes)) = (&found[0], &found[1]);
    // k0 (k = 64, two k-tiles) runs them as a pair between barriers with
    // split activations, so its loop body holds two k-tiles' MMAs there and
    // one with half; k1 (k = 96, three k-tiles) one k-tile in both modes.
    for ((s, h), tiles) in split.iter().zip(half).zip([2, 1]) {
        assert!(*h > 0 && *s == 2 * tiles * h, "MMAs: split {split:?}, half {half:?}");
    }
    assert_eq!(split_shapes, half_shapes);
}

/// The filetests of the shared-memory tiled matmul (both activation modes)
/// and the tensor-core prefill attention on CUDA, at row counts that leave
/// tiles part full, against the interpreter (the attention within the f16
/// caches' rounding, as its filetest allows; `half` within the activations'
/// rounding) and the CPU (1e-4; `half` 5e-2).
#[test]
fn cuda_tensor_core_prefill_kernels_equal_the_interpreter_and_the_cpu() {
    if !common::require_gpu(sparsec_runtime::cuda::cuda_available()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("lower-matmul-mma-tiled", 1e-4, 1e-4, GpuMmaActivations::Split),
        ("lower-matmul-mma-tiled-half", 5e-2, 5e-2, GpuMmaActivations::Half),
        ("lower-matmul-mma-tiled-quant", 1e-4, 1e-4, GpuMmaActivations::Split),
        ("lower-matmul-mma-tiled-f32", 1e-4, 1e-4, GpuMmaActivations::Split),
        ("lower-attention-mma", 2e-3, 1e-4, GpuMmaActivations::Split),
    ];
    for (file, reference, against_cpu, mode) in cases {
        let src = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/filetests/{file}.sir"))).unwrap();
        let out = dir.path().join(format!("{file}.sparsec"));
        // f32 activations on the CPU too (the quantized case), so the two
        // differ by rounding alone.
        let options = CompileOptions {
            target: TargetKind::All,
            cuda_kv_cache: KvCacheType::F16,
            gpu_mma_activations: mode,
            quant_activations: QuantActivations::F32,
            ..Default::default()
        };
        build_with(&src, options, &out);
        let art = Artifact::open(&out).unwrap();
        let gpu_exec = sparsec_runtime::cuda::CudaExecutor::load(&art).unwrap();
        for seq in [2, 37, 130] {
            let inputs = art.random_inputs(seq, 5).unwrap();
            let gpu = gpu_exec.run(&art, &inputs).unwrap();
            let cpu = CpuExecutor::load(&art).unwrap().run(&art, &inputs).unwrap();
            let want = interpret(&art.graph, &inputs, &|n| art.weight_array(n).ok().map(std::sync::Arc::new)).unwrap();
            assert_eq!((gpu.len(), cpu.len()), (want.len(), want.len()), "{file}: outputs");
            for (i, ((g, c), w)) in gpu.iter().zip(&cpu).zip(&want).enumerate() {
                assert_eq!(g.shape(), w.shape(), "{file} seq {seq} output {i}: shape");
                let r = compare(g, w, Tolerance { atol: reference, rtol: reference });
                assert!(r.passed, "{file} seq {seq} output {i}: {} from the interpreter", r.max_abs_error);
                let r = compare(g, c, Tolerance { atol: against_cpu, rtol: against_cpu });
                assert!(r.passed, "{file} seq {seq} output {i}: {} from the CPU", r.max_abs_error);
            }
        }
    }
}

#[test]
fn sparse_matmuls_take_a_warp_per_output_element_in_every_format() {
    let src = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/filetests/lower-matmul-sparse-warp.sir")).unwrap();
    // A 2:32 group spans five bitmap bytes at some offsets: a thread per output.
    let src = src.replace(
        "  return %a, %b, %c, %d, %e, %f, %g",
        "  %w232 = weight \"w232\" init normal(seed = 8, std = 0.3) : f32[20, 64]\n  %h = matmul %y, %w232 {transpose_b = true} #sparsity(nm, n = 2, m = 32) #specialize(generic)\n  return %a, %b, %c, %d, %e, %f, %g, %h",
    );
    let s = steps(&src, KvCacheType::F32);
    let mm: Vec<&KernelStep> = s.iter().filter(|k| k.kernel.contains("matmul")).collect();
    let outputs = [37u64, 33, 41, 45, 45, 30, 35, 20];
    assert_eq!(mm.len(), outputs.len(), "{:?}", s.iter().map(|k| &k.kernel).collect::<Vec<_>>());
    for (i, (k, n)) in mm.iter().zip(outputs).enumerate() {
        let per_output = if i + 1 == outputs.len() { 1 } else { 32 };
        assert_eq!(k.gpu_threads, sparsec_ir::SymSize { coef: n * per_output, seq_pow: 1 }, "matmul {i} ({})", k.kernel);
    }
}

/// The sparse matmul filetests (every format, f32 and quantized values) on
/// CUDA at 1, 5 and 37 rows against the interpreter (f32 sums in another
/// order: 1e-4). The CPU is checked against the interpreter by the
/// filetests themselves (with int8 activations where they ask for them).
#[test]
fn cuda_sparse_matmuls_equal_the_interpreter() {
    if !common::require_gpu(sparsec_runtime::cuda::cuda_available()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let files = ["nm", "nm-q", "nm-q-f32", "bsr", "bsr-q", "csr", "csr-q", "bitmap-q-avx512", "sparse-warp"];
    for file in files {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/filetests/lower-matmul-{file}.sir"));
        let src = std::fs::read_to_string(&path).unwrap();
        let out = dir.path().join(format!("{file}.sparsec"));
        build(&src, KvCacheType::F32, &out);
        let art = Artifact::open(&out).unwrap();
        let gpu_exec = sparsec_runtime::cuda::CudaExecutor::load(&art).unwrap();
        for seq in [1, 5, 37] {
            let inputs = art.random_inputs(seq, 5).unwrap();
            let gpu = gpu_exec.run(&art, &inputs).unwrap();
            let want = interpret(&art.graph, &inputs, &|n| art.weight_array(n).ok().map(std::sync::Arc::new)).unwrap();
            assert_eq!(gpu.len(), want.len(), "{file}: outputs");
            for (i, (g, w)) in gpu.iter().zip(&want).enumerate() {
                assert_eq!(g.shape(), w.shape(), "{file} seq {seq} output {i}: shape");
                let r = compare(g, w, Tolerance { atol: 1e-4, rtol: 1e-4 });
                assert!(r.passed, "{file} seq {seq} output {i}: {} from the interpreter", r.max_abs_error);
            }
        }
    }
}
