//! Corrupted and mismatched artifacts are clean load errors, never a crash:
//! every file of artifacts of every weight format (dense f32, Q4_1, CSR, N:M,
//! BSR, baked) truncated, bit-flipped and swapped with another artifact's; and
//! structural corruptions re-sealed with valid hashes (as a hostile writer
//! would), which the validation behind the hashes must catch.

use crate::common;

use sparsec_compiler::driver::{compile, CompileRequest};
use sparsec_compiler::options::{CompileOptions, TargetKind};
use sparsec_compiler::Cache;
use sparsec_ir::parse_graph;
use sparsec_passes::PrintOptions;
use sparsec_runtime::cpu::CpuExecutor;
use sparsec_runtime::manifest::{Manifest, MANIFEST_FILE, WEIGHTS_FILE};
use sparsec_runtime::{Artifact, Trust};
use std::path::{Path, PathBuf};

/// One small graph per weight format, each with an attention op (KV caches)
/// after its matmul.
fn graph(format: &str) -> String {
    let (ty, pattern) = match format {
        "dense" => ("f32", ""),
        "q4_1" => ("q4_1", ""),
        "csr" => ("f32", "#sparsity(unstructured, ratio = 0.8) #specialize(generic)"),
        "nm" => ("f32", "#sparsity(nm, n = 2, m = 4) #specialize(generic)"),
        "bsr" => ("f32", "#sparsity(block, ratio = 0.5, rows = 4, cols = 4) #specialize(generic)"),
        "baked" => ("f32", "#sparsity(unstructured, ratio = 0.8) #specialize(full)"),
        "nm_q4" => ("f32", "#sparsity(nm, n = 2, m = 4) #values(q4) #specialize(generic)"),
        "csr_q8" => ("f32", "#sparsity(unstructured, ratio = 0.5) #values(q8) #specialize(generic)"),
        _ => unreachable!(),
    };
    format!(
        "graph @{format} {{\n  %x = input : f32[seq, 64]\n  %w = weight \"w\" init normal(seed = 1, std = 0.3) : {ty}[32, 64]\n  \
         %h = matmul %x, %w {{transpose_b = true}} {pattern}\n  %y = attention %h, %h, %h {{heads = 2, kv_heads = 2}}\n  return %y\n}}\n"
    )
}

const FORMATS: [&str; 8] = ["dense", "q4_1", "csr", "nm", "bsr", "baked", "nm_q4", "csr_q8"];

fn build(format: &str, out: &Path) {
    compile(CompileRequest {
        graph: parse_graph(&graph(format)).unwrap(),
        plan_text: None,
        weights: sparsec_compiler::WeightSource::None,
        options: CompileOptions { target: TargetKind::All, ..Default::default() },
        print: PrintOptions::default(),
        cache: None::<Cache>,
        output: out.to_path_buf(),
        lm: None,
    })
    .unwrap_or_else(|e| panic!("compiling {format}: {e}"));
}

