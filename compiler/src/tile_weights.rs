//! Which weights an artifact stores as AMX tiles (`sparsec_ir::tiles`): on a
//! CPU-only target with AMX-BF16, every bf16 `[n, k]` weight of whole tiles
//! (`n` a multiple of 32: a unit takes two column tiles) that only transposed
//! dense matmuls read. Their kernels are then the tile
//! kernels (`mlir::kernels::amx_matmul`); a weight read any other way (a tied
//! embedding table, a pruned weight, a CUDA kernel) stays in rows.

use crate::options::CompileOptions;
use sparsec_ir::graph::weight_buffer_name;
use sparsec_ir::tiles::TileLayout;
use sparsec_ir::{Dim, Graph, Op, TensorType};
use std::collections::{HashMap, HashSet};

/// The weight buffer names of `g` (typed by `types`) stored as tiles under `opts`.
pub fn tile_weights(g: &Graph, types: &[TensorType], opts: &CompileOptions) -> HashSet<String> {
    if opts.target != crate::options::TargetKind::Cpu || !opts.cpu.isa().amx_bf16 {
        return HashSet::new();
    }
    let pruned = sparsec_ir::sparse::pruned_weights(g);
    let mut ok: HashMap<String, bool> = HashMap::new();
    for (i, n) in g.nodes.iter().enumerate() {
        let Some(name) = weight_buffer_name(g, i) else { continue };
        let fits = matches!(n.op, Op::Weight { .. })
            && !pruned.contains_key(&i)
            && matches!(types[i].dims[..], [Dim::Fixed(rows), Dim::Fixed(k)]
                if TileLayout::AmxBf16.fits(types[i].dtype, rows, k) && rows.is_multiple_of(2 * sparsec_ir::tiles::TILE_N));
        *ok.entry(name).or_insert(true) &= fits;
    }
    for n in &g.nodes {
        for (slot, v) in n.operands.iter().enumerate() {
            let Some(name) = weight_buffer_name(g, v.0) else { continue };
            if let Some(e) = ok.get_mut(&name) {
                *e &= matches!((&n.op, slot), (Op::MatMul { transpose_b: true }, 1));
            }
        }
    }
    ok.into_iter().filter_map(|(name, yes)| yes.then_some(name)).collect()
}
