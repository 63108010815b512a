//! AMX tiles (`compiler/src/mlir/kernels/amx_matmul.rs`, `amx_int8_matmul.rs`):
//! which weights a compile for an AMX target stores as tiles, and, where the
//! host has AMX, that the bf16 tile kernel's results stay within the bound of
//! its one rounding (the activations to bf16) of an f64 reference, and that
//! the q4_1 int8 tile kernel equals the VNNI kernel (the same integer dot
//! products) to f32 rounding, element by element, at row counts that take
//! one row, one and two A tiles, whole and ragged row blocks.

use anyhow::Result;
use sparsec_compiler::{compile, CompileOptions, CompileRequest, CpuTarget, TargetKind};
use sparsec_ir::tiles::TileLayout;
use sparsec_ir::{parse_graph, Init};
use sparsec_passes::PrintOptions;
use sparsec_runtime::cpu::CpuExecutor;
use sparsec_runtime::Artifact;

const K: usize = 96;
const N: usize = 64;

/// A bf16 matmul plus a residual (fused into its stores), a tied table
/// (read by an embedding too: stays in rows) and an f32 weight (no tiles).
const SRC: &str = r#"graph @amx {
  %ids = input : i32[seq]
  %x = input : f32[seq, 96]
  %r = input : f32[seq, 64]
  %w = weight "w" init normal(seed = 5, std = 0.3) : bf16[64, 96]
  %t = weight "t" init normal(seed = 6, std = 0.3) : bf16[32, 96]
  %q = weight "q" init normal(seed = 7, std = 0.3) : q4_1[64, 96]
  %h = matmul %x, %w {transpose_b = true}
  %y = add %h, %r
  %e = embedding %t, %ids
  %l = matmul %e, %t {transpose_b = true}
  %g = matmul %x, %q {transpose_b = true}
  %z = add %g, %r
  return %y, %l, %z
}"#;

fn target(cpu: &str) -> CpuTarget {
    CpuTarget { cpu: cpu.into(), ..CpuTarget::x86_64_v3() }
}

fn build(dir: &std::path::Path, cpu: CpuTarget, target: TargetKind) -> Result<Artifact> {
    build_with(dir, CompileOptions { target, cpu, ..Default::default() })
}

fn build_with(dir: &std::path::Path, options: CompileOptions) -> Result<Artifact> {
    compile(CompileRequest {
        graph: parse_graph(SRC)?,
        plan_text: None,
        weights: sparsec_compiler::WeightSource::None,
        options,
        print: PrintOptions::default(),
        cache: None,
        output: dir.to_path_buf(),
        lm: None,
    })?;
    Ok(Artifact::open(dir)?)
}

fn tiles_of(art: &Artifact, name: &str) -> Option<TileLayout> {
    art.manifest.execution.buffers.iter().find(|b| b.name == name).and_then(|b| b.tiles)
}

#[test]
fn amx_targets_store_only_matmul_weights_as_tiles() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let art = build(&tmp.path().join("spr"), target("sapphirerapids"), TargetKind::Cpu)?;
    assert_eq!(tiles_of(&art, "w"), Some(TileLayout::AmxBf16));
    assert_eq!(tiles_of(&art, "q"), Some(TileLayout::AmxQ4_1));
    // q4_1 records only for kernels that take int8 activations.
    let f32_act = CompileOptions {
        target: TargetKind::Cpu,
        cpu: target("sapphirerapids"),
        quant_activations: sparsec_compiler::QuantActivations::F32,
        ..Default::default()
    };
    assert_eq!(tiles_of(&build_with(&tmp.path().join("f32act"), f32_act)?, "q"), None);
    // The q4_1 weight read back in rows dequantizes to the reference's values.
    let packed = sparsec_ir::quant::quantize(sparsec_ir::DType::Q4_1, &Init::Normal { seed: 7, std: 0.3 }.generate(N * K)).unwrap();
    let mut q_want = vec![0f32; N * K];
    assert!(sparsec_ir::quant::dequantize(sparsec_ir::DType::Q4_1, &packed, &mut q_want));
    assert_eq!(art.weight_array("q")?.iter().copied().collect::<Vec<_>>(), q_want);
    assert_eq!(tiles_of(&art, "t"), None, "a table an embedding reads stays in rows");
    // The artifact's weight, read back in rows, is the init rounded to bf16.
    let want: Vec<f32> = Init::Normal { seed: 5, std: 0.3 }.generate(N * K).iter().map(|v| half::bf16::from_f32(*v).to_f32()).collect();
    assert_eq!(art.weight_array("w")?.iter().copied().collect::<Vec<_>>(), want);
    // No tiles without AMX, or where CUDA kernels read the weights too.
    let v4 = build(&tmp.path().join("v4"), target("x86-64-v4"), TargetKind::Cpu)?;
    assert_eq!(tiles_of(&v4, "w"), None);
    let off = CpuTarget { features: "-amx-bf16,-amx-int8".into(), ..target("sapphirerapids") };
    let off = build(&tmp.path().join("off"), off, TargetKind::Cpu)?;
    assert_eq!((tiles_of(&off, "w"), tiles_of(&off, "q")), (None, None));
    let all = build(&tmp.path().join("all"), target("sapphirerapids"), TargetKind::All)?;
    assert_eq!((tiles_of(&all, "w"), tiles_of(&all, "q")), (None, None));
    Ok(())
}

