//! Criterion benches of single compiled matmul kernels against this machine's
//! roofline: GEMV (decode, seq 1) and GEMM (prefill, seq 128) at the MLP shapes
//! of SmolLM2 and GPT-2, with f32, Q8_0 and Q4_1 weights, and the sparse
//! formats (CSR at 90%, 2:4, BSR 4x4 at 80%); and decode attention at
//! SmolLM2's shape (9 heads, 3 KV heads, head dim 64) over a 512-position KV
//! cache, f16 and f32. One thread.
//!
//! `attention_memory`: decode attention at long context from memory, two
//! threads: one SmolLM2-shaped attention over an 8000-position f16 cache
//! (6.1 MB), the caches pushed out of every cache level before each timed step
//! (a 128 MB buffer read), as decode meets them after 29 other layers and the
//! weights have streamed through; and hot (the caches in the L3), the
//! kernel's compute ceiling.
//!
//! `gemv_memory`: decode GEMV with the weights streaming from memory, two
//! threads: a chain of 8 matmuls of 4096x4096 (84 MB as Q4_1, beyond the L3)
//! as dense Q4_1, f32, f16 and bf16, 2:4 with f32 values, 2:4 with 4-bit values
//! (`nm_q4`) and 50% unstructured with 4-bit values (`csr_q4`, bitmap-indexed),
//! side by side (the summary alternates them in rounds, against the box's
//! drift); int8 activations (the default) for the quantized ones.
//! `gemv_memory_smollm2`: the same at SmolLM2's MLP shapes (1536x576 and
//! 576x1536 in turn, 120 matrices, 66 MB as Q4_1): Q4_1, 2:4 and 50%
//! unstructured with 4-bit values, where rows of 9 steps of 64 weights make a
//! call's fixed costs weigh as they do in decode.
//!
//! A filter naming none of a function's groups skips its setup and summary
//! as well (`-- gemv_memory_smollm2` runs that chain alone).
//!
//! The roofline is measured first, in this process: read bandwidth (a sum over
//! 256 MB) and the peak FMA rate (independent AVX2 FMA chains). GEMV reports
//! its weight bytes per second (against the bandwidth), GEMM its FLOP/s
//! (against the FMA peak); a summary table with both ratios ends the run.
//!
//!     cargo bench --bench kernels [-- FILTER]

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use ndarray::ArrayD;
use sparsec_compiler::{compile, CompileOptions, CompileRequest, CpuTarget, KvCacheType, TargetKind, WeightSource};
use sparsec_runtime::cpu::CpuExecutor;
use sparsec_runtime::Artifact;
use std::time::{Duration, Instant};

const SHAPES: [(&str, u64, u64); 4] =
    [("smollm2.up", 1536, 576), ("smollm2.down", 576, 1536), ("gpt2.up", 3072, 768), ("gpt2.down", 768, 3072)];
const KINDS: [(&str, &str, &str); 6] = [
    ("f32", "f32", ""),
    ("q8_0", "q8_0", ""),
    ("q4_1", "q4_1", ""),
    ("csr90", "f32", "#sparsity(unstructured, ratio = 0.9) #specialize(generic)"),
    ("nm2:4", "f32", "#sparsity(nm, n = 2, m = 4) #specialize(generic)"),
    ("bsr4x4-80", "f32", "#sparsity(block, ratio = 0.8, rows = 4, cols = 4) #specialize(generic)"),
];