/// Copies artifact `src` to a fresh `dst`.
fn copy_dir(src: &Path, dst: &Path) {
    let _ = std::fs::remove_dir_all(dst);
    for e in walk(src) {
        let to = dst.join(e.strip_prefix(src).unwrap());
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&e, &to).unwrap();
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// Opens `dir` fully: the artifact, then its CPU executor and one run at seq 3,
/// as a user's first command would. Returns the first error.
fn load_and_run(dir: &Path) -> Result<(), String> {
    let art = Artifact::open(dir).map_err(|e| e.to_string())?;
    let exec = CpuExecutor::load(&art).map_err(|e| e.to_string())?;
    let inputs = art.random_inputs(3, 1).map_err(|e| e.to_string())?;
    exec.run(&art, &inputs).map_err(|e| e.to_string())?;
    Ok(())
}

/// A corruption: what it is called and what it does to a file's bytes.
type Corruption = (String, Box<dyn Fn(&mut Vec<u8>)>);

fn corruptions(len: usize) -> Vec<Corruption> {
    let mut v: Vec<Corruption> = vec![
        ("emptied".into(), Box::new(|b: &mut Vec<u8>| b.clear())),
        ("truncated to half".into(), Box::new(|b: &mut Vec<u8>| b.truncate(b.len() / 2))),
        ("truncated by one byte".into(), Box::new(|b: &mut Vec<u8>| b.truncate(b.len().saturating_sub(1)))),
        ("extended by one byte".into(), Box::new(|b: &mut Vec<u8>| b.push(0))),
    ];
    for at in [0, len / 3, len / 2, len.saturating_sub(1)] {
        v.push((format!("bit flipped at byte {at}"), Box::new(move |b: &mut Vec<u8>| b[at] ^= 0x10)));
    }
    v
}

#[test]
fn every_file_of_every_format_corrupted_or_swapped_is_a_clean_error() {
    let tmp = tempfile::tempdir().unwrap();
    let arts: Vec<PathBuf> = FORMATS
        .iter()
        .map(|f| {
            let p = tmp.path().join(format!("{f}.sparsec"));
            build(f, &p);
            load_and_run(&p).unwrap_or_else(|e| panic!("the intact {f} artifact: {e}"));
            p
        })
        .collect();
    let work = tmp.path().join("work");
    let mut cases = 0;
    for (i, art) in arts.iter().enumerate() {
        for file in walk(art) {
            let rel = file.strip_prefix(art).unwrap().to_path_buf();
            let original = std::fs::read(&file).unwrap();
            for (what, f) in corruptions(original.len()) {
                copy_dir(art, &work);
                let mut b = original.clone();
                f(&mut b);
                std::fs::write(work.join(&rel), &b).unwrap();
                let err = load_and_run(&work).expect_err(&format!("{} {}: {what} loaded", FORMATS[i], rel.display()));
                // The error names the file it found wrong (or the manifest, whose
                // hashes a damaged manifest no longer matches).
                let name = rel.file_name().unwrap().to_string_lossy().into_owned();
                assert!(err.contains(&name) || err.contains(MANIFEST_FILE), "{} {}: {what}: {err}", FORMATS[i], rel.display());
                cases += 1;
            }
            // The same file from another artifact.
            let other = &arts[(i + 1) % arts.len()];
            if let Ok(theirs) = std::fs::read(other.join(&rel)) {
                if theirs != original {
                    copy_dir(art, &work);
                    std::fs::write(work.join(&rel), &theirs).unwrap();
                    let err = load_and_run(&work).expect_err(&format!("{} {}: swapped in loaded", FORMATS[i], rel.display()));
                    assert!(err.contains("hash") || err.contains("modified"), "{err}");
                    cases += 1;
                }
            }
        }
    }
    assert!(cases > 300, "only {cases} corruptions tried");
}

/// Re-seals `dir` after its files were changed: new file hashes and manifest
/// hash, as a writer that knows the format would. Only the structural checks
/// stand between such an artifact and the kernels.
fn reseal(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join(MANIFEST_FILE);
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    let mut m: Manifest = serde_json::from_value(v).unwrap();
    let text = sparsec_runtime::integrity::seal(dir, &mut m).unwrap();
    std::fs::write(&path, text).unwrap();
}

/// Rewrites bytes of weight tensor `name` in place (`edit` gets its bytes).
fn edit_weight(dir: &Path, name: &str, edit: impl FnOnce(&mut [u8])) {
    let range = Artifact::open_with(dir, Trust::SkipFileHashes).unwrap().weights.range(name).unwrap();
    let path = dir.join(WEIGHTS_FILE);
    let mut b = std::fs::read(&path).unwrap();
    edit(&mut b[range]);
    std::fs::write(&path, b).unwrap();
}

fn expect_error(dir: &Path, fragments: &[&str]) {
    let err = load_and_run(dir).expect_err("a structurally corrupt artifact loaded");
    for f in fragments {
        assert!(err.contains(f), "expected `{f}` in: {err}");
    }
}

#[test]
fn resealed_structural_corruptions_are_caught_behind_the_hashes() {
    let tmp = tempfile::tempdir().unwrap();
    let art = |f: &str| {
        let p = tmp.path().join(format!("{f}.sparsec"));
        build(f, &p);
        p
    };
    let (csr, nm, bsr, q4, dense) = (art("csr"), art("nm"), art("bsr"), art("q4_1"), art("dense"));
    let w = tmp.path().join("work");

    // A reseal without changes loads: the checks below fail for their reason.
    copy_dir(&csr, &w);
    reseal(&w, |_| {});
    load_and_run(&w).unwrap();

    // CSR: a column index past k (the last 2 bytes are u16 column indices; k = 64).
    copy_dir(&csr, &w);
    edit_weight(&w, "w", |b| {
        let n = sparsec_ir::sparse::SparseFormat::Csr { n: 32, k: 64, nnz: 410 }.bytes();
        b[n - 2..n].copy_from_slice(&999u16.to_le_bytes());
    });
    reseal(&w, |_| {});
    expect_error(&w, &["tensor `w`", "column index", "999"]);

    // CSR: row pointers that go backwards.
    copy_dir(&csr, &w);
    edit_weight(&w, "w", |b| b[4..8].copy_from_slice(&400u32.to_le_bytes()));
    reseal(&w, |_| {});
    expect_error(&w, &["tensor `w`", "row pointer"]);

    // N:M: one more bit in a row's bitmap than the pattern keeps (values: 32·32·4 bytes).
    copy_dir(&nm, &w);
    edit_weight(&w, "w", |b| b[32 * 32 * 4] |= 0xff);
    reseal(&w, |_| {});
    expect_error(&w, &["tensor `w`", "keeps"]);

    // BSR: a block column past the row (8 block rows: pointers 9 u32, then 64 blocks' values).
    copy_dir(&bsr, &w);
    edit_weight(&w, "w", |b| {
        let at = 9 * 4 + 64 * 16 * 4;
        b[at..at + 4].copy_from_slice(&1000u32.to_le_bytes());
    });
    reseal(&w, |_| {});
    expect_error(&w, &["tensor `w`", "block column"]);

    // Quantized values: an N:M q4 bitmap byte with every bit set, and a CSR q8
    // (bitmap-indexed at 50%) row whose bits disagree with its row pointers.
    let quantized =
        |s: sparsec_ir::Sparsity, v: sparsec_ir::ValueCoding| sparsec_ir::sparse::SparseFormat::for_pattern_coded(&s, v, 32, 64);
    let (nm_q4, csr_q8) = (art("nm_q4"), art("csr_q8"));
    let nm_idx = quantized(sparsec_ir::Sparsity::NM { n: 2, m: 4 }, sparsec_ir::ValueCoding::Q4).layout().indices as usize;
    copy_dir(&nm_q4, &w);
    edit_weight(&w, "w", |b| b[nm_idx] = 0xff);
    reseal(&w, |_| {});
    expect_error(&w, &["tensor `w`", "invalid nm_q4", "keeps 4, not 2"]);
    let csr_fmt = quantized(sparsec_ir::Sparsity::Unstructured { ratio: 0.5 }, sparsec_ir::ValueCoding::Q8);
    assert_eq!(csr_fmt.csr_index(), sparsec_ir::sparse_quant::CsrIndex::Bitmap);
    let csr_idx = csr_fmt.layout().indices as usize;
    copy_dir(&csr_q8, &w);
    edit_weight(&w, "w", |b| b[csr_idx] ^= 0x01);
    reseal(&w, |_| {});
    expect_error(&w, &["tensor `w`", "invalid csr_q8", "bitmap bits"]);

    // Q4_1: the manifest claims a larger weight than the file holds.
    copy_dir(&q4, &w);
    reseal(&w, |m| {
        for b in m["execution"]["buffers"].as_array_mut().unwrap() {
            if b["name"] == "w" {
                b["dims"][0] = serde_json::json!({"Fixed": 320});
            }
        }
    });
    expect_error(&w, &["`w`", "[Fixed(320), Fixed(64)]"]);

    // A step pointed at a buffer of another size: the graph check, and behind
    // it the library's ABI record, refuse it.
    copy_dir(&dense, &w);
    reseal(&w, |m| {
        for s in m["execution"]["steps"].as_array_mut().unwrap() {
            if s["step"] == "kernel" && s["kernel"].as_str().unwrap().contains("matmul") {
                s["args"][0] = s["args"][1].clone();
            }
        }
    });
    expect_error(&w, &["kernels.so", "kernel k0_matmul: buffer 0 (`w`)", "the kernel was built for"]);

    // A kernel name that walks out of the artifact.
    copy_dir(&dense, &w);
    reseal(&w, |m| m["kernels"][0]["name"] = serde_json::json!("../../etc/passwd"));
    expect_error(&w, &["kernel name"]);

    // A decode launch of part of a block, and one smaller than a row's launch.
    for t in [300, 256] {
        copy_dir(&dense, &w);
        reseal(&w, |m| {
            for s in m["execution"]["steps"].as_array_mut().unwrap() {
                if s["step"] == "kernel" {
                    s["gpu_decode_threads"] = serde_json::json!(t);
                }
            }
        });
        expect_error(&w, &[&format!("gpu_decode_threads {t} is not whole blocks")]);
    }

    // A tiled matmul's band of rows whose warps are not whole blocks (a
    // block is one tile), or without warps, or of no rows.
    for (rows, warps) in [(64, Some(12)), (64, None), (0, Some(8))] {
        copy_dir(&dense, &w);
        reseal(&w, |m| {
            for s in m["execution"]["steps"].as_array_mut().unwrap() {
                if s["step"] == "kernel" {
                    s["gpu_mma_rows"] = serde_json::json!(rows);
                    s["gpu_mma_warps"] = serde_json::json!(warps);
                }
            }
        });
        expect_error(&w, &[&format!("gpu_mma_rows {rows} without gpu_mma_warps of whole blocks")]);
    }

    // Blocks of part of a warp, and blocks of their own for a tiled launch.
    for (block, rows) in [(48, None), (32, Some(64))] {
        copy_dir(&dense, &w);
        reseal(&w, |m| {
            for s in m["execution"]["steps"].as_array_mut().unwrap() {
                if s["step"] == "kernel" {
                    s["gpu_mma_block"] = serde_json::json!(block);
                    s["gpu_mma_rows"] = serde_json::json!(rows);
                    s["gpu_mma_warps"] = serde_json::json!(256);
                }
            }
        });
        expect_error(&w, &[&format!("gpu_mma_block {block} is not whole warps")]);
    }

    // Indices out of range in the plan.
    copy_dir(&dense, &w);
    reseal(&w, |m| m["execution"]["outputs"][0] = serde_json::json!(10_000));
    expect_error(&w, &["output 10000"]);

    // Per-channel groups claimed by a buffer that is no q4_1 KV cache.
    copy_dir(&dense, &w);
    reseal(&w, |m| m["execution"]["buffers"][0]["channel_groups"] = serde_json::json!(32));
    expect_error(&w, &["channel groups of 32", "only an unwindowed q4_1 KV cache"]);

    // A chunked-SVD layout claimed by a buffer that is no f16 KV cache, and
    // one whose ring is not made of whole chunks.
    copy_dir(&dense, &w);
    reseal(&w, |m| m["execution"]["buffers"][0]["chunked"] = serde_json::json!({"chunk": 16, "ring": 272, "slot": 4, "head": 16}));
    expect_error(&w, &["chunked layout", "only an unwindowed f16 KV cache"]);
    copy_dir(&dense, &w);
    reseal(&w, |m| m["execution"]["buffers"][0]["chunked"] = serde_json::json!({"chunk": 16, "ring": 270, "slot": 4, "head": 16}));
    expect_error(&w, &["buffer 0 (`x`): no byte size"]);

    // A sequence-axis layout claimed by a buffer that is no f16 KV cache.
    copy_dir(&dense, &w);
    reseal(
        &w,
        |m| m["execution"]["buffers"][0]["sequence"] = serde_json::json!({"basis": {"transform": "pswf", "bandwidth": 0.125}, "keep": 0.5, "block": 16, "rows": 8, "sinks": 4, "recent": 32, "ring": 304}),
    );
    expect_error(&w, &["sequence layout", "only an unwindowed f16 KV cache"]);

    // A layout per block and KV head claimed by a buffer that is no KV cache.
    copy_dir(&dense, &w);
    reseal(&w, |m| m["execution"]["buffers"][0]["head_blocks"] = serde_json::json!({"block": 16, "heads": 2}));
    expect_error(&w, &["head blocks", "only an f16 or f32 KV cache"]);

    // An unknown manifest version is refused before anything else.
    copy_dir(&dense, &w);
    reseal(&w, |m| m["version"] = serde_json::json!(99));
    expect_error(&w, &["manifest version Some(99)"]);
}

/// An artifact whose CPU code was compiled for x86-64 features this host
/// lacks is refused before its library is loaded, naming the features (never
/// SIGILL); the host's own target loads. The feature claimed is the first of
/// a list that this host lacks (AMX tiles on AMD's machines; VP2INTERSECT
/// on Intel's).
#[test]
fn artifacts_for_features_the_host_lacks_are_refused_by_name() {
    let candidates =
        ["amx-tile", "avx512f", "avx512vnni", "avx512bf16", "avx512vbmi2", "avx512ifma", "avx512fp16", "avxvnni", "avx512vp2intersect"];
    let Some(lacking) = candidates.iter().find(|f| !sparsec_runtime::isa::missing_on_host(&[f.to_string()]).is_empty()) else {
        common::require::<(), _>(
            "a host that lacks one of AVX-512 F, VNNI, BF16, VBMI2, IFMA, FP16, VP2INTERSECT or AVX-VNNI",
            Err("this host has them all"),
        );
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dense = tmp.path().join("dense.sparsec");
    build("dense", &dense);
    let w = tmp.path().join("work");
    copy_dir(&dense, &w);
    let (cpu, features) = sparsec_runtime::isa::recorded_target(&Artifact::open(&dense).unwrap().manifest.options);
    assert!(sparsec_runtime::isa::missing_on_host(&sparsec_runtime::isa::required(&cpu, &features)).is_empty());
    reseal(&w, |v| v["options"]["cpu"]["features"] = serde_json::json!(format!("{features},+{lacking}")));
    expect_error(&w, &["features this host lacks", lacking]);
    // A generic level implies its features.
    copy_dir(&dense, &w);
    reseal(&w, |v| {
        v["options"]["cpu"]["cpu"] = serde_json::json!("x86-64-v4");
        v["options"]["cpu"]["features"] = serde_json::json!("");
    });
    if sparsec_runtime::isa::missing_on_host(&["avx512f".into()]).is_empty() {
        load_and_run(&w).unwrap();
    } else {
        expect_error(&w, &["features this host lacks", "avx512f", "x86-64-v4"]);
    }
}

#[test]
fn sessions_refuse_ids_positions_and_artifacts_they_cannot_serve() {
    let tmp = tempfile::tempdir().unwrap();
    let src = "graph @emb {\n  %ids = input : i32[seq]\n  %pos = positions : i32[seq]\n  %wte = weight \"wte\" init normal(seed = 1, std = 0.3) : f32[10, 8]\n  \
               %wpe = weight \"wpe\" init normal(seed = 2, std = 0.3) : f32[6, 8]\n  %t = embedding %wte, %ids\n  %p = embedding %wpe, %pos\n  %y = add %t, %p\n  return %y\n}\n";
    let out = tmp.path().join("emb.sparsec");
    compile(CompileRequest {
        graph: parse_graph(src).unwrap(),
        plan_text: None,
        weights: sparsec_compiler::WeightSource::None,
        options: CompileOptions { target: TargetKind::Cpu, ..Default::default() },
        print: PrintOptions::default(),
        cache: None::<Cache>,
        output: out.clone(),
        lm: None,
    })
    .unwrap();
    let art = Artifact::open(&out).unwrap();
    assert_eq!(art.limits.max_positions, 6);
    let exec = CpuExecutor::load(&art).unwrap();
    let ids = |v: &[f32]| vec![ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[v.len()]), v.to_vec()).unwrap()];
    for bad in [&[1.0, 10.0][..], &[-1.0], &[2.5], &[f32::NAN]] {
        let err = exec.run(&art, &ids(bad)).expect_err("a bad id ran").to_string();
        assert!(err.contains("not an integer in 0..10"), "{err}");
    }
    let mut s = exec.session(&art).unwrap();
    s.run(&ids(&[1.0, 2.0, 3.0, 4.0])).unwrap();
    let err = s.run(&ids(&[1.0, 2.0, 3.0])).expect_err("ran past the position table").to_string();
    assert!(err.contains("exceed the 6"), "{err}");
    s.run(&ids(&[1.0, 2.0])).unwrap();

    let other = tmp.path().join("other.sparsec");
    build("dense", &other);
    let other = Artifact::open(&other).unwrap();
    let err = exec.session(&other).err().expect("a session over another artifact").to_string();
    assert!(err.contains("another artifact"), "{err}");
}

