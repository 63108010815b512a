//! One kernel per compute op, written against `KernelBuilder`: the lowering of
//! every IR op to MLIR. Buffers are flat f32 arrays; shapes are baked in except
//! `seq`, which arrives at run time.
//!
//! This file holds what a kernel is (`KernelSpec`, its fused prologue and
//! epilogue, the units and costs the runtime schedules by) and `emit_kernel`,
//! which matches the op exhaustively and hands it to its family's emitter, one
//! file each: `elementwise`, `matmul` (dispatch and row kernels; the tiled CPU
//! micro-kernels in `tiled_matmul`), `norm`, `softmax`, `embedding`, `rope`,
//! `attention`, `nsa` (the block summaries and selection of native sparse
//! attention); `quant_planes` reads block-quantized operands.

mod attention;
mod attention_mma;
mod kv_chunked;
mod kv_kivi;
mod kv_pre_rope;
mod kv_quant;
mod kv_sequence;
mod nsa;

pub use attention::{cpu_head_blocks, cpu_ring, window_of, RING_SLACK};

/// The cache layout of an attention with `#kv(chunked_svd)` and `kv_heads`
/// heads of width `d` (its calls append at most `RING_SLACK` rows, as a
/// windowed layer's do); `None` without one, or where it does not fit.
pub fn chunked_layout(spec: &KernelSpec, kv_heads: usize, d: usize) -> Option<sparsec_ir::kv_chunked::ChunkLayout> {
    let (chunk, rank) = chunked_svd_of(spec)?;
    sparsec_ir::kv_chunked::ChunkLayout::new(chunk, rank, kv_heads, d, RING_SLACK as usize)
}

/// The cache layout of an attention with `#kv(dct | pswf, axis = sequence)`
/// over cache rows of `width` channels (calls append at most `RING_SLACK`
/// rows); `None` without one, or where it does not fit. Attention reads it
/// through `kv_sequence` (the same for both bases: only the appender's matrix differs).
pub fn sequence_layout(spec: &KernelSpec, width: usize) -> Option<sparsec_ir::kv_sequence::SeqLayout> {
    sparsec_ir::kv_sequence::SeqParams::of_patterns(&spec.patterns)?.layout(width, RING_SLACK as usize)
}

/// Whether an attention carries `#kv(dct | pswf, axis = sequence)`.
pub fn has_sequence_kv(spec: &KernelSpec) -> bool {
    sparsec_ir::kv_sequence::SeqParams::of_patterns(&spec.patterns).is_some()
}

/// The chunk and rank of an attention's `#kv(chunked_svd)`, if it has one
/// (its kernel is `kv_chunked`'s).
pub fn chunked_svd_of(spec: &KernelSpec) -> Option<(u32, sparsec_ir::SvdRank)> {
    spec.patterns.iter().find_map(|p| match p {
        Pattern::Kv(sparsec_ir::KvCompression::ChunkedSvd { chunk, rank }) => Some((*chunk, *rank)),
        _ => None,
    })
}
mod amx_int8_matmul;
mod amx_matmul;
mod elementwise;
mod embedding;
mod half_planes;
mod matmul;
mod mma_half;
mod mma_matmul;
mod mma_quant;
mod mma_tiled;
mod norm;
mod quant_planes;
mod rope;
mod softmax;
mod tiled_matmul;
mod warp_fold;
mod warp_rows;

// What the other kernel generators of `mlir` (quant_dot, sparse_kernels) share.
pub(super) use quant_planes::{nibbles, QuantPlanes};
pub(super) use tiled_matmul::{
    column_groups, row_block, strided, unit_origin, walk_row_blocks, TileCounts, TiledMatmul, UnitOrder, MM_COLS,
};
pub(super) use warp_fold::{prefetch_warp_block, warp_per_output};

use super::builder::{Device, KernelBuilder, V};
use super::math;
use super::sparse_kernels::SparseMatmul;
use crate::error::CompileError;
pub(super) use matmul::WARP;
use sparsec_ir::{DType, Op, Pattern, SymSize, TensorType};
use tiled_matmul::MM_ROWS;

/// Warps per (query row, head) of the NVPTX attention: one block of the CUDA
/// runtime's launches (`BLOCK` threads) splits the keys over its warps and
/// combines their partial softmaxes in shared memory (flash-decoding within a block).
pub(super) const GPU_ATTN_WARPS: u64 = sparsec_runtime::cuda::BLOCK as u64 / WARP;