/// Read bandwidth in GB/s: the best of 5 sums over 256 MB.
fn read_bandwidth() -> f64 {
    let v = vec![1.0f32; 64 << 20];
    let mut best = 0.0f64;
    for _ in 0..5 {
        let t = Instant::now();
        let mut acc = [0f32; 16];
        for c in v.chunks_exact(16) {
            for (a, x) in acc.iter_mut().zip(c) {
                *a += x;
            }
        }
        std::hint::black_box(acc);
        best = best.max((v.len() * 4) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// # Safety
/// The CPU must support AVX2 and FMA (checked by the caller).
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_chains(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_set1_ps(0.0); 10];
    let (a, b) = (_mm256_set1_ps(0.999), _mm256_set1_ps(0.001));
    for _ in 0..iters {
        for r in acc.iter_mut() {
            *r = _mm256_fmadd_ps(*r, a, b);
        }
    }
    let mut out = [0f32; 8];
    _mm256_storeu_ps(out.as_mut_ptr(), acc[0]);
    out[0]
}

/// Peak single-thread f32 FMA rate in GFLOP/s (2 FLOP per lane).
fn fma_peak() -> f64 {
    if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
        return f64::NAN;
    }
    let iters = 20_000_000u64;
    let mut best = 0.0f64;
    for _ in 0..3 {
        let t = Instant::now();
        // SAFETY: AVX2 and FMA were detected above.
        std::hint::black_box(unsafe { fma_chains(iters) });
        best = best.max((iters * 10 * 8 * 2) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// A one-matmul artifact and the bytes its weight occupies.
struct Kernel {
    _dir: tempfile::TempDir,
    art: Artifact,
    weight_bytes: u64,
}

fn build(n: u64, k: u64, dtype: &str, pattern: &str) -> Kernel {
    let text = format!(
        "graph @bench {{\n  %x = input : f32[seq, {k}]\n  %w = weight \"w\" init normal(seed = 1, std = 0.02) : {dtype}[{n}, {k}]\n  %y = matmul %x, %w {{transpose_b = true}} {pattern}\n  return %y\n}}\n"
    );
    let options = CompileOptions { target: TargetKind::Cpu, cpu: CpuTarget::host(), ..Default::default() };
    let (dir, art) = compile_text(&text, options);
    let weight_bytes = art.manifest.execution.buffers.iter().filter(|b| b.name == "w").map(|b| b.bytes(0) as u64).sum();
    Kernel { _dir: dir, art, weight_bytes }
}

/// `text` compiled under `options` into a temporary directory.
fn compile_text(text: &str, options: CompileOptions) -> (tempfile::TempDir, Artifact) {
    let graph = sparsec_ir::parse_graph(text).expect("bench graph parses");
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("k.sparsec");
    compile(CompileRequest {
        graph,
        plan_text: None,
        weights: WeightSource::None,
        options,
        print: Default::default(),
        cache: None,
        output: out.clone(),
        lm: None,
    })
    .expect("bench kernel compiles");
    let art = Artifact::open(&out).expect("artifact opens");
    (dir, art)
}

fn input(k: u64, seq: u64) -> Vec<ArrayD<f32>> {
    let v = sparsec_ir::Init::Normal { seed: 3, std: 1.0 }.generate((k * seq) as usize);
    vec![ArrayD::from_shape_vec(ndarray::IxDyn(&[seq as usize, k as usize]), v).expect("shape")]
}

fn median_us(exec: &CpuExecutor, art: &Artifact, x: &[ArrayD<f32>]) -> f64 {
    median_of(exec, art, x, 50)
}

/// Median of `runs` timed runs, in µs.
fn median_of(exec: &CpuExecutor, art: &Artifact, x: &[ArrayD<f32>], runs: usize) -> f64 {
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let s = Instant::now();
            std::hint::black_box(exec.run(art, x).expect("runs"));
            s.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    t.sort_by(|a, b| a.total_cmp(b));
    t[t.len() / 2]
}

fn kernels(c: &mut Criterion) {
    if !["gemv/", "gemm/"].into_iter().any(wanted) {
        return;
    }
    let bw = read_bandwidth();
    let peak = fma_peak();
    println!("roofline (1 thread): read bandwidth {bw:.1} GB/s, f32 FMA peak {peak:.1} GFLOP/s");
    let mut summary = Vec::new();
    for (shape, n, k) in SHAPES {
        for (kind, dtype, pattern) in KINDS {
            let kern = build(n, k, dtype, pattern);
            let exec = CpuExecutor::load(&kern.art).and_then(|e| e.with_threads(1)).expect("executor");
            for (what, seq) in [("gemv", 1u64), ("gemm", 128)] {
                let x = input(k, seq);
                let mut g = c.benchmark_group(format!("{what}/{shape}"));
                g.sample_size(20).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1));
                let flops = 2 * n * k * seq;
                g.throughput(if seq == 1 { Throughput::Bytes(kern.weight_bytes) } else { Throughput::Elements(flops) });
                g.bench_with_input(BenchmarkId::from_parameter(kind), &x, |b, x| b.iter(|| exec.run(&kern.art, x).expect("runs")));
                g.finish();
                let us = median_us(&exec, &kern.art, &x);
                let gbs = kern.weight_bytes as f64 / us / 1e3;
                let gflops = flops as f64 / us / 1e3;
                summary.push(format!(
                    "| {what} | {shape} ({n}x{k}) | {kind} | {us:.1} | {:.2} | {gbs:.1} ({:.0}% of bw) | {gflops:.1} ({:.0}% of peak) |",
                    kern.weight_bytes as f64 / 1e6,
                    100.0 * gbs / bw,
                    100.0 * gflops / peak
                ));
            }
        }
    }
    println!("\nroofline (1 thread): read bandwidth {bw:.1} GB/s, f32 FMA peak {peak:.1} GFLOP/s");
    println!("| kernel | shape | weights | median µs | weight MB | weight GB/s | GFLOP/s (dense-equivalent) |\n| --- | --- | --- | --- | --- | --- | --- |");
    for l in summary {
        println!("{l}");
    }
}

/// Decode attention: one query row against `CONTEXT` cached positions (the
/// session is cut back to `CONTEXT` before every step), with f16 and f32 caches.
/// Reports the cache bytes read per step against the bandwidth and the time per
/// (key, head). The caches are hot (in L2/L3): in a model the weights stream
/// through the caches between layers, so there they come from memory.
/// One attention op over the KV caches: `heads` query heads of width `d`, `kv_heads` KV heads.
fn attention_graph(heads: u64, kv_heads: u64, d: u64) -> String {
    format!(
        "graph @attn {{\n  %q = input : f32[seq, {}]\n  %k = input : f32[seq, {}]\n  %v = input : f32[seq, {}]\n  %y = attention %q, %k, %v {{heads = {heads}, kv_heads = {kv_heads}}}\n  return %y\n}}\n",
        heads * d,
        kv_heads * d,
        kv_heads * d
    )
}

fn attention(c: &mut Criterion) {
    if !wanted("attention-decode/smollm2-512") {
        return;
    }
    const CONTEXT: usize = 512;
    let (heads, kv_heads, d) = (9u64, 3u64, 64u64);
    let bw = read_bandwidth();
    let text = attention_graph(heads, kv_heads, d);
    let mut summary = Vec::new();
    for (name, kv) in [("f16", KvCacheType::F16), ("f32", KvCacheType::F32)] {
        let options = CompileOptions { target: TargetKind::Cpu, cpu: CpuTarget::host(), kv_cache: kv, ..Default::default() };
        let (_dir, art) = compile_text(&text, options);
        let exec = CpuExecutor::load(&art).and_then(|e| e.with_threads(1)).expect("executor");
        let mut session = exec.session(&art).expect("session");
        session.run(&art.random_inputs(CONTEXT as u64, 1).expect("inputs")).expect("prefill");
        let step = art.random_inputs(1, 2).expect("inputs");
        let mut decode = || {
            session.truncate(CONTEXT).expect("truncate");
            session.run(&step).expect("decode step")
        };
        let elem = if kv == KvCacheType::F16 { 2 } else { 4 };
        let cache_bytes = 2 * (CONTEXT as u64 + 1) * kv_heads * d * elem;
        let mut g = c.benchmark_group("attention-decode/smollm2-512");
        g.sample_size(20).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1));
        g.throughput(Throughput::Bytes(cache_bytes));
        g.bench_function(BenchmarkId::from_parameter(name), |b| b.iter(&mut decode));
        g.finish();
        let mut t: Vec<f64> = (0..200)
            .map(|_| {
                let s = Instant::now();
                std::hint::black_box(decode());
                s.elapsed().as_secs_f64() * 1e6
            })
            .collect();
        t.sort_by(|a, b| a.total_cmp(b));
        let us = t[t.len() / 2];
        let gbs = cache_bytes as f64 / us / 1e3;
        let ns_per_key_head = us * 1e3 / ((CONTEXT as f64 + 1.0) * heads as f64);
        summary.push(format!(
            "| attention decode, 9 heads / 3 KV heads x 64, {} positions | {name} cache | {us:.1} | {:.2} | {gbs:.1} ({:.0}% of bw) | {ns_per_key_head:.2} ns per (key, head) |",
            CONTEXT + 1,
            cache_bytes as f64 / 1e6,
            100.0 * gbs / bw
        ));
    }
    println!("\n| kernel | KV cache | median µs | cache MB | cache GB/s | time per key |\n| --- | --- | --- | --- | --- | --- |");
    for l in summary {
        println!("{l}");
    }
}

