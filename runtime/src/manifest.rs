//! The artifact manifest and execution plan: written by the compiler, read by
//! the runtime. Versioned; the runtime refuses versions it does not know.

use serde::{Deserialize, Serialize};
use sparsec_ir::sparse::SparseStorage;
use sparsec_ir::{DType, Dim, SymSize};

/// Bumped whenever the manifest or the kernel ABI changes.
pub const MANIFEST_VERSION: u32 = 15;

pub const MANIFEST_FILE: &str = "manifest.json";
pub const GRAPH_FILE: &str = "graph.sir";
pub const PLAN_FILE: &str = "plan.toml";
pub const WEIGHTS_FILE: &str = "weights.safetensors";
pub const CPU_LIBRARY: &str = "cpu/kernels.so";
pub const CUDA_DIR: &str = "cuda";

/// Buffer arguments a kernel may take (the CPU calling convention adds four
/// integers; `cpu::call` has one signature per count).
pub const MAX_KERNEL_BUFFERS: usize = 8;

/// The CPU library holds, per kernel `k`, a constant `sparsec_abi_<k>`: the
/// kernel's ABI record (`abi_record`), written by the compiler from the
/// buffers it generated the kernel for and checked by the runtime against
/// every step that launches it.
pub const ABI_SYMBOL_PREFIX: &str = "sparsec_abi_";

/// First word of an ABI record ("SPARSEC1").
pub const ABI_MAGIC: u64 = u64::from_be_bytes(*b"SPARSEC1");

/// A kernel's ABI record for a launch on `args`: `ABI_MAGIC`, the buffer
/// count, then per buffer its bytes at `seq` 1 and 2 (per position for a KV
/// cache), which pin both its fixed and its `seq`-dependent size.
pub fn abi_record(args: &[&BufferSpec]) -> Vec<u64> {
    let mut r = vec![ABI_MAGIC, args.len() as u64];
    for b in args {
        r.push(b.bytes(1) as u64);
        r.push(b.bytes(2) as u64);
    }
    r
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub version: u32,
    pub sparsec_version: String,
    pub graph_name: String,
    /// blake3 of the source graph text, the plan and the weight data.
    pub source_hash: String,
    /// blake3 of the source hash, the compile options and the compiler version.
    pub cache_key: String,
    /// The plan text, when one was given.
    pub plan: Option<String>,
    /// The compile options, as the compiler spelled them.
    pub options: serde_json::Value,
    /// `cpu` and/or `cuda`.
    pub targets: Vec<String>,
    pub kernels: Vec<KernelRecord>,
    pub execution: ExecutionPlan,
    /// Wall time of the whole compile, in milliseconds.
    pub compile_ms: f64,
    /// For a language model: its tokenizer file in the artifact and end token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lm: Option<LmInfo>,
    /// Every other file of the artifact (`/`-separated, relative) and its
    /// blake3 hash (`integrity::seal`), checked at load.
    pub files: std::collections::BTreeMap<String, String>,
    /// blake3 of this manifest's text with this value empty.
    pub integrity: String,
    /// Weight parameters of the graph as given and as compiled (they differ
    /// where a plan factors weights: `low_rank`, `share`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<ParamCounts>,
    /// Weight buffers left out of the weights file (`sparsec compile
    /// --strip-weights`, version 10): checkpoint tensors the runtime packs at
    /// load (`sparsec-run ARTIFACT --weights CHECKPOINT`), each to its buffer's
    /// type, sparse format and the graph's `#sparsity`, then validated as the
    /// weights file would be. Empty for an artifact that holds its weights.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checkpoint_weights: Vec<String>,
}

/// Weight parameters (elements of every weight tensor, a tied one counted once)
/// of a graph before and after the passes.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ParamCounts {
    pub before: u64,
    pub after: u64,
}