/// Lanes of the CPU vector kernels that do not take their width from the
/// target (AVX2: 8 × f32), and the narrowest the tiled matmuls use.
const VW: u32 = 8;
/// Lanes of the quantized CPU kernels: half a block of 32 per vector.
const VQ: u32 = 16;

/// Which of an op's kernels a spec is: the op itself, or one of the steps an
/// attention with `#nsa` runs before it (`nsa.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// The op.
    Op,
    /// Writes the key summary (mean, minimum, maximum per channel) of every
    /// block of positions a call completes into the layer's block cache.
    NsaSummary,
    /// Ranks the blocks each (row, KV head) may read and writes its selection.
    NsaSelect,
}

/// What a kernel computes: the op, its operand types and its result type.
#[derive(Clone, Debug)]
pub struct KernelSpec {
    pub name: String,
    pub op: Op,
    /// The op itself, or a step before it.
    pub stage: Stage,
    pub operands: Vec<TensorType>,
    pub result: TensorType,
    /// The op's patterns (attention windows, ...).
    pub patterns: Vec<Pattern>,
    /// A matmul over a pruned weight: the specialization chosen and its storage.
    pub sparse: Option<crate::sparse_select::SparseChoice>,
    /// An add fused into a matmul's stores; its addend is the last operand.
    pub epilogue: Option<Epilogue>,
    /// A unary op fused into the loads of operand 0 (SwiGLU's SiLU into its mul).
    pub prologue: Option<Prologue>,
    /// An activation applied after the epilogue's add (`matmul-add-activation`).
    pub activation: Option<math::Activation>,
    /// CPU matmuls over block-quantized weights quantize their activations to
    /// int8 blocks and use integer dot products (`quant_dot`; needs AVX2).
    pub int8_activations: bool,
    /// The tiled tensor-core matmul rounds its activations to the weights'
    /// type, one MMA instead of a hi and a lo (`--gpu-mma-activations half`).
    pub half_mma_activations: bool,
    /// NVIDIA kernels open with `griddepcontrol` (the CUDA target is sm_90 or
    /// later): the runtime may launch them before the kernel ahead finishes.
    pub grid_dependency: bool,
    /// What the CPU kernels take from the target (`CpuTarget::isa`): the
    /// tiled matmuls' vector width where `k` allows, VNNI dot products.
    pub cpu_isa: crate::options::CpuIsa,
    /// Attention over caches whose heads are stored Hadamard-rotated
    /// (`--kv-hadamard`): the query is rotated alike and the result back.
    pub hadamard_kv: bool,
    /// Attention whose K cache is quantized per channel in groups of
    /// positions (`--kv-kivi`, `sparsec_ir::kv_channel`).
    pub kivi_keys: bool,
    /// CPU: an `#nsa` attention's caches kept per block and KV head
    /// (`attention::cpu_head_blocks`, set by partition; its NSA steps inherit it).
    pub cpu_head_blocks: Option<sparsec_runtime::manifest::HeadBlocks>,
    /// CPU: the transposed weight (operand 1) is stored as AMX tiles (bf16, or
    /// q4_1 records: `sparsec_ir::tiles`, chosen by `tile_weights`):
    /// `amx_matmul` reads it.
    pub amx_weight: bool,
}

/// What an elementwise kernel applies to its first operand as it loads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prologue {
    /// `x·sigmoid(x)`.
    Silu,
}

/// What a matmul adds to each result before storing it (a fused `add`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Epilogue {
    /// `+ c[r, j]`: a residual of the result's shape.
    Residual,
    /// `+ c[j]`: a bias over the output features.
    Bias,
    /// `+ c[j]`, then `+ d[r, j]`: a bias (operand 2), then a residual
    /// (operand 3), in that order.
    BiasResidual,
}

