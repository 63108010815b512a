//! Causal multi-head attention (grouped KV heads) over the KV caches, with
//! sliding windows and sink tokens; f32 or f16 caches; windowed layers read
//! ring caches on the CPU. A query visits only the keys it sees (its sinks,
//! then its window), so a window costs O(window + sinks) per query.
//!
//! Two variants. On the CPU, when the head width is a multiple of the vector
//! width: one unit per (row, KV head, split) serves every query head of the KV
//! group. It walks its keys in tiles of `KEY_TILE`, widening each tile's K and
//! V rows to f32 once for the whole group, with an online softmax per head
//! (bounded scratch: two tiles, a tile of scores and the group's sums). In
//! decode the visible keys are split over `ATTN_SPLITS` units
//! (flash-decoding); each writes its partial softmax (max, sum, weighted
//! values) to a scratch buffer, and a second phase of units, one per
//! (row, head), combines them. Otherwise on the CPU: one unit per
//! (row, head), an online softmax accumulating into the output row. On
//! NVIDIA: a block of warps per (row, head), its lanes splitting the keys,
//! combined with warp shuffles and then across the warps in shared memory.

use super::{fixed_last, KernelCtx, KernelSpec, GPU_ATTN_WARPS, VW, WARP};
use crate::error::CompileError;
use crate::mlir::builder::{Device, KernelBuilder, V};
use crate::mlir::math;
use sparsec_ir::{DType, NativeSparse, Op, Pattern, SymSize, Window};

/// How many keys ahead CPU attention prefetches its K and V rows.
const ATTN_PREFETCH_KEYS: u64 = 16;
/// Keys per tile of the CPU split variant: a tile's K and V rows, widened to
/// f32 (2·32·64·4 = 16 KiB at head width 64), stay in L1 while every head of
/// the group reads them.
const KEY_TILE: u64 = 32;
/// The most units one decode row's keys are split over, per KV head.
pub const ATTN_SPLITS: u64 = 8;
/// The fewest visible keys a decode row splits (into `ATTN_SPLITS` spans):
/// shorter rows are not worth a combine.
const SPLIT_MIN_KEYS: u64 = 256;
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

/// `(heads, kv_heads, head width)` of an attention kernel.
fn dims(spec: &KernelSpec) -> Result<(u64, u64, u64), CompileError> {
    let Op::Attention { heads, kv_heads } = spec.op else { return Err(spec.unsupported("not an attention op")) };
    let qw = fixed_last(spec, &spec.operands[0])?;
    Ok((heads as u64, kv_heads as u64, qw / (heads as u64).max(1)))
}

/// Whether the CPU kernel is the grouped, split variant (two phases of units
/// and a scratch buffer).
pub fn cpu_split(spec: &KernelSpec) -> bool {
    dims(spec).is_ok_and(|(_, _, d)| d > 0 && d % VW as u64 == 0)
}

/// The CPU units of the split variant's first phase (partials), and of both
/// phases together: `(seq·kv_heads·ATTN_SPLITS, that + seq·heads)`.
pub fn cpu_phases(spec: &KernelSpec) -> Result<(SymSize, SymSize), CompileError> {
    let (h, kvh, _) = dims(spec)?;
    let first = kvh * ATTN_SPLITS;
    Ok((SymSize { coef: first, seq_pow: 1 }, SymSize { coef: first + h, seq_pow: 1 }))
}

/// f32 words of the split variant's scratch: per (KV head, split, head of the
/// group) a max, a sum and a head-width row of weighted values (decode rows only).
pub fn scratch_words(spec: &KernelSpec) -> Result<u64, CompileError> {
    let (h, kvh, d) = dims(spec)?;
    Ok(kvh * ATTN_SPLITS * (h / kvh.max(1)) * (d + 2))
}

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
}