/// Matrices of the `gemv_memory` chain and their size.
const MEM_LAYERS: u64 = 8;
const MEM_DIM: u64 = 4096;
/// Alternating rounds of the `gemv_memory` summary.
const MEM_ROUNDS: usize = 7;
/// The `gemv_memory_smollm2` chain: SmolLM2's MLP up and down shapes in turn,
/// 120 matrices (66 MB as Q4_1, beyond the L3), as decode meets them.
const SMOL_LAYERS: u64 = 120;

/// Whether a filter on the command line (`cargo bench --bench kernels --
/// FILTER`) names `group`: the summaries below run outside criterion's own
/// filtering, and each takes minutes.
fn wanted(group: &str) -> bool {
    let filters: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    filters.is_empty() || filters.iter().any(|f| group.contains(f.as_str()) || f.contains(group))
}

/// Decode GEMV from memory: the same chain of matrices dense Q4_1 and sparse
/// with 4-bit values, two threads (see the module doc).
fn gemv_memory(c: &mut Criterion) {
    let kinds = [
        ("q4_1", "q4_1", ""),
        ("f32", "f32", ""),
        ("f16", "f16", ""),
        ("bf16", "bf16", ""),
        ("nm2:4", "f32", "#sparsity(nm, n = 2, m = 4) #specialize(generic)"),
        ("nm2:4-q4", "f32", "#sparsity(nm, n = 2, m = 4) #values(q4) #specialize(generic)"),
        ("csr50-q4", "f32", "#sparsity(unstructured, ratio = 0.5) #values(q4) #specialize(generic)"),
    ];
    let dims: Vec<(u64, u64)> = (0..MEM_LAYERS).map(|_| (MEM_DIM, MEM_DIM)).collect();
    gemv_chain(c, "gemv_memory/8x4096x4096", &dims, &kinds);
}

