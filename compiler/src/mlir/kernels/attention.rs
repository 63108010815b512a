//! Causal multi-head attention (grouped KV heads) over the KV caches, with
//! sliding windows and sink tokens; f32 or f16 caches; windowed layers read
//! ring caches on the CPU. A query visits only the keys it sees (its sinks,
//! then its window), so a window costs O(window + sinks) per query.
//!
//! Two variants. On the CPU, when the head width is a multiple of the vector
//! width: one unit per (row, KV head, split) serves every query head of the KV
//! group; without NSA the unit of KV head 0 serves every KV head (units are
//! numbered split-major and the others idle), so it reads whole cache rows. It
//! walks its keys in tiles of `KEY_TILE` with an online softmax per head. f32
//! and f16 caches are read as they lie (`cache_group_tile`): each key's row is
//! loaded (widened) once for all the group's heads, which score it into their
//! own tiles of scores, then the heads take the tile's values together, each
//! value vector loaded once for all of them; rows ahead are prefetched into
//! L2. Sequence-axis caches (`kv_sequence.rs`) are read the same way in
//! three runs of keys (`key_runs`): the sinks' and recent positions' exact
//! f32 rows and between them the f16 low-pass rows, whose scores get a
//! constant. Quantized caches and keys before RoPE are first widened to f32 tiles
//! once for the whole group (`widen_tile`, `widened_group_tile`). Scratch is bounded:
//! two tiles, a tile of scores per head and the group's sums. In decode the
//! visible keys are split over `ATTN_SPLITS` units (NSA: each KV head's over
//! `ATTN_SPLITS / kv_heads`, `cpu_splits`) (flash-decoding); each writes its
//! partial softmax (max, sum, weighted values) to a scratch buffer, and a
//! second phase of units, one per (row, head), combines them. Prefill
//! without windows or NSA is flash-style: a unit takes a block of
//! `FLASH_ROWS` query rows, so each key tile is widened (and transposed) once
//! per block rather than once per row, and the block's (row, head) pairs are
//! scored two at a time against the transposed tile (each key vector loaded
//! once for both, no horizontal sums). Otherwise on the CPU: one unit per
//! (row, head), an online softmax accumulating into the output row. On
//! NVIDIA: a block of warps per (row, head), its lanes splitting the keys,
//! combined with warp shuffles and then across the warps in shared memory;
//! a decode row's keys are also split over up to `GPU_SPLITS` blocks per head
//! (flash-decoding), each writing its partial to scratch and taking a ticket
//! from the head's counter; the block with the last ticket combines them.
//!
//! Gated native sparse attention (`NsaGate::Fixed`, `Sigmoid`) runs each
//! branch with its own softmax and adds its share (gate weight / its sum):
//! the CPU split variant keeps a partial per branch (selected, window) and
//! adds the compressed branch (the block cache's compressed keys, `nsa.rs`)
//! where it writes the row; the other variants run the three in turn.

use super::kv_pre_rope::KeyBasis;
use super::kv_sequence::{Run, SeqCache};
use super::{fixed_last, KernelCtx, KernelSpec, GPU_ATTN_WARPS, VW, WARP};
use crate::error::CompileError;
use crate::mlir::builder::{Device, KernelBuilder, PrefetchTo, V};
use crate::mlir::math;
use sparsec_ir::{DType, NativeSparse, Op, Pattern, SymSize, Window};

/// How many keys ahead CPU attention prefetches its K and V rows: four tiles,
/// so the next tiles' lines are in flight while a tile's heads compute
/// (`cargo bench --bench kernels -- attention_memory`: 16 keys 898 µs, 64
/// keys 825 µs, 128 keys 784 µs on the AMD dev box).
const ATTN_PREFETCH_KEYS: u64 = 128;
/// Visible keys ahead whose cache row a `#nsa` key prefetches (its visible
/// keys jump between selected blocks, so the row `ATTN_PREFETCH_KEYS` on is
/// mostly one it never reads). SmolLM2 `nsa` at 8000 positions, AMD dev box,
/// attention and selection ms per decoded token: 64 keys 4.81, 128 4.9, 256
/// 5.2; the cache row 128 positions on (before): 5.4-6.3.
const NSA_PREFETCH_KEYS: u64 = 64;
/// Keys per tile of the CPU split variant: a tile's K and V rows, widened to
/// f32 (2·32·64·4 = 16 KiB at head width 64), stay in L1 while every head of
/// the group reads them.
const KEY_TILE: u64 = 32;
/// Query rows of one flash-style prefill unit (`Attn::flash_unit`).
const FLASH_ROWS: u64 = 16;
/// The most units one decode row's keys are split over, per KV head.
pub const ATTN_SPLITS: u64 = 8;
/// The fewest visible keys a decode row splits (into `ATTN_SPLITS` spans):
/// shorter rows are not worth a combine.
const SPLIT_MIN_KEYS: u64 = 256;
/// NVPTX: the most blocks one decode row's keys of one head are split over
/// (flash-decoding across blocks); each takes at least `GPU_SPLIT_KEYS` keys.
pub const GPU_SPLITS: u64 = 16;
/// NVPTX: the fewest keys a split block takes (one per lane of its warps).
const GPU_SPLIT_KEYS: u64 = GPU_ATTN_WARPS * WARP;
/// NVPTX: the split blocks of all heads together stay within one wave of
/// blocks on sm_90 (132 multiprocessors, one 256-thread block each at this
/// kernel's 174 registers per thread).
const GPU_WAVE_BLOCKS: u64 = 128;

/// Rows a windowed layer's ring cache holds beyond its window and sinks: the
/// most rows one call may append (the CPU runtime splits longer calls).
pub const RING_SLACK: u32 = 256;

/// An attention op's sliding window: `(size, sinks)`, `None` when full.
pub fn window_of(spec: &KernelSpec) -> Result<Option<(u32, u32)>, CompileError> {
    let mut window = None;
    for p in &spec.patterns {
        match p {
            Pattern::Window(Window::Full) => {}
            Pattern::Window(Window::Sliding { size, sinks }) => window = Some((*size, *sinks)),
            // Native sparse attention sees its own window (`Visible`).
            Pattern::Nsa(_) => {}
            // Keys cached before RoPE (`kv_pre_rope.rs`), caches factored per chunk (`kv_chunked.rs`).
            Pattern::Kv(sparsec_ir::KvCompression::PreRope { .. } | sparsec_ir::KvCompression::ChunkedSvd { .. }) => {}
            // Older blocks read low-pass (`kv_sequence.rs`), in either basis.
            Pattern::Kv(kv) if sparsec_ir::kv_sequence::SeqParams::of(kv).is_some() => {}
            other => return Err(spec.unsupported(&format!("#{} is not lowered yet (its pattern issue adds it)", other.keyword()))),
        }
    }
    Ok(window)
}

/// The CPU ring cache of a windowed attention: `(sinks, ring rows)`; key j
/// lives in row j below the sinks, else in row `sinks + (j - sinks) % ring`.
pub fn cpu_ring(window: Option<(u32, u32)>) -> Option<(u32, u32)> {
    window.map(|(size, sinks)| (sinks, size + RING_SLACK))
}

/// The CPU layout of an `#nsa` attention's caches: per block of the
/// selection's `block` positions and KV head (`HeadBlocks`), so that a unit,
/// which reads one KV head's selected blocks, streams each block's keys where
/// rows by position would give it a third of every row. For the split kernel
/// over f16 or f32 caches of keys after RoPE (`Attn::fused`); `None` otherwise.
/// Partition lays the caches out by it and hands it to the kernels
/// (`KernelSpec::cpu_head_blocks`).
pub fn cpu_head_blocks(spec: &KernelSpec) -> Option<sparsec_runtime::manifest::HeadBlocks> {
    let nsa = NativeSparse::of(&spec.patterns)?;
    let Op::Attention { kv_heads, .. } = spec.op else { return None };
    let kv = spec.operands.get(1)?.dtype;
    let fused =
        matches!(kv, DType::F16 | DType::F32) && !spec.hadamard_kv && !spec.kivi_keys && super::kv_pre_rope::pre_rope_of(spec).is_none();
    // A window's ring keeps rows by position.
    let ring = window_of(spec).ok().flatten().is_some();
    (fused && !ring && cpu_split(spec)).then_some(sparsec_runtime::manifest::HeadBlocks { block: nsa.block, heads: kv_heads })
}

/// In a cache kept per block and KV head (`HeadBlocks`, heads of width `d`),
/// the first element of row `j` for the KV head whose part of a row starts
/// at `khd` (a multiple of `d`): `(j / B)·B·heads·d + khd·B + (j % B)·d`.
pub(super) fn head_block_base(b: &mut KernelBuilder, hb: sparsec_runtime::manifest::HeadBlocks, d: u64, j: &str, khd: &str) -> V {
    let block = hb.block as u64;
    let (bc, bkvw, dc) = (b.index(block), b.index(block * hb.heads as u64 * d), b.index(d));
    let blk = b.divui(j, &bc);
    let start = b.muli(&blk, &bkvw);
    let head = b.muli(khd, &bc);
    let start = b.addi(&start, &head);
    let within = b.remui(j, &bc);
    let within = b.muli(&within, &dc);
    b.addi(&start, &within)
}

/// `(heads, kv_heads, head width)` of an attention kernel.
fn dims(spec: &KernelSpec) -> Result<(u64, u64, u64), CompileError> {
    let Op::Attention { heads, kv_heads } = spec.op else { return Err(spec.unsupported("not an attention op")) };
    let qw = fixed_last(spec, &spec.operands[0])?;
    Ok((heads as u64, kv_heads as u64, qw / (heads as u64).max(1)))
}

/// Whether the CPU kernel is the grouped, split variant (two phases of units
/// and a scratch buffer).
pub fn cpu_split(spec: &KernelSpec) -> bool {
    super::chunked_svd_of(spec).is_none() && dims(spec).is_ok_and(|(_, _, d)| d > 0 && d % VW as u64 == 0)
}

/// The most splits of a decode row's keys per KV head on the CPU: without
/// NSA a unit serves every KV head, so `ATTN_SPLITS` units take the row; NSA's
/// units take one KV head each, so `ATTN_SPLITS / kv_heads` (at least one)
/// split each head's keys, and the row's units stay about `ATTN_SPLITS`.
fn cpu_splits(spec: &KernelSpec, kvh: u64) -> u64 {
    if NativeSparse::of(&spec.patterns).is_some() {
        (ATTN_SPLITS / kvh.max(1)).max(1)
    } else {
        ATTN_SPLITS
    }
}

/// The CPU units of the split variant's first phase (partials), and of both
/// phases together: `(seq·kv_heads·splits, that + seq·heads)` (`cpu_splits`).
pub fn cpu_phases(spec: &KernelSpec) -> Result<(SymSize, SymSize), CompileError> {
    let (h, kvh, _) = dims(spec)?;
    let first = kvh * cpu_splits(spec, kvh);
    Ok((SymSize { coef: first, seq_pow: 1 }, SymSize { coef: first + h, seq_pow: 1 }))
}

/// f32 words of the split variants' scratch. CPU: per (KV head, split, head
/// of the group) a max, a sum and a head-width row of weighted values (decode
/// rows only). NVPTX (`emit_warp`): a ticket counter per head (first, at the
/// same place in every layer, so that every layer finds them zero), then per
/// (head, split) the same record. The larger of the two.
pub fn scratch_words(spec: &KernelSpec) -> Result<u64, CompileError> {
    let (h, kvh, d) = dims(spec)?;
    // A gated NSA keeps one per branch it reads from the caches.
    let branches = if NativeSparse::of(&spec.patterns).is_some_and(|n| n.gated()) { 2 } else { 1 };
    Ok((branches * kvh * ATTN_SPLITS * (h / kvh.max(1)) * (d + 2)).max(h + h * GPU_SPLITS * (d + 2)))
}

/// NVPTX blocks per head a decode row's keys are split over
/// (`emit_warp`): `GPU_SPLITS`, fewer where the heads' blocks would not fit
/// one wave; `None` for the chunked-SVD kernel (a block per (row, head)
/// always).
pub fn gpu_decode_splits(spec: &KernelSpec) -> Option<u64> {
    if super::chunked_svd_of(spec).is_some() {
        return None;
    }
    let (h, _, _) = dims(spec).ok()?;
    Some(decode_splits(h))
}

/// What one NVPTX attention block runs (`Attn::emit_warp`): split `sp` of a
/// row's visible keys split `n` ways (`n` is 1 outside decode), or gated
/// NSA's three branches (one block per (row, head); the index value is where
/// the window's keys start).
enum BlockWork {
    Split(V),
    Branches(V),
}

/// `GPU_SPLITS`, at most `GPU_WAVE_BLOCKS` blocks over `h` heads, at least one.
fn decode_splits(h: u64) -> u64 {
    GPU_SPLITS.min(GPU_WAVE_BLOCKS / h.max(1)).max(1)
}

/// NVPTX: how the block's `GPU_ATTN_WARPS` partial softmaxes (max at
/// `k·part`, sum at `k·part + 1` of the shared array `smem`) combine: each
/// warp's weight `exp(m_k − max)` and the total `Σ l_k·weight_k`.
/// Also returns that max (the block's).
pub(super) fn partial_weights(b: &mut KernelBuilder, smem: &str, part: u64) -> (Vec<V>, V, V) {
    let ms: Vec<V> = (0..GPU_ATTN_WARPS)
        .map(|k| {
            let at = b.index(k * part);
            b.load_shared(smem, &at)
        })
        .collect();
    let mut mx = ms[0].clone();
    for mk in &ms[1..] {
        mx = b.fbin("maxnumf", &mx, mk);
    }
    let mut total = b.f32(0.0);
    let ws = ms
        .iter()
        .enumerate()
        .map(|(k, mk)| {
            let dk = b.sub(mk, &mx);
            let wk = math::exp(b, &dk);
            let at = b.index(k as u64 * part + 1);
            let lk = b.load_shared(smem, &at);
            total = b.fma(&lk, &wk, &total);
            wk
        })
        .collect();
    (ws, total, mx)
}

/// One key of an online softmax with running max `m` and sum `l`, its score
/// `s`: the new max and sum, the factor rescaling what was summed before,
/// and the key's weight.
pub(super) fn online_step(b: &mut KernelBuilder, m: &str, l: &str, s: &str) -> (V, V, V, V) {
    let m_new = b.fbin("maxnumf", m, s);
    let dm = b.sub(m, &m_new);
    let corr = math::exp(b, &dm);
    let ds = b.sub(s, &m_new);
    let pr = math::exp(b, &ds);
    let l_new = b.fma(l, &corr, &pr);
    (m_new, l_new, corr, pr)
}

/// A gated NSA's branches, as they index the gate (`NativeSparse`).
const BR_COMPRESSED: u64 = 0;
const BR_SELECTED: u64 = 1;
const BR_WINDOW: u64 = 2;

/// What a query row sees: keys are numbered `t in 0..count`, the first
/// `sinks` of them at positions `0..sinks`, the rest at `from + (t - sinks)`;
/// under `#nsa` the selected blocks come between the sinks and the window.
struct Visible {
    sinks: V,
    from: V,
    count: V,
    /// `#nsa`: where the row's selected block indices start in the selection
    /// buffer, and how many keys the selected blocks hold.
    selected: Option<(V, V)>,
    /// Gated `#nsa`: keys `0..branch` (sinks and selected blocks) are the
    /// selected branch, the rest the window branch.
    branch: Option<V>,
    /// `#kv(axis = sequence)`: the low-pass rows read, between the `sinks`
    /// and the recent positions (`from..=p`).
    low: Option<V>,
}

