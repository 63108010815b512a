//! Loading an artifact: manifest (version-checked), graph, memory-mapped weights.

use crate::error::{RuntimeError, RuntimeResult};
use crate::manifest::*;
use ndarray::{ArrayD, IxDyn};
use safetensors::{Dtype, SafeTensors};
use sparsec_ir::{parse_graph, Dim, Graph};
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub struct Artifact {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// The graph after the compiler's passes: what the kernels implement.
    pub graph: Graph,
    pub weights: WeightStore,
    /// Bounds validation established, enforced per call.
    pub limits: crate::validate::Limits,
}

/// The artifact's packed weights, memory-mapped (the header is read once), or
/// assembled in memory from its file and a checkpoint's packed tensors
/// (`with_tensors`, for `sparsec-run --weights CHECKPOINT`).
pub struct WeightStore {
    path: PathBuf,
    data: Backing,
    /// Tensor name → dtype, shape and byte range in the data.
    index: HashMap<String, (Dtype, Vec<usize>, std::ops::Range<usize>)>,
}

/// Where a store's bytes live.
enum Backing {
    Map(memmap2::Mmap),
    /// Cache-line blocks, so every tensor (placed on a block boundary) is
    /// aligned as a mapped file's are.
    Owned(Vec<Block>),
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Block([u8; 64]);

/// A tensor on its way into an assembled store: name, dtype, shape, bytes.
type Part<'a> = (String, Dtype, Vec<usize>, Cow<'a, [u8]>);

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Map(m) => m,
            // SAFETY: `Block` is 64 plain bytes with no padding, so the vector's
            // memory is `len * 64` initialized bytes, borrowed as long as `self`.
            Backing::Owned(v) => unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len() * 64) },
        }
    }
}