impl KernelSpec {
    /// Units of parallel work (GPU threads): one per output element for
    /// elementwise ops and matmul, one per row for row reductions.
    pub fn work(&self) -> Result<SymSize, CompileError> {
        let numel = self.result.numel();
        let last = |t: &TensorType| match t.last_dim() {
            Some(sparsec_ir::Dim::Fixed(n)) => Ok(n),
            _ => Err(self.unsupported("the last dimension must be fixed")),
        };
        if self.stage != Stage::Op {
            // A warp per (row, KV head) selects on NVPTX (`nsa::emit_select_warp`).
            let u = nsa::units(self)?;
            return Ok(if self.stage == Stage::NsaSelect { SymSize { coef: u.coef * WARP, ..u } } else { u });
        }
        Ok(match &self.op {
            Op::Softmax => SymSize { coef: numel.coef / last(&self.result)?, ..numel },
            // A warp of lanes per row (`norm::emit_norm`).
            Op::LayerNorm { .. } | Op::RmsNorm { .. } => SymSize { coef: numel.coef / last(&self.result)? * WARP, ..numel },
            // A block of `GPU_ATTN_WARPS` warps per (query row, head) (`attention::emit_warp`).
            // (A decode row may take more: `gpu_decode_threads`.)
            Op::Attention { heads, .. } => SymSize { coef: *heads as u64 * WARP * GPU_ATTN_WARPS, seq_pow: 1 },
            // One unit per rotated pair.
            Op::Rope { .. } => SymSize { coef: numel.coef / 2, ..numel },
            // A warp of lanes per output element (`matmul::emit_warp_dot`).
            Op::MatMul { .. } if self.warp_matmul() => SymSize { coef: numel.coef * WARP, ..numel },
            // A warp per output element of a sparse weight (`sparse_warp`).
            // (Baked weights keep a thread per output: `sparse_unrolled`.)
            Op::MatMul { .. }
                if self.sparse_matmul().is_some_and(|s| s.warp_per_output()) && !self.sparse.as_ref().is_some_and(|c| c.bakes()) =>
            {
                SymSize { coef: numel.coef * WARP, ..numel }
            }
            _ => numel,
        })
    }

    /// CUDA threads of a call of one row when they differ from `work` at
    /// one row: the attention kernel splits a decode row's keys over
    /// `attention::gpu_decode_splits` blocks per head.
    pub fn gpu_decode_threads(&self) -> Option<u64> {
        match (&self.op, self.stage) {
            (Op::Attention { heads, .. }, Stage::Op) => {
                attention::gpu_decode_splits(self).map(|s| *heads as u64 * WARP * GPU_ATTN_WARPS * s)
            }
            _ => None,
        }
    }

    /// CUDA warps per band of `gpu_mma_rows` rows when this matmul or
    /// attention takes calls of more than one row on tensor cores (`mma_tiled`,
    /// else `mma_matmul`; `attention_mma`: `SPLIT` warps per 16 rows and
    /// head); `None` otherwise.
    pub fn gpu_mma_warps(&self) -> Option<u64> {
        mma_tiled::tiled(self)
            .map(|(_, warps)| warps)
            .or_else(|| mma_matmul::mma_tiles(self).map(|(_, warps)| warps))
            .or_else(|| attention_mma::flash_dims(self).map(|(h, _, _)| h * attention_mma::SPLIT))
    }

    /// Threads per block of the tensor-core launch when they are not the
    /// runtime's: the prefill attention's `SPLIT` warps of one (16 rows,
    /// head) are a block of their own.
    pub fn gpu_mma_block(&self) -> Option<u32> {
        attention_mma::flash_dims(self).map(|_| (WARP * attention_mma::SPLIT) as u32)
    }

    /// Rows of a band of `gpu_mma_warps` when they are not `MMA_ROWS`: the
    /// shared-memory tiled matmul's blocks take 32 or 64 rows (`mma_tiled`).
    pub fn gpu_mma_rows(&self) -> Option<u64> {
        mma_tiled::tiled(self).map(|(tile, _)| tile.m)
    }

    /// A dense matmul with a transposed weight whose rows are whole 4-wide
    /// vectors (f32) or whole blocks of 32 (Q8_0/Q4_0/Q4_1): on NVPTX a warp
    /// computes each output element (`emit_warp_dot`).
    pub fn warp_matmul(&self) -> bool {
        let k = match self.operands.first().and_then(|t| t.last_dim()) {
            Some(sparsec_ir::Dim::Fixed(k)) => k,
            _ => return false,
        };
        matches!(self.op, Op::MatMul { transpose_b: true })
            && self.sparse.as_ref().and_then(|c| c.storage).is_none()
            && self.operands.get(1).is_some_and(|w| match w.dtype {
                DType::F32 => k % 4 == 0,
                DType::F16 | DType::BF16 => k % half_planes::HALF_VEC as u64 == 0,
                d => d.is_quantized() && k % sparsec_ir::quant::QK as u64 == 0,
            })
    }