/// The elements of every weight of `g` (each weight name once; weights of a
/// shape with `seq` do not exist).
pub fn weight_params(g: &sparsec_ir::Graph) -> u64 {
    let mut seen = std::collections::HashSet::new();
    g.nodes
        .iter()
        .filter_map(|n| match &n.op {
            sparsec_ir::Op::Weight { name, .. } if seen.insert(name.as_str()) => n.ty.as_ref().map(|t| t.numel().coef),
            _ => None,
        })
        .sum()
}

impl Manifest {
    /// A figure summed over every kernel's CPU code (`|s| s.code_bytes`, ...).
    pub fn cpu_total<T: std::iter::Sum<T>>(&self, figure: impl Fn(&CodeStats) -> T) -> T {
        self.kernels.iter().filter_map(|k| k.cpu.as_ref().map(&figure)).sum()
    }
}

/// Whether the artifact in `dir` says it is a language model (a peek at its
/// manifest, which is not validated here: `Artifact::open` does that).
pub fn is_lm_artifact(dir: &std::path::Path) -> bool {
    std::fs::read_to_string(dir.join(MANIFEST_FILE))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v.get("lm").is_some_and(|l| !l.is_null()))
}

/// What turns an artifact into a language model for `run --prompt` and `eval`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LmInfo {
    /// The tokenizer (Hugging Face `tokenizer.json` format), relative to the artifact.
    pub tokenizer: String,
    pub eos: Option<u32>,
    /// Where the weights came from (a path or `smollm2`).
    pub source: String,
    /// The context length the model was trained for (`max_position_embeddings`,
    /// `llama.context_length`): the runtime binds no positions past it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<u64>,
}

pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// One compiled kernel and what it cost.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct KernelRecord {
    pub name: String,
    /// The IR op it implements.
    pub op: String,
    pub cpu: Option<CodeStats>,
    pub cuda: Option<CodeStats>,
    /// For a matmul over a pruned weight: the specialization level and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub specialization: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CodeStats {
    /// MLIR generation, lowering, LLVM optimization and code emission.
    pub compile_ms: f64,
    pub mlir_bytes: usize,
    /// Optimized LLVM IR, as text.
    pub llvm_ir_bytes: usize,
    /// Machine code (`.text` of the object) on the CPU; PTX text on CUDA.
    pub code_bytes: usize,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BufferKind {
    Input,
    /// Data in `weights.safetensors` under the buffer's name.
    Weight,
    /// Produced by a step.
    Temp,
    /// The keys or values an attention op has seen: `dims` are per position
    /// (`[seq, width]`), `dtype` f32 or f16 (appends round to it); the runtime
    /// holds a capacity of positions across calls.
    KvCache,
    /// Working memory of the one kernel step that takes it (attention's split
    /// partials): fixed size, f32, undefined on entry, never a step's output.
    Scratch,
    /// State an attention with `#nsa` keeps across calls: one f32 row per
    /// `block` positions (`dims` are `[seq, width]` with `seq` counting
    /// blocks), written by the one kernel step whose output it is (as the
    /// call's rows complete blocks) and read by later steps; the runtime holds
    /// a row for every block the positions so far fill.
    BlockCache {
        block: u32,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BufferSpec {
    /// The graph value name (without `%`); the tensor name for weights.
    pub name: String,
    pub kind: BufferKind,
    pub dims: Vec<Dim>,
    /// Element type; a quantized weight is its packed bytes (`sparsec_ir::quant`).
    pub dtype: DType,
    /// Temps share memory: buffers with the same slot are never alive at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<usize>,
    /// A pruned weight stored packed (`sparsec_ir::sparse`): CSR, N:M or BSR bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sparse: Option<SparseStorage>,
    /// A windowed attention's KV cache on the CPU: a ring of positions (the
    /// PTX kernels read caches by position and the CUDA runtime keeps them whole).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ring: Option<Ring>,
    /// A Q4_1 K cache quantized per channel in groups of this many positions
    /// (`sparsec_ir::kv_channel`): the exact rows of the newest group, then
    /// the complete groups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel_groups: Option<u32>,
    /// A KV cache factored per chunk of positions (`#kv(chunked_svd)`,
    /// `sparsec_ir::kv_chunked`): the exact f32 rows of the newest chunk,
    /// then a record of f16 factors per complete chunk (`dtype` f16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunked: Option<ChunkedCache>,
    /// A KV cache whose older blocks of positions are kept low-pass
    /// (`#kv(dct | pswf, axis = sequence)`, `sparsec_ir::kv_sequence`): the sinks'
    /// and a ring's exact f32 rows, then per complete block its low-pass f16
    /// rows (`dtype` f16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<SequenceCache>,
    /// CPU: an `#nsa` layer's f16 or f32 KV cache kept per block of positions
    /// and KV head (`HeadBlocks`), so that a KV head's keys of one block lie
    /// together (the CUDA runtime keeps whole caches by rows, as its kernels
    /// read them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_blocks: Option<HeadBlocks>,
    /// A bf16 matmul weight stored as matrix tiles (`sparsec_ir::tiles`): the
    /// AMX kernels' layout, chosen at compile time for a target with AMX.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tiles: Option<sparsec_ir::tiles::TileLayout>,
}

/// The layout of a cache kept per block of positions and KV head (manifest
/// version 15): block `p / block` holds its positions' rows head after head,
/// so head `g` of position `p` starts at element `(p / block)·block·width +
/// g·block·d + (p % block)·d` (`width` elements per position, `d = width /
/// heads`). The cache holds whole blocks.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HeadBlocks {
    pub block: u32,
    pub heads: u32,
}

impl HeadBlocks {
    /// The first element of KV head `g` of position `p` in a cache of `width`
    /// elements per position.
    pub fn at(&self, p: usize, g: usize, width: usize) -> usize {
        let (block, d) = (self.block as usize, width / (self.heads as usize).max(1));
        p / block * block * width + g * block * d + p % block * d
    }
}

/// The layout parameters of a sequence-axis cache (manifest version 11; the
/// basis since version 14).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct SequenceCache {
    /// The matrix a block is compressed with (`SeqLayout::resampling`).
    pub basis: sparsec_ir::kv_sequence::SeqBasis,
    pub keep: f32,
    pub block: u32,
    /// Low-pass rows per block (`kv_sequence::kept_rows`).
    pub rows: u32,
    pub sinks: u32,
    pub recent: u32,
    /// Exact rows after the sinks: whole blocks, at least `recent + block`
    /// more than one call appends (`SeqLayout::max_call`; the runtime splits calls).
    pub ring: u32,
}

impl SequenceCache {
    /// The IR's layout for rows of `width` channels; `None` if the parameters
    /// do not describe one (zero sizes, a ring not of whole blocks or too
    /// short for a call, rows that `keep` does not give, a PSWF bandwidth
    /// outside (0, 0.5)).
    pub fn layout(&self, width: usize) -> Option<sparsec_ir::kv_sequence::SeqLayout> {
        let (block, ring, recent) = (self.block as usize, self.ring as usize, self.recent as usize);
        if block == 0 || !ring.is_multiple_of(block) || ring <= recent + block {
            return None;
        }
        if let sparsec_ir::kv_sequence::SeqBasis::Pswf { bandwidth } = self.basis {
            sparsec_ir::kv_basis::check_bandwidth(bandwidth).ok()?;
        }
        let l = sparsec_ir::kv_sequence::SeqLayout::new(
            self.basis,
            self.keep,
            self.block,
            self.sinks,
            self.recent,
            width,
            ring - recent - block,
        )?;
        (l.ring == ring && l.m == self.rows as usize).then_some(l)
    }
}

