//! KV-cached sessions through the device-independent `Session` API: the tiny
//! GPT-2 and Llama fixtures compiled for CPU and CUDA, prefilled in chunks and
//! then decoded token by token, every call's logits against the reference
//! interpreter and the CPU session. The CPU part runs everywhere; the CUDA
//! part needs a GPU and prints SKIPPED without one.

use crate::common;

use sparsec_runtime::compare::Tolerance;
use sparsec_runtime::cuda_session::SessionCapacity;
use sparsec_runtime::execute::{DeviceKind, Executor};
use sparsec_runtime::lm_session::{compare_steps, greedy_round, Reference, StepComparison};
use sparsec_runtime::manifest::{BufferKind, BufferSpec};
use sparsec_runtime::Artifact;
use std::path::{Path, PathBuf};

/// `tests/fixtures/hf/<name>` compiled with CPU and PTX code into `dir`.
fn compile_fixture(name: &str, dir: &Path) -> PathBuf {
    compile_fixture_with(name, dir, "f32")
}

/// `compile_fixture` with `--weights-dtype weights` (f32, f16, bf16).
fn compile_fixture_with(name: &str, dir: &Path, weights: &str) -> PathBuf {
    compile_fixture_args(name, dir, &["--weights-dtype", weights])
}

/// `compile_fixture` with more compile flags.
fn compile_fixture_args(name: &str, dir: &Path, flags: &[&str]) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf").join(name);
    let out = dir.join(format!("{name}{}.sparsec", flags.join("")));
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_sparsec"))
        .args(["compile", src.to_str().unwrap(), "--target", "all", "--no-cache", "-o", out.to_str().unwrap()])
        .args(flags)
        .output()
        .unwrap();
    assert!(st.status.success(), "compile {name}: {}", String::from_utf8_lossy(&st.stderr));
    out
}

/// A prompt of `n` ids below the model's vocabulary (deterministic).
fn prompt(art: &Artifact, n: usize) -> Vec<u32> {
    art.random_inputs(n as u64, 7).unwrap()[0].iter().map(|v| *v as u32).collect()
}

// f32 kernels against the f64-accumulating interpreter, as `--check`.
const TOL: Tolerance = Tolerance { atol: 1e-4, rtol: 1e-4 };

fn assert_all_pass(what: &str, steps: &[StepComparison], calls: usize) {
    assert_eq!(steps.len(), calls, "{what}: calls compared");
    for s in steps {
        assert!(s.cmp.passed, "{what}: logits at pos {} ({} rows) differ by {}", s.pos, s.rows, s.cmp.max_abs_error);
    }
    // Positions advance call by call: chunks of the prompt, then one a step.
    for w in steps.windows(2) {
        assert_eq!(w[1].pos, w[0].pos + w[0].rows, "{what}: positions");
    }
}