    /// A matmul whose weight is stored in a sparse format.
    fn sparse_matmul(&self) -> Option<SparseMatmul> {
        let storage = self.sparse.as_ref()?.storage?;
        let Some(sparsec_ir::Dim::Fixed(n)) = self.result.last_dim() else { return None };
        let numel = self.result.numel();
        Some(SparseMatmul {
            rows: SymSize { coef: numel.coef / n.max(1), ..numel },
            storage,
            int8: self.int8_activations,
            vnni: self.cpu_isa.vnni,
            lanes: self.cpu_isa.lanes,
        })
    }

    fn tiled_matmul(&self) -> Option<TiledMatmul> {
        if self.sparse_matmul().is_some() {
            return None;
        }
        let Op::MatMul { transpose_b: true } = self.op else { return None };
        let (Some(sparsec_ir::Dim::Fixed(k)), Some(sparsec_ir::Dim::Fixed(n))) = (self.operands[0].last_dim(), self.result.last_dim())
        else {
            return None;
        };
        let quant = Some(self.operands[1].dtype).filter(|d| d.is_quantized());
        let half = Some(self.operands[1].dtype).filter(|d| d.is_half());
        if k % VW as u64 != 0 && quant.is_none() {
            return None;
        }
        let numel = self.result.numel();
        let rows = SymSize { coef: numel.coef / n.max(1), ..numel };
        if rows.seq_pow > 1 {
            return None;
        }
        let rb = match (rows == (SymSize { coef: 1, seq_pow: 1 }), self.amx_weight) {
            (true, false) => MM_ROWS,
            (true, true) => amx_matmul::AMX_ROWS,
            (false, _) => 1,
        };
        // The target's widest vectors where k is made of them, else AVX2's.
        let lanes = if k.is_multiple_of(self.cpu_isa.lanes as u64) { self.cpu_isa.lanes } else { VW };
        Some(TiledMatmul { k, n, rows, rb, col_tiles: n.div_ceil(MM_COLS), quant, half, lanes, amx: self.amx_weight })
    }

    /// Rows of `seq` per CPU unit (the runtime counts `seq` in such blocks).
    pub fn cpu_seq_block(&self) -> u64 {
        if let Some(s) = self.sparse_matmul() {
            return s.rb();
        }
        self.tiled_matmul().map(|t| t.rb).unwrap_or(1)
    }

    /// Rough scalar operations per CPU unit (for the runtime's threading decision).
    pub fn cpu_unit_cost(&self) -> u64 {
        let last = |t: &TensorType| match t.last_dim() {
            Some(sparsec_ir::Dim::Fixed(n)) => n,
            _ => 1,
        };
        if let Some(s) = self.sparse_matmul() {
            return s.unit_cost();
        }
        if self.stage != Stage::Op {
            return nsa::unit_cost(self);
        }
        match &self.op {
            Op::MatMul { .. } => match self.tiled_matmul() {
                Some(t) => t.rb * MM_COLS * t.k,
                None => last(&self.operands[0]) * last(&self.result),
            },
            // Per (row, head), or per (row, KV head, split) serving the group's
            // heads: a dot and an axpy over every cached position (512 assumed).
            Op::Attention { heads, kv_heads } => {
                let per_head = 4 * 512 * last(&self.operands[0]) / (*heads as u64).max(1);
                if attention::cpu_split(self) {
                    per_head * (*heads as u64 / (*kv_heads as u64).max(1))
                } else {
                    per_head
                }
            }
            Op::LayerNorm { .. } | Op::RmsNorm { .. } | Op::Softmax => 8 * last(&self.result),
            // One angle's sin and cos, then a rotation per head.
            Op::Rope { heads, .. } => 48 + 16 * *heads as u64,
            Op::Gelu { .. } | Op::Silu => 16,
            _ => 2,
        }
    }

    /// Units of the CPU kernel's parallel loop (what the runtime splits over
    /// threads): tiles for matmul with a transposed weight, rows for other
    /// matmuls, else the same as `work`.
    pub fn cpu_work(&self) -> Result<SymSize, CompileError> {
        if let Some(s) = self.sparse_matmul() {
            return Ok(s.cpu_units());
        }
        if let Some(t) = self.tiled_matmul() {
            return Ok(SymSize { coef: t.rows.coef * t.col_tiles, seq_pow: t.rows.seq_pow });
        }
        if self.stage != Stage::Op {
            return nsa::units(self);
        }
        match &self.op {
            Op::MatMul { .. } => {
                let n = fixed_last(self, &self.result)?;
                let numel = self.result.numel();
                Ok(SymSize { coef: numel.coef / n.max(1), ..numel })
            }
            Op::Attention { .. } if attention::cpu_split(self) => Ok(attention::cpu_phases(self)?.1),
            // One unit per (query row, head).
            Op::Attention { heads, .. } => Ok(SymSize { coef: *heads as u64, seq_pow: 1 }),
            // One unit per (row, pair index): its angle serves every head.
            Op::Rope { heads, .. } => {
                let numel = self.result.numel();
                Ok(SymSize { coef: numel.coef / 2 / (*heads).max(1) as u64, ..numel })
            }
            // One unit per row.
            Op::LayerNorm { .. } | Op::RmsNorm { .. } => {
                let numel = self.result.numel();
                Ok(SymSize { coef: numel.coef / fixed_last(self, &self.result)?.max(1), ..numel })
            }
            _ => self.work(),
        }
    }