/// `out[r, head]` = softmax(q·kᵀ/√d)·v over the keys row r sees.
pub(super) fn emit_attention(b: &mut KernelBuilder, cx: &KernelCtx<'_>, heads: u32, kv_heads: u32) -> Result<(), CompileError> {
    let KernelCtx { spec, device, ins, .. } = *cx;
    let window = window_of(spec)?;
    let (h, kvh, d) = dims(spec)?;
    if heads == 0 || kv_heads == 0 || h % kvh != 0 {
        return Err(spec.unsupported("heads must be a positive multiple of kv_heads"));
    }
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
    let quant = if kv.is_quantized() {
        if !cpu_split(spec) || d % sparsec_ir::quant::QK as u64 != 0 {
            return Err(spec.unsupported(&format!("{} KV caches need a head width that is a multiple of 32, not {d}", kv.name())));
        }
        let rows = |b: &mut KernelBuilder, buf: &str| super::kv_quant::QuantRows::new(b, kv, buf, kvh * d);
        match (rows(b, &ins[1]), rows(b, &ins[2])) {
            (Some(k), Some(v)) => Some((k, v)),
            _ => return Err(spec.unsupported(&format!("{} KV caches of width {}", kv.name(), kvh * d))),
        }
    } else {
        None
    };
    let (kbuf, vbuf) = match kv {
        DType::F16 => (b.f16_param(&ins[1]), b.f16_param(&ins[2])),
        _ => (ins[1].clone(), ins[2].clone()),
    };
    // Under `#nsa`, operand 3 is the selection (`nsa.rs`).
    let nsa = match NativeSparse::of(&spec.patterns) {
        Some(n) => Some((n, ins.get(3).ok_or_else(|| spec.unsupported("#nsa attention takes the selection as operand 3"))?.clone())),
        None => None,
    };
    let ctx =
        Attn { h, kvh, d, window, ring: if device == Device::Cpu { cpu_ring(window) } else { None }, kv, quant, hadamard, kbuf, vbuf, nsa };
    match device {
        Device::Cpu if cpu_split(spec) => ctx.emit_split(b, cx),
        Device::Cpu => ctx.emit_online(b, cx),
        Device::Nvptx => ctx.emit_warp(b, cx),
    }
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
}