/// The layout parameters of a chunked-SVD KV cache (manifest version 11).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct ChunkedCache {
    pub chunk: u32,
    /// Exact rows held: a ring of whole chunks, at least a chunk more than
    /// one call appends (`ChunkLayout::max_call`; the runtime splits calls).
    pub ring: u32,
    /// Rank rows reserved per (chunk, KV head).
    pub slot: u32,
    /// Head width.
    pub head: u32,
    /// Each head's rank is the smallest keeping this fraction of its energy
    /// (at most `slot`); `None`: `slot` always.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy: Option<f32>,
}

impl ChunkedCache {
    /// The IR's layout for a cache `width` channels wide; `None` if the
    /// parameters do not describe one (zero sizes, a width not made of heads,
    /// a slot wider than the chunk or the head, an energy outside (0, 1]).
    pub fn layout(&self, width: usize) -> Option<sparsec_ir::kv_chunked::ChunkLayout> {
        let (chunk, slot, d, ring) = (self.chunk as usize, self.slot as usize, self.head as usize, self.ring as usize);
        if d == 0
            || chunk == 0
            || ring < chunk
            || !ring.is_multiple_of(chunk)
            || !width.is_multiple_of(d)
            || slot > chunk.min(d)
            || self.energy.is_some_and(|e| !(e > 0.0 && e <= 1.0))
        {
            return None;
        }
        let rank = match self.energy {
            Some(fraction) => sparsec_ir::SvdRank::Energy { fraction, max_rank: Some(self.slot) },
            None => sparsec_ir::SvdRank::Fixed(self.slot),
        };
        sparsec_ir::kv_chunked::ChunkLayout::new(self.chunk, rank, width / d, d, ring + 1 - chunk)
            .filter(|l| l.slot == slot && l.ring == ring)
    }
}

/// A KV cache that keeps only what a sliding window with sinks reads:
/// position j sits in row j below `sinks`, else in row
/// `sinks + (j - sinks) % rows`. `rows` exceeds the window by the most rows
/// one call may append (`max_rows`), so a call's first query still finds the
/// keys its window reaches back to; the runtime splits longer calls.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Ring {
    pub sinks: u32,
    pub rows: u32,
    pub max_rows: u32,
}

impl Ring {
    /// The cache row of position `j`.
    pub fn row(&self, j: usize) -> usize {
        let s = self.sinks as usize;
        if j < s {
            j
        } else {
            s + (j - s) % (self.rows.max(1) as usize)
        }
    }

    /// Rows held (sinks and ring).
    pub fn capacity(&self) -> usize {
        self.sinks as usize + self.rows as usize
    }
}

impl BufferSpec {
    pub fn numel(&self) -> SymSize {
        SymSize::of_dims(&self.dims)
    }

    /// Whether the buffer is laid out by rows of `seq`: its first dimension is
    /// `seq` and no other is, so row r starts at r × `bytes(1)`.
    pub fn by_rows(&self) -> bool {
        self.dims.first() == Some(&Dim::Seq) && self.dims.iter().filter(|d| **d == Dim::Seq).count() == 1
    }

    /// Rows a block cache holds after `positions` positions (the blocks they
    /// fill, at least one); `None` for other buffers.
    pub fn block_rows(&self, positions: usize) -> Option<usize> {
        match self.kind {
            BufferKind::BlockCache { block } => Some((positions / block.max(1) as usize).max(1)),
            _ => None,
        }
    }

    /// Rows a KV cache holds after `positions` positions on the CPU: all of
    /// them, or a ring's capacity at most.
    pub fn cache_rows(&self, positions: usize) -> usize {
        match (self.ring, self.head_blocks) {
            (Some(r), _) => positions.min(r.capacity()),
            // Whole blocks.
            (None, Some(h)) => positions.div_ceil(h.block.max(1) as usize) * h.block as usize,
            (None, None) => positions,
        }
    }

    /// Bytes a KV cache grows by per position; a per-channel K cache
    /// (`channel_groups`) holds `fixed_bytes` more, its newest group's exact rows.
    /// A chunked-SVD cache grows by a record per chunk, a sequence-axis DCT
    /// cache by a block's low-pass rows: their bytes per position are a
    /// record's share (rounded up).
    pub fn position_bytes(&self) -> usize {
        if let Some(l) = self.compressed() {
            return l.record_bytes().div_ceil(l.group());
        }
        self.bytes(1).saturating_sub(self.fixed_bytes())
    }

