//! Which weights an artifact stores as AMX tiles (`sparsec_ir::tiles`): on a
//! CPU-only target, every `[n, k]` weight of whole tiles (`n` a multiple of
//! 32: a unit takes two column tiles) that only transposed dense matmuls read,
//! when it is bf16 and the target has AMX-BF16 (`TileLayout::AmxBf16`), or
//! q4_1 with int8 activations and AMX-INT8 (`TileLayout::AmxQ4_1`). Their
//! kernels are then the tile kernels (`mlir::kernels::amx_matmul`); a weight
//! read any other way (a tied embedding table, a pruned weight, a CUDA
//! kernel) stays in rows.

use crate::options::CompileOptions;
use sparsec_ir::graph::weight_buffer_name;
use sparsec_ir::tiles::{TileLayout, TILE_N};
use sparsec_ir::{DType, Dim, Graph, Op, TensorType};
use std::collections::HashMap;

/// The weight buffer names of `g` (typed by `types`) stored as tiles under
/// `opts`, with their layouts.
pub fn tile_weights(g: &Graph, types: &[TensorType], opts: &CompileOptions) -> HashMap<String, TileLayout> {
    if opts.target != crate::options::TargetKind::Cpu {
        return HashMap::new();
    }
    let isa = opts.cpu.isa();
    let layout_for = |dt: DType| match dt {
        DType::BF16 if isa.amx_bf16 => Some(TileLayout::AmxBf16),
        DType::Q4_1 if isa.amx_int8 && opts.int8_activations() => Some(TileLayout::AmxQ4_1),
        _ => None,
    };
    let pruned = sparsec_ir::sparse::pruned_weights(g);
    let mut ok: HashMap<String, Option<TileLayout>> = HashMap::new();
    for (i, n) in g.nodes.iter().enumerate() {
        let Some(name) = weight_buffer_name(g, i) else { continue };
        let layout = layout_for(types[i].dtype).filter(|t| {
            matches!(n.op, Op::Weight { .. })
                && !pruned.contains_key(&i)
                && matches!(types[i].dims[..], [Dim::Fixed(rows), Dim::Fixed(k)]
                    if t.fits(types[i].dtype, rows, k) && rows.is_multiple_of(2 * TILE_N))
        });
        let e = ok.entry(name).or_insert(layout);
        if *e != layout {
            *e = None;
        }
    }
    for n in &g.nodes {
        for (slot, v) in n.operands.iter().enumerate() {
            let Some(name) = weight_buffer_name(g, v.0) else { continue };
            if let Some(e) = ok.get_mut(&name) {
                if !matches!((&n.op, slot), (Op::MatMul { transpose_b: true }, 1)) {
                    *e = None;
                }
            }
        }
    }
    ok.into_iter().filter_map(|(name, t)| t.map(|t| (name, t))).collect()
}