/// Where the keys of a tile of the CPU split variant's f32 or f16 caches are
/// read from: the K and V caches (or views of them), whether they hold f16,
/// the last element a prefetch may reach, and a constant added to every
/// score (the low-pass rows of `#kv(axis = sequence)`).
struct KeySource {
    k: V,
    v: V,
    half: bool,
    last: V,
    bonus: Option<V>,
}

/// A run of a split's visible keys that one `KeySource` holds: its source,
/// its visible keys `lo..hi`, and the cache row of a visible key.
type KeyRun<'a> = (KeySource, V, V, Box<dyn Fn(&mut KernelBuilder, &str) -> V + 'a>);

/// `VW` values at `buf[i..]` of a cache (or view) of f16 (`half`, widened) or f32.
fn vload_cache(b: &mut KernelBuilder, buf: &str, i: &str, half: bool) -> V {
    if half {
        b.vload_f16(buf, i, VW)
    } else {
        b.vload(buf, i, VW)
    }
}

/// The value at `buf[i]` of a cache (or view) of f16 (`half`, widened) or f32.
fn load_cache(b: &mut KernelBuilder, buf: &str, i: &str, half: bool) -> V {
    if half {
        b.load_f16(buf, i)
    } else {
        b.load(buf, i)
    }
}

/// `out[r, head]` = softmax(q·kᵀ/√d)·v over the keys row r sees.
pub(super) fn emit_attention(b: &mut KernelBuilder, cx: &KernelCtx<'_>, heads: u32, kv_heads: u32) -> Result<(), CompileError> {
    let KernelCtx { spec, device, ins, .. } = *cx;
    let window = window_of(spec)?;
    let (h, kvh, d) = dims(spec)?;
    if heads == 0 || kv_heads == 0 || h % kvh != 0 {
        return Err(spec.unsupported("heads must be a positive multiple of kv_heads"));
    }
    // Compressed caches have kernels of their own.
    if super::chunked_svd_of(spec).is_some() {
        return super::kv_chunked::emit(b, cx, (h, kvh, d));
    }
    // Sequence-axis caches: read in runs (`kv_sequence.rs`) by the CPU split
    // variant and the NVPTX kernel.
    let sequence = if super::has_sequence_kv(spec) { Some(super::kv_sequence::caches(b, cx, (kvh, d))?) } else { None };
    // f16 caches (`KvCacheType::F16`) are read as f16 views of byte
    // buffers (NVPTX: f16 pointers) and widened to f32 as they load;
    // block-quantized ones (`kv_quant.rs`, CPU) are dequantized a block of 32
    // at a time into the key tiles of the split variant.
    let kv = spec.operands[1].dtype;
    if !matches!(kv, DType::F32 | DType::F16) && device != Device::Cpu {
        return Err(spec.unsupported(&format!("{} KV caches are read on the CPU only", kv.name())));
    }
    let hadamard = spec.hadamard_kv;
    if hadamard && (!kv.is_quantized() || !d.is_power_of_two()) {
        return Err(spec.unsupported("Hadamard-rotated caches are block-quantized, of power-of-two heads"));
    }
    let key_basis = KeyBasis::new(spec, ins.get(3), d)?;
    if let Some(kb) = &key_basis {
        if hadamard || (device == Device::Cpu && !(cpu_split(spec) && kb.cpu_ok())) {
            return Err(spec.unsupported(&format!(
                "#kv(pre_rope) attention runs on the CPU for head widths that are a multiple of 8 (not {d}), without --kv-hadamard"
            )));
        }
        if !super::kv_pre_rope::coefficient_cache_ok(kv, kb.r) {
            return Err(spec.unsupported(&format!(
                "{} caches of #kv(pre_rope) need a rank that is a multiple of 32, not {}",
                kv.name(),
                kb.r
            )));
        }
    }
    // The K cache's row width per KV head: its coefficients under #kv(pre_rope).
    let kw = key_basis.as_ref().map_or(d, |kb| kb.r);
    let quant = if kv.is_quantized() {
        if !cpu_split(spec) || d % sparsec_ir::quant::QK as u64 != 0 {
            return Err(spec.unsupported(&format!("{} KV caches need a head width that is a multiple of 32, not {d}", kv.name())));
        }
        let rows = |b: &mut KernelBuilder, buf: &str, w: u64| super::kv_quant::QuantRows::new(b, kv, buf, kvh * w);
        match (rows(b, &ins[1], kw), rows(b, &ins[2], d)) {
            (Some(k), Some(v)) => Some((k, v)),
            _ => return Err(spec.unsupported(&format!("{} KV caches of width {}", kv.name(), kvh * d))),
        }
    } else {
        None
    };
    let kivi = if spec.kivi_keys {
        if quant.is_none() || key_basis.is_some() {
            return Err(spec.unsupported("--kv-kivi reads a block-quantized K cache without #kv(pre_rope)"));
        }
        Some(super::kv_kivi::KiviKeys::new(b, &ins[1], kvh * d))
    } else {
        None
    };
    let (kbuf, vbuf) = match (&sequence, kv) {
        (Some(sq), _) => (sq.k.halves.clone(), sq.v.halves.clone()),
        (None, DType::F16) => (b.f16_param(&ins[1]), b.f16_param(&ins[2])),
        (None, _) => (ins[1].clone(), ins[2].clone()),
    };
    // Under `#nsa` the selection (`nsa.rs`) follows q, k and v; gated, the
    // gate comes before it and the block cache after it.
    let operand = |i: usize| ins.get(i).cloned().ok_or_else(|| spec.unsupported("#nsa attention lacks its gate, selection or blocks"));
    let (nsa, gate, blocks) = match NativeSparse::of(&spec.patterns) {
        Some(n) if n.gated() => (Some((n, operand(4)?)), Some((n.gate, operand(3)?)), Some(operand(5)?)),
        Some(n) => (Some((n, operand(3)?)), None, None),
        None => (None, None, None),
    };
    let ctx = Attn {
        h,
        kvh,
        d,
        window,
        ring: if device == Device::Cpu { cpu_ring(window) } else { None },
        kv,
        quant,
        hadamard,
        kbuf,
        vbuf,
        nsa,
        gate,
        blocks,
        key_basis,
        kivi,
        head_blocks: if device == Device::Cpu { spec.cpu_head_blocks } else { None },
        sequence,
    };
    if ctx.head_blocks.is_some() && !(ctx.fused() && cpu_split(spec) && ctx.nsa.is_some()) {
        return Err(spec.unsupported("caches kept per block and KV head are read by the split kernel of #nsa over f16 or f32 caches"));
    }
    match device {
        Device::Cpu if cpu_split(spec) => ctx.emit_split(b, cx),
        Device::Cpu => ctx.emit_online(b, cx),
        // Calls of more than one row on tensor cores where the attention is
        // plain (`attention_mma`); decode rows, and the rest, a block per
        // (row, head).
        Device::Nvptx => match super::attention_mma::flash_dims(spec) {
            Some(dims) => {
                let (seq, one) = (b.seq(), b.index(1));
                let rows = b.def(format!("arith.cmpi ugt, {seq}, {one} : index"));
                let mut warp = Ok(());
                b.if_else(
                    &rows,
                    |b| super::attention_mma::emit_flash(b, dims, &ins[0], &ctx.kbuf, &ctx.vbuf, cx.out),
                    |b| warp = ctx.emit_warp(b, cx),
                );
                warp
            }
            None => ctx.emit_warp(b, cx),
        },
    }
}

/// The CPU split variant's key tile: K and V rows widened to f32, and a row
/// of scores.
struct TileMem {
    k: V,
    v: V,
    /// Scores: `KEY_TILE` per head of a KV group, at least two (the flash
    /// pair uses two; the split variant one per head of the group).
    s: V,
    /// The K tile transposed (`d × KEY_TILE`, feature-major), for the flash pair.
    kt: V,
    /// `#kv(pre_rope)`: a key's coefficients and the tile's angles (`KeyBasis::scratch_words`).
    rope: Option<V>,
    /// `#nsa` over f16/f32 caches: where each key of the tile starts in the
    /// caches for the unit's KV head (`KEY_TILE` element indices, `row_base`),
    /// its row looked up in the selection once per key; then as many starts
    /// of the rows `NSA_PREFETCH_KEYS` visible keys on, to prefetch.
    rows: Option<V>,
}

/// One query head of a KV group in the split variant's tile step: its query
/// (vectors of `VW`), running max and sum, and where its weighted values start.
struct TileHead {
    q: Vec<V>,
    ml: (V, V),
    ab: V,
}

/// The flash-style prefill's running state for a block of `FLASH_ROWS`
/// rows: per (row, head of the group) the max and the sum, and the weighted
/// values (a head width each).
struct FlashMem {
    m: V,
    l: V,
    acc: V,
}

struct Attn {
    h: u64,
    kvh: u64,
    d: u64,
    window: Option<(u32, u32)>,
    ring: Option<(u32, u32)>,
    /// The caches' element type.
    kv: DType,
    /// Block-quantized K and V caches.
    quant: Option<(super::kv_quant::QuantRows, super::kv_quant::QuantRows)>,
    /// The caches hold each head Hadamard-rotated (`KernelSpec::hadamard_kv`).
    hadamard: bool,
    kbuf: V,
    vbuf: V,
    /// `#nsa` and its selection buffer.
    nsa: Option<(NativeSparse, V)>,
    /// Gated `#nsa`: how the gate reads, and its buffer.
    gate: Option<(sparsec_ir::NsaGate, V)>,
    /// Gated `#nsa`: the block cache (compressed keys and values).
    blocks: Option<V>,
    /// `#kv(pre_rope)`: the K cache holds coefficients before RoPE.
    key_basis: Option<KeyBasis>,
    /// `--kv-kivi`: the K cache is quantized per channel.
    kivi: Option<super::kv_kivi::KiviKeys>,
    /// CPU: the caches are kept per block and KV head (`cpu_head_blocks`).
    head_blocks: Option<sparsec_runtime::manifest::HeadBlocks>,
    /// `#kv(axis = sequence)`: its layout and views of the exact and low-pass rows (`kv_sequence.rs`).
    sequence: Option<SeqCache>,
}

impl Attn {
    /// The first cache element of row `j` (an index value) for the KV head
    /// whose part of a row starts at `khd`: `j·kvh·d + khd` by rows, or, kept
    /// per block and KV head, `(j / B)·B·kvh·d + khd·B + (j % B)·d`.
    fn row_base(&self, b: &mut KernelBuilder, j: &str, khd: &str) -> V {
        match self.head_blocks {
            None => {
                let kvw = b.index(self.kvh * self.d);
                let rb = b.muli(j, &kvw);
                b.addi(&rb, khd)
            }
            Some(hb) => head_block_base(b, hb, self.d, j, khd),
        }
    }

    /// The gate's weight of `branch` for `head` at row `row` of the call.
    fn gate_weight(&self, b: &mut KernelBuilder, row: &str, head: &str, branch: u64) -> V {
        let Some((kind, buf)) = &self.gate else { return b.f32(1.0) };
        let three = b.index(3);
        let hb = b.muli(head, &three);
        let o = b.index(branch);
        let hb = b.addi(&hb, &o);
        match kind {
            sparsec_ir::NsaGate::Sigmoid => {
                let w = b.index(3 * self.h);
                let at = b.muli(row, &w);
                let at = b.addi(&at, &hb);
                let x = b.load(buf, &at);
                math::sigmoid(b, &x)
            }
            _ => b.load(buf, &hb),
        }
    }

    /// `w / l`, or 0 where the branch saw no keys (`l` = 0).
    fn branch_factor(b: &mut KernelBuilder, w: &str, l: &str) -> V {
        let zero = b.f32(0.0);
        let some = b.def(format!("arith.cmpf ogt, {l}, {zero} : f32"));
        let f = b.div(w, l);
        b.def(format!("arith.select {some}, {f}, {zero} : f32"))
    }

    /// Where KV head `kh`'s compressed key of block `j` starts in the block
    /// cache (its compressed value follows `d` later).
    fn compressed_base(&self, b: &mut KernelBuilder, kh: &str, j: &str) -> V {
        let (n, slabs, compressed) =
            self.nsa.as_ref().map_or((0, 0, 0), |(n, _)| (n.block_words(self.kvh * self.d), n.block_slabs(), n.compressed_slab()));
        let rowc = b.index(n);
        let segc = b.index(slabs * self.d);
        let seg = b.muli(kh, &segc);
        let rb = b.muli(j, &rowc);
        let ck = b.index(compressed * self.d);
        let at = b.addi(&rb, &seg);
        b.addi(&at, &ck)
    }

    /// The blocks whole at or before position `p`: the compressed branch's keys.
    fn compressed_count(&self, b: &mut KernelBuilder, p: &str) -> V {
        let block = self.nsa.as_ref().map_or(1, |(n, _)| n.block as u64);
        let one = b.index(1);
        let end = b.addi(p, &one);
        let bc = b.index(block);
        b.divui(&end, &bc)
    }

    /// CPU, vectors of `VW`: adds the compressed branch of `head` (query at
    /// `qbase` of `q`, position `p`, row `row`) times its gate weight to the
    /// output row at `qbase`: an online softmax over the blocks' compressed
    /// keys, in f32 from the block cache.
    #[allow(clippy::too_many_arguments)]
    fn add_compressed_vec(&self, b: &mut KernelBuilder, p: &str, kh: &str, row: &str, head: &str, qbase: &str, q: &str, out: &str) {
        let Some(blocks) = self.blocks.clone() else { return };
        let nv = (self.d / VW as u64) as usize;
        let vty = KernelBuilder::vty(VW);
        let qs: Vec<V> = (0..nv)
            .map(|v| {
                let o = b.index(v as u64 * VW as u64);
                let i = b.addi(qbase, &o);
                b.vload(q, &i, VW)
            })
            .collect();
        let zero_i = b.index(0);
        let nb = self.compressed_count(b, p);
        let (zero, ninf) = (b.f32(0.0), b.f32(-1e30));
        let scale = b.f32(1.0 / (self.d as f32).sqrt());
        let z = b.vzero(VW);
        let mut init: Vec<(V, String)> = vec![(ninf, "f32".into()), (zero, "f32".into())];
        init.extend((0..nv).map(|_| (z.clone(), vty.clone())));
        let dc = b.index(self.d);
        let acc = b.for_fold_typed(&zero_i, &nb, 1, &init, |b, j, acc| {
            let kb = self.compressed_base(b, kh, j);
            let vb = b.addi(&kb, &dc);
            let mut dot = b.vzero(VW);
            for (v, qv) in qs.iter().enumerate() {
                let o = b.index(v as u64 * VW as u64);
                let i = b.addi(&kb, &o);
                let k = b.vload(&blocks, &i, VW);
                dot = b.vfma(qv, &k, &dot, VW);
            }
            let dsum = b.vsum(&dot, VW);
            let sv = b.mul(&dsum, &scale);
            let (m_new, l_new, corr, pr) = online_step(b, &acc[0], &acc[1], &sv);
            let mut next = vec![m_new, l_new];
            let (cv, pv) = (b.vbroadcast(&corr, VW), b.vbroadcast(&pr, VW));
            for v in 0..nv {
                let o = b.index(v as u64 * VW as u64);
                let i = b.addi(&vb, &o);
                let x = b.vload(&blocks, &i, VW);
                let a = b.def(format!("arith.mulf {}, {cv} : {vty}", acc[2 + v]));
                next.push(b.vfma(&pv, &x, &a, VW));
            }
            next
        });
        let w = self.gate_weight(b, row, head, BR_COMPRESSED);
        let f = Self::branch_factor(b, &w, &acc[1]);
        let fv = b.vbroadcast(&f, VW);
        for v in 0..nv {
            let o = b.index(v as u64 * VW as u64);
            let i = b.addi(qbase, &o);
            let prev = b.vload(out, &i, VW);
            let y = b.vfma(&fv, &acc[2 + v], &prev, VW);
            b.vstore(&y, out, &i, VW);
        }
    }