impl Attn {
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
        if self.kv == DType::F16 {
            b.vload_f16(buf, i, VW)
        } else {
            b.vload(buf, i, VW)
        }
    }

    fn kv_load(&self, b: &mut KernelBuilder, buf: &str, i: &str) -> V {
        if self.kv == DType::F16 {
            b.load_f16(buf, i)
        } else {
            b.load(buf, i)
        }
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

    /// NVPTX: the `d` values of a cache row starting at element `base`, as
    /// f32 scalars: 16-byte vector loads (8 f16 or 4 f32) where `d` is a
    /// multiple of their width (rows then start 16-byte aligned), else one
    /// load per value.
    fn kv_row_nvptx(&self, b: &mut KernelBuilder, buf: &str, base: &str) -> Vec<V> {
        let (elem, width) = if self.kv == DType::F16 { ("f16", 8u64) } else { ("f32", 4u64) };
        if !self.d.is_multiple_of(width) {
            return (0..self.d)
                .map(|c| {
                    let o = b.index(c);
                    let i = b.addi(base, &o);
                    self.kv_load(b, buf, &i)
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
            let v =
                if self.kv == DType::F16 { b.def(format!("arith.extf {raw} : vector<{width}xf16> to vector<{width}xf32>")) } else { raw };
            for l in 0..width as i32 {
                let li = b.i32(l);
                out.push(b.def(format!("llvm.extractelement {v}[{li} : i32] : vector<{width}xf32>")));
            }
        }
        out
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
            (None, None) => return Visible { sinks: zero.clone(), from: zero, count: end, selected: None },
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
        Visible { sinks, from, count, selected }
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

    /// Splits of a row's visible keys: `ATTN_SPLITS` in decode (one row) with
    /// at least `SPLIT_MIN_KEYS` keys, else one. Always all of them, so that
    /// every unit of the first phase has work and the runtime's even ranges of
    /// units are even ranges of work.
    fn splits(&self, b: &mut KernelBuilder, count: &str) -> V {
        let one = b.index(1);
        let seq = b.seq();
        let min_keys = b.index(SPLIT_MIN_KEYS);
        let most = b.index(ATTN_SPLITS);
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
        let one = b.index(1);
        let two = b.index(2);
        let half = b.divui(i, &two);
        let odd = b.remui(i, &two);
        let odd = b.def(format!("arith.index_cast {odd} : index to i1"));
        let last = b.def(format!("arith.subi {seq}, {one} : index"));
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
        let kvw = kvh * d;
        let nv = (d / VW as u64) as usize;
        let (first, total) = cpu_phases(spec)?;
        let first = b.sym(first);
        let total = b.sym(total);
        let zero_i = b.index(0);
        let one_i = b.index(1);
        let (dc, qwc, kvwc, groupc, hc, splitsc) =
            (b.index(d), b.index(qw), b.index(kvw), b.index(group), b.index(h), b.index(ATTN_SPLITS));
        let rec = b.index(d + 2);
        let zero = b.f32(0.0);
        let ninf = b.f32(-1e30);
        let scale = b.f32(1.0 / (d as f32).sqrt());
        let pos = b.pos();
        // Key tiles: a tile's K and V rows widened to f32 once, for every head
        // of the group (f16 caches convert once per group, not once per head).
        let tile_elems = b.index(KEY_TILE * d);
        let ktile = b.alloca_f32(&tile_elems);
        let vtile = b.alloca_f32(&tile_elems);
        let tile_keys = b.index(KEY_TILE);
        let stile = b.alloca_f32(&tile_keys);
        // The group's running weighted sums of values, one row per head.
        let acc_elems = b.index(group * d);
        let acc_mem = b.alloca_f32(&acc_elems);
        let qrot = self.hadamard.then(|| b.alloca_f32(&acc_elems));
        let kv_len = b.def(format!("memref.dim {}, {zero_i} : memref<?x{}>", self.kbuf, self.kv_elem()));
        let kv_last = b.def(format!("arith.subi {kv_len}, {one_i} : index"));
        // Where a partial of (KV head, split, head of the group) lives in the scratch.
        let record = |b: &mut KernelBuilder, kh: &str, s: &str, g: &str| -> V {
            let a = b.muli(kh, &splitsc);
            let a = b.addi(&a, s);
            let a = b.muli(&a, &groupc);
            let a = b.addi(&a, g);
            b.muli(&a, &rec)
        };
        let vty = KernelBuilder::vty(VW);
        // Phase 1: partial softmax of (row, KV head, split) for each head of the group.
        let ub = b.minui("%hi", &first);
        b.for_each("%lo", &ub, |b, unit| {
            let per_row = b.index(kvh * ATTN_SPLITS);
            let r = b.divui(unit, &per_row);
            let rem = b.remui(unit, &per_row);
            let kh = b.divui(&rem, &splitsc);
            let s = b.remui(&rem, &splitsc);
            let row = Self::mirrored_row(b, &r);
            let p = b.addi(&pos, &row);
            let vis = self.visible(b, &p, &row, &kh);
            let n = self.splits(b, &vis.count);
            let active = b.def(format!("arith.cmpi ult, {s}, {n} : index"));
            b.if_then(&active, |b| {
                // Keys t0..t1 of the row's visible ones.
                let a = b.muli(&s, &vis.count);
                let t0 = b.divui(&a, &n);
                let s1 = b.addi(&s, &one_i);
                let a = b.muli(&s1, &vis.count);
                let t1 = b.divui(&a, &n);
                let khd = b.muli(&kh, &dc);
                let head0 = b.muli(&kh, &groupc);
                let qrow = b.muli(&row, &qwc);
                let z = b.vzero(VW);
                b.for_each(&zero_i, &acc_elems, |b, i| b.store(&zero, &acc_mem, i));
                let qbase_of = |b: &mut KernelBuilder, g: u64| -> V {
                    let gi = b.index(g);
                    let head = b.addi(&head0, &gi);
                    let qhd = b.muli(&head, &dc);
                    b.addi(&qrow, &qhd)
                };
                // Rotated caches: the group's queries rotated alike, once.
                if let Some(qrot) = &qrot {
                    for g in 0..group {
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
                for _ in 0..group {
                    init.push((ninf.clone(), "f32".into()));
                    init.push((zero.clone(), "f32".into()));
                }
                let ml = b.for_fold_typed(&t0, &t1, KEY_TILE, &init, |b, tb, ml| {
                    let te = b.addi(tb, &tile_keys);
                    let te = b.minui(&te, &t1);
                    let nk = b.def(format!("arith.subi {te}, {tb} : index"));
                    // Widen the tile's rows (the caches are read from memory: ask
                    // for rows ahead, clamped to the caches' last element).
                    b.for_each(&zero_i, &nk, |b, i| {
                        let t = b.addi(tb, i);
                        let j = self.key_row(b, &vis, &t);
                        let at = b.muli(i, &dc);
                        if let Some((qk, qv)) = &self.quant {
                            // Blocks of 32 of the head's part of the row, dequantized.
                            let rowb = b.index(qk.row_bytes());
                            let rb = b.muli(&j, &rowb);
                            for q in [qk, qv] {
                                b.prefetch_ahead(q.bytes(), &rb, ATTN_PREFETCH_KEYS * qk.row_bytes(), &kv_last, "i8");
                            }
                            let qkc = b.index(sparsec_ir::quant::QK as u64);
                            let blk0 = b.divui(&khd, &qkc);
                            for c in 0..d / sparsec_ir::quant::QK as u64 {
                                let ci = b.index(c);
                                let blk = b.addi(&blk0, &ci);
                                let o = b.index(c * sparsec_ir::quant::QK as u64);
                                let dst = b.addi(&at, &o);
                                let sixteen = b.index(16);
                                let dst2 = b.addi(&dst, &sixteen);
                                for (q, tile) in [(qk, &ktile), (qv, &vtile)] {
                                    let (lo, hi) = q.load_block(b, &j, &blk);
                                    b.vstore(&lo, tile, &dst, 16);
                                    b.vstore(&hi, tile, &dst2, 16);
                                }
                            }
                            return;
                        }
                        let rb = b.muli(&j, &kvwc);
                        let base = b.addi(&rb, &khd);
                        for buf in [&self.kbuf, &self.vbuf] {
                            b.prefetch_ahead(buf, &base, ATTN_PREFETCH_KEYS * kvw, &kv_last, self.kv_elem());
                            b.prefetch_ahead(buf, &base, ATTN_PREFETCH_KEYS * kvw + d - 1, &kv_last, self.kv_elem());
                        }
                        for v in 0..nv {
                            let o = b.index(v as u64 * VW as u64);
                            let src = b.addi(&base, &o);
                            let dst = b.addi(&at, &o);
                            let k = self.kv_vload(b, &self.kbuf, &src);
                            b.vstore(&k, &ktile, &dst, VW);
                            let x = self.kv_vload(b, &self.vbuf, &src);
                            b.vstore(&x, &vtile, &dst, VW);
                        }
                    });
                    let vwc = b.index(VW as u64);
                    let blocks = b.divui(&nk, &vwc);
                    let blocked = b.muli(&blocks, &vwc);
                    let mut next = Vec::new();
                    for g in 0..group {
                        let qbase = qbase_of(b, g);
                        let qs: Vec<V> = (0..nv)
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
                        let key_dot = |b: &mut KernelBuilder, i: &str| -> V {
                            let kb = b.muli(i, &dc);
                            let mut acc = z.clone();
                            for (v, q) in qs.iter().enumerate() {
                                let o = b.index(v as u64 * VW as u64);
                                let at = b.addi(&kb, &o);
                                let k = b.vload(&ktile, &at, VW);
                                acc = b.vfma(q, &k, &acc, VW);
                            }
                            acc
                        };
                        // Scores VW keys at a time (their dots overlap in flight and
                        // one butterfly sums all VW), then the rest one by one.
                        let vninf = b.vbroadcast(&ninf, VW);
                        let vscale = b.vbroadcast(&scale, VW);
                        let vmax = b.for_fold_typed(&zero_i, &blocked, VW as u64, &[(vninf, vty.clone())], |b, ib, acc| {
                            let dots: Vec<V> = (0..VW as u64)
                                .map(|u| {
                                    let o = b.index(u);
                                    let i = b.addi(ib, &o);
                                    key_dot(b, &i)
                                })
                                .collect();
                            let sums = b.vsums(&dots, VW);
                            let sv = b.def(format!("arith.mulf {sums}, {vscale} : {vty}"));
                            b.vstore(&sv, &stile, ib, VW);
                            vec![b.def(format!("arith.maxnumf {}, {sv} : {vty}", acc[0]))]
                        });
                        let block_max = b.def(format!("vector.reduction <maxnumf>, {} : {vty} into f32", vmax[0]));
                        let tmax = b.for_fold(&blocked, &nk, &[block_max], |b, i, acc| {
                            let dot = key_dot(b, i);
                            let dsum = b.vsum(&dot, VW);
                            let sv = b.mul(&dsum, &scale);
                            b.store(&sv, &stile, i);
                            vec![b.fbin("maxnumf", &acc[0], &sv)]
                        });
                        // Online softmax: rescale what the earlier tiles summed.
                        let (m_old, l_old) = (&ml[2 * g as usize], &ml[2 * g as usize + 1]);
                        let m_new = b.fbin("maxnumf", m_old, &tmax[0]);
                        let dm = b.sub(m_old, &m_new);
                        let corr = math::exp(b, &dm);
                        let tsum = b.for_fold(&zero_i, &nk, std::slice::from_ref(&zero), |b, i, acc| {
                            let sv = b.load(&stile, i);
                            let c = b.sub(&sv, &m_new);
                            let e = math::exp(b, &c);
                            b.store(&e, &stile, i);
                            // Reassociable, so LLVM may vectorize this loop (exp included).
                            vec![b.def(format!("arith.addf {}, {e} fastmath<reassoc> : f32", acc[0]))]
                        });
                        let l_new = b.fma(l_old, &corr, &tsum[0]);
                        let ab = b.index(g * d);
                        let corrv = b.vbroadcast(&corr, VW);
                        let init: Vec<(V, String)> = (0..nv)
                            .map(|v| {
                                let o = b.index(g * d + v as u64 * VW as u64);
                                let a = b.vload(&acc_mem, &o, VW);
                                (b.def(format!("arith.mulf {a}, {corrv} : {vty}")), vty.clone())
                            })
                            .collect();
                        let accs = b.for_fold_typed(&zero_i, &nk, 1, &init, |b, i, accs| {
                            let e = b.load(&stile, i);
                            let ev = b.vbroadcast(&e, VW);
                            let vb = b.muli(i, &dc);
                            (0..nv)
                                .map(|v| {
                                    let o = b.index(v as u64 * VW as u64);
                                    let at = b.addi(&vb, &o);
                                    let x = b.vload(&vtile, &at, VW);
                                    b.vfma(&ev, &x, &accs[v], VW)
                                })
                                .collect()
                        });
                        for (v, acc) in accs.iter().enumerate() {
                            let o = b.index(v as u64 * VW as u64);
                            let at = b.addi(&ab, &o);
                            b.vstore(acc, &acc_mem, &at, VW);
                        }
                        next.push(m_new);
                        next.push(l_new);
                    }
                    next
                });
                let whole = b.def(format!("arith.cmpi eq, {n}, {one_i} : index"));
                for g in 0..group {
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
                            // One split: the row's result directly.
                            let one = b.f32(1.0);
                            let inv = b.div(&one, l);
                            let invv = b.vbroadcast(&inv, VW);
                            let ys: Vec<V> = accs.iter().map(|acc| b.def(format!("arith.mulf {acc}, {invv} : {vty}"))).collect();
                            for (v, y) in self.unrotate(b, ys).iter().enumerate() {
                                let o = b.index(v as u64 * VW as u64);
                                let i = b.addi(&qbase, &o);
                                b.vstore(y, out, &i, VW);
                            }
                        },
                        |b| {
                            let gi = b.index(g);
                            let at = record(b, &kh, &s, &gi);
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
            });
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
            let n = self.splits(b, &vis.count);
            let split = b.def(format!("arith.cmpi ugt, {n}, {one_i} : index"));
            b.if_then(&split, |b| {
                let g = b.remui(&head, &groupc);
                let m = b.for_fold(&zero_i, &n, std::slice::from_ref(&ninf), |b, s, acc| {
                    let at = record(b, &kh, s, &g);
                    let ms = b.load(&scratch, &at);
                    vec![b.fbin("maxnumf", &acc[0], &ms)]
                });
                let z = b.vzero(VW);
                let mut init: Vec<(V, String)> = vec![(zero.clone(), "f32".into())];
                init.extend((0..nv).map(|_| (z.clone(), KernelBuilder::vty(VW))));
                let acc = b.for_fold_typed(&zero_i, &n, 1, &init, |b, s, acc| {
                    let at = record(b, &kh, s, &g);
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
                });
                let one = b.f32(1.0);
                let inv = b.div(&one, &acc[0]);
                let invv = b.vbroadcast(&inv, VW);
                let qhd = b.muli(&head, &dc);
                let ys: Vec<V> =
                    (0..nv).map(|v| b.def(format!("arith.mulf {}, {invv} : {}", acc[1 + v], KernelBuilder::vty(VW)))).collect();
                for (v, y) in self.unrotate(b, ys).iter().enumerate() {
                    let o = b.index(v as u64 * VW as u64);
                    let i = b.addi(&qhd, &o);
                    b.vstore(y, out, &i, VW);
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
    fn emit_warp(&self, b: &mut KernelBuilder, cx: &KernelCtx<'_>) -> Result<(), CompileError> {
        let KernelCtx { work, ins, out, .. } = *cx;
        let (h, kvh, d) = (self.h, self.kvh, self.d);
        let (hc, dc, qwc, kvwc, groupc) = (b.index(h), b.index(d), b.index(h * d), b.index(kvh * d), b.index(h / kvh));
        let zero = b.f32(0.0);
        let ninf = b.f32(-1e30);
        let scale = b.f32(1.0 / (d as f32).sqrt());
        let pos = b.pos();
        let (split, group, part) = (b.index(GPU_ATTN_WARPS), b.index(GPU_ATTN_WARPS * WARP), 2 + d);
        let smem = b.shared_f32("attn_partials", GPU_ATTN_WARPS * part);
        b.parallel(work, |b, t| {
            let warp = b.index(WARP);
            let e = b.divui(t, &group);
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
            let q: Vec<V> = (0..d)
                .map(|c| {
                    let o = b.index(c);
                    let i = b.addi(&qbase, &o);
                    b.load(&ins[0], &i)
                })
                .collect();
            let mut init: Vec<(V, String)> = vec![(ninf.clone(), "f32".into()), (zero.clone(), "f32".into())];
            init.extend((0..d).map(|_| (zero.clone(), "f32".to_string())));
            let sw = b.muli(&s, &warp);
            let start = b.addi(&sw, &lane);
            let st = b.for_fold_typed(&start, &vis.count, WARP * GPU_ATTN_WARPS, &init, |b, tk, acc| {
                let j = self.key_row(b, &vis, tk);
                let kb = b.muli(&j, &kvwc);
                let kbase = b.addi(&kb, &khd);
                let mut dot = zero.clone();
                let ks = self.kv_row_nvptx(b, &self.kbuf, &kbase);
                for (qc, k) in q.iter().zip(&ks) {
                    dot = b.fma(qc, k, &dot);
                }
                let sv = b.mul(&dot, &scale);
                let m_new = b.fbin("maxnumf", &acc[0], &sv);
                let dm = b.sub(&acc[0], &m_new);
                let corr = math::exp(b, &dm);
                let ds = b.sub(&sv, &m_new);
                let pr = math::exp(b, &ds);
                let mut next = vec![m_new, b.fma(&acc[1], &corr, &pr)];
                let vs = self.kv_row_nvptx(b, &self.vbuf, &kbase);
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
            let has_keys = b.def(format!("arith.cmpi ult, {sw}, {} : index", vis.count));
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
                let ms: Vec<V> = (0..GPU_ATTN_WARPS)
                    .map(|k| {
                        let at = b.index(k * part);
                        b.load_shared(&smem, &at)
                    })
                    .collect();
                let mut mx = ms[0].clone();
                for mk in &ms[1..] {
                    mx = b.fbin("maxnumf", &mx, mk);
                }
                let mut total = b.f32(0.0);
                let ws: Vec<V> = ms
                    .iter()
                    .enumerate()
                    .map(|(k, mk)| {
                        let dk = b.sub(mk, &mx);
                        let wk = math::exp(b, &dk);
                        let at = b.index(k as u64 * part + 1);
                        let lk = b.load_shared(&smem, &at);
                        total = b.fma(&lk, &wk, &total);
                        wk
                    })
                    .collect();
                let one = b.f32(1.0);
                let inv = b.div(&one, &total);
                b.for_step(&lane, &dc, WARP, |b, c| {
                    let mut y = b.f32(0.0);
                    for (k, wk) in ws.iter().enumerate() {
                        let o = b.index(k as u64 * part + 2);
                        let at = b.addi(&o, c);
                        let a = b.load_shared(&smem, &at);
                        y = b.fma(&a, wk, &y);
                    }
                    let y = b.mul(&y, &inv);
                    let i = b.addi(&qbase, c);
                    b.store(&y, out, &i);
                });
            });
        });
        Ok(())
    }

    /// One unit per (row, head): an online softmax over the visible keys,
    /// accumulating the weighted values in the output row itself.
    fn emit_online(&self, b: &mut KernelBuilder, cx: &KernelCtx<'_>) -> Result<(), CompileError> {
        let KernelCtx { work, ins, out, .. } = *cx;
        let (h, kvh, d) = (self.h, self.kvh, self.d);
        let (hc, dc, qwc, kvwc, groupc) = (b.index(h), b.index(d), b.index(h * d), b.index(kvh * d), b.index(h / kvh));
        let zero_i = b.index(0);
        let zero = b.f32(0.0);
        let ninf = b.f32(-1e30);
        let scale = b.f32(1.0 / (d as f32).sqrt());
        let pos = b.pos();
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
            b.for_each(&zero_i, &dc, |b, c| {
                let o = b.addi(&qbase, c);
                b.store(&zero, out, &o);
            });
            let ml = b.for_fold(&zero_i, &vis.count, &[ninf.clone(), zero.clone()], |b, t, acc| {
                let j = self.key_row(b, &vis, t);
                let kbase0 = b.muli(&j, &kvwc);
                let kbase = b.addi(&kbase0, &khd);
                let dot = b.for_fold(&zero_i, &dc, std::slice::from_ref(&zero), |b, c, a| {
                    let qi = b.addi(&qbase, c);
                    let ki = b.addi(&kbase, c);
                    let qv = b.load(&ins[0], &qi);
                    let kv = self.kv_load(b, &self.kbuf, &ki);
                    vec![b.fma(&qv, &kv, &a[0])]
                });
                let s = b.mul(&dot[0], &scale);
                let m_new = b.fbin("maxnumf", &acc[0], &s);
                let dm = b.sub(&acc[0], &m_new);
                let corr = math::exp(b, &dm);
                let ds = b.sub(&s, &m_new);
                let pr = math::exp(b, &ds);
                let l = b.fma(&acc[1], &corr, &pr);
                b.for_each(&zero_i, &dc, |b, c| {
                    let o = b.addi(&qbase, c);
                    let vi = b.addi(&kbase, c);
                    let prev = b.load(out, &o);
                    let vv = self.kv_load(b, &self.vbuf, &vi);
                    let pv = b.mul(&pr, &vv);
                    let y = b.fma(&prev, &corr, &pv);
                    b.store(&y, out, &o);
                });
                vec![m_new, l]
            });
            let one = b.f32(1.0);
            let inv = b.div(&one, &ml[1]);
            b.for_each(&zero_i, &dc, |b, c| {
                let o = b.addi(&qbase, c);
                let y = b.load(out, &o);
                let y = b.mul(&y, &inv);
                b.store(&y, out, &o);
            });
        });
        Ok(())
    }
}