    /// CPU units of a kernel's first phase when it has two (the runtime runs
    /// every unit of the first before any of the second): attention's split
    /// partials, then their combination.
    pub fn cpu_first_phase(&self) -> Result<Option<SymSize>, CompileError> {
        match &self.op {
            Op::Attention { .. } if self.stage != Stage::Op => Ok(None),
            Op::Attention { .. } if attention::cpu_split(self) => Ok(Some(attention::cpu_phases(self)?.0)),
            _ => Ok(None),
        }
    }

    /// f32 words of scratch memory the kernel takes after its operands
    /// (attention's split partials); `None` when it takes none.
    pub fn scratch_words(&self) -> Result<Option<u64>, CompileError> {
        match &self.op {
            Op::Attention { .. } if self.stage != Stage::Op || chunked_svd_of(self).is_some() => Ok(None),
            Op::Attention { .. } => Ok(Some(attention::scratch_words(self)?)),
            _ => Ok(None),
        }
    }

    /// Whether output row r reads only row r of each `[rows, ...]` operand
    /// (and whole weights): matmul, norms, activations and same-shape
    /// elementwise ops; not attention, RoPE (positions) or embeddings.
    pub fn row_local(&self) -> bool {
        match &self.op {
            Op::MatMul { .. } | Op::RmsNorm { .. } | Op::LayerNorm { .. } | Op::Softmax | Op::Gelu { .. } | Op::Silu => true,
            Op::Add | Op::Mul => self.operands.iter().all(|t| t.dims == self.result.dims || !t.dims.contains(&sparsec_ir::Dim::Seq)),
            Op::Input
            | Op::Weight { .. }
            | Op::Constant { .. }
            | Op::Attention { .. }
            | Op::Rope { .. }
            | Op::Embedding
            | Op::Positions => false,
        }
    }

    /// Whether operand `i` is a KV cache (read in the cache's type, f16 or f32).
    fn kv_cache_operand(&self, i: usize) -> bool {
        match (self.stage, &self.op) {
            (Stage::Op, Op::Attention { .. }) => i == 1 || i == 2,
            // Gated, the summary reads the V cache too.
            (Stage::NsaSummary, _) => i == 0 || (i == 1 && sparsec_ir::NativeSparse::of(&self.patterns).is_some_and(|n| n.gated())),
            (Stage::Op | Stage::NsaSelect, _) => false,
        }
    }

    pub(crate) fn unsupported(&self, why: &str) -> CompileError {
        CompileError::Unsupported { kernel: self.name.clone(), op: self.op.keyword(), why: why.to_string() }
    }
}

fn fixed_last(spec: &KernelSpec, t: &TensorType) -> Result<u64, CompileError> {
    match t.last_dim() {
        Some(sparsec_ir::Dim::Fixed(n)) => Ok(n),
        _ => Err(spec.unsupported("the last dimension must be fixed")),
    }
}

/// What an op family's emitter gets besides the builder: the kernel, its
/// target, its units of parallel work (`KernelSpec::work` as an index value),
/// its input buffers (`%in0`...) and its output buffer (`%out`).
#[derive(Clone, Copy)]
pub(super) struct KernelCtx<'a> {
    pub spec: &'a KernelSpec,
    pub device: Device,
    pub work: &'a str,
    pub ins: &'a [V],
    pub out: &'a str,
}

