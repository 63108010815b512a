//! Weights packed from a checkpoint at load (`sparsec-run ARTIFACT --weights
//! CHECKPOINT`) for an artifact compiled with `--strip-weights`: each weight
//! the manifest lists (`Manifest::checkpoint_weights`) is read from the
//! checkpoint by its role (GGUF or HF safetensors, through `sparsec_models`),
//! checked against the shape its buffer was compiled for, and stored as the
//! compiler stores it (`sparsec_ir::stored`: the buffer's type, the graph's
//! `#sparsity` and `#values`, the buffer's sparse format). The result then goes
//! through the same validation as a weights file. No LLVM is involved.

use crate::artifact::WeightStore;
use crate::error::{RuntimeError, RuntimeResult};
use crate::manifest::{BufferKind, Manifest, WEIGHTS_FILE};
use rayon::prelude::*;
use sparsec_ir::stored::WeightData;
use sparsec_ir::{Dim, Graph, Op};
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// `stored` (the artifact's weights file) with the weights of `checkpoint`
/// that `manifest` lists, packed (see the module doc).
pub fn pack(dir: &Path, manifest: &Manifest, graph: &Graph, stored: &WeightStore, checkpoint: &Path) -> RuntimeResult<WeightStore> {
    let bad = |message: String| RuntimeError::Artifact { path: checkpoint.into(), message };
    let spec = checkpoint.to_str().ok_or_else(|| bad("the checkpoint path is not UTF-8".into()))?;
    let model = sparsec_models::checkpoint::Model::load(spec).map_err(|e| bad(e.to_string()))?;
    // The graph's pruning, by weight name.
    let pruned_nodes = sparsec_ir::sparse::pruned_weights(graph);
    let pruned: HashMap<&str, &sparsec_ir::sparse::PrunedWeight> = graph
        .nodes
        .iter()
        .enumerate()
        .filter_map(|(i, n)| match &n.op {
            Op::Weight { name, .. } => pruned_nodes.get(&i).map(|p| (name.as_str(), p)),
            _ => None,
        })
        .collect();
    let mut seen = HashSet::new();
    let mut wanted = Vec::new();
    for name in &manifest.checkpoint_weights {
        if !seen.insert(name.as_str()) {
            return Err(bad(format!("the manifest lists `{name}` twice")));
        }
        let b = manifest
            .execution
            .buffers
            .iter()
            .find(|b| b.kind == BufferKind::Weight && b.name == *name)
            .ok_or_else(|| bad(format!("the manifest lists `{name}`, which is no weight buffer of its plan")))?;
        let shape = b
            .dims
            .iter()
            .map(|d| match d {
                Dim::Fixed(n) => usize::try_from(*n).map_err(|_| bad(format!("`{name}`: dimension {n} does not fit"))),
                Dim::Seq => Err(bad(format!("`{name}`: a weight of shape {:?} depends on seq", b.dims))),
            })
            .collect::<RuntimeResult<Vec<usize>>>()?;
        wanted.push((b, shape));
    }
    let packed = wanted
        .into_par_iter()
        .map(|(b, shape)| {
            let name = &b.name;
            let data = if b.dtype.is_quantized() && model.stored_dtype(name) == b.dtype {
                let (dt, bytes) = model.weight_packed(name).map_err(|e| bad(e.to_string()))?;
                let have = model.role_shape(name).map(|s| s.to_vec()).unwrap_or_default();
                if have != shape {
                    return Err(bad(format!("`{name}` has shape {have:?}; the artifact was compiled for {shape:?}")));
                }
                WeightData::Packed(dt, bytes)
            } else {
                let a = model.weight(name).map_err(|e| bad(e.to_string()))?;
                if a.shape() != shape.as_slice() {
                    return Err(bad(format!("`{name}` has shape {:?}; the artifact was compiled for {shape:?}", a.shape())));
                }
                WeightData::F32(a.iter().copied().collect())
            };
            let dims: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
            let data = sparsec_ir::stored::store(b.dtype, pruned.get(name.as_str()).copied(), b.sparse.as_ref(), data)
                .and_then(|d| sparsec_ir::stored::tiled(b.tiles, &dims, d))
                .map_err(|m| bad(format!("`{name}`: {m}")))?;
            Ok((name.clone(), shape, data))
        })
        .collect::<Vec<RuntimeResult<_>>>()
        // The first failure in the manifest's order, whichever thread met it first.
        .into_iter()
        .collect::<RuntimeResult<Vec<_>>>()?;
    let path = dir.join(format!("{WEIGHTS_FILE}+{}", checkpoint.display()));
    stored.with_tensors(path, packed)
}