fn check_device(device: DeviceKind) {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["gpt2_tiny", "llama_tiny"] {
        let art = Artifact::open(&compile_fixture(name, tmp.path())).unwrap();
        let exec = Executor::load(&art, device).unwrap();
        // 32 positions (GPT-2's table); 4 rows a call, so a 10-token prompt runs
        // in chunks inside the session too (prefill_rows 6 > 4).
        let cap = SessionCapacity { positions: 32, seq: 4 };
        let ids = prompt(&art, 10);
        let mut s = exec.session(&art, cap).unwrap();
        let steps = compare_steps(&mut s, &mut Reference::Interpreter(&art), &ids, 6, 12, TOL).unwrap();
        assert_all_pass(&format!("{name} on {device:?} vs interpreter"), &steps, 2 + 12);
        let cpu = Executor::load(&art, DeviceKind::Cpu).unwrap();
        let mut r = Reference::Session(cpu.session(&art, cap).unwrap());
        let steps = compare_steps(&mut s, &mut r, &ids, 3, 8, TOL).unwrap();
        assert_all_pass(&format!("{name} on {device:?} vs CPU session"), &steps, 4 + 8);
        // Greedy generation is reproducible after a reset; positions past
        // what the session holds (the GPU's 32; GPT-2's table) are refused.
        let (a, _) = greedy_round(&mut s, &ids, 8).unwrap();
        let (b, _) = greedy_round(&mut s, &ids, 8).unwrap();
        assert_eq!(a, b, "{name}: greedy generation after reset");
        // The GPU chooses ids without logits leaving it; the host's argmax of
        // every step's logits chooses the same.
        let host = sparsec_runtime::lm_session::greedy_round_on_host(&mut s, &ids, 8).unwrap();
        assert_eq!(a, host, "{name}: greedy steps on {device:?} vs the host's argmax");
        // The last row alone (the row-local tail at one row, in chunks of the
        // session's 4 rows) equals the last row of a full call.
        let x = [sparsec_runtime::lm_session::ids_input(&ids)];
        s.reset();
        let full = s.run(&x).unwrap().remove(0);
        s.reset();
        let last = s.run_last(&x).unwrap().remove(0);
        assert_eq!(last.shape()[0], 1, "{name}: run_last returns one row");
        let want = full.index_axis(ndarray::Axis(0), ids.len() - 1);
        let worst = want.iter().zip(last.iter()).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-4, "{name} on {device:?}: the last row alone differs from a full call's by {worst}");
        if device == DeviceKind::Cpu && name != "gpt2_tiny" {
            continue;
        }
        s.reset();
        s.run(&[sparsec_runtime::lm_session::ids_input(&ids)]).unwrap();
        let err = s.greedy_steps(1, 32).unwrap_err().to_string();
        assert!(err.contains("exceed") || err.contains("position"), "{name}: greedy steps past the positions: {err}");
        s.reset();
        let long = prompt(&art, 32);
        s.run(&[sparsec_runtime::lm_session::ids_input(&long)]).unwrap();
        let err = s.run(&[sparsec_runtime::lm_session::ids_input(&[1])]).unwrap_err().to_string();
        assert!(err.contains("exceed"), "{name}: past the positions: {err}");
    }
}

#[test]
fn cpu_session_equals_the_interpreter_through_chunked_prefill_and_decode() {
    check_device(DeviceKind::Cpu);
}

#[test]
fn cuda_session_equals_the_interpreter_and_the_cpu_through_chunked_prefill_and_decode() {
    if !common::require_gpu(sparsec_runtime::cuda::cuda_available()) {
        return;
    }
    check_device(DeviceKind::Cuda);
}

/// Native sparse attention on every layer of the tiny Llama (blocks of 4, the
/// top 2, a window of 8, 1 sink): a 20-token prompt in calls of 6 (chunks of 4
/// inside the session) and 12 decode steps select blocks from summaries written
/// by earlier calls; the session equals the interpreter, which ranks blocks
/// from the keys themselves.
fn check_nsa(device: DeviceKind) {
    let tmp = tempfile::tempdir().unwrap();
    let plan = tmp.path().join("nsa.toml");
    std::fs::write(&plan, "[[rule]]\nlayers = \"all\"\nattention = { nsa = { block = 4, top_n = 2, window = 8, sinks = 1 } }\n").unwrap();
    let art = Artifact::open(&compile_fixture_args("llama_tiny", tmp.path(), &["--plan", plan.to_str().unwrap()])).unwrap();
    nsa_session_equals_the_interpreter(&art, device, "nsa");
}

/// Compressed KV caches on every layer of the tiny Llama (head width 8):
/// chunked SVD (chunks of 8 at rank 2) and sequence-axis DCT (blocks of 4,
/// half kept, 2 sinks, 4 recent), against the interpreter. On CUDA the
/// session appends the chunked-SVD caches on the host and the sequence-axis
/// ones on the device (`cuda_seq_append`: exact rows and the blocks a call
/// completes, through prefill calls and 12 decode steps), and attention runs
/// their NVPTX kernels.
fn check_compressed(device: DeviceKind) {
    let tmp = tempfile::tempdir().unwrap();
    for (name, kv) in [
        ("chunked", "kv = { transform = \"chunked_svd\", chunk = 8, rank = 2 }"),
        ("sequence", "kv = { transform = \"dct\", axis = \"sequence\", keep = 0.5, block = 4, sinks = 2, recent = 4 }"),
    ] {
        let plan = tmp.path().join(format!("{name}.toml"));
        std::fs::write(&plan, format!("[[rule]]\nlayers = \"all\"\n{kv}\n")).unwrap();
        let art = Artifact::open(&compile_fixture_args("llama_tiny", tmp.path(), &["--plan", plan.to_str().unwrap()])).unwrap();
        nsa_session_equals_the_interpreter(&art, device, name);
    }
}