impl WeightStore {
    pub fn open(path: &Path) -> RuntimeResult<WeightStore> {
        let f = std::fs::File::open(path).map_err(|error| RuntimeError::Io { path: path.into(), error })?;
        // SAFETY: mapped read-only; artifacts are immutable once published.
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|error| RuntimeError::Io { path: path.into(), error })?;
        let st = SafeTensors::deserialize(&map).map_err(|e| RuntimeError::Artifact { path: path.into(), message: e.to_string() })?;
        let index = st
            .tensors()
            .into_iter()
            .map(|(name, t)| {
                let start = t.data().as_ptr() as usize - map.as_ptr() as usize;
                (name, (t.dtype(), t.shape().to_vec(), start..start + t.data().len()))
            })
            .collect();
        Ok(WeightStore { path: path.into(), data: Backing::Map(map), index })
    }

    /// This store's tensors and `more` (stored as the compiler stores them:
    /// f32 values of their shape, packed bytes as U8), in one block of memory
    /// named `path` (which identifies it, `ResidentWeights::serves`). A name
    /// both have is an error.
    pub fn with_tensors(
        &self,
        path: PathBuf,
        more: Vec<(String, Vec<usize>, sparsec_ir::stored::WeightData)>,
    ) -> RuntimeResult<WeightStore> {
        use sparsec_ir::stored::WeightData;
        let mut parts: Vec<Part<'_>> = self
            .index
            .iter()
            .map(|(n, (dt, shape, r))| (n.clone(), *dt, shape.clone(), Cow::Borrowed(&self.data.bytes()[r.clone()])))
            .collect();
        for (name, shape, d) in more {
            if self.index.contains_key(&name) {
                return Err(RuntimeError::Artifact {
                    path,
                    message: format!("tensor `{name}` is both in the artifact and packed from the checkpoint"),
                });
            }
            let part = match d {
                WeightData::F32(v) => (Dtype::F32, shape, Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect())),
                WeightData::Packed(_, p) | WeightData::Sparse(p) => (Dtype::U8, vec![p.len()], Cow::Owned(p)),
            };
            parts.push((name, part.0, part.1, part.2));
        }
        parts.sort_by(|a, b| a.0.cmp(&b.0));
        let blocks: usize = parts.iter().map(|p| p.3.len().div_ceil(64)).sum();
        let mut data = vec![Block([0; 64]); blocks];
        let mut index = HashMap::new();
        let mut at = 0usize;
        for (name, dt, shape, bytes) in parts {
            for (i, chunk) in bytes.chunks(64).enumerate() {
                data[at / 64 + i].0[..chunk.len()].copy_from_slice(chunk);
            }
            index.insert(name, (dt, shape, at..at + bytes.len()));
            at += bytes.len().div_ceil(64) * 64;
        }
        Ok(WeightStore { path, data: Backing::Owned(data), index })
    }

    /// Copies the bytes in `range` into `dst` (of its length): for a mapped
    /// store read from the file with `pread` (not through the mapping), else
    /// copied from memory.
    pub fn read_into(&self, range: std::ops::Range<usize>, dst: &mut [u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        match &self.data {
            Backing::Map(_) => std::fs::File::open(&self.path)?.read_exact_at(dst, range.start as u64),
            Backing::Owned(_) => {
                dst.copy_from_slice(&self.data.bytes()[range]);
                Ok(())
            }
        }
    }

    /// Every tensor: name, dtype, shape and stored bytes (what `validate` checks).
    pub fn tensors(&self) -> HashMap<String, (Dtype, Vec<usize>, &[u8])> {
        self.index.iter().map(|(k, (dt, shape, r))| (k.clone(), (*dt, shape.clone(), &self.data.bytes()[r.clone()]))).collect()
    }

    fn entry(&self, name: &str) -> RuntimeResult<&(Dtype, Vec<usize>, std::ops::Range<usize>)> {
        self.index
            .get(name)
            .ok_or_else(|| RuntimeError::Artifact { path: self.path.clone(), message: format!("tensor `{name}` is missing") })
    }

    /// The file the weights live in (`weights.safetensors`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the stored bytes of tensor `name` lie in the file (see `bytes`).
    pub fn range(&self, name: &str) -> RuntimeResult<std::ops::Range<usize>> {
        let (dtype, _, range) = self.entry(name)?;
        if !matches!(dtype, Dtype::F32 | Dtype::U8) {
            return Err(RuntimeError::Artifact {
                path: self.path.clone(),
                message: format!("tensor `{name}` is {dtype:?}, expected F32 or packed U8"),
            });
        }
        Ok(range.clone())
    }

    /// The stored bytes of tensor `name`: little-endian f32 values, or the packed
    /// blocks of a quantized weight (`sparsec_ir::quant`).
    pub fn bytes(&self, name: &str) -> RuntimeResult<&[u8]> {
        Ok(self.at(self.range(name)?))
    }

    /// The file's bytes in `range` (a `range` of this store's tensors).
    pub fn at(&self, range: std::ops::Range<usize>) -> &[u8] {
        &self.data.bytes()[range]
    }

    /// The f32 tensor `name` (borrowed from the map when aligned) and its shape.
    pub fn get(&self, name: &str) -> RuntimeResult<(Vec<usize>, Cow<'_, [f32]>)> {
        let (dtype, shape, range) = self.entry(name)?;
        if *dtype != Dtype::F32 {
            return Err(RuntimeError::Artifact { path: self.path.clone(), message: format!("tensor `{name}` is {dtype:?}, expected F32") });
        }
        let shape = shape.clone();
        let bytes = &self.data.bytes()[range.clone()];
        // SAFETY: f32 has no invalid bit patterns; `align_to` only yields the
        // aligned middle, which we use only when it covers all bytes.
        let (pre, mid, post) = unsafe { bytes.align_to::<f32>() };
        if pre.is_empty() && post.is_empty() {
            return Ok((shape, Cow::Borrowed(mid)));
        }
        let v = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        Ok((shape, Cow::Owned(v)))
    }

    pub fn get_array(&self, name: &str) -> RuntimeResult<ArrayD<f32>> {
        let (shape, data) = self.get(name)?;
        ArrayD::from_shape_vec(IxDyn(&shape), data.into_owned())
            .map_err(|e| RuntimeError::Artifact { path: self.path.clone(), message: e.to_string() })
    }
}

/// How much of an artifact `Artifact::open_with` checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trust {
    /// Every file's hash, then the structure (`validate`). The default.
    Verify,
    /// The structure only: skips hashing the files (`--trust`; the manifest's
    /// own hash is still checked). For artifacts this machine just built.
    SkipFileHashes,
}