    /// Bytes a KV cache holds whatever its length: a per-channel K cache's
    /// exact rows, else none.
    pub fn fixed_bytes(&self) -> usize {
        let width = self.numel().resolve(1) as usize;
        if let Some(l) = self.compressed() {
            return l.record_at(0);
        }
        match self.channel_groups {
            Some(_) => sparsec_ir::kv_channel::residual_bytes(width),
            None => 0,
        }
    }

    /// The layout of a compressed cache (`chunked` or `sequence`), if it is
    /// one and fits: what its appender, call limit and going back ask.
    pub fn compressed(&self) -> Option<sparsec_ir::kv_compressed::Compressed> {
        use sparsec_ir::kv_compressed::Compressed;
        self.chunk_layout().map(Compressed::Chunked).or_else(|| self.sequence_layout().map(Compressed::Sequence))
    }

    /// Whether the buffer is a compressed KV cache (chunked SVD or
    /// sequence-axis DCT), whose rows are encoded as they are appended.
    pub fn compressed_cache(&self) -> bool {
        self.chunked.is_some() || self.sequence.is_some()
    }

    /// The layout of a sequence-axis DCT cache (`sequence`), if it is one and fits.
    pub fn sequence_layout(&self) -> Option<sparsec_ir::kv_sequence::SeqLayout> {
        self.sequence?.layout(usize::try_from(self.numel().resolve(1)).ok()?)
    }

    /// The layout of a chunked-SVD cache (`chunked`), if it is one and fits.
    pub fn chunk_layout(&self) -> Option<sparsec_ir::kv_chunked::ChunkLayout> {
        self.chunked?.layout(usize::try_from(self.numel().resolve(1)).ok()?)
    }

    /// Whether kernels take the buffer as bytes (`memref<?xi8>`): packed
    /// quantized weights, f16/bf16 weights and f16 KV caches.
    pub fn as_bytes(&self) -> bool {
        self.dtype.is_packed_weight()
    }

    /// Bytes at sequence length `seq`: packed blocks for quantized weights, 2 per
    /// value for f16/bf16 weights and f16 KV caches; every other buffer holds 4-byte f32 values (i32
    /// ids travel as exact f32).
    ///
    /// Saturates where `try_bytes` has no answer: a loaded artifact has been
    /// validated (`validate`) so that it has one at every `seq` the runtime binds.
    pub fn bytes(&self, seq: u64) -> usize {
        self.try_bytes(seq).unwrap_or(usize::MAX)
    }

    /// `bytes`, or `None` where the size overflows or the type cannot hold the
    /// element count (quantized blocks that do not divide it).
    pub fn try_bytes(&self, seq: u64) -> Option<usize> {
        if let Some(f) = &self.sparse {
            sparsec_ir::sparse::check_format(&f.format).ok()?;
            return usize::try_from(f.format.layout().total).ok();
        }
        let mut n: u64 = 1;
        for d in &self.dims {
            n = n.checked_mul(match d {
                Dim::Fixed(x) => *x,
                Dim::Seq => seq,
            })?;
        }
        let n = usize::try_from(n).ok()?;
        if self.compressed_cache() {
            // `seq` counts positions; the dims give one position's width.
            return self.compressed()?.bytes(usize::try_from(seq).ok()?);
        }
        if self.channel_groups.is_some() {
            let width = usize::try_from(SymSize::of_dims(&self.dims).resolve(1)).ok()?;
            return sparsec_ir::kv_channel::residual_bytes(width).checked_add(self.dtype.storage_bytes(n)?);
        }
        if self.as_bytes() {
            self.dtype.storage_bytes(n)
        } else {
            n.checked_mul(4)
        }
    }
}