#[test]
fn cpu_sessions_of_compressed_caches_equal_the_interpreter() {
    check_compressed(DeviceKind::Cpu);
}

#[test]
fn cuda_sessions_of_compressed_caches_equal_the_interpreter() {
    if !common::require_gpu(sparsec_runtime::cuda::cuda_available()) {
        return;
    }
    check_compressed(DeviceKind::Cuda);
}

/// A 20-token prompt in calls of 6 and 12 decode steps of the tiny Llama
/// `art` on `device`, every call against the interpreter.
fn nsa_session_equals_the_interpreter(art: &Artifact, device: DeviceKind, what: &str) {
    let exec = Executor::load(art, device).unwrap();
    let cap = SessionCapacity { positions: 40, seq: 4 };
    let ids = prompt(art, 20);
    let mut s = exec.session(art, cap).unwrap();
    let steps = compare_steps(&mut s, &mut Reference::Interpreter(art), &ids, 6, 12, TOL).unwrap();
    assert_all_pass(&format!("llama_tiny with {what} on {device:?} vs interpreter"), &steps, 4 + 12);
}

/// NSA adapters (`docs/nsa-adapters.md`) for both layers of the tiny Llama
/// (4 heads, 2 KV heads of width 8, model width 32, blocks of 4): seeded
/// gate and linear compression weights, written as safetensors.
fn write_adapters(path: &Path) {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut rand = |n: usize, scale: f32| -> Vec<u8> {
        (0..n)
            .flat_map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (((x >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * scale).to_le_bytes()
            })
            .collect()
    };
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for l in 0..2 {
        tensors.push((format!("layers.{l}.nsa.gate.weight"), vec![12, 32], rand(12 * 32, 0.5)));
        tensors.push((format!("layers.{l}.nsa.gate.bias"), vec![12], rand(12, 1.0)));
        for kv in ["k", "v"] {
            tensors.push((format!("layers.{l}.nsa.compress_{kv}.pos"), vec![2, 4], rand(8, 0.5)));
            tensors.push((format!("layers.{l}.nsa.compress_{kv}.weight"), vec![2, 8, 8], rand(128, 0.4)));
            tensors.push((format!("layers.{l}.nsa.compress_{kv}.bias"), vec![2, 8], rand(16, 0.1)));
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, shape, data)| (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, &None, path).unwrap();
}

/// `check_nsa` with trained adapters: three branches mixed by sigmoid gates
/// computed from each layer's input, linear block compression.
fn check_nsa_adapters(device: DeviceKind) {
    let tmp = tempfile::tempdir().unwrap();
    let adapters = tmp.path().join("adapters.safetensors");
    write_adapters(&adapters);
    let plan = tmp.path().join("nsa.toml");
    std::fs::write(
        &plan,
        format!(
            "[[rule]]\nlayers = \"all\"\nattention = {{ nsa = {{ block = 4, top_n = 2, window = 8, sinks = 1, adapters = \"{}\" }} }}\n",
            adapters.display()
        ),
    )
    .unwrap();
    let art = Artifact::open(&compile_fixture_args("llama_tiny", tmp.path(), &["--plan", plan.to_str().unwrap()])).unwrap();
    // The adapters are in the artifact's graph: a gated, linearly compressed NSA.
    let g = sparsec_ir::parse_graph(&std::fs::read_to_string(art.dir.join("graph.sir")).unwrap()).unwrap();
    let nsa: Vec<_> = g.nodes.iter().filter_map(|n| sparsec_ir::NativeSparse::of(&n.patterns)).collect();
    assert_eq!(nsa.len(), 2);
    assert!(nsa.iter().all(|n| n.gate == sparsec_ir::NsaGate::Sigmoid && n.compress == sparsec_ir::NsaCompress::Linear));
    nsa_session_equals_the_interpreter(&art, device, "nsa adapters");
}

#[test]
fn cpu_session_with_nsa_adapters_equals_the_interpreter() {
    check_nsa_adapters(DeviceKind::Cpu);
}

#[test]
fn cuda_session_with_nsa_adapters_equals_the_interpreter() {
    if !common::require_gpu(sparsec_runtime::cuda::cuda_available()) {
        return;
    }
    check_nsa_adapters(DeviceKind::Cuda);
}

#[test]
fn cpu_session_with_nsa_equals_the_interpreter() {
    check_nsa(DeviceKind::Cpu);
}

#[test]
fn cuda_session_with_nsa_equals_the_interpreter() {
    if !common::require_gpu(sparsec_runtime::cuda::cuda_available()) {
        return;
    }
    check_nsa(DeviceKind::Cuda);
}

/// 16-bit weights (`--weights-dtype f16|bf16`): every dense matmul weight and
/// the embedding tables are stored in 16 bits; the session equals the
/// interpreter on the same rounded weights to f32 rounding (`TOL`), and the
/// f32 model's CPU session within the weights' rounding (`vs_f32`, atol = rtol:
/// f16 keeps 11 bits, bf16 8; measured on the tiny models 1.7e-4 and 1.3e-3).
fn check_half_weights(device: DeviceKind) {
    let tmp = tempfile::tempdir().unwrap();
    for (name, dtype, vs_f32) in [("gpt2_tiny", "f16", 2e-3), ("llama_tiny", "bf16", 1e-2), ("llama_tiny", "f16", 2e-3)] {
        let art = Artifact::open(&compile_fixture_with(name, tmp.path(), dtype)).unwrap();
        let exact = Artifact::open(&compile_fixture(name, tmp.path())).unwrap();
        let want = sparsec_ir::DType::from_name(dtype).unwrap();
        let weights =
            |a: &Artifact| a.manifest.execution.buffers.iter().filter(|b| b.kind == BufferKind::Weight).cloned().collect::<Vec<_>>();
        let (half, full) = (weights(&art), weights(&exact));
        // Every matrix went 16-bit (norm gains and biases stay f32), and the
        // weights file shrank accordingly.
        let matrices: Vec<_> = half.iter().filter(|b| b.dims.len() == 2).collect();
        assert!(!matrices.is_empty() && matrices.iter().all(|b| b.dtype == want), "{name} {dtype}: {matrices:?}");
        assert!(half.iter().filter(|b| b.dims.len() == 1).all(|b| b.dtype == sparsec_ir::DType::F32));
        let bytes = |ws: &[BufferSpec]| ws.iter().map(|b| b.bytes(0)).sum::<usize>();
        let (hb, fb, mb) = (bytes(&half), bytes(&full), bytes(&matrices.iter().map(|b| (*b).clone()).collect::<Vec<_>>()));
        assert_eq!(hb, fb - mb, "{name} {dtype}: 16-bit matrices take half their f32 bytes");
        let exec = Executor::load(&art, device).unwrap();
        let cap = SessionCapacity { positions: 32, seq: 4 };
        let ids = prompt(&art, 10);
        let mut s = exec.session(&art, cap).unwrap();
        let steps = compare_steps(&mut s, &mut Reference::Interpreter(&art), &ids, 6, 12, TOL).unwrap();
        assert_all_pass(&format!("{name} {dtype} on {device:?} vs interpreter"), &steps, 2 + 12);
        let cpu = Executor::load(&exact, DeviceKind::Cpu).unwrap();
        let mut r = Reference::Session(cpu.session(&exact, cap).unwrap());
        let tol = Tolerance { atol: vs_f32, rtol: vs_f32 };
        let steps = compare_steps(&mut s, &mut r, &ids, 6, 12, tol).unwrap();
        let worst = steps.iter().map(|s| s.cmp.max_abs_error).fold(0f32, f32::max);
        eprintln!("{name} {dtype} on {device:?}: max abs difference from the f32 model {worst:.2e} (tolerance {vs_f32:.0e})");
        assert_all_pass(&format!("{name} {dtype} on {device:?} vs the f32 model"), &steps, 2 + 12);
    }
}

#[test]
fn cpu_session_with_16_bit_weights_equals_the_interpreter() {
    check_half_weights(DeviceKind::Cpu);
}

#[test]
fn cuda_session_with_16_bit_weights_equals_the_interpreter() {
    if !common::require_gpu(sparsec_runtime::cuda::cuda_available()) {
        return;
    }
    check_half_weights(DeviceKind::Cuda);
}

/// f16 KV caches (`--kv-cache f16` with a target that includes CUDA) with f16
/// weights: every key and value is rounded to f16 as it is appended. Against
/// the interpreter (which keeps them exact) within that rounding (2e-3; the
/// tiny models measure about 1e-4); on CUDA, against the CPU session of the
/// same artifact (the same rounding, to nearest even on both) to f32
/// rounding; and decode steps replayed from the captured CUDA graph equal
/// the same steps launched kernel by kernel.
fn check_f16_kv(device: DeviceKind) {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["gpt2_tiny", "llama_tiny"] {
        let art = Artifact::open(&compile_fixture_args(name, tmp.path(), &["--kv-cache", "f16", "--weights-dtype", "f16"])).unwrap();
        let caches: Vec<_> = art.manifest.execution.buffers.iter().filter(|b| b.kind == BufferKind::KvCache).collect();
        assert!(!caches.is_empty() && caches.iter().all(|b| b.dtype == sparsec_ir::DType::F16), "{name}: {caches:?}");
        let exec = Executor::load(&art, device).unwrap();
        let cap = SessionCapacity { positions: 32, seq: 4 };
        let ids = prompt(&art, 10);
        let mut s = exec.session(&art, cap).unwrap();
        let loose = Tolerance { atol: 2e-3, rtol: 2e-3 };
        let steps = compare_steps(&mut s, &mut Reference::Interpreter(&art), &ids, 6, 12, loose).unwrap();
        let worst = steps.iter().map(|s| s.cmp.max_abs_error).fold(0f32, f32::max);
        eprintln!("{name} f16 KV on {device:?}: max abs difference from the interpreter {worst:.2e}");
        assert_all_pass(&format!("{name} f16 KV on {device:?} vs interpreter"), &steps, 2 + 12);
        if device == DeviceKind::Cpu {
            continue;
        }
        let cpu = Executor::load(&art, DeviceKind::Cpu).unwrap();
        let mut r = Reference::Session(cpu.session(&art, cap).unwrap());
        let steps = compare_steps(&mut s, &mut r, &ids, 3, 8, TOL).unwrap();
        assert_all_pass(&format!("{name} f16 KV on {device:?} vs CPU session"), &steps, 4 + 8);
        let (with_graph, _) = greedy_round(&mut s, &ids, 8).unwrap();
        // The same decode step at the same position, replayed and launched.
        let step = |s: &mut sparsec_runtime::session::Session<'_>| s.run(&[sparsec_runtime::lm_session::ids_input(&[3])]).unwrap();
        let at = s.pos();
        let replayed = step(&mut s);
        s.set_graphs(false);
        s.truncate(at).unwrap();
        let launched = step(&mut s);
        assert_eq!(replayed, launched, "{name}: the graph replays the same kernels");
        let (without, _) = greedy_round(&mut s, &ids, 8).unwrap();
        assert_eq!(with_graph, without, "{name}: decode with and without the CUDA graph");
    }
}

#[test]
fn cpu_session_with_f16_kv_caches_is_within_their_rounding() {
    check_f16_kv(DeviceKind::Cpu);
}

#[test]
fn cuda_session_with_f16_kv_caches_equals_the_cpu_and_replays_its_graph() {
    if !common::require_gpu(sparsec_runtime::cuda::cuda_available()) {
        return;
    }
    check_f16_kv(DeviceKind::Cuda);
}

#[test]
fn the_kv_append_ptx_assembles_for_hopper() {
    assembles_for_hopper(&sparsec_runtime::cuda_append::append_ptx());
}

#[test]
fn the_sequence_axis_append_ptx_assembles_for_hopper() {
    assembles_for_hopper(&sparsec_runtime::cuda_seq_append::seq_append_ptx());
}

#[test]
fn the_greedy_step_ptx_assembles_for_hopper() {
    assembles_for_hopper(&sparsec_runtime::cuda_greedy::greedy_ptx());
}

/// `ptx` is ASCII and ptxas accepts it for sm_90 (the runtime's own kernels,
/// which the driver would otherwise first compile on a GPU host).
fn assembles_for_hopper(ptx: &str) {
    // CUDA 13.0's PTX JIT (the H200 machine's driver) refuses any non-ASCII
    // character, comments included, where later ptxas versions take them.
    assert!(ptx.is_ascii(), "PTX with a non-ASCII character: {:?}", ptx.chars().find(|c| !c.is_ascii()));
    let Some(ptxas) = common::require("ptxas", sparsec_compiler::toolchain::find_ptxas().ok_or(common::PTXAS_NOT_FOUND)) else {
        return;
    };
    let f = tempfile::Builder::new().suffix(".ptx").tempfile().unwrap();
    std::fs::write(f.path(), ptx).unwrap();
    sparsec_compiler::toolchain::check_ptx(&ptxas, f.path(), "sm_90").unwrap();
}

#[test]
fn bench_on_cuda_is_for_language_models_and_a_missing_driver_is_named() {
    // A graph (not a model) on CUDA: refused, not silently run on the CPU.
    let ir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/filetests/lower-matmul-transposed.sir");
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_sparsec"))
        .args(["bench", ir.to_str().unwrap(), "--device", "cuda", "--no-cache"])
        .output()
        .unwrap();
    assert!(!st.status.success());
    let err = String::from_utf8_lossy(&st.stderr);
    assert!(err.contains("bench --device cuda measures language models"), "{err}");
    if sparsec_runtime::cuda::cuda_available() {
        return;
    }
    // Without a driver, a CUDA session is refused with the reason.
    let tmp = tempfile::tempdir().unwrap();
    let art = Artifact::open(&compile_fixture("gpt2_tiny", tmp.path())).unwrap();
    let err = Executor::load(&art, DeviceKind::Cuda).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("no CUDA driver"), "{err}");
}