impl Artifact {
    /// Opens and fully validates the artifact in `dir` (`Trust::Verify`).
    pub fn open(dir: &Path) -> RuntimeResult<Artifact> {
        Self::open_with(dir, Trust::Verify)
    }

    /// Opens the artifact in `dir`: the manifest's own hash and version, then
    /// (unless trusted) the hash of every file, then the plan against the
    /// graph and the weights (`validate`). Any mismatch is an error naming the
    /// file and the buffer; nothing is used as an address before it passes.
    pub fn open_with(dir: &Path, trust: Trust) -> RuntimeResult<Artifact> {
        Self::open_checkpoint(dir, trust, None)
    }

    /// `open_with`, and for an artifact compiled with `--strip-weights`, the
    /// weights it lists packed from `checkpoint` (`checkpoint.rs`) before the
    /// same validation. A checkpoint for an artifact that holds its weights, or
    /// none for one that does not, is an error.
    pub fn open_checkpoint(dir: &Path, trust: Trust, checkpoint: Option<&Path>) -> RuntimeResult<Artifact> {
        let mpath = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&mpath).map_err(|error| RuntimeError::Io { path: mpath.clone(), error })?;
        let probe: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| RuntimeError::Artifact { path: mpath.clone(), message: format!("not JSON: {e}") })?;
        let version = probe.get("version").and_then(|v| v.as_u64());
        if version != Some(MANIFEST_VERSION as u64) {
            return Err(RuntimeError::Artifact {
                path: mpath,
                message: format!("manifest version {version:?}; this runtime reads version {MANIFEST_VERSION}"),
            });
        }
        crate::integrity::check_manifest_text(&mpath, &text)?;
        let manifest: Manifest =
            serde_json::from_value(probe).map_err(|e| RuntimeError::Artifact { path: mpath.clone(), message: e.to_string() })?;
        let mut required = vec![GRAPH_FILE.to_string(), WEIGHTS_FILE.to_string()];
        if manifest.plan.is_some() {
            required.push(PLAN_FILE.into());
        }
        if let Some(lm) = &manifest.lm {
            required.push(lm.tokenizer.clone());
        }
        if manifest.targets.iter().any(|t| t == "cpu") {
            required.push(CPU_LIBRARY.into());
        }
        if manifest.targets.iter().any(|t| t == "cuda") {
            for k in &manifest.kernels {
                if !crate::validate::is_kernel_name(&k.name) {
                    return Err(RuntimeError::Artifact { path: mpath, message: format!("kernel name `{}` is not [A-Za-z0-9_]", k.name) });
                }
                required.push(format!("{CUDA_DIR}/{}.ptx", k.name));
            }
        }
        for r in &required {
            if !manifest.files.contains_key(r) {
                return Err(RuntimeError::Artifact { path: dir.join(r), message: "the manifest records no hash for this file".into() });
            }
        }
        if trust == Trust::Verify {
            crate::integrity::check_files(dir, &manifest)?;
        }
        let gpath = dir.join(GRAPH_FILE);
        let gtext = std::fs::read_to_string(&gpath).map_err(|error| RuntimeError::Io { path: gpath.clone(), error })?;
        let graph = parse_graph(&gtext).map_err(|e| RuntimeError::Artifact { path: gpath.clone(), message: e.to_string() })?;
        let weights = WeightStore::open(&dir.join(WEIGHTS_FILE))?;
        let weights = match (checkpoint, manifest.checkpoint_weights.is_empty()) {
            (None, true) => weights,
            (Some(c), false) => crate::checkpoint::pack(dir, &manifest, &graph, &weights, c)?,
            (None, false) => {
                return Err(RuntimeError::Artifact {
                    path: dir.join(WEIGHTS_FILE),
                    message: format!(
                        "compiled with --strip-weights: {} weights (`{}`, ...) come from the checkpoint; give it with --weights CHECKPOINT",
                        manifest.checkpoint_weights.len(),
                        manifest.checkpoint_weights[0]
                    ),
                })
            }
            (Some(c), true) => {
                return Err(RuntimeError::Artifact {
                    path: c.into(),
                    message: "this artifact holds its weights; --weights CHECKPOINT is for artifacts compiled with --strip-weights".into(),
                })
            }
        };
        let limits = crate::validate::validate(dir, &manifest, &graph, &weights.tensors())?;
        Ok(Artifact { dir: dir.into(), manifest, graph, weights, limits })
    }

    /// Checks that `seq` new positions after `pos` stay within what the
    /// artifact can address (`Limits::max_positions`: a position table's rows).
    pub fn check_positions(&self, pos: usize, seq: u64) -> RuntimeResult<()> {
        let end = (pos as u64).checked_add(seq);
        match end {
            Some(e) if e <= self.limits.max_positions => Ok(()),
            _ => Err(RuntimeError::Positions(format!(
                "positions {pos}..{} exceed the {} this model can address",
                pos as u64 + seq,
                self.limits.max_positions
            ))),
        }
    }

    /// The weight `name` as f32 values of its graph shape: quantized and f16/bf16
    /// weights are widened exactly (what the reference interpreter computes with).
    /// Where weight buffer `b`'s bytes (`b.bytes(0)` of its tensor) lie in the
    /// weights file (`validate` checked that the tensor holds them); an error
    /// when the tensor holds fewer than the plan needs.
    pub fn weight_range(&self, b: &BufferSpec) -> RuntimeResult<std::ops::Range<usize>> {
        let range = self.weights.range(&b.name)?;
        let need = b.bytes(0);
        if range.len() < need {
            return Err(RuntimeError::Artifact {
                path: self.dir.clone(),
                message: format!("weight `{}` holds {} bytes, the plan needs {need}", b.name, range.len()),
            });
        }
        Ok(range.start..range.start + need)
    }

    pub fn weight_array(&self, name: &str) -> RuntimeResult<ArrayD<f32>> {
        let spec = self.manifest.execution.buffers.iter().find(|b| b.kind == BufferKind::Weight && b.name == name);
        match spec {
            Some(b @ BufferSpec { sparse: Some(st), dims, .. }) => {
                let shape: Vec<usize> = dims.iter().map(|d| d.resolve(0) as usize).collect();
                // The packed bytes without the file's padding.
                let packed = self.weights.at(self.weight_range(b)?);
                let w = sparsec_ir::sparse::unpack(&st.format, packed, st.transposed).ok_or_else(|| RuntimeError::Artifact {
                    path: self.dir.join(WEIGHTS_FILE),
                    message: format!("tensor `{name}`: not valid {} bytes", st.format.name()),
                })?;
                ArrayD::from_shape_vec(IxDyn(&shape), w).map_err(|e| RuntimeError::Cpu(e.to_string()))
            }
            Some(b) if b.dtype.is_quantized() => {
                let shape: Vec<usize> = b.dims.iter().map(|d| d.resolve(0) as usize).collect();
                let mut out = vec![0f32; shape.iter().product()];
                let packed = self.weights.bytes(name)?;
                let n = b.bytes(0);
                // Tiled blocks are put back in rows (validated: a whole-tile matrix).
                let rows = match (b.tiles, &shape[..]) {
                    (Some(t), &[r, k]) if packed.len() >= n => t.untile(&packed[..n], r as u64, k as u64),
                    _ => None,
                };
                let packed = rows.as_deref().unwrap_or(packed);
                if packed.len() < n || !sparsec_ir::quant::dequantize(b.dtype, &packed[..n], &mut out) {
                    return Err(RuntimeError::Artifact {
                        path: self.dir.join(WEIGHTS_FILE),
                        message: format!("tensor `{name}`: {} bytes do not hold {} {} blocks", packed.len(), b.dtype.name(), n),
                    });
                }
                ArrayD::from_shape_vec(IxDyn(&shape), out).map_err(|e| RuntimeError::Cpu(e.to_string()))
            }
            Some(b) if b.dtype.is_half() => {
                let shape: Vec<usize> = b.dims.iter().map(|d| d.resolve(0) as usize).collect();
                let stored = self.weights.at(self.weight_range(b)?);
                // Tiled words are put back in rows (validated: a whole-tile matrix).
                let rows = match (b.tiles, &shape[..]) {
                    (Some(t), &[n, k]) => t.untile(stored, n as u64, k as u64),
                    _ => None,
                };
                let words = rows.as_deref().unwrap_or(stored).chunks_exact(2).map(|c| [c[0], c[1]]);
                let out: Vec<f32> = if b.dtype == sparsec_ir::DType::BF16 {
                    words.map(|w| half::bf16::from_le_bytes(w).to_f32()).collect()
                } else {
                    words.map(|w| half::f16::from_le_bytes(w).to_f32()).collect()
                };
                ArrayD::from_shape_vec(IxDyn(&shape), out).map_err(|e| RuntimeError::Cpu(e.to_string()))
            }
            _ => self.weights.get_array(name),
        }
    }

    /// Binds `seq` from the inputs and checks their shapes against the plan.
    pub fn bind_seq(&self, inputs: &[ArrayD<f32>]) -> RuntimeResult<u64> {
        let plan = &self.manifest.execution;
        if inputs.len() != plan.inputs.len() {
            return Err(RuntimeError::Input {
                index: inputs.len(),
                name: String::new(),
                message: format!("the graph takes {} inputs, got {}", plan.inputs.len(), inputs.len()),
            });
        }
        let mut seq: Option<u64> = None;
        for (i, (a, b)) in inputs.iter().zip(&plan.inputs).enumerate() {
            let spec = &plan.buffers[*b];
            let err = |message: String| RuntimeError::Input { index: i, name: spec.name.clone(), message };
            if a.ndim() != spec.dims.len() {
                return Err(err(format!("rank {} but the graph wants {:?}", a.ndim(), spec.dims)));
            }
            for (ext, d) in a.shape().iter().zip(&spec.dims) {
                match d {
                    Dim::Fixed(n) if *n as usize != *ext => {
                        return Err(err(format!("shape {:?} does not match {:?}", a.shape(), spec.dims)))
                    }
                    Dim::Seq => match seq {
                        None => seq = Some(*ext as u64),
                        Some(s) if s != *ext as u64 => return Err(err(format!("seq = {ext} but an earlier input bound seq = {s}"))),
                        _ => {}
                    },
                    _ => {}
                }
            }
        }
        for (i, (a, bound)) in inputs.iter().zip(&self.limits.id_bounds).enumerate() {
            let Some(bound) = bound else { continue };
            if let Some(bad) = a.iter().find(|x| !(x.fract() == 0.0 && **x >= 0.0 && (**x as u64) < *bound)) {
                return Err(RuntimeError::Input {
                    index: i,
                    name: plan.buffers[plan.inputs[i]].name.clone(),
                    message: format!("id {bad} is not an integer in 0..{bound}"),
                });
            }
        }
        let seq = seq.unwrap_or(1);
        if seq == 0 {
            return Err(RuntimeError::Input { index: 0, name: String::new(), message: "seq must be at least 1".into() });
        }
        Ok(seq)
    }

    /// Deterministic random inputs for `seq` (ChaCha8 seeded): standard normal
    /// for f32 inputs; for i32 inputs (token ids), integers below the bound
    /// validation found (`Limits::id_bounds`: the rows of the embedding tables
    /// they index). An error when `seq` exceeds what the artifact can address.
    pub fn random_inputs(&self, seq: u64, seed: u64) -> RuntimeResult<Vec<ArrayD<f32>>> {
        self.check_positions(0, seq)?;
        let plan = &self.manifest.execution;
        plan.inputs
            .iter()
            .zip(&self.limits.id_bounds)
            .enumerate()
            .map(|(i, (b, bound))| {
                let shape: Vec<usize> = plan.buffers[*b].dims.iter().map(|d| d.resolve(seq) as usize).collect();
                let n = shape.iter().product();
                let seed = seed.wrapping_add(i as u64);
                let values = match bound {
                    Some(bound) => {
                        let u = sparsec_ir::Init::Uniform { seed, bound: 1.0 }.generate(n);
                        u.iter().map(|x| (((x + 1.0) * 0.5 * *bound as f32) as u64).min(bound - 1) as f32).collect()
                    }
                    None => sparsec_ir::Init::Normal { seed, std: 1.0 }.generate(n),
                };
                ArrayD::from_shape_vec(IxDyn(&shape), values).map_err(|e| RuntimeError::Input {
                    index: i,
                    name: plan.buffers[*b].name.clone(),
                    message: e.to_string(),
                })
            })
            .collect()
    }
}