#[test]
fn the_tile_kernel_is_within_the_bf16_rounding_of_the_activations() -> Result<()> {
    if !host_has_amx("the AMX bf16 tile kernel (its code is pinned by filetests/lower-matmul-amx)") {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let host = CpuTarget::host();
    let art = build(&tmp.path().join("host"), host, TargetKind::Cpu)?;
    assert_eq!(tiles_of(&art, "w"), Some(TileLayout::AmxBf16));
    let exec = CpuExecutor::load(&art)?;
    let w: Vec<f64> = Init::Normal { seed: 5, std: 0.3 }.generate(N * K).iter().map(|v| half::bf16::from_f32(*v).to_f32() as f64).collect();
    // One and two A tiles, whole and ragged blocks of 32 rows, several blocks.
    for seq in [1u64, 5, 16, 17, 32, 33, 70] {
        let inputs = art.random_inputs(seq, 7)?;
        let got = exec.run(&art, &inputs)?;
        let (x, r, y) = (&inputs[1], &inputs[2], &got[0]);
        for row in 0..seq as usize {
            for j in 0..N {
                let (mut dot, mut mag) = (0f64, 0f64);
                for k in 0..K {
                    let p = x[[row, k]] as f64 * w[j * K + k];
                    dot += p;
                    mag += p.abs();
                }
                let want = dot + r[[row, j]] as f64;
                // x rounded to bf16 (unit roundoff 2^-8), f32 sums over k, the residual add.
                let bound = (2f64.powi(-8) + K as f64 * 2f64.powi(-23)) * mag + 2f64.powi(-23) * want.abs() + 1e-6;
                let err = (y[[row, j]] as f64 - want).abs();
                assert!(
                    err <= bound,
                    "seq {seq}, row {row}, column {j}: {} against {want}: error {err:.3e} above the bound {bound:.3e}",
                    y[[row, j]]
                );
            }
        }
    }
    Ok(())
}

/// Whether the host runs both AMX kernels (else prints SKIPPED).
fn host_has_amx(what: &str) -> bool {
    let host = CpuTarget::host();
    let features = ["amx-tile".into(), "amx-bf16".into(), "amx-int8".into()];
    let yes = host.isa().amx_bf16 && host.isa().amx_int8 && sparsec_runtime::isa::missing_on_host(&features).is_empty();
    if !yes {
        eprintln!("SKIPPED: {what} needs a host with AMX (tile, bf16, int8)");
    }
    yes
}

#[test]
fn the_int8_tile_kernel_equals_the_vnni_kernel() -> Result<()> {
    if !host_has_amx("the AMX int8 tile kernel (its code is pinned by filetests/lower-matmul-amx-int8)") {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let tiles = build(&tmp.path().join("tiles"), CpuTarget::host(), TargetKind::Cpu)?;
    assert_eq!(tiles_of(&tiles, "q"), Some(TileLayout::AmxQ4_1));
    let vnni = build(
        &tmp.path().join("vnni"),
        CpuTarget { features: format!("{},-amx-int8", CpuTarget::host().features), ..CpuTarget::host() },
        TargetKind::Cpu,
    )?;
    assert_eq!(tiles_of(&vnni, "q"), None);
    let (et, ev) = (CpuExecutor::load(&tiles)?, CpuExecutor::load(&vnni)?);
    for seq in [1u64, 5, 16, 17, 32, 33, 70] {
        let inputs = tiles.random_inputs(seq, 11)?;
        let (a, b) = (&et.run(&tiles, &inputs)?[2], &ev.run(&vnni, &inputs)?[2]);
        for (i, (x, y)) in a.iter().zip(b.iter()).enumerate() {
            // Exact integer dot products; f32 sums of the scaled blocks in another order.
            assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "seq {seq}, element {i}: tiles {x}, VNNI {y}");
        }
    }
    Ok(())
}

/// SmolLM2 with bf16 weights on AMX tiles (its activations rounded to bf16 in
/// every tiled matmul): perplexity on 512 tokens of GPL-3 within 0.5% of the
/// reference's 18.8328 (f32 weights dequantized from the Q4_1 file); and the
/// Q4_1 file as shipped on int8 tiles.
#[test]
fn smollm2_on_amx_tiles_keeps_its_perplexity() {
    if !host_has_amx("SmolLM2 on AMX tiles") {
        return;
    }
    let Some(_) = crate::common::require(crate::common::SMOLLM2, sparsec_models::checkpoint::smollm2_path()) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("bf16.sparsec");
    let sparsec = |args: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_sparsec")).args(args).env("SPARSEC_CACHE_DIR", tmp.path()).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        o.stdout
    };
    sparsec(&["compile", "smollm2", "--dequantize", "--weights-dtype", "bf16", "--quant-activations", "f32", "-o", dir.to_str().unwrap()]);
    let art = Artifact::open(&dir).unwrap();
    let tiled = art.manifest.execution.buffers.iter().filter(|b| b.tiles.is_some()).count();
    // 7 matrices in each of 30 layers; the tied embedding table stays in rows.
    assert_eq!(tiled, 7 * 30);
    let out = sparsec(&["eval", dir.to_str().unwrap(), "--text", crate::common::GPL3, "--max-tokens", "512", "--json"]);
    let ppl = serde_json::from_slice::<serde_json::Value>(&out).unwrap()["perplexity"].as_f64().unwrap();
    let rel = (ppl - 18.8328).abs() / 18.8328;
    println!("smollm2, bf16 weights on AMX tiles: perplexity {ppl:.4} ({:+.3}% from the reference)", 100.0 * (ppl / 18.8328 - 1.0));
    assert!(rel < 0.005, "perplexity {ppl:.4} is {:.2}% from the reference 18.8328", rel * 100.0);

    // As shipped (q4_1, int8 activations): its matrices as int8 tile records,
    // within 1.5% of the reference as the VNNI kernels are
    // (`models::smollm2_perplexity_matches_llama_cpp_and_the_compiled_model_matches_the_reference`).
    let q4 = tmp.path().join("q4.sparsec");
    sparsec(&["compile", "smollm2", "-o", q4.to_str().unwrap()]);
    let art = Artifact::open(&q4).unwrap();
    let records = art.manifest.execution.buffers.iter().filter(|b| b.tiles == Some(TileLayout::AmxQ4_1)).count();
    assert_eq!(records, 7 * 30);
    let out = sparsec(&["eval", q4.to_str().unwrap(), "--text", crate::common::GPL3, "--max-tokens", "512", "--json"]);
    let ppl = serde_json::from_slice::<serde_json::Value>(&out).unwrap()["perplexity"].as_f64().unwrap();
    println!("smollm2 q4_1 on AMX int8 tiles: perplexity {ppl:.4} ({:+.3}% from the reference)", 100.0 * (ppl / 18.8328 - 1.0));
    assert!((ppl - 18.8328).abs() / 18.8328 < 1.5e-2, "perplexity {ppl:.4} vs the reference 18.8328");
}