/// `gemv_memory` at SmolLM2's shapes (576-wide rows are 9 steps of 64, where
/// a call's fixed costs weigh more than at 4096): Q4_1 against the 4-bit sparse formats.
fn gemv_memory_smollm2(c: &mut Criterion) {
    let kinds = [
        ("q4_1", "q4_1", ""),
        ("nm2:4-q4", "f32", "#sparsity(nm, n = 2, m = 4) #values(q4) #specialize(generic)"),
        ("csr50-q4", "f32", "#sparsity(unstructured, ratio = 0.5) #values(q4) #specialize(generic)"),
    ];
    let dims: Vec<(u64, u64)> = (0..SMOL_LAYERS).map(|l| if l % 2 == 0 { (1536, 576) } else { (576, 1536) }).collect();
    gemv_chain(c, "gemv_memory_smollm2/120x1536x576", &dims, &kinds);
}

/// A chain of matmuls `dims` (`[n, k]` each, every `k` the `n` before it)
/// compiled once per kind, timed by criterion and then in alternating rounds.
fn gemv_chain(c: &mut Criterion, group: &str, dims: &[(u64, u64)], kinds: &[(&str, &str, &str)]) {
    if !wanted(group) {
        return;
    }
    let k0 = dims.first().map_or(1, |d| d.1);
    let mut compiled = Vec::new();
    for &(kind, dtype, pattern) in kinds {
        let mut text = format!("graph @chain {{\n  %y0 = input : f32[seq, {k0}]\n");
        for (l, (n, k)) in dims.iter().enumerate() {
            text += &format!(
                "  %w{l} = weight \"w{l}\" init normal(seed = {}, std = 0.015) : {dtype}[{n}, {k}]\n  %y{} = matmul %y{l}, %w{l} {{transpose_b = true}} {pattern}\n",
                l + 1,
                l + 1
            );
        }
        text += &format!("  return %y{}\n}}\n", dims.len());
        let options = CompileOptions { target: TargetKind::Cpu, cpu: CpuTarget::host(), ..Default::default() };
        let (dir, art) = compile_text(&text, options);
        let bytes: u64 = art.manifest.execution.buffers.iter().filter(|b| b.name.starts_with('w')).map(|b| b.bytes(0) as u64).sum();
        let exec = CpuExecutor::load(&art).and_then(|e| e.with_threads(2)).expect("executor");
        let x = input(k0, 1);
        let mut g = c.benchmark_group(group);
        g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
        g.throughput(Throughput::Bytes(bytes));
        g.bench_with_input(BenchmarkId::from_parameter(kind), &x, |b, x| b.iter(|| exec.run(&art, x).expect("runs")));
        g.finish();
        compiled.push((kind, bytes, exec, art, x, dir));
    }
    // The summary alternates the kinds, round after round, so that the box's
    // drift (10-30% over minutes here) falls on all of them alike.
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); compiled.len()];
    for _ in 0..MEM_ROUNDS {
        for ((_, _, exec, art, x, _), t) in compiled.iter().zip(&mut times) {
            t.push(median_of(exec, art, x, 10));
        }
    }
    let mut summary = Vec::new();
    let mut base_us = None;
    for ((kind, bytes, ..), t) in compiled.iter().zip(&mut times) {
        t.sort_by(|a, b| a.total_cmp(b));
        let us = t[t.len() / 2];
        let base = *base_us.get_or_insert(us);
        summary.push(format!("| {kind} | {:.1} | {:.0} | {:.1} | {:.2}x |", *bytes as f64 / 1e6, us, *bytes as f64 / us / 1e3, base / us));
    }
    println!("\n{group}: {} matrices, seq 1, 2 threads; medians of {MEM_ROUNDS} alternating rounds of 10 runs", dims.len());
    println!("| weights | MB | median µs | GB/s | speed-up vs q4_1 |\n| --- | --- | --- | --- | --- |");
    for l in summary {
        println!("{l}");
    }
}

