//! Structural validation of a loaded artifact, the one check that CPU, CUDA
//! and the interpreter all rely on: the execution plan is coherent (indices in
//! range, sizes defined, kernel names safe), every buffer has the type and
//! shape the graph gives its value, every weight tensor holds exactly the bytes
//! its type and shape need, and sparse weights' indices are in range. After it
//! passes, the runtime may use the plan's sizes and the weights' indices as
//! addresses.

use crate::error::{RuntimeError, RuntimeResult};
use crate::manifest::*;
use safetensors::Dtype;
use sparsec_ir::{DType, Dim, Graph, Op, TensorType};
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// The most positions (`pos + seq`) the runtime binds when the graph sets no
/// smaller bound (a position embedding table).
pub const MAX_POSITIONS: u64 = 1 << 20;

/// Packed weights are padded to a multiple of this many bytes in the file.
const PACK_PAD: usize = 64;

/// What validation establishes for the runtime to enforce per call.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// `pos + seq` must not exceed this: the rows of a position embedding
    /// table, else the largest count at which every size is defined.
    pub max_positions: u64,
    /// Per plan input: ids must be integers below this bound (the rows of the
    /// embedding tables the input indexes); `None` for f32 inputs.
    pub id_bounds: Vec<Option<u64>>,
}

fn fail(path: &Path, message: String) -> RuntimeError {
    RuntimeError::Artifact { path: path.into(), message }
}