/// The tiny Llama with room for 1024 positions (its weights do not depend on
/// them), prefilled with 600 tokens in calls of 256 and decoded 6 steps: every
/// decode row sees more than 512 keys, so the CUDA kernel splits them over
/// three blocks per head (`attention::emit_warp`) and the CPU kernel over its
/// units. Against the interpreter on the CPU, against the CPU session on CUDA.
fn check_long_decode(device: DeviceKind) {
    let tmp = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/llama_tiny");
    let dir = tmp.path().join("llama_long");
    std::fs::create_dir(&dir).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    let cfg = dir.join("config.json");
    let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    c["max_position_embeddings"] = serde_json::json!(1024);
    std::fs::write(&cfg, c.to_string()).unwrap();
    let out = tmp.path().join("long.sparsec");
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_sparsec"))
        .args(["compile", dir.to_str().unwrap(), "--target", "all", "--no-cache", "-o", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(st.status.success(), "compile: {}", String::from_utf8_lossy(&st.stderr));
    let art = Artifact::open(&out).unwrap();
    let cap = SessionCapacity { positions: 700, seq: 256 };
    let ids = prompt(&art, 600);
    let exec = Executor::load(&art, device).unwrap();
    let mut s = exec.session(&art, cap).unwrap();
    let cpu = Executor::load(&art, DeviceKind::Cpu).unwrap();
    let mut reference = match device {
        DeviceKind::Cpu => Reference::Interpreter(&art),
        DeviceKind::Cuda => Reference::Session(cpu.session(&art, cap).unwrap()),
    };
    let steps = compare_steps(&mut s, &mut reference, &ids, 256, 6, TOL).unwrap();
    assert_all_pass(&format!("600-token prompt on {device:?}"), &steps, 3 + 6);
}

#[test]
fn cpu_decode_after_600_positions_equals_the_interpreter() {
    check_long_decode(DeviceKind::Cpu);
}

#[test]
fn cuda_decode_split_over_blocks_equals_the_cpu_after_600_positions() {
    if !common::require_gpu(sparsec_runtime::cuda::cuda_available()) {
        return;
    }
    check_long_decode(DeviceKind::Cuda);
}

/// The CUDA session launches a layer's key and value appends as one, so its
/// launch list is shorter than the plan's steps; the row-local tail (final
/// norm, LM head) must still start at the tail's first kernel. (It once used
/// the plan's index and so never ran on one row: every prefill row's logits
/// were computed.) Runs on the CPU: the mapping is the session's own.
#[test]
fn the_cuda_session_finds_the_row_local_tail_among_joined_appends() {
    use sparsec_runtime::cuda_session::{joined_appends, launch_index};
    use sparsec_runtime::manifest::Step;
    let tmp = tempfile::tempdir().unwrap();
    for name in ["gpt2_tiny", "llama_tiny"] {
        let art = Artifact::open(&compile_fixture(name, tmp.path())).unwrap();
        let plan = &art.manifest.execution;
        let joins = joined_appends(plan);
        let appends = plan.steps.iter().filter(|s| matches!(s, Step::KvAppend { .. })).count();
        // Two layers, a key and a value cache each: one launch per layer.
        assert_eq!((appends, joins.iter().filter(|&&j| j).count()), (4, 2), "{name}: appends and joined appends");
        for (i, j) in joins.iter().enumerate() {
            if *j {
                assert!(matches!((&plan.steps[i - 1], &plan.steps[i]), (Step::KvAppend { .. }, Step::KvAppend { .. })), "{name}: step {i}");
            }
        }
        let launches: Vec<&Step> = plan.steps.iter().zip(&joins).filter(|(_, j)| !**j).map(|(s, _)| s).collect();
        let tail = plan.row_local_tail.expect("a language model has a row-local tail");
        assert!(tail < plan.steps.len(), "{name}: the tail is not empty");
        assert_eq!(launches[launch_index(&joins, tail)], &plan.steps[tail], "{name}: the tail's first launch");
        assert_eq!(launch_index(&joins, plan.steps.len()), launches.len(), "{name}: the end");
    }
}

/// Side by side (`cuda_side`): the tiny GPT-2's q, k and v projections and
/// the tiny Llama's (and its gate and up) run on forked streams in calls of
/// several rows; the logits equal, bit for bit, those of a session that
/// launches every kernel on its stream in turn, through prefill calls of 6
/// rows and decode steps.
#[test]
fn cuda_sessions_side_by_side_equal_one_stream() {
    if !common::require_gpu(sparsec_runtime::cuda::cuda_available()) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    for name in ["gpt2_tiny", "llama_tiny"] {
        let art = Artifact::open(&compile_fixture(name, tmp.path())).unwrap();
        let cap = SessionCapacity { positions: 32, seq: 8 };
        let exec = Executor::load(&art, DeviceKind::Cuda).unwrap();
        let mut s = exec.session(&art, cap).unwrap();
        match &s {
            sparsec_runtime::session::Session::Cuda(c) => assert!(c.side_by_side_runs() > 0, "{name}: no kernels side by side"),
            sparsec_runtime::session::Session::Cpu(_) => panic!("{name}: a CPU session"),
        }
        let mut one = Executor::load(&art, DeviceKind::Cuda).unwrap();
        one.set_side_by_side(false);
        let mut r = Reference::Session(one.session(&art, cap).unwrap());
        let exact = Tolerance { atol: 0.0, rtol: 0.0 };
        let steps = compare_steps(&mut s, &mut r, &prompt(&art, 18), 6, 6, exact).unwrap();
        assert_all_pass(&format!("{name} side by side vs one stream"), &steps, 3 + 6);
    }
}