/// Decode attention at 8000 positions from memory, two threads (module doc).
fn attention_memory(c: &mut Criterion) {
    if !wanted("attention_memory/smollm2-8000") {
        return;
    }
    const CONTEXT: usize = 8000;
    let (heads, kv_heads, d) = (9u64, 3u64, 64u64);
    let bw = read_bandwidth();
    let text = attention_graph(heads, kv_heads, d);
    let options = CompileOptions { target: TargetKind::Cpu, cpu: CpuTarget::host(), kv_cache: KvCacheType::F16, ..Default::default() };
    let (_dir, art) = compile_text(&text, options);
    let exec = CpuExecutor::load(&art).and_then(|e| e.with_threads(2)).expect("executor");
    let mut session = exec.session(&art).expect("session");
    session.run(&art.random_inputs(CONTEXT as u64, 1).expect("inputs")).expect("prefill");
    let step = art.random_inputs(1, 2).expect("inputs");
    let evict: Vec<u64> = (0..16u64 << 20).collect();
    // From memory (the caches pushed out first) and hot (the 6 MB fit the L3
    // after the last step): the second is the kernel's compute ceiling.
    let mut timed_step = |cold: bool| {
        session.truncate(CONTEXT).expect("truncate");
        if cold {
            std::hint::black_box(evict.iter().fold(0u64, |a, x| a.wrapping_add(*x)));
        }
        let s = Instant::now();
        std::hint::black_box(session.run(&step).expect("decode step"));
        s.elapsed()
    };
    let cache_bytes = 2 * (CONTEXT as u64 + 1) * kv_heads * d * 2;
    let mut g = c.benchmark_group("attention_memory/smollm2-8000");
    g.sample_size(20).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    g.throughput(Throughput::Bytes(cache_bytes));
    g.bench_function(BenchmarkId::from_parameter("f16"), |b| b.iter_custom(|n| (0..n).map(|_| timed_step(true)).sum()));
    g.finish();
    println!("\n| kernel | KV cache | caches | median µs | cache MB | cache GB/s |\n| --- | --- | --- | --- | --- | --- |");
    for (cold, from) in [(true, "from memory"), (false, "hot (L3)")] {
        let mut t: Vec<f64> = (0..100).map(|_| timed_step(cold).as_secs_f64() * 1e6).collect();
        t.sort_by(|a, b| a.total_cmp(b));
        let us = t[t.len() / 2];
        let gbs = cache_bytes as f64 / us / 1e3;
        println!(
            "| attention decode, 9 heads / 3 KV heads x 64, {} positions, 2 threads | f16 | {from} | {us:.1} | {:.2} | {gbs:.1} ({:.0}% of bw {bw:.1}) |",
            CONTEXT + 1,
            cache_bytes as f64 / 1e6,
            100.0 * gbs / bw
        );
    }
}

criterion_group!(benches, kernels, attention, gemv_memory, gemv_memory_smollm2, attention_memory);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