/// Writes the MLIR module of one kernel for `device`.
pub fn emit_kernel(spec: &KernelSpec, device: Device) -> Result<String, CompileError> {
    // Buffers hold f32; i32 values (token ids, positions) travel as exact f32 integers.
    // Quantized and 16-bit weights are packed bytes (shape inference allows them
    // only as matmul weights and embedding tables); f16 and block-quantized
    // types also as KV caches.
    let weight_operand = |i: usize| matches!((&spec.op, i), (Op::MatMul { transpose_b: true }, 1) | (Op::Embedding, 0));
    let supported = |i: usize, t: &TensorType| match t.dtype {
        DType::F32 | DType::I32 => true,
        DType::F16 => spec.kv_cache_operand(i) || weight_operand(i),
        DType::BF16 => weight_operand(i),
        DType::Q8_0 | DType::Q4_0 | DType::Q4_1 => true,
    };
    if let Some((_, t)) = spec.operands.iter().enumerate().chain([(usize::MAX, &spec.result)]).find(|&(i, t)| !supported(i, t)) {
        return Err(spec.unsupported(&format!(
            "element type {} (f32, i32; f16/bf16/q8_0/q4_0/q4_1 weights; f16 or q8_0/q4_0/q4_1 KV caches)",
            t.dtype.name()
        )));
    }
    let mut b = KernelBuilder::new(device);
    b.set_grid_dependency(spec.grid_dependency);
    // The operands, then a scratch buffer where the kernel takes one.
    let scratch = usize::from(spec.scratch_words()?.is_some());
    let ins: Vec<V> = (0..spec.operands.len() + scratch).map(|i| format!("%in{i}")).collect();
    for (i, t) in spec.operands.iter().enumerate() {
        // f16 caches are declared by their kernels (they take f16 views).
        if t.dtype.is_packed_weight() && !(spec.kv_cache_operand(i) && t.dtype == DType::F16) {
            b.byte_param(&ins[i]);
        }
    }
    if spec.sparse_matmul().is_some() {
        b.byte_param(&ins[1]);
    }
    if let Some(e) = spec.epilogue {
        let missing = || spec.unsupported("the fused epilogue's addend is not an operand");
        let addend = ins.get(2).ok_or_else(missing)?;
        let addends = match e {
            Epilogue::Residual => vec![(addend.clone(), None)],
            Epilogue::Bias => vec![(addend.clone(), Some(b.index(fixed_last(spec, &spec.result)?)))],
            Epilogue::BiasResidual => {
                let residual = ins.get(3).ok_or_else(missing)?;
                vec![(addend.clone(), Some(b.index(fixed_last(spec, &spec.result)?))), (residual.clone(), None)]
            }
        };
        b.set_epilogue(addends, spec.activation);
    }
    let out: V = "%out".into();
    // The CPU's loops count output elements where the GPU counts warp lanes.
    let work = match (device, &spec.op) {
        (Device::Cpu, Op::MatMul { .. }) if spec.warp_matmul() => spec.result.numel(),
        (Device::Cpu, Op::Attention { .. } | Op::LayerNorm { .. } | Op::RmsNorm { .. }) => spec.cpu_work()?,
        _ => spec.work()?,
    };
    let work = b.sym(work);
    let cx = KernelCtx { spec, device, work: &work, ins: &ins, out: &out };
    match spec.stage {
        Stage::Op => {}
        Stage::NsaSummary => nsa::emit_summary(&mut b, &cx)?,
        Stage::NsaSelect => nsa::emit_select(&mut b, &cx)?,
    }
    match &spec.op {
        _ if spec.stage != Stage::Op => {}
        Op::Input | Op::Weight { .. } | Op::Constant { .. } => return Err(spec.unsupported("leaves are data, not kernels")),
        Op::Gelu { approx } => elementwise::emit_activation(&mut b, &cx, math::Activation::Gelu(*approx))?,
        Op::Silu => elementwise::emit_activation(&mut b, &cx, math::Activation::Silu)?,
        Op::Add | Op::Mul => elementwise::emit_binary(&mut b, &cx)?,
        Op::MatMul { transpose_b } => matmul::emit_matmul(&mut b, &cx, *transpose_b)?,
        Op::LayerNorm { eps } | Op::RmsNorm { eps } => norm::emit_norm(&mut b, &cx, *eps)?,
        Op::Softmax => softmax::emit_softmax(&mut b, &cx)?,
        Op::Embedding => embedding::emit_embedding(&mut b, &cx)?,
        Op::Positions => embedding::emit_positions(&mut b, &cx)?,
        Op::Rope { heads, theta, adjacent } => rope::emit_rope(&mut b, &cx, *heads, *theta, *adjacent)?,
        Op::Attention { heads, kv_heads } => attention::emit_attention(&mut b, &cx, *heads, *kv_heads)?,
    }
    let mut params = ins.clone();
    params.push(out);
    Ok(b.finish(&spec.name, &params))
}