#[test]
fn trust_skips_the_file_hashes_and_nothing_else() {
    let tmp = tempfile::tempdir().unwrap();
    let art = tmp.path().join("dense.sparsec");
    build("dense", &art);
    // A weight value changed in place: only the hash can tell.
    edit_weight(&art, "w", |b| b[0] ^= 0x01);
    let run = |trust: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sparsec"));
        if trust {
            cmd.arg("--trust");
        }
        cmd.args(["run", art.to_str().unwrap(), "--seq", "2"]).output().unwrap()
    };
    let o = run(false);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("weights.safetensors: the file was modified"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = run(true);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The structure is still validated under --trust.
    edit_weight(&art, "w", |_| {});
    reseal(&art, |m| m["execution"]["outputs"][0] = serde_json::json!(10_000));
    let o = run(true);
    assert!(String::from_utf8_lossy(&o.stderr).contains("output 10000"), "{}", String::from_utf8_lossy(&o.stderr));
}

/// The CUDA loader checks each PTX entry's parameter count against the plan
/// (`cuda::entry_params`); here, without a GPU, the count read from real PTX
/// must be what every step launches with.
#[test]
fn ptx_entries_take_the_parameters_the_plan_launches_with() {
    let tmp = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for f in FORMATS {
        let p = tmp.path().join(format!("{f}.sparsec"));
        build(f, &p);
        let art = Artifact::open(&p).unwrap();
        for step in &art.manifest.execution.steps {
            let sparsec_runtime::manifest::Step::Kernel(k) = step else { continue };
            let ptx = std::fs::read_to_string(p.join("cuda").join(format!("{}.ptx", k.kernel))).unwrap();
            assert_eq!(sparsec_runtime::cuda::entry_params(&ptx, &k.kernel), Some(k.args.len() + 2), "{f}: {}", k.kernel);
            assert_eq!(sparsec_runtime::cuda::entry_params(&ptx, "no_such_kernel"), None);
            checked += 1;
        }
    }
    assert!(checked >= 12, "{checked}");
}

/// What the interpreter reads of an artifact: every weight, unpacked from its
/// stored format (padding and all), equal to the graph's pruned init.
#[test]
fn weights_unpack_from_every_format() {
    let tmp = tempfile::tempdir().unwrap();
    let mut dense: Option<Vec<f32>> = None;
    for f in ["dense", "csr", "nm", "bsr", "q4_1"] {
        let p = tmp.path().join(format!("{f}.sparsec"));
        build(f, &p);
        let w = Artifact::open(&p).unwrap().weight_array("w").unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!(w.shape(), [32, 64], "{f}");
        let zeros = w.iter().filter(|v| **v == 0.0).count();
        match f {
            "dense" => dense = Some(w.iter().copied().collect()),
            "csr" => assert_eq!(zeros, 32 * 64 - 410, "csr keeps 410"),
            "nm" | "bsr" => assert_eq!(zeros, 32 * 64 / 2, "{f} keeps half"),
            _ => {}
        }
        if let (Some(d), "csr" | "nm" | "bsr") = (&dense, f) {
            // Kept values are the dense init's, unchanged.
            assert!(w.iter().zip(d).all(|(a, b)| *a == 0.0 || a == b), "{f}");
        }
    }
}