/// One kernel launch. Kernel ABI (`MANIFEST_VERSION` 9): arguments are the
/// `args` buffers as flat arrays (f32; packed bytes for quantized, f16/bf16 and
/// sparse weights and for f16 and block-quantized KV caches; the last one is
/// written, and a block cache it takes is its to write: version 9), then `seq`
/// (rows of this call) and `pos` (positions already in the KV caches).
/// CPU: `_mlir_ciface_<kernel>(memref descriptor*..., i64 seq, i64 pos, i64 lo, i64 hi)`
/// runs units `lo..hi` of `cpu_units` (disjoint slices may run on different threads);
/// CUDA: `<kernel>(ptr..., i64 seq, i64* pos)`, one thread per unit of
/// `gpu_threads` (or, for calls of more than one row, `gpu_mma_warps` warps
/// per band of `gpu_mma_rows` (else `MMA_ROWS`) rows when the kernel has a
/// tensor-core path, in blocks of `gpu_mma_block` threads where given: version
/// 13; for calls of one row `gpu_decode_threads` where given: version 12); `pos`
/// is read from device memory (version 8), so a captured decode step replays
/// at any position.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct KernelStep {
    pub kernel: String,
    pub args: Vec<usize>,
    pub gpu_threads: SymSize,
    /// CUDA: a matmul with a tensor-core path for calls of more than one row
    /// launches this many warps per band of `MMA_ROWS` rows instead (a warp
    /// per output tile); `None`: `gpu_threads` at every call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_mma_warps: Option<u64>,
    /// CUDA: rows of a band of `gpu_mma_warps` when they are not `MMA_ROWS`
    /// (the shared-memory tiled matmul: a block of whole warps per 32 or 64
    /// rows and 64 features; version 13). Its band's warps are whole blocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_mma_rows: Option<u64>,
    /// CUDA: threads per block of a `gpu_mma_warps` launch when they are not
    /// the runtime's `BLOCK` (the tensor-core prefill attention: blocks of one
    /// warp, so that a few hundred warps spread over every SM); a multiple of
    /// 32, never with `gpu_mma_rows` (whose tiles are whole blocks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_mma_block: Option<u32>,
    /// CUDA: threads of a call of one row when they are not `gpu_threads` at
    /// one row (the attention kernel splits a decode row's keys over several
    /// blocks per head: version 12); `None`: `gpu_threads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_decode_threads: Option<u64>,
    /// CPU units, with `seq` counted in blocks of `cpu_seq_block` rows.
    pub cpu_units: SymSize,
    pub cpu_seq_block: u64,
    /// Rough scalar operations per CPU unit: the runtime splits a step over
    /// threads only when there is enough work to pay for it.
    pub cpu_unit_cost: u64,
    /// CPU units of a first phase that must finish before the rest run
    /// (attention's split partials before their combination); `None`: one phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_first_phase: Option<SymSize>,
}

/// Rows of one band of a tensor-core matmul's warp tiles (`KernelStep::gpu_mma_warps`
/// without `gpu_mma_rows`).
pub const MMA_ROWS: u64 = 16;

impl KernelStep {
    /// CUDA threads of a call of `seq` rows (`None` when they overflow).
    pub fn gpu_threads_at(&self, seq: u64) -> Option<u64> {
        match (self.gpu_mma_warps, self.gpu_decode_threads) {
            (Some(w), _) if seq > 1 => seq.div_ceil(self.gpu_mma_rows.unwrap_or(MMA_ROWS)).checked_mul(w)?.checked_mul(32),
            (_, Some(t)) if seq == 1 => Some(t),
            _ => self.gpu_threads.checked_resolve(seq),
        }
    }

