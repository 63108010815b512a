//! What each fuzz target does with its input. Every function must return
//! normally for any bytes: an error is a fine answer, a panic, an abort or a
//! sanitizer report is a finding. Shared by the `cargo fuzz` targets and by
//! `tests/fuzz_regressions.rs`, which replays every saved finding.

use std::io::Write;
use std::path::Path;

/// Splits `data` into a length-prefixed part (u32 little-endian length, cut
/// to what is there) and the rest.
fn split(data: &[u8]) -> (&[u8], &[u8]) {
    let Some(head) = data.get(..4) else { return (data, &[]) };
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let body = &data[4..];
    let len = len.min(body.len());
    (&body[..len], &body[len..])
}

fn write(path: &Path, bytes: &[u8]) {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).expect("fuzz scratch directory");
    }
    let mut f = std::fs::File::create(path).expect("fuzz scratch file");
    f.write_all(bytes).expect("fuzz scratch write");
}

/// A fresh scratch directory (in memory where `/dev/shm` exists).
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().expect("fuzz scratch directory")
}

/// The IR text parser: whatever parses and verifies prints to text that
/// parses back to the same graph.
pub fn ir_text(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(g) = sparsec_ir::parse_graph(text) else { return };
    if sparsec_ir::verify(&g).is_err() {
        return;
    }
    let printed = sparsec_ir::print_graph(&g);
    let again = sparsec_ir::parse_graph(&printed).unwrap_or_else(|e| panic!("printed graph does not parse: {e}\n{printed}"));
    assert!(again == g, "printed graph parses to another graph:\n{printed}");
}

/// A small Llama graph the plan target applies plans to.
fn plan_graph() -> sparsec_ir::Graph {
    sparsec_models::llama::LlamaConfig {
        vocab: 64,
        dim: 32,
        layers: 3,
        heads: 4,
        kv_heads: 2,
        ffn: 64,
        rope_theta: 10000.0,
        rms_eps: 1e-5,
        tied: true,
        rope_adjacent: false,
        context: 128,
    }
    .build_graph("fuzz")
}

/// The plan parser, and the passes that apply a parsed plan to a model.
pub fn plan(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(p) = sparsec_passes::Plan::parse(text) else { return };
    let mut g = plan_graph();
    let _ = sparsec_passes::PassManager::with_plan(Some(p), sparsec_passes::PrintOptions::default()).run(&mut g);
}

/// The GGUF reader: header, metadata, tensor table, tensor bytes and
/// dequantization, then the model built from its metadata.
pub fn gguf(data: &[u8]) {
    let dir = scratch();
    let path = dir.path().join("m.gguf");
    write(&path, data);
    let Ok(f) = sparsec_models::gguf::GgufFile::open(&path) else { return };
    let names: Vec<String> = f.tensors.iter().map(|t| t.name.clone()).collect();
    for name in names {
        if let Some(t) = f.tensor(&name) {
            if f.tensor_bytes(t).is_ok() && t.numel() <= 1 << 20 {
                let _ = f.dequantize(&name);
            }
        }
    }
    drop(f);
    if let Some(p) = path.to_str() {
        if let Ok(m) = sparsec_models::checkpoint::Model::load(p) {
            let _ = m.family.build_graph("fuzz");
        }
    }
}

/// A Hugging Face directory: `config.json` (length-prefixed) and a
/// `model.safetensors` (the rest), loaded as a model (config, headers, every
/// tensor's shape and type checked against the config) and built into a graph.
pub fn safetensors_dir(data: &[u8]) {
    let (config, tensors) = split(data);
    let dir = scratch();
    write(&dir.path().join("config.json"), config);
    write(&dir.path().join("model.safetensors"), tensors);
    let Some(p) = dir.path().to_str() else { return };
    let Ok(m) = sparsec_models::checkpoint::Model::load(p) else { return };
    let _ = m.family.build_graph("fuzz");
}

/// Artifact loading: a manifest, a graph and a weights file (length-prefixed,
/// length-prefixed, rest) after a mode byte. Odd modes load the files as they
/// are (the hashes must catch them); even modes seal them first, with every
/// file the manifest requires present, as a hostile writer would, so that the
/// structural validation is what stands between the bytes and the runtime.
pub fn artifact(data: &[u8]) {
    use sparsec_runtime::manifest::*;
    let Some((&mode, rest)) = data.split_first() else { return };
    let (manifest, rest) = split(rest);
    let (graph, weights) = split(rest);
    let dir = scratch();
    let d = dir.path();
    write(&d.join(GRAPH_FILE), graph);
    write(&d.join(WEIGHTS_FILE), weights);
    if mode % 2 == 0 {
        let Ok(mut m) = serde_json::from_slice::<Manifest>(manifest) else { return };
        let mut files = vec![CPU_LIBRARY.to_string()];
        if m.plan.is_some() {
            files.push(PLAN_FILE.into());
        }
        if let Some(lm) = &m.lm {
            files.push(lm.tokenizer.clone());
        }
        files.extend(
            m.kernels.iter().filter(|k| sparsec_runtime::validate::is_kernel_name(&k.name)).map(|k| format!("{CUDA_DIR}/{}.ptx", k.name)),
        );
        for f in files {
            let inside = !f.is_empty() && f.split('/').all(|c| !c.is_empty() && c != "." && c != "..") && !f.starts_with('/');
            if inside && f.len() < 200 {
                write(&d.join(f), b"");
            }
        }
        let Ok(text) = sparsec_runtime::integrity::seal(d, &mut m) else { return };
        write(&d.join(MANIFEST_FILE), text.as_bytes());
    } else {
        write(&d.join(MANIFEST_FILE), manifest);
    }
    let Ok(art) = sparsec_runtime::Artifact::open(d) else { return };
    // What the interpreter reads of a validated artifact: every weight.
    let names: Vec<String> =
        art.manifest.execution.buffers.iter().filter(|b| b.kind == BufferKind::Weight).map(|b| b.name.clone()).collect();
    for n in names {
        let _ = art.weight_array(&n);
    }
    let _ = art.random_inputs(1, 0);
}