/// A name that is safe as a file name and a symbol: `[A-Za-z0-9_]+`.
pub fn is_kernel_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Checks `manifest` against itself, `graph` and the weights file.
/// `tensors` maps every tensor of the weights file to its dtype, shape and bytes.
pub fn validate(
    dir: &Path,
    manifest: &Manifest,
    graph: &Graph,
    tensors: &HashMap<String, (Dtype, Vec<usize>, &[u8])>,
) -> RuntimeResult<Limits> {
    let mpath = dir.join(MANIFEST_FILE);
    let plan = &manifest.execution;
    let bufs = &plan.buffers;
    let nb = bufs.len();
    for t in &manifest.targets {
        if t != "cpu" && t != "cuda" {
            return Err(fail(&mpath, format!("unknown target `{t}`")));
        }
    }
    let mut kernel_names = HashSet::new();
    for k in &manifest.kernels {
        if !is_kernel_name(&k.name) || !kernel_names.insert(k.name.as_str()) {
            return Err(fail(&mpath, format!("kernel name `{}` is not a unique [A-Za-z0-9_] name", k.name)));
        }
    }

    // The graph's types, by value name and by weight buffer name.
    let types = sparsec_ir::verify(graph)?;
    let mut by_value: HashMap<&str, &TensorType> = HashMap::new();
    let mut by_weight: HashMap<String, (usize, &TensorType)> = HashMap::new();
    for (i, (n, t)) in graph.nodes.iter().zip(&types).enumerate() {
        match sparsec_ir::graph::weight_buffer_name(graph, i) {
            Some(w) => {
                by_weight.entry(w).or_insert((i, t));
            }
            None => {
                by_value.insert(n.name.as_str(), t);
            }
        }
    }
    let pruned = sparsec_ir::sparse::pruned_weights(graph);

    // Buffers: types as the graph says, sizes defined.
    for (i, b) in bufs.iter().enumerate() {
        let bad = |m: String| fail(&mpath, format!("buffer {i} (`{}`): {m}", b.name));
        if b.try_bytes(1).is_none() {
            return Err(bad(format!("no byte size for {} {:?}", b.dtype.name(), b.dims)));
        }
        if let Some(r) = b.ring {
            if b.kind != BufferKind::KvCache || r.max_rows == 0 || r.rows <= r.max_rows {
                return Err(bad(format!("ring {r:?} (only a KV cache is a ring, of more rows than one call appends, at least one)")));
            }
        }
        if let Some(h) = b.head_blocks {
            let width = b.numel().resolve(1);
            if b.kind != BufferKind::KvCache
                || !matches!(b.dtype, DType::F16 | DType::F32)
                || !b.by_rows()
                || b.ring.is_some()
                || b.channel_groups.is_some()
                || b.chunked.is_some()
                || b.sequence.is_some()
                || h.block == 0
                || h.heads == 0
                || width % h.heads as u64 != 0
            {
                return Err(bad(format!(
                    "head blocks {h:?} (only an f16 or f32 KV cache by rows, of whole heads, without another layout)"
                )));
            }
        }
        if let Some(g) = b.channel_groups {
            let width = b.numel().resolve(1);
            if b.kind != BufferKind::KvCache
                || b.dtype != DType::Q4_1
                || b.ring.is_some()
                || g as usize != sparsec_ir::kv_channel::GROUP
                || width % 32 != 0
            {
                return Err(bad(format!(
                    "channel groups of {g} (only an unwindowed q4_1 KV cache of whole blocks, in groups of {})",
                    sparsec_ir::kv_channel::GROUP
                )));
            }
        }
        if let Some(c) = b.chunked {
            if b.kind != BufferKind::KvCache
                || b.dtype != DType::F16
                || b.ring.is_some()
                || b.channel_groups.is_some()
                || b.chunk_layout().is_none()
            {
                return Err(bad(format!(
                    "chunked layout {c:?} (only an unwindowed f16 KV cache of whole heads, slot within chunk and head)"
                )));
            }
        }
        if let Some(c) = b.sequence {
            if b.kind != BufferKind::KvCache
                || b.dtype != DType::F16
                || b.ring.is_some()
                || b.channel_groups.is_some()
                || b.chunked.is_some()
                || b.sequence_layout().is_none()
            {
                return Err(bad(format!("sequence layout {c:?} (only an unwindowed f16 KV cache, a ring of whole blocks)")));
            }
        }
        if b.sparse.is_some() && (b.kind != BufferKind::Weight || b.dtype != DType::F32) {
            return Err(bad("only f32 weights are stored sparse".into()));
        }
        if let Some(t) = b.tiles {
            let [n, k] = b.dims[..] else { return Err(bad(format!("tile layout {t:?} on a buffer of rank {}", b.dims.len()))) };
            let (Dim::Fixed(n), Dim::Fixed(k)) = (n, k) else {
                return Err(bad(format!("tile layout {t:?} on a buffer of symbolic shape")));
            };
            if b.kind != BufferKind::Weight || b.sparse.is_some() || !t.fits(b.dtype, n, k) {
                return Err(bad(format!(
                    "tile layout {t:?} on a {} {:?} buffer {n}x{k} (only dense bf16 weights of whole tiles)",
                    b.dtype.name(),
                    b.kind
                )));
            }
        }
        let want: Option<&TensorType> = match b.kind {
            BufferKind::Weight => {
                let Some(&(node, t)) = by_weight.get(&b.name) else {
                    return Err(bad("the graph has no weight or constant of this name".into()));
                };
                let expect = pruned.get(&node).map(|p| sparsec_ir::sparse::SparseStorage { format: p.format(), transposed: p.transposed });
                // A pruned weight is stored packed as its pattern says, or dense
                // (the `dense` specialization).
                if b.sparse.is_some() && b.sparse != expect {
                    return Err(bad(format!("stored as {:?}, the graph's pattern gives {expect:?}", b.sparse)));
                }
                Some(t)
            }
            BufferKind::Input | BufferKind::Temp => match by_value.get(b.name.as_str()) {
                Some(t) => Some(*t),
                None => match nsa_selection(graph, &b.name) {
                    // An attention's `#nsa` selection: a row of words per KV head.
                    Some(words) if b.kind == BufferKind::Temp && b.dtype == DType::F32 && b.dims == [Dim::Seq, Dim::Fixed(words)] => None,
                    _ => return Err(bad("the graph has no value of this name".into())),
                },
            },
            BufferKind::BlockCache { block } => {
                if b.dtype != DType::F32 || !b.by_rows() || block == 0 {
                    return Err(bad(format!(
                        "a block cache must be f32 rows of [seq, ...] over blocks of at least one position, not {} {:?} over {block}",
                        b.dtype.name(),
                        b.dims
                    )));
                }
                None
            }
            BufferKind::Scratch => {
                if b.dtype != DType::F32 || b.dims.contains(&Dim::Seq) || b.slot.is_none() {
                    return Err(bad(format!("scratch must be f32 of a fixed size in a slot, not {} {:?}", b.dtype.name(), b.dims)));
                }
                None
            }
            BufferKind::KvCache => {
                // Block-quantized rows pack on their own: a row is whole blocks.
                let row_packs = b.dtype.is_quantized() && b.numel().resolve(1) % sparsec_ir::quant::QK as u64 == 0;
                if !(matches!(b.dtype, DType::F32 | DType::F16) || row_packs) || !b.by_rows() {
                    return Err(bad(format!(
                        "a KV cache must be f32, f16 or block-quantized rows of [seq, ...] (whole blocks), not {} {:?}",
                        b.dtype.name(),
                        b.dims
                    )));
                }
                None
            }
        };
        if let Some(t) = want {
            if t.dims != b.dims || t.dtype != b.dtype {
                return Err(bad(format!("{} {:?} where the graph's value is {} {:?}", b.dtype.name(), b.dims, t.dtype.name(), t.dims)));
            }
        }
        if b.kind != BufferKind::Weight && b.kind != BufferKind::KvCache && !matches!(b.dtype, DType::F32 | DType::I32) {
            return Err(bad(format!("{} values are not f32 or i32", b.dtype.name())));
        }
        if b.kind == BufferKind::Weight && b.dims.contains(&Dim::Seq) {
            return Err(bad("a weight's shape depends on seq".into()));
        }
    }

    // Inputs and outputs.
    let input_kinds: Vec<usize> = (0..nb).filter(|&i| bufs[i].kind == BufferKind::Input).collect();
    if plan.inputs != input_kinds {
        return Err(fail(&mpath, format!("inputs {:?} are not the input buffers {input_kinds:?} in order", plan.inputs)));
    }
    for &o in &plan.outputs {
        match bufs.get(o) {
            Some(b) if matches!(b.kind, BufferKind::Temp | BufferKind::Input) && b.dtype != DType::F16 => {}
            _ => return Err(fail(&mpath, format!("output {o} is not an f32 buffer of the plan"))),
        }
    }

    // Steps.
    let mut appended = HashSet::new();
    let mut scratch_users = HashSet::new();
    let mut block_writers = HashSet::new();
    for (s, step) in plan.steps.iter().enumerate() {
        let bad = |m: String| fail(&mpath, format!("step {s}: {m}"));
        match step {
            Step::KvAppend { src, cache, hadamard } => {
                let (Some(sb), Some(cb)) = (bufs.get(*src), bufs.get(*cache)) else {
                    return Err(bad(format!("buffers {src} or {cache} out of range")));
                };
                if cb.kind != BufferKind::KvCache
                    || !matches!(sb.kind, BufferKind::Temp | BufferKind::Input)
                    || sb.dims != cb.dims
                    || sb.dtype != DType::F32
                {
                    return Err(bad(format!("appends `{}` to `{}`, which is not a KV cache of its shape", sb.name, cb.name)));
                }
                if let Some(d) = hadamard {
                    let width = cb.numel().resolve(1);
                    if !cb.dtype.is_quantized() || !d.is_power_of_two() || width % *d as u64 != 0 {
                        return Err(bad(format!(
                            "rotates `{}` in heads of {d}: only block-quantized caches, in power-of-two heads dividing the row",
                            cb.name
                        )));
                    }
                }
                if !appended.insert(*cache) {
                    return Err(bad(format!("cache `{}` is appended twice", cb.name)));
                }
            }
            Step::Kernel(k) => {
                if !kernel_names.contains(k.kernel.as_str()) {
                    return Err(bad(format!("kernel `{}` is not in the manifest's kernels", k.kernel)));
                }
                let Some((&out, ins)) = k.args.split_last() else {
                    return Err(bad(format!("kernel `{}` has no output", k.kernel)));
                };
                if k.args.len() > MAX_KERNEL_BUFFERS || k.args.iter().any(|&a| a >= nb) {
                    return Err(bad(format!("kernel `{}` takes buffers {:?} of {nb} (at most {MAX_KERNEL_BUFFERS})", k.kernel, k.args)));
                }
                if !matches!(bufs[out].kind, BufferKind::Temp | BufferKind::BlockCache { .. }) || ins.contains(&out) {
                    return Err(bad(format!(
                        "kernel `{}` writes `{}`, which is not a temporary or block cache it does not read",
                        k.kernel, bufs[out].name
                    )));
                }
                if matches!(bufs[out].kind, BufferKind::BlockCache { .. }) && !block_writers.insert(out) {
                    return Err(bad(format!("block cache `{}` is written by two steps", bufs[out].name)));
                }
                if ins.iter().any(|&a| bufs[a].kind == BufferKind::Scratch && !scratch_users.insert(a)) {
                    return Err(bad(format!("kernel `{}` takes a scratch buffer another step takes", k.kernel)));
                }
                if k.cpu_seq_block == 0 {
                    return Err(bad("cpu_seq_block is 0".into()));
                }
                // A tiled matmul's band is whole blocks (a block is one tile).
                if let Some(r) = k.gpu_mma_rows {
                    let whole =
                        k.gpu_mma_warps.and_then(|w| w.checked_mul(32)).is_some_and(|t| t > 0 && t % crate::cuda::BLOCK as u64 == 0);
                    if r == 0 || !whole {
                        return Err(bad(format!(
                            "kernel `{}`: gpu_mma_rows {r} without gpu_mma_warps of whole blocks ({:?})",
                            k.kernel, k.gpu_mma_warps
                        )));
                    }
                }
                // Blocks of their own: whole warps, within CUDA's limit, not for tiles.
                if let Some(t) = k.gpu_mma_block {
                    if t == 0 || t % 32 != 0 || t > 1024 || k.gpu_mma_rows.is_some() || k.gpu_mma_warps.is_none() {
                        return Err(bad(format!(
                            "kernel `{}`: gpu_mma_block {t} is not whole warps of at most 1024 threads of a warp-tiled launch",
                            k.kernel
                        )));
                    }
                }
                // A decode launch is whole blocks, at least the one-row launch.
                if let Some(t) = k.gpu_decode_threads {
                    if t % crate::cuda::BLOCK as u64 != 0 || k.gpu_threads.checked_resolve(1).is_none_or(|one| t < one) {
                        return Err(bad(format!(
                            "kernel `{}`: gpu_decode_threads {t} is not whole blocks of at least one row's threads",
                            k.kernel
                        )));
                    }
                }
            }
        }
    }
    for (i, b) in bufs.iter().enumerate() {
        if b.kind == BufferKind::KvCache && !appended.contains(&i) {
            return Err(fail(&mpath, format!("KV cache `{}` is never appended to", b.name)));
        }
        if matches!(b.kind, BufferKind::BlockCache { .. }) && !block_writers.contains(&i) {
            return Err(fail(&mpath, format!("block cache `{}` is never written", b.name)));
        }
    }
    if let Some(t) = plan.row_local_tail {
        if t > plan.steps.len() {
            return Err(fail(&mpath, format!("row-local tail at step {t} of {}", plan.steps.len())));
        }
        let rows = |i: usize| bufs[i].kind == BufferKind::Weight || bufs[i].by_rows();
        let tail_ok = plan.steps[t..].iter().all(|s| matches!(s, Step::Kernel(k) if k.args.iter().all(|&a| rows(a))));
        if !tail_ok || !plan.outputs.iter().all(|&o| bufs[o].by_rows()) {
            return Err(fail(&mpath, format!("the row-local tail from step {t} uses buffers not laid out by rows")));
        }
    }

    // Weights: each tensor holds exactly what its buffer needs.
    let wpath = dir.join(WEIGHTS_FILE);
    for b in bufs.iter().filter(|b| b.kind == BufferKind::Weight) {
        let bad = |m: String| fail(&wpath, format!("tensor `{}`: {m}", b.name));
        let Some((dtype, shape, data)) = tensors.get(&b.name) else {
            return Err(bad("missing".into()));
        };
        let need = b.bytes(0);
        if b.sparse.is_some() || b.as_bytes() {
            if *dtype != Dtype::U8 || data.len() < need || data.len() >= need + PACK_PAD {
                return Err(bad(format!("{dtype:?} of {} bytes; {} needs {need} packed bytes", data.len(), b.dtype.name())));
            }
            if let Some(st) = &b.sparse {
                sparsec_ir::sparse::validate(&st.format, &data[..need]).map_err(|m| bad(format!("invalid {}: {m}", st.format.name())))?;
            }
        } else {
            let dims: Vec<usize> = b.dims.iter().map(|d| d.resolve(0) as usize).collect();
            if *dtype != Dtype::F32 || *shape != dims || data.len() != need {
                return Err(bad(format!("{dtype:?} {shape:?} ({} bytes) where the plan needs F32 {dims:?}", data.len())));
            }
        }
    }

    // Bounds the runtime enforces per call.
    let mut max_positions = MAX_POSITIONS;
    for n in &graph.nodes {
        if n.op == Op::Embedding && n.operands.get(1).is_some_and(|o| graph.nodes[o.0].op == Op::Positions) {
            if let Some(Dim::Fixed(rows)) = types[n.operands[0].0].dims.first() {
                max_positions = max_positions.min(*rows);
            }
        }
    }
    if let Some(c) = manifest.lm.as_ref().and_then(|lm| lm.context) {
        max_positions = max_positions.min(c);
    }
    let sizes_fit = |p: u64| {
        bufs.iter().all(|b| b.try_bytes(p).is_some())
            && plan.steps.iter().all(|s| match s {
                Step::Kernel(k) => k.gpu_threads_at(p).is_some() && k.cpu_units.checked_resolve(p.div_ceil(k.cpu_seq_block)).is_some(),
                Step::KvAppend { .. } => true,
            })
    };
    while max_positions > 0 && !sizes_fit(max_positions) {
        max_positions /= 2;
    }
    if max_positions == 0 {
        return Err(fail(&mpath, "no sequence length has defined buffer sizes".into()));
    }
    let input_nodes: Vec<usize> = graph.nodes.iter().enumerate().filter(|(_, n)| n.op == Op::Input).map(|(i, _)| i).collect();
    let id_bounds = plan
        .inputs
        .iter()
        .map(|&b| {
            let node = input_nodes.iter().copied().find(|&v| graph.nodes[v].name == bufs[b].name)?;
            if types[node].dtype != DType::I32 {
                return None;
            }
            let rows = graph
                .nodes
                .iter()
                .filter(|c| c.op == Op::Embedding && c.operands.get(1).map(|o| o.0) == Some(node))
                .filter_map(|c| match types[c.operands[0].0].dims.first() {
                    Some(Dim::Fixed(r)) => Some(*r),
                    _ => None,
                })
                .min();
            // Ids travel as f32: integers up to 2^24 are exact.
            Some(rows.unwrap_or(1 << 24).min(1 << 24))
        })
        .collect();
    Ok(Limits { max_positions, id_bounds })
}

/// The f32 words per row of the `#nsa` selection buffer named `name`
/// (`<attention value>.nsa_select`, `NativeSparse::select_words`); `None`
/// when no attention with `#nsa` has that name.
fn nsa_selection(graph: &Graph, name: &str) -> Option<u64> {
    let value = name.strip_suffix(".nsa_select")?;
    let n = graph.nodes.iter().find(|n| n.name == value)?;
    let Op::Attention { kv_heads, .. } = n.op else { return None };
    sparsec_ir::NativeSparse::of(&n.patterns).map(|nsa| nsa.select_words(kv_heads as u64))
}