    /// CUDA grid and block of a call of `seq` rows (`None` when they overflow).
    pub fn gpu_launch_at(&self, seq: u64) -> Option<(u32, u32)> {
        let threads = self.gpu_threads_at(seq)?;
        let block = match self.gpu_mma_block {
            Some(b) if seq > 1 && self.gpu_mma_warps.is_some() => b,
            _ => crate::cuda::BLOCK,
        };
        let grid = u32::try_from(threads.div_ceil(block as u64).max(1)).ok()?;
        Some((grid, block))
    }

    /// CPU units at sequence length `seq`.
    pub fn units(&self, seq: u64) -> u64 {
        self.cpu_units.resolve(seq.div_ceil(self.cpu_seq_block.max(1)))
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum Step {
    Kernel(KernelStep),
    /// Copies the `seq` new rows of `src` into the cache `cache` at row `pos`,
    /// converting them to the cache's type; with `hadamard` = d, each d-wide
    /// head of a row is first multiplied by the normalized d×d Hadamard matrix
    /// (`sparsec_ir::quant::hadamard`; d a power of two).
    KvAppend {
        src: usize,
        cache: usize,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        hadamard: Option<u32>,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ExecutionPlan {
    pub buffers: Vec<BufferSpec>,
    pub inputs: Vec<usize>,
    pub outputs: Vec<usize>,
    pub steps: Vec<Step>,
    /// Where the row-local tail begins: from this step on, every step is a
    /// kernel whose output row r reads only row r of its `[seq, ...]` inputs
    /// (a final norm and an LM head), so a caller that wants only the last
    /// row's outputs (generation) can run the tail at `seq` = 1 on that row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub row_local_tail: Option<usize>,
}

impl ExecutionPlan {
    /// Bytes of each temp slot at sequence length `seq`: the largest temp or
    /// scratch buffer it holds.
    pub fn slot_bytes(&self, seq: u64) -> Vec<usize> {
        let mut slot_bytes: Vec<usize> = Vec::new();
        for b in &self.buffers {
            if let (BufferKind::Temp | BufferKind::Scratch, Some(s)) = (b.kind, b.slot) {
                if slot_bytes.len() <= s {
                    slot_bytes.resize(s + 1, 0);
                }
                slot_bytes[s] = slot_bytes[s].max(b.bytes(seq));
            }
        }
        slot_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kept per block and KV head, the positions of whole blocks fill the
    /// cache's elements exactly once, a KV head's keys of one block lie one
    /// after another, and the layout agrees with the serde round trip.
    #[test]
    fn head_blocks_tile_whole_blocks_head_after_head() {
        let h = HeadBlocks { block: 4, heads: 3 };
        let (width, d) = (3 * 8, 8);
        let mut seen = vec![false; 3 * 4 * width];
        for p in 0..12 {
            for g in 0..3 {
                let at = h.at(p, g, width);
                for (i, s) in seen[at..at + d].iter_mut().enumerate() {
                    assert!(!*s, "element {} twice", at + i);
                    *s = true;
                }
                if p % 4 > 0 {
                    assert_eq!(at, h.at(p - 1, g, width) + d, "head {g} of position {p} follows position {}", p - 1);
                }
            }
        }
        assert!(seen.iter().all(|s| *s));
        let back: HeadBlocks = serde_json::from_str(&serde_json::to_string(&h).unwrap()).unwrap();
        assert_eq!(back, h);
    }

    #[test]
    fn a_launch_counts_its_threads_by_the_kind_of_call() {
        let step = |mma_warps, mma_rows, decode| KernelStep {
            kernel: "k".into(),
            args: vec![0],
            gpu_threads: SymSize { coef: 768, seq_pow: 1 },
            gpu_mma_warps: mma_warps,
            gpu_mma_rows: mma_rows,
            gpu_mma_block: None,
            gpu_decode_threads: decode,
            cpu_units: SymSize { coef: 1, seq_pow: 1 },
            cpu_seq_block: 1,
            cpu_unit_cost: 1,
            cpu_first_phase: None,
        };
        // A thread per output at every call.
        assert_eq!(step(None, None, None).gpu_threads_at(37), Some(768 * 37));
        // Warp tiles: bands of 16 rows (3 for 37), 96 warps each; one row as before.
        assert_eq!(step(Some(96), None, None).gpu_threads_at(37), Some(3 * 96 * 32));
        assert_eq!(step(Some(96), None, None).gpu_threads_at(1), Some(768));
        // Block tiles: bands of 64 rows (1 for 37), 12 × 8 warps each.
        assert_eq!(step(Some(96), Some(64), None).gpu_threads_at(37), Some(96 * 32));
        assert_eq!(step(Some(96), Some(64), None).gpu_threads_at(65), Some(2 * 96 * 32));
        // A decode launch of its own.
        assert_eq!(step(Some(96), Some(64), Some(4096)).gpu_threads_at(1), Some(4096));
        // Blocks: the runtime's, or one warp each for a warp-tiled launch that asks.
        assert_eq!(step(Some(96), Some(64), None).gpu_launch_at(37), Some((12, crate::cuda::BLOCK)));
        let mut one_warp = step(Some(6), None, Some(4096));
        one_warp.gpu_mma_block = Some(32);
        assert_eq!(one_warp.gpu_launch_at(37), Some((18, 32)));
        assert_eq!(one_warp.gpu_launch_at(1), Some((4096 / crate::cuda::BLOCK, crate::cuda::BLOCK)));
    }

    #[test]
    fn parameter_counts_are_additive_and_count_a_tied_weight_once() {
        let g = sparsec_ir::parse_graph(
            "graph @g {\n  %x = input : f32[seq, 4]\n  %w = weight \"w\" : f32[4, 3]\n  %v = weight \"w\" : f32[4, 3]\n  %b = weight \"b\" : q8_0[32, 4]\n  %y = matmul %x, %w\n  return %y\n}\n",
        )
        .unwrap();
        assert_eq!(weight_params(&g), 12 + 128);
        // A manifest written before the field reads as `None`; one with it round-trips.
        let mut v = serde_json::json!({
            "version": MANIFEST_VERSION, "sparsec_version": "0", "graph_name": "g", "source_hash": "", "cache_key": "",
            "plan": null, "options": {}, "targets": [], "kernels": [],
            "execution": { "buffers": [], "inputs": [], "outputs": [], "steps": [] },
            "compile_ms": 0.0, "files": {}, "integrity": ""
        });
        let m: Manifest = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(m.params, None);
        assert!(!serde_json::to_string(&m).unwrap().contains("params"));
        v["params"] = serde_json::json!({ "before": 10, "after": 7 });
        let m: Manifest = serde_json::from_value(v).unwrap();
        assert_eq!(m.params, Some(ParamCounts { before: 10, after: 7 }));
        let back: Manifest = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(back.params, m.params);
    }

    #[test]
    fn sequence_layouts_round_trip_their_basis_and_refuse_a_bad_bandwidth() {
        use sparsec_ir::kv_sequence::SeqBasis;
        let c =
            SequenceCache { basis: SeqBasis::Pswf { bandwidth: 0.125 }, keep: 0.5, block: 16, rows: 8, sinks: 4, recent: 32, ring: 304 };
        let text = serde_json::to_string(&c).unwrap();
        assert!(text.contains(r#""basis":{"transform":"pswf","bandwidth":0.125}"#), "{text}");
        assert_eq!(serde_json::from_str::<SequenceCache>(&text).unwrap(), c);
        assert_eq!(c.layout(32).map(|l| l.basis), Some(c.basis));
        let dct = SequenceCache { basis: SeqBasis::Dct, ..c };
        assert!(serde_json::to_string(&dct).unwrap().contains(r#""basis":{"transform":"dct"}"#));
        for bandwidth in [0.0, 0.5, 7.0, f32::NAN] {
            assert!(SequenceCache { basis: SeqBasis::Pswf { bandwidth }, ..c }.layout(32).is_none(), "{bandwidth}");
        }
    }
}