    /// A head's output row (vectors of `VW`) back from the rotated space
    /// (the rotation is its own inverse); as is without rotation.
    fn unrotate(&self, b: &mut KernelBuilder, ys: Vec<V>) -> Vec<V> {
        if self.hadamard {
            super::kv_quant::hadamard(b, &ys)
        } else {
            ys
        }
    }

    /// The element type of the `kbuf` and `vbuf` memrefs.
    fn kv_elem(&self) -> &'static str {
        match self.kv {
            DType::F16 => "f16",
            DType::F32 => "f32",
            _ => "i8",
        }
    }

    /// `VW` values of an f32 or f16 cache (`quant` caches load by blocks).
    fn kv_vload(&self, b: &mut KernelBuilder, buf: &str, i: &str) -> V {
        vload_cache(b, buf, i, self.kv == DType::F16)
    }

    fn kv_load(&self, b: &mut KernelBuilder, buf: &str, i: &str) -> V {
        load_cache(b, buf, i, self.kv == DType::F16)
    }

    /// NVPTX: a warp's partial softmax (max `m`, sum `l`, values `sums`) at
    /// `base` of the block's shared array.
    fn store_partial(b: &mut KernelBuilder, smem: &str, base: &str, m: &str, l: &str, sums: &[V]) {
        b.store_shared(m, smem, base);
        for (c, y) in std::iter::once(l).chain(sums.iter().map(|s| s.as_str())).enumerate() {
            let o = b.index(1 + c as u64);
            let at = b.addi(base, &o);
            b.store_shared(y, smem, &at);
        }
    }

    /// NVPTX: the `d` values of an f32 row (the block cache) starting at
    /// element `base`, as f32 scalars, one load each.
    fn f32_row_nvptx(&self, b: &mut KernelBuilder, buf: &str, base: &str) -> Vec<V> {
        (0..self.d)
            .map(|c| {
                let o = b.index(c);
                let i = b.addi(base, &o);
                b.load(buf, &i)
            })
            .collect()
    }

    /// NVPTX: the `d` values of a cache row (f16 where `half`) starting at
    /// element `base`, as f32 scalars: 16-byte vector loads (8 f16 or 4 f32)
    /// where `d` is a multiple of their width (rows then start 16-byte
    /// aligned), else one load per value.
    fn kv_row_nvptx(&self, b: &mut KernelBuilder, buf: &str, base: &str, half: bool) -> Vec<V> {
        let (elem, width) = if half { ("f16", 8u64) } else { ("f32", 4u64) };
        if !self.d.is_multiple_of(width) {
            return (0..self.d)
                .map(|c| {
                    let o = b.index(c);
                    let i = b.addi(base, &o);
                    load_cache(b, buf, &i, half)
                })
                .collect();
        }
        let mut out = Vec::with_capacity(self.d as usize);
        for chunk in 0..self.d / width {
            let o = b.index(chunk * width);
            let i = b.addi(base, &o);
            let i = b.def(format!("arith.index_cast {i} : index to i64"));
            let p = b.def(format!("llvm.getelementptr inbounds {buf}[{i}] : (!llvm.ptr, i64) -> !llvm.ptr, {elem}"));
            let raw = b.def(format!("llvm.load {p} {{alignment = 16 : i64}} : !llvm.ptr -> vector<{width}x{elem}>"));
            let v = if half { b.def(format!("arith.extf {raw} : vector<{width}xf16> to vector<{width}xf32>")) } else { raw };
            for l in 0..width as i32 {
                let li = b.i32(l);
                out.push(b.def(format!("llvm.extractelement {v}[{li} : i32] : vector<{width}xf32>")));
            }
        }
        out
    }

    /// NVPTX, `#kv(axis = sequence)`: visible key `tk`'s K and V rows (its KV
    /// head's part from `khd`) and what its score gains: a low-pass row
    /// (f16, ln(block/m)) or a sink's or recent position's exact row (f32, 0).
    fn sequence_key_nvptx(&self, b: &mut KernelBuilder, sq: &SeqCache, vis: &Visible, tk: &str, khd: &str) -> (Vec<V>, Vec<V>, Option<V>) {
        let zero = b.index(0);
        let low = vis.low.clone().unwrap_or(zero);
        let low_end = b.addi(&vis.sinks, &low);
        let past_sinks = b.def(format!("arith.cmpi uge, {tk}, {} : index", vis.sinks));
        let before_recent = b.def(format!("arith.cmpi ult, {tk}, {low_end} : index"));
        let in_low = b.def(format!("arith.andi {past_sinks}, {before_recent} : i1"));
        let width = b.index(sq.l.width as u64);
        let d = self.d as usize;
        let tys = vec!["f32"; 2 * d + 1];
        let row_at = |b: &mut KernelBuilder, row: &str| {
            let at = b.muli(row, &width);
            b.addi(&at, khd)
        };
        let out = b.if_else_yield(
            &in_low,
            &tys,
            |b| {
                let u = b.def(format!("arith.subi {tk}, {} : index", vis.sinks));
                let row = sq.view_row(b, Run::LowPass, &u);
                let base = row_at(b, &row);
                let mut out = self.kv_row_nvptx(b, &sq.k.halves, &base, true);
                out.extend(self.kv_row_nvptx(b, &sq.v.halves, &base, true));
                out.push(b.f32(sq.l.bonus()));
                out
            },
            |b| {
                // A recent key's position: `from` on past the low-pass rows
                // (computed for the sinks too, and not used there).
                let u = b.def(format!("arith.subi {tk}, {low_end} : index"));
                let u = b.addi(&u, &vis.from);
                let recent = sq.view_row(b, Run::Recent, &u);
                let row = b.def(format!("arith.select {past_sinks}, {recent}, {tk} : index"));
                let base = row_at(b, &row);
                let mut out = self.kv_row_nvptx(b, &sq.k.exact, &base, false);
                out.extend(self.kv_row_nvptx(b, &sq.v.exact, &base, false));
                out.push(b.f32(0.0));
                out
            },
        );
        (out[..d].to_vec(), out[d..2 * d].to_vec(), Some(out[2 * d].clone()))
    }

    /// The keys the query at position `p` (row `row` of the call) sees from
    /// KV head `kh` (the caches hold positions `0..=p` by then: the runtime
    /// appends a call's rows before attention).
    fn visible(&self, b: &mut KernelBuilder, p: &str, row: &str, kh: &str) -> Visible {
        let zero = b.index(0);
        let one = b.index(1);
        let end = b.addi(p, &one);
        let (size, sinks) = match (self.window, &self.nsa) {
            (_, Some((n, _))) => (n.window, n.sinks),
            (Some(w), None) => w,
            (None, None) => {
                if let Some(sq) = &self.sequence {
                    // Sinks, low-pass rows, recent positions.
                    let r = sq.runs_at(b, p);
                    let recent = b.sub_or_zero(&r.recent.1, &r.recent.0);
                    let count = b.addi(&r.sinks_end, &r.low_rows);
                    let count = b.addi(&count, &recent);
                    return Visible { sinks: r.sinks_end, from: r.recent.0, count, selected: None, branch: None, low: Some(r.low_rows) };
                }
                return Visible { sinks: zero.clone(), from: zero, count: end, selected: None, branch: None, low: None };
            }
        };
        let size = b.index(size as u64);
        let from = b.sub_or_zero(&end, &size);
        // Sinks are the positions below both `sinks` and the window.
        let s = b.index(sinks as u64);
        let sinks = b.minui(&s, &from);
        let span = b.def(format!("arith.subi {end}, {from} : index"));
        let count = b.addi(&sinks, &span);
        let selected = self.nsa.as_ref().map(|(n, sel)| {
            let kvhc = b.index(self.kvh);
            let a = b.muli(row, &kvhc);
            let a = b.addi(&a, kh);
            let words = b.index(n.select_words_per_head());
            let o = b.muli(&a, &words);
            let taken = b.load(sel, &o);
            let taken = b.f32_to_index(&taken);
            let blk = b.index(n.block as u64);
            let keys = b.muli(&taken, &blk);
            let first = b.addi(&o, &one);
            (first, keys)
        });
        let count = match &selected {
            Some((_, keys)) => b.addi(&count, keys),
            None => count,
        };
        let branch = match (&self.gate, &selected) {
            (Some(_), Some((_, keys))) => Some(b.addi(&sinks, keys)),
            _ => None,
        };
        Visible { sinks, from, count, selected, branch, low: None }
    }

    /// The cache row holding visible key `t` (its position, wrapped into the
    /// ring on the CPU when the layer has a window).
    fn key_row(&self, b: &mut KernelBuilder, vis: &Visible, t: &str) -> V {
        if let (Some((n, sel)), Some((first, keys))) = (&self.nsa, &vis.selected) {
            // Sinks, then the selected blocks' keys, then the window.
            let in_sinks = b.def(format!("arith.cmpi ult, {t}, {} : index", vis.sinks));
            let u = b.def(format!("arith.subi {t}, {} : index", vis.sinks));
            let in_sel = b.def(format!("arith.cmpi ult, {u}, {keys} : index"));
            let blk = b.index(n.block as u64);
            let k = b.divui(&u, &blk);
            let lastk = b.index(n.top_n as u64 - 1);
            let k = b.minui(&k, &lastk);
            let at = b.addi(first, &k);
            let bi = b.load(sel, &at);
            let bi = b.f32_to_index(&bi);
            let off = b.remui(&u, &blk);
            let base = b.muli(&bi, &blk);
            let in_block = b.addi(&base, &off);
            let w = b.def(format!("arith.subi {u}, {keys} : index"));
            let in_window = b.addi(&vis.from, &w);
            let later = b.def(format!("arith.select {in_sel}, {in_block}, {in_window} : index"));
            return b.def(format!("arith.select {in_sinks}, {t}, {later} : index"));
        }
        if self.window.is_none() {
            return t.to_string();
        }
        let in_sinks = b.def(format!("arith.cmpi ult, {t}, {} : index", vis.sinks));
        let off = b.def(format!("arith.subi {}, {} : index", vis.from, vis.sinks));
        let later = b.addi(t, &off);
        let j = b.def(format!("arith.select {in_sinks}, {t}, {later} : index"));
        match self.ring {
            None => j,
            Some((sinks, ring)) => {
                let s = b.index(sinks as u64);
                let r = b.index(ring as u64);
                let below = b.def(format!("arith.cmpi ult, {j}, {s} : index"));
                let past = b.def(format!("arith.subi {j}, {s} : index"));
                let wrapped = b.remui(&past, &r);
                let slot = b.addi(&s, &wrapped);
                b.def(format!("arith.select {below}, {j}, {slot} : index"))
            }
        }
    }

    /// The runs of visible keys `lo..hi` a split reads, each from one
    /// `KeySource` (clamped to it; empty runs stay, with no keys): the
    /// caches (`kv_last` their last element) and `key_row`, or under
    /// `#kv(axis = sequence)` the sinks' and recent positions' exact rows
    /// and between them the low-pass rows, whose scores are raised by
    /// ln(block/m).
    fn key_runs<'a>(&'a self, b: &mut KernelBuilder, vis: &'a Visible, (lo, hi): (&str, &str), kv_last: &str) -> Vec<KeyRun<'a>> {
        let (Some(sq), Some(low)) = (&self.sequence, &vis.low) else {
            let src = KeySource {
                k: self.kbuf.clone(),
                v: self.vbuf.clone(),
                half: self.kv == DType::F16,
                last: kv_last.to_string(),
                bonus: None,
            };
            return vec![(src, lo.to_string(), hi.to_string(), Box::new(move |b: &mut KernelBuilder, t: &str| self.key_row(b, vis, t)))];
        };
        let zero = b.index(0);
        let low_end = b.addi(&vis.sinks, low);
        let exact_len = b.def(format!("memref.dim {}, {zero} : memref<?xf32>", sq.k.exact));
        let one = b.index(1);
        let exact_last = b.def(format!("arith.subi {exact_len}, {one} : index"));
        let bonus = b.f32(sq.l.bonus());
        let runs = [
            (Run::Sinks, zero.clone(), vis.sinks.clone(), zero.clone()),
            (Run::LowPass, vis.sinks.clone(), low_end.clone(), zero),
            (Run::Recent, low_end, vis.count.clone(), vis.from.clone()),
        ];
        runs.into_iter()
            .map(|(run, a, end, first)| {
                let half = run == Run::LowPass;
                let (k, v) = sq.bufs(run);
                let last = if half { kv_last.to_string() } else { exact_last.clone() };
                let src = KeySource { k: k.clone(), v: v.clone(), half, last, bonus: half.then(|| bonus.clone()) };
                let clamp = |b: &mut KernelBuilder, x: &str| {
                    let x = b.maxui(x, &a);
                    b.minui(&x, &end)
                };
                let (rlo, rhi) = (clamp(b, lo), clamp(b, hi));
                // Visible key t is key `t - a` of the run (from `first`).
                let row_of = move |b: &mut KernelBuilder, t: &str| {
                    let u = b.def(format!("arith.subi {t}, {a} : index"));
                    let u = b.addi(&u, &first);
                    sq.view_row(b, run, &u)
                };
                (src, rlo, rhi, Box::new(row_of) as Box<dyn Fn(&mut KernelBuilder, &str) -> V + 'a>)
            })
            .collect()
    }

    /// Splits of a row's visible keys: `most` (`cpu_splits`) in decode (one
    /// row) with at least `SPLIT_MIN_KEYS` keys, else one. Always all of them,
    /// so that every unit of the first phase has work and the runtime's even
    /// ranges of units are even ranges of work.
    fn splits(&self, b: &mut KernelBuilder, count: &str, most: u64) -> V {
        let one = b.index(1);
        let seq = b.seq();
        let min_keys = b.index(SPLIT_MIN_KEYS);
        let most = b.index(most);
        let long = b.def(format!("arith.cmpi uge, {count}, {min_keys} : index"));
        let decode = b.def(format!("arith.cmpi eq, {seq}, {one} : index"));
        let split = b.def(format!("arith.andi {long}, {decode} : i1"));
        b.def(format!("arith.select {split}, {most}, {one} : index"))
    }

    /// Row `i` of the units' row order 0, seq-1, 1, seq-2, ...: causal rows
    /// cost more the later they are, and the runtime gives each thread a
    /// contiguous range of units, so every range costs about the same.
    fn mirrored_row(b: &mut KernelBuilder, i: &str) -> V {
        let seq = b.seq();
        Self::mirrored(b, i, &seq)
    }

    /// CPU split variant: widens keys `tb..tb + nk` of KV head part `khd`
    /// (cache rows from `row_of`) into the tile's K and V rows, in f32; the
    /// caches are read from memory, so rows ahead are prefetched (clamped to
    /// the caches' last element `kv_last`).
    #[allow(clippy::too_many_arguments)]
    fn widen_tile(
        &self,
        b: &mut KernelBuilder,
        t: &TileMem,
        tb: &str,
        nk: &str,
        khd: &str,
        kv_last: &str,
        row_of: &dyn Fn(&mut KernelBuilder, &str) -> V,
    ) {
        let d = self.d;
        let kvw = self.kvh * d;
        let nv = (d / VW as u64) as usize;
        let (zero_i, dc) = (b.index(0), b.index(d));
        let (ktile, vtile) = (&t.k, &t.v);
        // Keys before RoPE: the tile's angles (its keys are consecutive positions).
        let pre_rope = self.key_basis.as_ref().zip(t.rope.as_ref());
        if let Some((kb, mem)) = pre_rope {
            kb.tile_start(b, mem, tb);
        }
        let kh = pre_rope.map(|_| b.divui(khd, &dc));
        let nq = self.kivi.as_ref().map(|k| k.quantized_keys(b));
        b.for_each(&zero_i, nk, |b, i| {
            let tk = b.addi(tb, i);
            let j = row_of(b, &tk);
            // The cache row to prefetch: ATTN_PREFETCH_KEYS rows on, or under
            // `#nsa` (whose visible keys jump between selected blocks) the row
            // of the visible key that many keys on.
            let (ahead_row, ahead) = match &self.nsa {
                Some(_) => {
                    let n = b.index(NSA_PREFETCH_KEYS);
                    let ta = b.addi(&tk, &n);
                    (Some(row_of(b, &ta)), 0)
                }
                None => (None, ATTN_PREFETCH_KEYS),
            };
            let ahead_row = ahead_row.as_ref().unwrap_or(&j);
            let at = b.muli(i, &dc);
            if let Some((qk, qv)) = &self.quant {
                // Blocks of 32 of the head's part of the row, dequantized.
                if let Some(kivi) = &self.kivi {
                    kivi.prefetch(b, &j, ATTN_PREFETCH_KEYS / sparsec_ir::kv_channel::GROUP as u64, kv_last);
                }
                // The blocks of this KV head's part of the row ahead: its
                // quants and its scales (each group's pass its own; the row
                // start alone, before, left most of a row's lines to the
                // hardware prefetcher).
                let rows: &[&super::kv_quant::QuantRows] = if self.kivi.is_some() { &[qv] } else { &[qk, qv] };
                let qkc = b.index(sparsec_ir::quant::QK as u64);
                let blk0 = b.divui(khd, &qkc);
                for q in rows {
                    q.prefetch_blocks(b, ahead_row, ahead, (&blk0, d / sparsec_ir::quant::QK as u64), kv_last);
                }
                for c in 0..d / sparsec_ir::quant::QK as u64 {
                    let ci = b.index(c);
                    let blk = b.addi(&blk0, &ci);
                    let o = b.index(c * sparsec_ir::quant::QK as u64);
                    let dst = b.addi(&at, &o);
                    let sixteen = b.index(16);
                    let dst2 = b.addi(&dst, &sixteen);
                    let keys_apart = pre_rope.is_some() || self.kivi.is_some();
                    let pairs: &[(&super::kv_quant::QuantRows, &V)] = if keys_apart { &[(qv, vtile)] } else { &[(qk, ktile), (qv, vtile)] };
                    for (q, tile) in pairs {
                        let (lo, hi) = q.load_block(b, &j, &blk);
                        b.vstore(&lo, tile, &dst, 16);
                        b.vstore(&hi, tile, &dst2, 16);
                    }
                }
            } else {
                let base = self.row_base(b, &j, khd);
                let ahead_base = if self.nsa.is_some() { self.row_base(b, ahead_row, khd) } else { base.clone() };
                let bufs: &[&V] = if pre_rope.is_some() { &[&self.vbuf] } else { &[&self.kbuf, &self.vbuf] };
                for buf in bufs {
                    b.prefetch_ahead(buf, &ahead_base, ahead * kvw, kv_last, self.kv_elem());
                    b.prefetch_ahead(buf, &ahead_base, ahead * kvw + d - 1, kv_last, self.kv_elem());
                }
                for v in 0..nv {
                    let o = b.index(v as u64 * VW as u64);
                    let src = b.addi(&base, &o);
                    let dst = b.addi(&at, &o);
                    if pre_rope.is_none() {
                        let k = self.kv_vload(b, &self.kbuf, &src);
                        b.vstore(&k, ktile, &dst, VW);
                    }
                    let x = self.kv_vload(b, &self.vbuf, &src);
                    b.vstore(&x, vtile, &dst, VW);
                }
            }
            if let (Some(kivi), Some(nq)) = (&self.kivi, &nq) {
                // The key's position is its index (no window).
                kivi.widen(b, &tk, khd, d, nq, ktile, &at);
            }
            if let (Some((kb, mem)), Some(kh)) = (pre_rope, &kh) {
                let quant = self.quant.as_ref().map(|(qk, _)| qk);
                if let Some(qk) = quant {
                    let rowb = b.index(qk.row_bytes());
                    let rb = b.muli(&j, &rowb);
                    b.prefetch_ahead(qk.bytes(), &rb, ATTN_PREFETCH_KEYS * qk.row_bytes(), kv_last, "i8");
                } else {
                    let kwc = b.index(self.kvh * kb.r);
                    let rb = b.muli(&j, &kwc);
                    b.prefetch_ahead(&self.kbuf, &rb, ATTN_PREFETCH_KEYS * self.kvh * kb.r, kv_last, self.kv_elem());
                }
                kb.stage_cpu(b, mem, (&j, kh), quant, &|b: &mut KernelBuilder, i: &str| self.kv_load(b, &self.kbuf, i), self.kvh);
                kb.expand_cpu(b, mem, kh, ktile, &at);
            }
        });
    }

    /// `#nsa`: where the KV head part `khd` of keys `t0..t0 + nk` starts in
    /// the caches, stored at `rows[at..at + nk]`. Keys of one run of
    /// consecutive cache rows (one block of a KV head in the caches kept per
    /// block and KV head, and no block boundary between them) are one lookup
    /// of the first key's row and the others a stride on; others are looked
    /// up key by key in the selection.
    #[allow(clippy::too_many_arguments)]
    fn tile_rows(
        &self,
        b: &mut KernelBuilder,
        (t0, nk): (&str, &str),
        khd: &str,
        row_of: &dyn Fn(&mut KernelBuilder, &str) -> V,
        rows: &str,
        at: &str,
    ) {
        let one = b.index(1);
        let zero = b.index(0);
        let j0 = row_of(b, t0);
        let tl = b.addi(t0, nk);
        let tl = b.def(format!("arith.subi {tl}, {one} : index"));
        let jl = row_of(b, &tl);
        let span = b.def(format!("arith.subi {jl}, {j0} : index"));
        let n1 = b.def(format!("arith.subi {nk}, {one} : index"));
        let run = b.def(format!("arith.cmpi eq, {span}, {n1} : index"));
        let (run, stride) = match self.head_blocks {
            Some(hb) => {
                let bc = b.index(hb.block as u64);
                let (c0, cl) = (b.divui(&j0, &bc), b.divui(&jl, &bc));
                let same = b.def(format!("arith.cmpi eq, {c0}, {cl} : index"));
                (b.def(format!("arith.andi {run}, {same} : i1")), self.d)
            }
            None => (run, self.kvh * self.d),
        };
        let stride = b.index(stride);
        b.if_else(
            &run,
            |b| {
                let base = self.row_base(b, &j0, khd);
                b.for_each(&zero, nk, |b, i| {
                    let o = b.muli(i, &stride);
                    let x = b.addi(&base, &o);
                    let ia = b.addi(i, at);
                    b.set_index(&x, rows, &ia);
                });
            },
            |b| {
                b.for_each(&zero, nk, |b, i| {
                    let tk = b.addi(t0, i);
                    let j = row_of(b, &tk);
                    let x = self.row_base(b, &j, khd);
                    let ia = b.addi(i, at);
                    b.set_index(&x, rows, &ia);
                });
            },
        );
    }

    /// CPU split variant, a widened tile (quantized caches, keys before
    /// RoPE): `group_tile` over the tile's K and V rows.
    fn widened_group_tile(&self, b: &mut KernelBuilder, t: &TileMem, heads: &[TileHead], nk: &str, acc: &str) -> Vec<(V, V)> {
        let d = self.d;
        let nv = (d / VW as u64) as usize;
        let dc = b.index(d);
        let key = |b: &mut KernelBuilder, i: &str| -> Vec<V> {
            let kb = b.muli(i, &dc);
            (0..nv)
                .map(|v| {
                    let o = b.index(v as u64 * VW as u64);
                    let at = b.addi(&kb, &o);
                    b.vload(&t.k, &at, VW)
                })
                .collect()
        };
        let row = |b: &mut KernelBuilder, i: &str, _part: std::ops::Range<u64>| b.muli(i, &dc);
        let value = |b: &mut KernelBuilder, at: &str| b.vload(&t.v, at, VW);
        self.group_tile(b, t, heads, (nk, None), acc, (&key, &row, &value))
    }

    /// Whether the split variant's tiles read f32 or f16 cache rows directly
    /// (`cache_group_tile`): caches neither quantized nor holding keys before RoPE.
    fn fused(&self) -> bool {
        self.quant.is_none() && self.key_basis.is_none() && self.kivi.is_none()
    }

    /// CPU split variant, f32 and f16 caches (`fused`): `group_tile` over
    /// keys `tb..tb + nk` read from `src` as they lie (cache rows from
    /// `row_of`, widened as they are loaded), without widened tiles. Rows
    /// ahead are prefetched as `widen_tile` does, but into L2.
    #[allow(clippy::too_many_arguments)]
    fn cache_group_tile(
        &self,
        b: &mut KernelBuilder,
        t: &TileMem,
        heads: &[TileHead],
        (tb, nk): (&str, &str),
        khd: &str,
        src: &KeySource,
        row_of: &dyn Fn(&mut KernelBuilder, &str) -> V,
        acc: &str,
    ) -> Vec<(V, V)> {
        let d = self.d;
        let kvw = self.kvh * d;
        let nv = (d / VW as u64) as usize;
        // Into L2: the lines a tile needs (128 keys ahead, K and V) outnumber
        // L1's miss buffers, which would stall the stream (SmolLM2's shape at
        // 60000 positions, 2 threads, Zen 4 guest: 2.4-3.5 ms per call against
        // 3.4-4.5 with prefetcht0).
        let elem = if src.half { "f16" } else { "f32" };
        let line_elems = if src.half { 32 } else { 16 };
        let load = |b: &mut KernelBuilder, buf: &str, at: &str| vload_cache(b, buf, at, src.half);
        // The lines of `buf` holding elements `part` of the head's part of the
        // row `ahead` keys on from `base`.
        let prefetch_lines = |b: &mut KernelBuilder, buf: &str, base: &str, ahead: u64, part: std::ops::Range<u64>| {
            for at in part.step_by(line_elems) {
                b.prefetch_ahead_to(buf, base, ahead * kvw + at, &src.last, elem, PrefetchTo::L2);
            }
        };
        // `#nsa`: each key's cache row looked up in the selection once (and
        // where its KV head's part starts, kept for the scores and the
        // values), and so is the row `NSA_PREFETCH_KEYS` visible keys on
        // (three lookups a key before).
        let tile_keys = b.index(KEY_TILE);
        if let Some(rows) = &t.rows {
            let ahead = b.index(NSA_PREFETCH_KEYS);
            let ta = b.addi(tb, &ahead);
            let zero = b.index(0);
            self.tile_rows(b, (tb, nk), khd, row_of, rows, &zero);
            self.tile_rows(b, (&ta, nk), khd, row_of, rows, &tile_keys);
        }
        // Cache row start of key `i` of the tile; it prefetches the lines of
        // `buf` holding elements `part` of the row `ATTN_PREFETCH_KEYS` on
        // (under `#nsa`, the row looked up above). The scores prefetch K and
        // the values V (each pass of `pv_from` its own lines), so the stream
        // of requests runs through both halves of a tile's work: with every
        // prefetch in the scores, the memory idled while the values were
        // summed (SmolLM2 dense at 8000 positions, 2 threads, Zen 4 guest,
        // three interleaved rounds: attention 9.6-10.0 → 8.2-8.5 ms per
        // token; `nsa` there: attention even, prefill 415-443 → 464-470
        // tokens/s).
        let row_base = |b: &mut KernelBuilder, i: &str, buf: &str, part: std::ops::Range<u64>| -> V {
            if let Some(rows) = &t.rows {
                let ia = b.addi(i, &tile_keys);
                let ahead = b.index_at(rows, &ia);
                prefetch_lines(b, buf, &ahead, 0, part);
                return b.index_at(rows, i);
            }
            let tk = b.addi(tb, i);
            let j = row_of(b, &tk);
            let base = self.row_base(b, &j, khd);
            prefetch_lines(b, buf, &base, ATTN_PREFETCH_KEYS, part);
            base
        };
        let key = |b: &mut KernelBuilder, i: &str| -> Vec<V> {
            let base = row_base(b, i, &src.k, 0..d);
            (0..nv)
                .map(|v| {
                    let o = b.index(v as u64 * VW as u64);
                    let at = b.addi(&base, &o);
                    load(b, &src.k, &at)
                })
                .collect()
        };
        let row = |b: &mut KernelBuilder, i: &str, part: std::ops::Range<u64>| row_base(b, i, &src.v, part);
        let value = |b: &mut KernelBuilder, at: &str| load(b, &src.v, at);
        self.group_tile(b, t, heads, (nk, src.bonus.as_deref()), acc, (&key, &row, &value))
    }

    /// CPU split variant: the online softmax of a KV group's heads over `nk`
    /// keys of a tile. Scores: each key's K vectors (`key(i)`, loaded once)
    /// meet every head's query, VW keys at a time, whose dots one butterfly
    /// per head sums, then one by one; they go to each head's own tile of
    /// scores, and each head's running max and sum are rescaled (`softmax`).
    /// Values: the heads' weighted values (at `acc[ab..]`) take key `i`'s
    /// values (`value` at `row(i, part)`) together, each value vector loaded once
    /// for the whole group (`pv_from`). `bonus` is added to every score.
    /// Returns each head's new max and sum.
    #[allow(clippy::type_complexity)]
    fn group_tile(
        &self,
        b: &mut KernelBuilder,
        t: &TileMem,
        heads: &[TileHead],
        (nk, bonus): (&str, Option<&str>),
        acc: &str,
        (key, row, value): (
            &dyn Fn(&mut KernelBuilder, &str) -> Vec<V>,
            &dyn Fn(&mut KernelBuilder, &str, std::ops::Range<u64>) -> V,
            &dyn Fn(&mut KernelBuilder, &str) -> V,
        ),
    ) -> Vec<(V, V)> {
        let d = self.d;
        let vty = KernelBuilder::vty(VW);
        let ninf = b.f32(-1e30);
        let scale = b.f32(1.0 / (d as f32).sqrt());
        let z = b.vzero(VW);
        let vwc = b.index(VW as u64);
        let blocks = b.divui(nk, &vwc);
        let blocked = b.muli(&blocks, &vwc);
        let vninf = b.vbroadcast(&ninf, VW);
        let vscale = b.vbroadcast(&scale, VW);
        let vbonus = bonus.map(|bo| b.vbroadcast(bo, VW));
        let s0s: Vec<V> = (0..heads.len()).map(|h| b.index(h as u64 * KEY_TILE)).collect();
        let dot = |b: &mut KernelBuilder, q: &[V], k: &[V]| -> V {
            let mut a = z.clone();
            for (qv, kv) in q.iter().zip(k) {
                a = b.vfma(qv, kv, &a, VW);
            }
            a
        };
        // Scores, VW keys at a time.
        let init: Vec<(V, String)> = heads.iter().map(|_| (vninf.clone(), vty.clone())).collect();
        let zero_i = b.index(0);
        let vmax = b.for_fold_typed(&zero_i, &blocked, VW as u64, &init, |b, ib, maxes| {
            let mut dots: Vec<Vec<V>> = vec![Vec::new(); heads.len()];
            for u in 0..VW as u64 {
                let o = b.index(u);
                let i = b.addi(ib, &o);
                let k = key(b, &i);
                for (h, head) in heads.iter().enumerate() {
                    dots[h].push(dot(b, &head.q, &k));
                }
            }
            dots.iter()
                .zip(&s0s)
                .zip(maxes)
                .map(|((ds, s0), m)| {
                    let sums = b.vsums(ds, VW);
                    let sv = b.def(format!("arith.mulf {sums}, {vscale} : {vty}"));
                    let sv = match &vbonus {
                        Some(bv) => b.def(format!("arith.addf {sv}, {bv} : {vty}")),
                        None => sv,
                    };
                    let si = b.addi(s0, ib);
                    b.vstore(&sv, &t.s, &si, VW);
                    b.def(format!("arith.maxnumf {m}, {sv} : {vty}"))
                })
                .collect()
        });
        let block_max: Vec<V> = vmax.iter().map(|m| b.def(format!("vector.reduction <maxnumf>, {m} : {vty} into f32"))).collect();
        let tmax = b.for_fold(&blocked, nk, &block_max, |b, i, maxes| {
            let k = key(b, i);
            heads
                .iter()
                .zip(&s0s)
                .zip(maxes)
                .map(|((head, s0), m)| {
                    let a = dot(b, &head.q, &k);
                    let dsum = b.vsum(&a, VW);
                    let sv = b.mul(&dsum, &scale);
                    let sv = match bonus {
                        Some(bo) => b.add(&sv, bo),
                        None => sv,
                    };
                    let si = b.addi(s0, i);
                    b.store(&sv, &t.s, &si);
                    b.fbin("maxnumf", m, &sv)
                })
                .collect()
        });
        let mut ml = Vec::with_capacity(heads.len());
        let mut corrs = Vec::with_capacity(heads.len());
        for ((head, s0), tm) in heads.iter().zip(&s0s).zip(&tmax) {
            let (m_new, l_new, corr) = self.softmax(b, t, s0, nk, tm, (&head.ml.0, &head.ml.1));
            ml.push((m_new, l_new));
            corrs.push(corr);
        }
        // Values, each value vector loaded once for every head.
        let abs: Vec<V> = heads.iter().map(|h| h.ab.clone()).collect();
        self.pv_from(b, t, (&s0s, nk), &corrs, (acc, &abs), row, value);
        ml
    }

    /// The online softmax of one head over the scores `s[s0..s0 + nk]` of a
    /// widened tile whose maximum is `tmax`, then its weighted values
    /// (`pv`). Returns the new max and sum.
    #[allow(clippy::too_many_arguments)]
    fn softmax_pv(
        &self,
        b: &mut KernelBuilder,
        t: &TileMem,
        s0: &str,
        nk: &str,
        tmax: &str,
        (m_old, l_old): (&str, &str),
        (acc, ab): (&str, &str),
    ) -> (V, V) {
        let (m_new, l_new, corr) = self.softmax(b, t, s0, nk, tmax, (m_old, l_old));
        self.pv(b, t, &[s0.to_string()], nk, &[corr], acc, &[ab.to_string()]);
        (m_new, l_new)
    }

    /// The online softmax of one head over `s[s0..s0 + nk]` (maximum `tmax`):
    /// the scores become weights in place, the running max and sum `(m, l)`
    /// are rescaled. Returns the new max and sum and the factor the earlier
    /// weighted values take. With `nk` = 0 it changes nothing (factor 1).
    fn softmax(&self, b: &mut KernelBuilder, t: &TileMem, s0: &str, nk: &str, tmax: &str, (m_old, l_old): (&str, &str)) -> (V, V, V) {
        let zero_i = b.index(0);
        let stile = &t.s;
        // Online softmax: rescale what the earlier tiles summed.
        let m_new = b.fbin("maxnumf", m_old, tmax);
        let dm = b.sub(m_old, &m_new);
        let corr = math::exp(b, &dm);
        // VW scores at a time, then one by one.
        let vty = KernelBuilder::vty(VW);
        let vwc = b.index(VW as u64);
        let blocks = b.divui(nk, &vwc);
        let blocked = b.muli(&blocks, &vwc);
        let vm = b.vbroadcast(&m_new, VW);
        let z = b.vzero(VW);
        let vsum = b.for_fold_typed(&zero_i, &blocked, VW as u64, &[(z, vty.clone())], |b, i, a| {
            let si = b.addi(s0, i);
            let sv = b.vload(stile, &si, VW);
            let c = b.def(format!("arith.subf {sv}, {vm} : {vty}"));
            let e = math::vexp(b, &c, VW);
            b.vstore(&e, stile, &si, VW);
            vec![b.def(format!("arith.addf {}, {e} : {vty}", a[0]))]
        });
        let head_sum = b.vsum(&vsum[0], VW);
        let tsum = b.for_fold(&blocked, nk, &[head_sum], |b, i, a| {
            let si = b.addi(s0, i);
            let sv = b.load(stile, &si);
            let c = b.sub(&sv, &m_new);
            let e = math::exp(b, &c);
            b.store(&e, stile, &si);
            vec![b.add(&a[0], &e)]
        });
        let l_new = b.fma(l_old, &corr, &tsum[0]);
        (m_new, l_new, corr)
    }

    /// The weighted values of the heads over the widened tile's first `nk`
    /// keys: head `m`'s weights at `s[s0s[m]..]`, its values at
    /// `acc[abs[m]..]` scaled by `corrs[m]` first. Several heads share every
    /// loaded value vector and go through the head width four vectors at a
    /// time; one head takes it whole.
    #[allow(clippy::too_many_arguments)]
    fn pv(&self, b: &mut KernelBuilder, t: &TileMem, s0s: &[V], nk: &str, corrs: &[V], acc: &str, abs: &[V]) {
        let dc = b.index(self.d);
        let row = |b: &mut KernelBuilder, i: &str, _part: std::ops::Range<u64>| b.muli(i, &dc);
        self.pv_from(b, t, (s0s, nk), corrs, (acc, abs), &row, &|b: &mut KernelBuilder, at: &str| b.vload(&t.v, at, VW));
    }

    /// `pv` over values read through `load` (VW values at an element index),
    /// key `i`'s row starting at `row(i, part)`, where `part` is the pass's
    /// elements of the head width (the heads go through it four vectors at a
    /// time).
    #[allow(clippy::too_many_arguments)]
    fn pv_from(
        &self,
        b: &mut KernelBuilder,
        t: &TileMem,
        (s0s, nk): (&[V], &str),
        corrs: &[V],
        (acc, abs): (&str, &[V]),
        row: &dyn Fn(&mut KernelBuilder, &str, std::ops::Range<u64>) -> V,
        load: &dyn Fn(&mut KernelBuilder, &str) -> V,
    ) {
        let d = self.d;
        let nv = d / VW as u64;
        let heads = s0s.len();
        let vty = KernelBuilder::vty(VW);
        let zero_i = b.index(0);
        let chunk = if heads == 1 { nv } else { nv.min(4) };
        for c0 in (0..nv).step_by(chunk as usize) {
            let vs: Vec<u64> = (c0..(c0 + chunk).min(nv)).collect();
            let mut init: Vec<(V, String)> = Vec::new();
            for (ab, corr) in abs.iter().zip(corrs) {
                let corrv = b.vbroadcast(corr, VW);
                for v in &vs {
                    let o = b.index(v * VW as u64);
                    let at = b.addi(ab, &o);
                    let a = b.vload(acc, &at, VW);
                    init.push((b.def(format!("arith.mulf {a}, {corrv} : {vty}")), vty.clone()));
                }
            }
            let accs = b.for_fold_typed(&zero_i, nk, 1, &init, |b, i, accs| {
                let evs: Vec<V> = s0s
                    .iter()
                    .map(|s0| {
                        let si = b.addi(s0, i);
                        let e = b.load(&t.s, &si);
                        b.vbroadcast(&e, VW)
                    })
                    .collect();
                let vb = row(b, i, c0 * VW as u64..(c0 + chunk).min(nv) * VW as u64);
                let mut next = accs.to_vec();
                for (n, v) in vs.iter().enumerate() {
                    let o = b.index(v * VW as u64);
                    let at = b.addi(&vb, &o);
                    let x = load(b, &at);
                    for (m, ev) in evs.iter().enumerate() {
                        let a = m * vs.len() + n;
                        next[a] = b.vfma(ev, &x, &accs[a], VW);
                    }
                }
                next
            });
            for (m, ab) in abs.iter().enumerate() {
                for (n, v) in vs.iter().enumerate() {
                    let o = b.index(v * VW as u64);
                    let at = b.addi(ab, &o);
                    b.vstore(&accs[m * vs.len() + n], acc, &at, VW);
                }
            }
        }
    }

    /// Flash prefill: the widened K tile's first `nk` rows transposed into
    /// `t.kt` (feature `c` of key `i` at `c·KEY_TILE + i`).
    fn transpose_tile(&self, b: &mut KernelBuilder, t: &TileMem, nk: &str) {
        let (d, nv) = (self.d, self.d / VW as u64);
        let (zero_i, dc) = (b.index(0), b.index(d));
        b.for_each(&zero_i, nk, |b, i| {
            let kb = b.muli(i, &dc);
            for v in 0..nv {
                let o = b.index(v * VW as u64);
                let at = b.addi(&kb, &o);
                let k = b.vload(&t.k, &at, VW);
                for e in 0..VW as u64 {
                    let x = b.def(format!("vector.extract {k}[{e}] : f32 from {}", KernelBuilder::vty(VW)));
                    let c = b.index((v * VW as u64 + e) * KEY_TILE);
                    let to = b.addi(&c, i);
                    b.store(&x, &t.kt, &to);
                }
            }
        });
    }

    /// Flash prefill: the scaled scores of two query heads (at `q[qb..]`)
    /// against the tile's `KEY_TILE` keys, from the transposed tile: per
    /// feature, each query's element broadcast against `KEY_TILE / VW` key
    /// vectors (every loaded key vector used twice, no horizontal sums). The
    /// scores go to `t.s[0..]` and `t.s[KEY_TILE..]`; returns each one's
    /// maximum over its first `nk` keys (keys past a tile's end are stale).
    fn scores_pair(&self, b: &mut KernelBuilder, t: &TileMem, q: &str, qb: [&str; 2], nk: [&str; 2]) -> [V; 2] {
        let d = self.d;
        let kv = (KEY_TILE / VW as u64) as usize;
        let vty = KernelBuilder::vty(VW);
        let (zero_i, dc, tk) = (b.index(0), b.index(d), b.index(KEY_TILE));
        let z = b.vzero(VW);
        let init: Vec<(V, String)> = (0..2 * kv).map(|_| (z.clone(), vty.clone())).collect();
        let accs = b.for_fold_typed(&zero_i, &dc, 1, &init, |b, c, accs| {
            let qv: Vec<V> = qb
                .iter()
                .map(|base| {
                    let at = b.addi(base, c);
                    let x = b.load(q, &at);
                    b.vbroadcast(&x, VW)
                })
                .collect();
            let row = b.muli(c, &tk);
            let mut next = accs.to_vec();
            for j in 0..kv {
                let o = b.index(j as u64 * VW as u64);
                let at = b.addi(&row, &o);
                let kvec = b.vload(&t.kt, &at, VW);
                for (m, qx) in qv.iter().enumerate() {
                    next[m * kv + j] = b.vfma(qx, &kvec, &accs[m * kv + j], VW);
                }
            }
            next
        });
        let scale = b.f32(1.0 / (d as f32).sqrt());
        let vscale = b.vbroadcast(&scale, VW);
        let ninf = b.f32(-1e30);
        let mut out = Vec::with_capacity(2);
        for m in 0..2 {
            for j in 0..kv {
                let sv = b.def(format!("arith.mulf {}, {vscale} : {vty}", accs[m * kv + j]));
                let at = b.index((m * kv + j) as u64 * VW as u64);
                b.vstore(&sv, &t.s, &at, VW);
            }
            let s0 = b.index(m as u64 * KEY_TILE);
            let mx = b.for_fold(&zero_i, nk[m], std::slice::from_ref(&ninf), |b, i, a| {
                let si = b.addi(&s0, i);
                let x = b.load(&t.s, &si);
                vec![b.fbin("maxnumf", &a[0], &x)]
            });
            out.push(mx[0].clone());
        }
        [out[0].clone(), out[1].clone()]
    }

    /// CPU split variant, prefill of a model without windows or NSA
    /// (flash-style): the unit `unit` of phase 1 whose split is 0 and whose
    /// row is a multiple of `FLASH_ROWS` takes a block of that many query rows
    /// (blocks in mirrored order, so even ranges of units are even work) of
    /// KV head `kh`, and walks the keys they see in tiles: each tile is
    /// widened once for every row and head of the block (not once per row),
    /// each row taking the tile's keys at or before its position. Running
    /// maxima, sums and weighted values live in `mem` until the rows are
    /// written.
    #[allow(clippy::too_many_arguments)]
    fn flash_unit(&self, b: &mut KernelBuilder, unit: &str, splits: u64, t: &TileMem, mem: &FlashMem, q: &str, out: &str, kv_last: &str) {
        let (h, kvh, d) = (self.h, self.kvh, self.d);
        let group = h / kvh;
        let nv = (d / VW as u64) as usize;
        let vty = KernelBuilder::vty(VW);
        let (zero_i, one_i) = (b.index(0), b.index(1));
        let (per_row, splitsc, rowsc) = (b.index(kvh * splits), b.index(splits), b.index(FLASH_ROWS));
        let (dc, qwc, groupc, tile_keys) = (b.index(d), b.index(h * d), b.index(group), b.index(KEY_TILE));
        let (zero, ninf) = (b.f32(0.0), b.f32(-1e30));
        let r = b.divui(unit, &per_row);
        let rem = b.remui(unit, &per_row);
        let kh = b.divui(&rem, &splitsc);
        let s = b.remui(&rem, &splitsc);
        let rr = b.remui(&r, &rowsc);
        let first_split = b.def(format!("arith.cmpi eq, {s}, {zero_i} : index"));
        let block_row = b.def(format!("arith.cmpi eq, {rr}, {zero_i} : index"));
        let active = b.def(format!("arith.andi {first_split}, {block_row} : i1"));
        b.if_then(&active, |b| {
            let seq = b.seq();
            let bi = b.divui(&r, &rowsc);
            let last = b.index(FLASH_ROWS - 1);
            let nblk = b.addi(&seq, &last);
            let nblk = b.divui(&nblk, &rowsc);
            let blk = Self::mirrored(b, &bi, &nblk);
            let r0 = b.muli(&blk, &rowsc);
            let r1 = b.addi(&r0, &rowsc);
            let r1 = b.minui(&r1, &seq);
            let nr = b.def(format!("arith.subi {r1}, {r0} : index"));
            let pos = b.pos();
            let khd = b.muli(&kh, &dc);
            let head0 = b.muli(&kh, &groupc);
            let cells = b.muli(&nr, &groupc);
            b.for_each(&zero_i, &cells, |b, c| {
                b.store(&ninf, &mem.m, c);
                b.store(&zero, &mem.l, c);
            });
            let acc_n = b.muli(&cells, &dc);
            b.for_each(&zero_i, &acc_n, |b, i| b.store(&zero, &mem.acc, i));
            // The block's last row sees keys 0..t_end.
            let t_end = b.addi(&pos, &r1);
            b.for_step(&zero_i, &t_end, KEY_TILE, |b, tb| {
                let te = b.addi(tb, &tile_keys);
                let te = b.minui(&te, &t_end);
                let nk = b.def(format!("arith.subi {te}, {tb} : index"));
                self.widen_tile(b, t, tb, &nk, &khd, kv_last, &|_: &mut KernelBuilder, t: &str| t.to_string());
                self.transpose_tile(b, t, &nk);
                // The block's (row, head) pairs two at a time: each transposed
                // key vector serves both (`scores_pair`); an odd count repeats
                // the last pair member and keeps one result.
                let pairs = b.addi(&cells, &one_i);
                let two = b.index(2);
                let pairs = b.divui(&pairs, &two);
                let last_cell = b.def(format!("arith.subi {cells}, {one_i} : index"));
                b.for_each(&zero_i, &pairs, |b, pm| {
                    let c0 = b.muli(pm, &two);
                    let c1 = b.addi(&c0, &one_i);
                    let c1 = b.minui(&c1, &last_cell);
                    let member = |b: &mut KernelBuilder, c: &str| -> (V, V) {
                        let i = b.divui(c, &groupc);
                        let g = b.remui(c, &groupc);
                        let row = b.addi(&r0, &i);
                        let qrow = b.muli(&row, &qwc);
                        let head = b.addi(&head0, &g);
                        let qhd = b.muli(&head, &dc);
                        let p = b.addi(&pos, &row);
                        let end = b.addi(&p, &one_i);
                        let seen = b.sub_or_zero(&end, tb);
                        (b.addi(&qrow, &qhd), b.minui(&nk, &seen))
                    };
                    let (qb0, nk0) = member(b, &c0);
                    let (qb1, nk1) = member(b, &c1);
                    let maxes = self.scores_pair(b, t, q, [&qb0, &qb1], [&nk0, &nk1]);
                    let second = b.def(format!("arith.cmpi ne, {c1}, {c0} : index"));
                    b.if_else(
                        &second,
                        |b| {
                            // Both members: each one's softmax (a member that sees
                            // no key of the tile changes nothing), its weights
                            // past its keys zeroed, one PV for the two.
                            let mut corrs = Vec::new();
                            let mut abs = Vec::new();
                            let s0s = [zero_i.clone(), tile_keys.clone()];
                            for (k, (c, nk_row)) in [(&c0, &nk0), (&c1, &nk1)].into_iter().enumerate() {
                                let m_old = b.load(&mem.m, c);
                                let l_old = b.load(&mem.l, c);
                                let (m_new, l_new, corr) = self.softmax(b, t, &s0s[k], nk_row, &maxes[k], (&m_old, &l_old));
                                b.store(&m_new, &mem.m, c);
                                b.store(&l_new, &mem.l, c);
                                let z = b.f32(0.0);
                                b.for_each(nk_row, &tile_keys, |b, i| {
                                    let si = b.addi(&s0s[k], i);
                                    b.store(&z, &t.s, &si);
                                });
                                corrs.push(corr);
                                abs.push(b.muli(c, &dc));
                            }
                            let nk_max = b.def(format!("arith.maxui {nk0}, {nk1} : index"));
                            self.pv(b, t, &s0s, &nk_max, &corrs, &mem.acc, &abs);
                        },
                        |b| {
                            let any = b.def(format!("arith.cmpi ugt, {nk0}, {zero_i} : index"));
                            b.if_then(&any, |b| {
                                let m_old = b.load(&mem.m, &c0);
                                let l_old = b.load(&mem.l, &c0);
                                let ab = b.muli(&c0, &dc);
                                let (m_new, l_new) = self.softmax_pv(b, t, &zero_i, &nk0, &maxes[0], (&m_old, &l_old), (&mem.acc, &ab));
                                b.store(&m_new, &mem.m, &c0);
                                b.store(&l_new, &mem.l, &c0);
                            });
                        },
                    );
                });
            });
            // The rows: weighted values over their sums.
            b.for_each(&zero_i, &nr, |b, i| {
                let row = b.addi(&r0, i);
                let qrow = b.muli(&row, &qwc);
                let cell0 = b.muli(i, &groupc);
                for g in 0..group {
                    let gi = b.index(g);
                    let cell = b.addi(&cell0, &gi);
                    let l = b.load(&mem.l, &cell);
                    let one = b.f32(1.0);
                    let inv = b.div(&one, &l);
                    let invv = b.vbroadcast(&inv, VW);
                    let ab = b.muli(&cell, &dc);
                    let head = b.addi(&head0, &gi);
                    let qhd = b.muli(&head, &dc);
                    let obase = b.addi(&qrow, &qhd);
                    for v in 0..nv {
                        let o = b.index(v as u64 * VW as u64);
                        let at = b.addi(&ab, &o);
                        let a = b.vload(&mem.acc, &at, VW);
                        let y = b.def(format!("arith.mulf {a}, {invv} : {vty}"));
                        let at = b.addi(&obase, &o);
                        b.vstore(&y, out, &at, VW);
                    }
                }
            });
        });
    }

    /// Index `i` of the order 0, n-1, 1, n-2, ... over `0..n`.
    fn mirrored(b: &mut KernelBuilder, i: &str, n: &str) -> V {
        let one = b.index(1);
        let two = b.index(2);
        let half = b.divui(i, &two);
        let odd = b.remui(i, &two);
        let odd = b.def(format!("arith.index_cast {odd} : index to i1"));
        let last = b.def(format!("arith.subi {n}, {one} : index"));
        let mirrored = b.def(format!("arith.subi {last}, {half} : index"));
        b.def(format!("arith.select {odd}, {mirrored}, {half} : index"))
    }

    /// The grouped, split CPU variant (see the file's doc).
    fn emit_split(&self, b: &mut KernelBuilder, cx: &KernelCtx<'_>) -> Result<(), CompileError> {
        let KernelCtx { spec, ins, out, .. } = *cx;
        let scratch =
            ins.get(spec.operands.len()).ok_or_else(|| spec.unsupported("the split attention kernel takes a scratch buffer"))?.clone();
        let (h, kvh, d) = (self.h, self.kvh, self.d);
        let group = h / kvh;
        let qw = h * d;
        let nv = (d / VW as u64) as usize;
        let (first, total) = cpu_phases(spec)?;
        let first = b.sym(first);
        let total = b.sym(total);
        let zero_i = b.index(0);
        let one_i = b.index(1);
        let splits = cpu_splits(spec, kvh);
        let (dc, qwc, groupc, hc, splitsc) = (b.index(d), b.index(qw), b.index(group), b.index(h), b.index(splits));
        let rec = b.index(d + 2);
        let zero = b.f32(0.0);
        let ninf = b.f32(-1e30);
        let pos = b.pos();
        // Key tiles: a tile's K and V rows widened to f32 once, for every head
        // of the group (f16 caches convert once per group, not once per head).
        let tile_elems = b.index(KEY_TILE * d);
        let ktile = b.alloca_f32(&tile_elems);
        let vtile = b.alloca_f32(&tile_elems);
        let tile_keys = b.index(KEY_TILE);
        // Scores: a tile per head of the group (the flash pair uses two).
        let score_tiles = b.index(group.max(2) * KEY_TILE);
        let stile = b.alloca_f32(&score_tiles);
        let kt = b.alloca_f32(&tile_elems);
        let rope = self.key_basis.as_ref().map(|kb| {
            let n = b.index(kb.scratch_words());
            b.alloca_f32(&n)
        });
        let rows = (self.nsa.is_some() && self.fused()).then(|| {
            let n = b.index(2 * KEY_TILE);
            b.alloca_index(&n)
        });
        let tiles_mem = TileMem { k: ktile, v: vtile, s: stile, kt, rope, rows };
        // The group's running weighted sums of values, one row per head.
        // Without NSA (whose visible keys depend on the KV head) a unit serves
        // every KV head of its row and split, so it reads whole cache rows: its
        // tile's keys for one head, then the next head's, in the same lines'
        // neighbours (one head's part of a row is a third of its lines at
        // SmolLM2's shape, and the prefetchers fetch the rest anyway).
        let all_heads = self.nsa.is_none();
        let served = if all_heads { kvh } else { 1 };
        let heads_served = served * group;
        let acc_elems = b.index(heads_served * d);
        let acc_mem = b.alloca_f32(&acc_elems);
        let qrot = self.hadamard.then(|| b.alloca_f32(&acc_elems));
        let kv_len = b.def(format!("memref.dim {}, {zero_i} : memref<?x{}>", self.kbuf, self.kv_elem()));
        let kv_last = b.def(format!("arith.subi {kv_len}, {one_i} : index"));
        // Where a partial of (KV head, split, head of the group) lives in the scratch.
        // Gated NSA keeps a record per branch (selected, window).
        let record = |b: &mut KernelBuilder, kh: &str, s: &str, g: &str, branch: Option<u64>| -> V {
            let a = b.muli(kh, &splitsc);
            let a = b.addi(&a, s);
            let a = b.muli(&a, &groupc);
            let a = b.addi(&a, g);
            let a = match branch {
                None => a,
                Some(br) => {
                    let two = b.index(2);
                    let a = b.muli(&a, &two);
                    let o = b.index(br - BR_SELECTED);
                    b.addi(&a, &o)
                }
            };
            b.muli(&a, &rec)
        };
        let vty = KernelBuilder::vty(VW);
        // Phase 1: partial softmax of (row, KV head, split) for each head of the group.
        let ub = b.minui("%hi", &first);
        // Prefill of a model without windows or NSA goes flash-style.
        let flash = (self.window.is_none() && self.nsa.is_none() && self.sequence.is_none() && !self.hadamard).then(|| {
            let cells = b.index(FLASH_ROWS * group);
            let accs = b.index(FLASH_ROWS * group * d);
            FlashMem { m: b.alloca_f32(&cells), l: b.alloca_f32(&cells), acc: b.alloca_f32(&accs) }
        });
        let per_row_unit = |b: &mut KernelBuilder, unit: &str| {
            let per_row = b.index(kvh * splits);
            let r = b.divui(unit, &per_row);
            let rem = b.remui(unit, &per_row);
            let kvhc = b.index(kvh);
            let kh = b.remui(&rem, &kvhc);
            let s = b.divui(&rem, &kvhc);
            let row = Self::mirrored_row(b, &r);
            let p = b.addi(&pos, &row);
            let vis = self.visible(b, &p, &row, &kh);
            let n = self.splits(b, &vis.count, splits);
            let active = b.def(format!("arith.cmpi ult, {s}, {n} : index"));
            let active = if all_heads {
                let first_kh = b.def(format!("arith.cmpi eq, {kh}, {zero_i} : index"));
                b.def(format!("arith.andi {active}, {first_kh} : i1"))
            } else {
                active
            };
            b.if_then(&active, |b| {
                // Keys t0..t1 of the row's visible ones.
                let a = b.muli(&s, &vis.count);
                let t0 = b.divui(&a, &n);
                let s1 = b.addi(&s, &one_i);
                let a = b.muli(&s1, &vis.count);
                let t1 = b.divui(&a, &n);
                // Served head `g` (of `heads_served`): its KV head and its
                // index in that head's group.
                let kh_of = |b: &mut KernelBuilder, g: u64| -> V {
                    if all_heads {
                        b.index(g / group)
                    } else {
                        kh.clone()
                    }
                };
                let head0 = if all_heads { zero_i.clone() } else { b.muli(&kh, &groupc) };
                let qrow = b.muli(&row, &qwc);
                let qbase_of = |b: &mut KernelBuilder, g: u64| -> V {
                    let gi = b.index(g);
                    let head = b.addi(&head0, &gi);
                    let qhd = b.muli(&head, &dc);
                    b.addi(&qrow, &qhd)
                };
                // Rotated caches: the group's queries rotated alike, once.
                if let Some(qrot) = &qrot {
                    for g in 0..heads_served {
                        let qbase = qbase_of(b, g);
                        let qv: Vec<V> = (0..nv)
                            .map(|v| {
                                let o = b.index(v as u64 * VW as u64);
                                let i = b.addi(&qbase, &o);
                                b.vload(&ins[0], &i, VW)
                            })
                            .collect();
                        for (v, x) in super::kv_quant::hadamard(b, &qv).iter().enumerate() {
                            let o = b.index(g * d + v as u64 * VW as u64);
                            b.vstore(x, qrot, &o, VW);
                        }
                    }
                }
                // Per head of the group: running max and sum, over tiles of keys.
                let mut init: Vec<(V, String)> = Vec::new();
                for _ in 0..heads_served {
                    init.push((ninf.clone(), "f32".into()));
                    init.push((zero.clone(), "f32".into()));
                }
                let tiles = |b: &mut KernelBuilder, lo: &str, hi: &str| -> Vec<V> {
                    b.for_each(&zero_i, &acc_elems, |b, i| b.store(&zero, &acc_mem, i));
                    let mut ml = init.clone();
                    for (src, lo, hi, row_of) in self.key_runs(b, &vis, (lo, hi), &kv_last) {
                        let next = b.for_fold_typed(&lo, &hi, KEY_TILE, &ml, |b, tb, ml| {
                            let te = b.addi(tb, &tile_keys);
                            let te = b.minui(&te, &hi);
                            let nk = b.def(format!("arith.subi {te}, {tb} : index"));
                            let mut next = Vec::new();
                            for g0 in (0..heads_served).step_by(group as usize) {
                                let khg = kh_of(b, g0);
                                let khd = b.muli(&khg, &dc);
                                if !self.fused() {
                                    self.widen_tile(b, &tiles_mem, tb, &nk, &khd, &kv_last, &row_of);
                                }
                                // The KV head's query heads: their queries, running max and sum, and values.
                                let heads: Vec<TileHead> = (g0..g0 + group)
                                    .map(|g| {
                                        let qbase = qbase_of(b, g);
                                        let q: Vec<V> = (0..nv)
                                            .map(|v| match &qrot {
                                                Some(qrot) => {
                                                    let o = b.index(g * d + v as u64 * VW as u64);
                                                    b.vload(qrot, &o, VW)
                                                }
                                                None => {
                                                    let o = b.index(v as u64 * VW as u64);
                                                    let i = b.addi(&qbase, &o);
                                                    b.vload(&ins[0], &i, VW)
                                                }
                                            })
                                            .collect();
                                        let ml = (ml[2 * g as usize].clone(), ml[2 * g as usize + 1].clone());
                                        TileHead { q, ml, ab: b.index(g * d) }
                                    })
                                    .collect();
                                let ml = if self.fused() {
                                    self.cache_group_tile(b, &tiles_mem, &heads, (tb, &nk), &khd, &src, &*row_of, &acc_mem)
                                } else {
                                    self.widened_group_tile(b, &tiles_mem, &heads, &nk, &acc_mem)
                                };
                                for (m_new, l_new) in ml {
                                    next.push(m_new);
                                    next.push(l_new);
                                }
                            }
                            next
                        });
                        ml = next.into_iter().map(|v| (v, "f32".to_string())).collect();
                    }
                    ml.into_iter().map(|(v, _)| v).collect()
                };
                let whole = b.def(format!("arith.cmpi eq, {n}, {one_i} : index"));
                // A pass's result per head of the group: one split writes the
                // row (gated: its branch's share, added to the earlier
                // branches'), else a partial record.
                let finish = |b: &mut KernelBuilder, ml: &[V], branch: Option<u64>| {
                    for g in 0..heads_served {
                        let (m, l) = (&ml[2 * g as usize], &ml[2 * g as usize + 1]);
                        let qbase = qbase_of(b, g);
                        let accs: Vec<V> = (0..nv)
                            .map(|v| {
                                let o = b.index(g * d + v as u64 * VW as u64);
                                b.vload(&acc_mem, &o, VW)
                            })
                            .collect();
                        b.if_else(
                            &whole,
                            |b| {
                                let f = match branch {
                                    None => {
                                        let one = b.f32(1.0);
                                        b.div(&one, l)
                                    }
                                    Some(br) => {
                                        let gi = b.index(g);
                                        let head = b.addi(&head0, &gi);
                                        let w = self.gate_weight(b, &row, &head, br);
                                        Self::branch_factor(b, &w, l)
                                    }
                                };
                                let fv = b.vbroadcast(&f, VW);
                                let ys: Vec<V> = accs.iter().map(|acc| b.def(format!("arith.mulf {acc}, {fv} : {vty}"))).collect();
                                let add = branch.is_some_and(|br| br != BR_SELECTED);
                                for (v, y) in self.unrotate(b, ys).iter().enumerate() {
                                    let o = b.index(v as u64 * VW as u64);
                                    let i = b.addi(&qbase, &o);
                                    let y = if add {
                                        let prev = b.vload(out, &i, VW);
                                        b.def(format!("arith.addf {prev}, {y} : {vty}"))
                                    } else {
                                        y.clone()
                                    };
                                    b.vstore(&y, out, &i, VW);
                                }
                            },
                            |b| {
                                let khg = kh_of(b, g);
                                let gi = b.index(g % group);
                                let at = record(b, &khg, &s, &gi, branch);
                                b.store(m, &scratch, &at);
                                let at1 = b.addi(&at, &one_i);
                                b.store(l, &scratch, &at1);
                                for (v, acc) in accs.iter().enumerate() {
                                    let o = b.index(2 + v as u64 * VW as u64);
                                    let i = b.addi(&at, &o);
                                    b.vstore(acc, &scratch, &i, VW);
                                }
                            },
                        );
                    }
                };
                match vis.branch.clone() {
                    None => {
                        let ml = tiles(b, &t0, &t1);
                        finish(b, &ml, None);
                    }
                    Some(na) => {
                        // Gated NSA: the split's keys of each branch, then
                        // (one split) the compressed branch.
                        let (a0, a1) = (b.minui(&t0, &na), b.minui(&t1, &na));
                        let ml = tiles(b, &a0, &a1);
                        finish(b, &ml, Some(BR_SELECTED));
                        let (w0, w1) = (b.maxui(&t0, &na), b.maxui(&t1, &na));
                        let ml = tiles(b, &w0, &w1);
                        finish(b, &ml, Some(BR_WINDOW));
                        b.if_then(&whole, |b| {
                            for g in 0..group {
                                let qbase = qbase_of(b, g);
                                let gi = b.index(g);
                                let head = b.addi(&head0, &gi);
                                self.add_compressed_vec(b, &p, &kh, &row, &head, &qbase, &ins[0], out);
                            }
                        });
                    }
                }
            });
        };
        b.for_each("%lo", &ub, |b, unit| match &flash {
            Some(mem) => {
                let seq = b.seq();
                let prefill = b.def(format!("arith.cmpi ugt, {seq}, {one_i} : index"));
                b.if_else(
                    &prefill,
                    |b| self.flash_unit(b, unit, splits, &tiles_mem, mem, &ins[0], out, &kv_last),
                    |b| per_row_unit(b, unit),
                );
            }
            None => per_row_unit(b, unit),
        });
        // Phase 2: per (row, head) of a split decode row, the partials combined.
        let lb = b.maxui("%lo", &first);
        let ub = b.minui("%hi", &total);
        b.for_each(&lb, &ub, |b, unit| {
            let c = b.def(format!("arith.subi {unit}, {first} : index"));
            let head = b.remui(&c, &hc);
            let kh = b.divui(&head, &groupc);
            // Only a one-row call splits; its row is 0.
            let vis = self.visible(b, &pos, &zero_i, &kh);
            let n = self.splits(b, &vis.count, splits);
            let split = b.def(format!("arith.cmpi ugt, {n}, {one_i} : index"));
            b.if_then(&split, |b| {
                let g = b.remui(&head, &groupc);
                // One branch's partials (or all of them) combined: its sum
                // and weighted values.
                let combine = |b: &mut KernelBuilder, branch: Option<u64>| -> Vec<V> {
                    let m = b.for_fold(&zero_i, &n, std::slice::from_ref(&ninf), |b, s, acc| {
                        let at = record(b, &kh, s, &g, branch);
                        let ms = b.load(&scratch, &at);
                        vec![b.fbin("maxnumf", &acc[0], &ms)]
                    });
                    let z = b.vzero(VW);
                    let mut init: Vec<(V, String)> = vec![(zero.clone(), "f32".into())];
                    init.extend((0..nv).map(|_| (z.clone(), KernelBuilder::vty(VW))));
                    b.for_fold_typed(&zero_i, &n, 1, &init, |b, s, acc| {
                        let at = record(b, &kh, s, &g, branch);
                        let ms = b.load(&scratch, &at);
                        let at1 = b.addi(&at, &one_i);
                        let ls = b.load(&scratch, &at1);
                        let dm = b.sub(&ms, &m[0]);
                        let w = math::exp(b, &dm);
                        let mut next = vec![b.fma(&ls, &w, &acc[0])];
                        let wv = b.vbroadcast(&w, VW);
                        for v in 0..nv {
                            let o = b.index(2 + v as u64 * VW as u64);
                            let i = b.addi(&at, &o);
                            let x = b.vload(&scratch, &i, VW);
                            next.push(b.vfma(&wv, &x, &acc[1 + v], VW));
                        }
                        next
                    })
                };
                let vty = KernelBuilder::vty(VW);
                let scaled = |b: &mut KernelBuilder, acc: &[V], f: &V| -> Vec<V> {
                    let fv = b.vbroadcast(f, VW);
                    (0..nv).map(|v| b.def(format!("arith.mulf {}, {fv} : {vty}", acc[1 + v]))).collect()
                };
                let qhd = b.muli(&head, &dc);
                let ys = match vis.branch {
                    None => {
                        let acc = combine(b, None);
                        let one = b.f32(1.0);
                        let inv = b.div(&one, &acc[0]);
                        scaled(b, &acc, &inv)
                    }
                    Some(_) => {
                        let mut ys: Vec<V> = Vec::new();
                        for br in [BR_SELECTED, BR_WINDOW] {
                            let acc = combine(b, Some(br));
                            let w = self.gate_weight(b, &zero_i, &head, br);
                            let f = Self::branch_factor(b, &w, &acc[0]);
                            let y = scaled(b, &acc, &f);
                            ys = if ys.is_empty() {
                                y
                            } else {
                                ys.iter().zip(&y).map(|(a, c)| b.def(format!("arith.addf {a}, {c} : {vty}"))).collect()
                            };
                        }
                        ys
                    }
                };
                for (v, y) in self.unrotate(b, ys).iter().enumerate() {
                    let o = b.index(v as u64 * VW as u64);
                    let i = b.addi(&qhd, &o);
                    b.vstore(y, out, &i, VW);
                }
                if vis.branch.is_some() {
                    self.add_compressed_vec(b, &pos, &kh, &zero_i, &head, &qhd, &ins[0], out);
                }
            });
        });
        Ok(())
    }

    /// NVPTX: a block of `GPU_ATTN_WARPS` warps per (row, head), splitting the
    /// keys (flash-decoding within a block). Lane l of warp s takes visible
    /// keys 32s + l, 32s + l + 32·GPU_ATTN_WARPS, ... with an online softmax of its
    /// own (the query and the weighted sum of values in registers); butterflies
    /// of `shfl.sync` take the warp's max, rescale every lane's sums to it and
    /// add them; lane 0 puts the warp's partial (max, sum, values) in shared
    /// memory, and after a barrier warp 0 rescales the partials to their max,
    /// adds them and stores the row. `work` counts whole blocks, so every
    /// thread of a block enters the bounds check and reaches the barrier.
    /// A call of one row has `decode_splits(h)` blocks per head instead (the
    /// runtime launches `KernelStep::gpu_decode_threads`): a row with more
    /// than `GPU_SPLIT_KEYS` visible keys splits them over up to that many
    /// blocks (`split_partial`, `combine_splits`); blocks past the row's
    /// splits leave at once. The ticket counters are the scratch's first `h`
    /// words (every layer's scratch shares one slot; every layer has the same
    /// heads), zero when the session's arena is made and reset by each
    /// combining block, so a captured decode step replays.
    fn emit_warp(&self, b: &mut KernelBuilder, cx: &KernelCtx<'_>) -> Result<(), CompileError> {
        let KernelCtx { spec, work, ins, out, .. } = *cx;
        let (h, kvh, d) = (self.h, self.kvh, self.d);
        let (hc, dc, qwc, groupc) = (b.index(h), b.index(d), b.index(h * d), b.index(h / kvh));
        let zero = b.f32(0.0);
        let ninf = b.f32(-1e30);
        let scale = b.f32(1.0 / (d as f32).sqrt());
        let pos = b.pos();
        let (split, group, part) = (b.index(GPU_ATTN_WARPS), b.index(GPU_ATTN_WARPS * WARP), 2 + d);
        let smem = b.shared_f32("attn_partials", GPU_ATTN_WARPS * part);
        let scratch = ins.get(spec.operands.len()).ok_or_else(|| spec.unsupported("attention without its scratch buffer"))?.clone();
        let splits = decode_splits(h);
        let (splitsc, one_i, zero_i) = (b.index(splits), b.index(1), b.index(0));
        // A call of one row has `splits` blocks per head (the runtime launches
        // `KernelStep::gpu_decode_threads`), others a block per (row, head).
        let seq = b.seq();
        let decode = b.def(format!("arith.cmpi eq, {seq}, {one_i} : index"));
        let decode_work = b.index(h * splits * GPU_ATTN_WARPS * WARP);
        let units = b.def(format!("arith.select {decode}, {decode_work}, {work} : index"));
        b.parallel(&units, |b, t| {
            let warp = b.index(WARP);
            let blk = b.divui(t, &group);
            // Block `blk` is split `sp` of (row, head) `e`.
            let (dsp, de) = (b.remui(&blk, &splitsc), b.divui(&blk, &splitsc));
            let sp = b.def(format!("arith.select {decode}, {dsp}, {zero_i} : index"));
            let e = b.def(format!("arith.select {decode}, {de}, {blk} : index"));
            let wid = b.divui(t, &warp);
            let s = b.remui(&wid, &split);
            let lane = b.remui(t, &warp);
            let r = b.divui(&e, &hc);
            let head = b.remui(&e, &hc);
            let row = Self::mirrored_row(b, &r);
            let kh = b.divui(&head, &groupc);
            let qrow = b.muli(&row, &qwc);
            let qhd = b.muli(&head, &dc);
            let qbase = b.addi(&qrow, &qhd);
            let khd = b.muli(&kh, &dc);
            let p = b.addi(&pos, &row);
            let vis = self.visible(b, &p, &row, &kh);
            // Decode rows split their keys over up to `splits` blocks of at
            // least GPU_SPLIT_KEYS keys (gated NSA keeps one block per (row,
            // head) for its branches); a block past its row's splits leaves
            // before it loads anything.
            let work = match vis.branch.clone() {
                None => {
                    let keysc = b.index(GPU_SPLIT_KEYS);
                    let round = b.index(GPU_SPLIT_KEYS - 1);
                    let up = b.addi(&vis.count, &round);
                    let want = b.divui(&up, &keysc);
                    let want = b.minui(&want, &splitsc);
                    let want = b.maxui(&want, &one_i);
                    BlockWork::Split(b.def(format!("arith.select {decode}, {want}, {one_i} : index")))
                }
                Some(na) => BlockWork::Branches(na),
            };
            let active = match &work {
                BlockWork::Split(n) => b.def(format!("arith.cmpi ult, {sp}, {n} : index")),
                BlockWork::Branches(_) => b.def(format!("arith.cmpi eq, {sp}, {zero_i} : index")),
            };
            b.if_then(&active, |b| {
                let q: Vec<V> = (0..d)
                    .map(|c| {
                        let o = b.index(c);
                        let i = b.addi(&qbase, &o);
                        b.load(&ins[0], &i)
                    })
                    .collect();
                let zero_i0 = b.index(0);
                // Keys lo..hi: from the caches (visible keys), or the compressed
                // keys of blocks lo..hi (gated NSA). Warp 0 writes the row: all of
                // it (`branch` None), or the branch's share, added to the earlier
                // branches'.
                let pass = |b: &mut KernelBuilder, lo: &str, hi: &str, compressed: bool, branch: Option<u64>, nsplit: Option<&str>| {
                    let mut init: Vec<(V, String)> = vec![(ninf.clone(), "f32".into()), (zero.clone(), "f32".into())];
                    init.extend((0..d).map(|_| (zero.clone(), "f32".to_string())));
                    let sw = b.muli(&s, &warp);
                    let start = b.addi(&sw, &lane);
                    let start = b.addi(&start, lo);
                    let st = b.for_fold_typed(&start, hi, WARP * GPU_ATTN_WARPS, &init, |b, tk, acc| {
                        let (ks, vs, bonus) = match (&self.blocks, compressed, &self.sequence) {
                            (Some(blocks), true, _) => {
                                let kb = self.compressed_base(b, &kh, tk);
                                let vb = b.addi(&kb, &dc);
                                (self.f32_row_nvptx(b, blocks, &kb), self.f32_row_nvptx(b, blocks, &vb), None)
                            }
                            (_, _, Some(sq)) => self.sequence_key_nvptx(b, sq, &vis, tk, &khd),
                            _ => {
                                let j = self.key_row(b, &vis, tk);
                                let kbase = self.row_base(b, &j, &khd);
                                let ks = match &self.key_basis {
                                    // Coefficients before RoPE; the key's position is `tk` (no window).
                                    Some(basis) => {
                                        let (kwc, rc) = (b.index(kvh * basis.r), b.index(basis.r));
                                        let rb = b.muli(&j, &kwc);
                                        let khr = b.muli(&kh, &rc);
                                        let cbase = b.addi(&rb, &khr);
                                        let coefs: Vec<V> = (0..basis.r)
                                            .map(|c| {
                                                let o = b.index(c);
                                                let i = b.addi(&cbase, &o);
                                                self.kv_load(b, &self.kbuf, &i)
                                            })
                                            .collect();
                                        basis.expand_nvptx(b, &coefs, &kh, tk)
                                    }
                                    None => self.kv_row_nvptx(b, &self.kbuf, &kbase, self.kv == DType::F16),
                                };
                                (ks, self.kv_row_nvptx(b, &self.vbuf, &kbase, self.kv == DType::F16), None)
                            }
                        };
                        let mut dot = zero.clone();
                        for (qc, k) in q.iter().zip(&ks) {
                            dot = b.fma(qc, k, &dot);
                        }
                        let sv = b.mul(&dot, &scale);
                        let sv = match bonus {
                            Some(bo) => b.add(&sv, &bo),
                            None => sv,
                        };
                        let (m_new, l_new, corr, pr) = online_step(b, &acc[0], &acc[1], &sv);
                        let mut next = vec![m_new, l_new];
                        for (c, v) in vs.iter().enumerate() {
                            let pv = b.mul(&pr, v);
                            next.push(b.fma(&acc[2 + c], &corr, &pv));
                        }
                        next
                    });
                    // A lane without keys has max -1e30 and sums 0: its weight is 0.
                    // A warp whose first key is past the visible ones (short rows of a
                    // prefill) skips the shuffles (the branch is uniform over the warp)
                    // and leaves an empty partial.
                    let zero_i = b.index(0);
                    let first = b.def(format!("arith.cmpi eq, {lane}, {zero_i} : index"));
                    let partc = b.index(part);
                    let sbase = b.muli(&s, &partc);
                    let wfirst = b.addi(&sw, lo);
                    let has_keys = b.def(format!("arith.cmpi ult, {wfirst}, {hi} : index"));
                    b.if_else(
                        &has_keys,
                        |b| {
                            // The warp's partial: its max, its sum and its unnormalized values.
                            let m = b.warp_all(&st[0], "maxnumf");
                            let dm = b.sub(&st[0], &m);
                            let w = math::exp(b, &dm);
                            let lw = b.mul(&st[1], &w);
                            let l = b.warp_all(&lw, "addf");
                            let sums: Vec<V> = (0..d as usize)
                                .map(|c| {
                                    let a = b.mul(&st[2 + c], &w);
                                    b.warp_all(&a, "addf")
                                })
                                .collect();
                            b.if_then(&first, |b| Self::store_partial(b, &smem, &sbase, &m, &l, &sums));
                        },
                        |b| {
                            let empty = vec![zero.clone(); d as usize];
                            b.if_then(&first, |b| Self::store_partial(b, &smem, &sbase, &ninf, &zero, &empty));
                        },
                    );
                    // Every warp of the block is here (whole blocks of work).
                    b.barrier();
                    // Warp 0 combines the block's partials; lane l writes dims l, l + 32, ...
                    let warp0 = b.def(format!("arith.cmpi eq, {s}, {zero_i} : index"));
                    b.if_then(&warp0, |b| {
                        let (ws, total, m) = partial_weights(b, &smem, part);
                        // The block's weighted values of dim c, unnormalized.
                        let block_sum = |b: &mut KernelBuilder, c: &str| {
                            let mut y = b.f32(0.0);
                            for (k, wk) in ws.iter().enumerate() {
                                let o = b.index(k as u64 * part + 2);
                                let at = b.addi(&o, c);
                                let a = b.load_shared(&smem, &at);
                                y = b.fma(&a, wk, &y);
                            }
                            y
                        };
                        let write_row = |b: &mut KernelBuilder| {
                            let f = match branch {
                                None => {
                                    let one = b.f32(1.0);
                                    b.div(&one, &total)
                                }
                                Some(br) => {
                                    let w = self.gate_weight(b, &row, &head, br);
                                    Self::branch_factor(b, &w, &total)
                                }
                            };
                            b.for_step(&lane, &dc, WARP, |b, c| {
                                let y = block_sum(b, c);
                                let y = b.mul(&y, &f);
                                let i = b.addi(&qbase, c);
                                let y = if branch.is_some_and(|br| br != BR_SELECTED) {
                                    let prev = b.load(out, &i);
                                    b.add(&prev, &y)
                                } else {
                                    y
                                };
                                b.store(&y, out, &i);
                            });
                        };
                        match nsplit {
                            None => write_row(b),
                            Some(nsplit) => {
                                let many = b.def(format!("arith.cmpi ugt, {nsplit}, {one_i} : index"));
                                b.if_else(
                                    &many,
                                    |b| {
                                        let last = self.split_partial(b, &scratch, &head, &sp, nsplit, &lane, (&m, &total), &block_sum);
                                        b.if_then(&last, |b| self.combine_splits(b, &scratch, &head, nsplit, &lane, &qbase, out));
                                    },
                                    write_row,
                                );
                            }
                        }
                    });
                };
                match &work {
                    BlockWork::Split(nsplit) => {
                        // Split `sp` of `nsplit` takes keys sp·count/n .. (sp+1)·count/n.
                        let a = b.muli(&sp, &vis.count);
                        let lo = b.divui(&a, nsplit);
                        let sp1 = b.addi(&sp, &one_i);
                        let a = b.muli(&sp1, &vis.count);
                        let hi = b.divui(&a, nsplit);
                        pass(b, &lo, &hi, false, None, Some(nsplit));
                    }
                    BlockWork::Branches(na) => {
                        let nb = self.compressed_count(b, &p);
                        pass(b, &zero_i0, na, false, Some(BR_SELECTED), None);
                        // The next pass writes the shared partials warp 0 read.
                        b.barrier();
                        pass(b, na, &vis.count, false, Some(BR_WINDOW), None);
                        b.barrier();
                        pass(b, &zero_i0, &nb, true, Some(BR_COMPRESSED), None);
                    }
                }
            });
        });
        Ok(())
    }

    /// NVPTX, warp 0 of a split block: its partial (block max `m`, sum `l`,
    /// unnormalized weighted values) goes to the scratch record of (head,
    /// split `sp`) after the head's ticket counter, and a fence makes it
    /// visible before lane 0 takes a ticket (`atomicrmw fadd` of 1 on the
    /// head's counter); the ticket comes back to every lane of the warp.
    /// Returns whether this block took the last ticket.
    #[allow(clippy::too_many_arguments)]
    fn split_partial(
        &self,
        b: &mut KernelBuilder,
        scratch: &str,
        head: &str,
        sp: &str,
        nsplit: &str,
        lane: &str,
        (m, l): (&str, &str),
        block_sum: &dyn Fn(&mut KernelBuilder, &str) -> V,
    ) -> V {
        let d = self.d;
        let (zero_i, one_i, dc) = (b.index(0), b.index(1), b.index(d));
        let base = self.split_record(b, head, sp);
        let first = b.def(format!("arith.cmpi eq, {lane}, {zero_i} : index"));
        b.if_then(&first, |b| {
            b.store(m, scratch, &base);
            let at = b.addi(&base, &one_i);
            b.store(l, scratch, &at);
        });
        let two = b.index(2);
        let vals = b.addi(&base, &two);
        b.for_step(lane, &dc, WARP, |b, c| {
            let y = block_sum(b, c);
            let at = b.addi(&vals, c);
            b.store(&y, scratch, &at);
        });
        // Every lane's record stores, then lane 0's fence orders them (and,
        // cumulatively, what the warp barrier made it see) before its ticket.
        let mask = b.i32(-1);
        b.line(format!("nvvm.bar.warp.sync {mask} : i32"));
        let zero = b.f32(0.0);
        let one = b.f32(1.0);
        let ticket = b.def(format!("scf.if {first} -> (f32) {{"));
        b.fence();
        let old = b.atomic_add(scratch, head, &one);
        b.line(format!("scf.yield {old} : f32"));
        b.line("} else {".into());
        b.line(format!("scf.yield {zero} : f32"));
        b.line("}".into());
        let ticket = b.warp_from(&ticket, &zero_i);
        // The block whose ticket is the last combines every split.
        let nf = b.index_to_f32(nsplit);
        let last = b.sub(&nf, &one);
        b.def(format!("arith.cmpf oeq, {ticket}, {last} : f32"))
    }

    /// NVPTX, warp 0 of the split block that took the last ticket: resets the head's counter for the next call, then
    /// combines the `nsplit` records (read from memory, not L1) under their
    /// common max and writes the output row.
    #[allow(clippy::too_many_arguments)]
    fn combine_splits(&self, b: &mut KernelBuilder, scratch: &str, head: &str, nsplit: &str, lane: &str, qbase: &str, out: &str) {
        let d = self.d;
        let (zero_i, one_i, dc) = (b.index(0), b.index(1), b.index(d));
        let first = b.def(format!("arith.cmpi eq, {lane}, {zero_i} : index"));
        let zero = b.f32(0.0);
        b.if_then(&first, |b| b.store(&zero, scratch, head));
        b.fence();
        let ninf = b.f32(-1e30);
        let mx = b.for_fold(&zero_i, nsplit, std::slice::from_ref(&ninf), |b, j, acc| {
            let at = self.split_record(b, head, j);
            let mj = b.load_volatile(scratch, &at);
            vec![b.fbin("maxnumf", &acc[0], &mj)]
        });
        let total = b.for_fold(&zero_i, nsplit, std::slice::from_ref(&zero), |b, j, acc| {
            let at = self.split_record(b, head, j);
            let mj = b.load_volatile(scratch, &at);
            let at = b.addi(&at, &one_i);
            let lj = b.load_volatile(scratch, &at);
            let dm = b.sub(&mj, &mx[0]);
            let w = math::exp(b, &dm);
            vec![b.fma(&lj, &w, &acc[0])]
        });
        let one = b.f32(1.0);
        let f = b.div(&one, &total[0]);
        b.for_step(lane, &dc, WARP, |b, c| {
            let y = b.for_fold(&zero_i, nsplit, std::slice::from_ref(&zero), |b, j, acc| {
                let at = self.split_record(b, head, j);
                let mj = b.load_volatile(scratch, &at);
                let two = b.index(2);
                let at = b.addi(&at, &two);
                let at = b.addi(&at, c);
                let yj = b.load_volatile(scratch, &at);
                let dm = b.sub(&mj, &mx[0]);
                let w = math::exp(b, &dm);
                vec![b.fma(&yj, &w, &acc[0])]
            });
            let y = b.mul(&y[0], &f);
            let i = b.addi(qbase, c);
            b.store(&y, out, &i);
        });
    }

    /// The scratch index of (head, split)'s record: after the `h` counters.
    fn split_record(&self, b: &mut KernelBuilder, head: &str, sp: &str) -> V {
        let (hc, sc, rec) = (b.index(self.h), b.index(GPU_SPLITS), b.index(self.d + 2));
        let slot = b.muli(head, &sc);
        let slot = b.addi(&slot, sp);
        let at = b.muli(&slot, &rec);
        b.addi(&hc, &at)
    }

    /// One unit per (row, head): an online softmax over the visible keys,
    /// accumulating the weighted values in a row of scratch, then the output
    /// row. Gated NSA runs it per branch (the selected keys, the window, the
    /// blocks' compressed keys) and adds each branch's share.
    fn emit_online(&self, b: &mut KernelBuilder, cx: &KernelCtx<'_>) -> Result<(), CompileError> {
        let KernelCtx { work, ins, out, .. } = *cx;
        let (h, kvh, d) = (self.h, self.kvh, self.d);
        let (hc, dc, qwc, groupc) = (b.index(h), b.index(d), b.index(h * d), b.index(h / kvh));
        let zero_i = b.index(0);
        let zero = b.f32(0.0);
        let ninf = b.f32(-1e30);
        let scale = b.f32(1.0 / (d as f32).sqrt());
        let pos = b.pos();
        let acc = b.alloca_f32(&dc);
        b.parallel(work, |b, unit| {
            let r = b.divui(unit, &hc);
            let head = b.remui(unit, &hc);
            let row = Self::mirrored_row(b, &r);
            let kh = b.divui(&head, &groupc);
            let qrow = b.muli(&row, &qwc);
            let qhd = b.muli(&head, &dc);
            let qbase = b.addi(&qrow, &qhd);
            let khd = b.muli(&kh, &dc);
            let p = b.addi(&pos, &row);
            let vis = self.visible(b, &p, &row, &kh);
            // Keys lo..hi: from the caches (visible keys), or the compressed
            // keys of blocks lo..hi; their sum, the weighted values in `acc`.
            let pass = |b: &mut KernelBuilder, lo: &str, hi: &str, compressed: bool| -> V {
                b.for_each(&zero_i, &dc, |b, c| b.store(&zero, &acc, c));
                let ml = b.for_fold(lo, hi, &[ninf.clone(), zero.clone()], |b, t, a| {
                    let (kbase, vbase) = if compressed {
                        let kb = self.compressed_base(b, &kh, t);
                        let vb = b.addi(&kb, &dc);
                        (kb, vb)
                    } else {
                        let j = self.key_row(b, &vis, t);
                        let kb = self.row_base(b, &j, &khd);
                        (kb.clone(), kb)
                    };
                    let load = |b: &mut KernelBuilder, cache: &V, i: &str| match (&self.blocks, compressed) {
                        (Some(blocks), true) => b.load(blocks, i),
                        _ => self.kv_load(b, cache, i),
                    };
                    let dot = b.for_fold(&zero_i, &dc, std::slice::from_ref(&zero), |b, c, a| {
                        let qi = b.addi(&qbase, c);
                        let ki = b.addi(&kbase, c);
                        let qv = b.load(&ins[0], &qi);
                        let kv = load(b, &self.kbuf, &ki);
                        vec![b.fma(&qv, &kv, &a[0])]
                    });
                    let s = b.mul(&dot[0], &scale);
                    let (m_new, l, corr, pr) = online_step(b, &a[0], &a[1], &s);
                    b.for_each(&zero_i, &dc, |b, c| {
                        let vi = b.addi(&vbase, c);
                        let prev = b.load(&acc, c);
                        let vv = load(b, &self.vbuf, &vi);
                        let pv = b.mul(&pr, &vv);
                        let y = b.fma(&prev, &corr, &pv);
                        b.store(&y, &acc, c);
                    });
                    vec![m_new, l]
                });
                ml[1].clone()
            };
            // out (+)= acc · f.
            let put = |b: &mut KernelBuilder, f: &V, add: bool| {
                b.for_each(&zero_i, &dc, |b, c| {
                    let o = b.addi(&qbase, c);
                    let y = b.load(&acc, c);
                    let y = b.mul(&y, f);
                    let y = if add {
                        let prev = b.load(out, &o);
                        b.add(&prev, &y)
                    } else {
                        y
                    };
                    b.store(&y, out, &o);
                });
            };
            match vis.branch.clone() {
                None => {
                    let l = pass(b, &zero_i, &vis.count, false);
                    let one = b.f32(1.0);
                    let inv = b.div(&one, &l);
                    put(b, &inv, false);
                }
                Some(na) => {
                    let nb = self.compressed_count(b, &p);
                    for (br, lo, hi, compressed) in [
                        (BR_SELECTED, zero_i.clone(), na.clone(), false),
                        (BR_WINDOW, na.clone(), vis.count.clone(), false),
                        (BR_COMPRESSED, zero_i.clone(), nb, true),
                    ] {
                        let l = pass(b, &lo, &hi, compressed);
                        let w = self.gate_weight(b, &row, &head, br);
                        let f = Self::branch_factor(b, &w, &l);
                        put(b, &f, br != BR_SELECTED);
                    }
                }
            }
        });
        Ok(())
    }
}
