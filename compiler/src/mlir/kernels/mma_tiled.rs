//! NVPTX matmul on tensor cores with shared-memory tiles, for calls of more
//! than one row (prefill) of f16/bf16, block-quantized (Q8_0, Q4_0, Q4_1:
//! `mma_quant.rs`) or f32 (split as the activations are, `TileWeight::F32`)
//! weights whose k is a multiple of 32 and whose output width is a multiple
//! of 64: a block of 8 warps computes 64 rows
//! (32 for outputs narrower than 1024) × 64 output features. k-tiles of 32
//! (the activations as f32, the weights as stored) are copied into a ring of
//! `STAGES` shared buffers with `cp.async`, `STAGES - 1` tiles ahead of the
//! one the tensor cores use, so the copies' latency hides behind the MMAs
//! (32-row tiles of split activations with an even count of k-tiles: two
//! k-tiles between barriers, the next two in flight, a ring of
//! `PAIR_STAGES`).
//! Each warp of a 4 × 2 grid (2 × 4 at 32 rows) runs `mma.sync.m16n8k16` on
//! 16 rows × 32 (16) features with operands of the weights' own type (f16 or
//! bf16): the weights as stored, the activations split into a `hi` part
//! rounded to that type and a `lo` part, the rest rounded (`half_split`), so
//! that the two products together carry 22 (f16) or 16 (bf16) bits of each
//! activation; at 32 rows their products go to two accumulators (two
//! independent chains). Fragments are read with 16-byte loads. Every
//! activation and weight element is read from global memory once per block
//! instead of once per warp.

use super::half_planes::HalfPlane;
use super::mma_half::{half_round, half_split_scaled, mma_sync_half, words};
use super::mma_matmul::store_tiles;
use super::mma_quant::QuantTile;
use super::{fixed_last, KernelSpec, WARP};
use crate::mlir::builder::{KernelBuilder, V};
use sparsec_ir::DType;

/// Output features of a block's tile.
const TILE_N: u64 = 64;
/// k of a shared-memory tile.
const TILE_K: u64 = 32;
/// Threads of a block: the runtime's `BLOCK` (a tile is one block).
const THREADS: u64 = sparsec_runtime::cuda::BLOCK as u64;
/// Row stride of the activation tiles in 4-byte words: 32 f32 plus 4 of
/// padding, so the 8 lanes of a 16-byte load phase (two rows, four k offsets)
/// hit distinct bank groups. A weight tile's row (32 16-bit words, 16 words)
/// needs none.
const A_STRIDE: u64 = TILE_K + 4;
const W_STRIDE: u64 = TILE_K / 2;
/// Shared buffers in the copy ring: `STAGES - 1` k-tiles in flight while one
/// is multiplied (3 × 13.3 KB at 64 rows, 3 × 8.7 KB at 32). Five at 32 rows
/// measured the same on an H200 (`docs/device-runs/2026-11-30-gpu-tiled-prefill/`).
const STAGES: u64 = 3;
/// The ring with pairs of k-tiles (`Tile::pairs`): the pair being multiplied
/// and the next pair in flight (4 × 8.7 KB at 32 rows).
const PAIR_STAGES: u64 = 4;
/// The scale of the lo parts when the weights are f32 (`half_split_scaled`).
const F32_LO_SCALE: f64 = 2048.0;
/// Outputs at least this wide take 64-row tiles, narrower ones 32-row tiles,
/// which give the GPU twice the blocks (a 576-wide output of 512 rows: 144
/// blocks instead of 72 on 132 SMs). On an H200, against 64-row tiles
/// everywhere: 128-token prefill GPT-2 124M 2.0 → 1.6 ms, SmolLM2-shaped
/// Llama 4.2 → 3.5 ms; 512 tokens GPT-2 2.55 → 2.7 ms, Llama even.
const WIDE: u64 = 1024;

const _: () = assert!(THREADS * 8 == TILE_N * TILE_K, "a thread copies 8 weights of each k-tile");

/// A block's tile: `m` rows (`KernelStep::gpu_mma_rows`) × 64 features; its
/// 8 warps form a grid of `m / 16` along the rows and `8 / (m / 16)` along the
/// features, each warp `nt` n-tiles of 8 features.
/// `half`: the activations rounded to the weights' type, one MMA per k-step
/// (`--gpu-mma-activations half`), instead of a hi and a lo part, two.
#[derive(Clone, Copy)]
pub(crate) struct Tile {
    pub m: u64,
    warps_m: u64,
    nt: u64,
    half: bool,
    /// f32 weights: their k-tiles take as much shared memory as the
    /// activations', so the tile keeps 32 rows and one k-tile per barrier
    /// (three stages: 3 × 13.8 KB).
    f32_weights: bool,
}

impl Tile {
    /// Whether the k loop takes two k-tiles between barriers (32-row tiles
    /// of split activations and an even count of k-tiles): twice the MMAs a
    /// warp has to interleave per barrier and half the barriers. On an H200
    /// (`docs/device-runs/2026-11-30-dependent-launch/run4.sh`) GPT-2 124M's
    /// 512-token prefill went 2.03-2.06 → 1.86-1.90 ms with them, 960 tokens
    /// 3.14 → 3.00, Llama's 2% faster; with half activations (one MMA per
    /// k-step) they were 2-8% slower, so those take one k-tile at a time.
    /// 64-row tiles' four stages would not fit 48 KB of shared memory.
    fn pairs(&self, k_tiles: u64) -> bool {
        self.m == 32 && !self.half && !self.f32_weights && k_tiles.is_multiple_of(2)
    }

    fn for_width(n: u64, half: bool, f32_weights: bool) -> Tile {
        let m = if n >= WIDE && !f32_weights { 64 } else { 32 };
        let warps_m = m / 16;
        let warps_n = THREADS / WARP / warps_m;
        Tile { m, warps_m, nt: TILE_N / 8 / warps_n, half, f32_weights }
    }
}

/// One 16-byte `cp.async` of a thread per k-tile: element `global` (at k-tile
/// 0) of `plane` (of `elem`) to word `shared` (in stage 0) of the ring `ring`,
/// whose stages are `stage` words apart; the next k-tile's is `advance`
/// elements on. Only threads where `guard` holds copy (a quantized tile has
/// fewer chunks than the block has threads).
struct Chunk<'a> {
    global: V,
    shared: V,
    plane: &'a str,
    elem: &'static str,
    ring: &'a str,
    stage: u64,
    advance: u64,
    guard: Option<V>,
}

/// The 16-byte copies of a k-tile of f32 rows (activations, f32 weights):
/// thread `tid` copies chunks `tid`, `tid + THREADS`, ... (row c / 8, k
/// 4·(c % 8)..), rows padded to `A_STRIDE` words in shared memory.
struct F32Rows<'a> {
    tid: &'a V,
    four: &'a V,
    eight: &'a V,
    /// k, the global rows' length.
    kc: &'a V,
}

impl F32Rows<'_> {
    /// The chunks of `rows` rows from global row `first` (clamped to `last`
    /// where given) of `plane` into the ring `ring` of `stage` words.
    #[allow(clippy::too_many_arguments)]
    fn chunks<'b>(
        &self,
        b: &mut KernelBuilder,
        rows: u64,
        first: &V,
        last: Option<&V>,
        plane: &'b str,
        ring: &'b str,
        stage: u64,
    ) -> Vec<Chunk<'b>> {
        (0..rows * 8 / THREADS)
            .map(|i| {
                let off = b.index(i * THREADS);
                let c = b.addi(self.tid, &off);
                let row = b.divui(&c, self.eight);
                let q = b.remui(&c, self.eight);
                let col = b.muli(&q, self.four);
                let r = b.addi(first, &row);
                let r = match last {
                    Some(l) => b.minui(&r, l),
                    None => r,
                };
                let rk = b.muli(&r, self.kc);
                let g = b.addi(&rk, &col);
                let stride = b.index(A_STRIDE);
                let rs = b.muli(&row, &stride);
                let shared = b.addi(&rs, &col);
                Chunk { global: g, shared, plane, elem: "f32", ring, stage, advance: TILE_K, guard: None }
            })
            .collect()
    }
}

/// The weights a tiled matmul reads: 16-bit values, quantized blocks, or f32
/// values (the byte buffer), which are split into a hi and a lo f16 part as
/// the activations are, three MMAs a k-step (hi·hi, lo·hi, hi·lo; two with
/// `half` activations), so the products stay near f32 rounding.
pub(super) enum TileWeight<'a> {
    Half(&'a HalfPlane),
    Quant(QuantTile<'a>),
    F32(&'a str),
}

impl TileWeight<'_> {
    /// The MMA operand type: the weights' own (f16/bf16), f16 for quants and
    /// the parts of f32 weights.
    fn mma_type(&self) -> &'static str {
        match self {
            TileWeight::Half(h) => h.mma_type(),
            TileWeight::Quant(_) | TileWeight::F32(_) => "f16",
        }
    }

    /// Shared-memory words of one weight row of a k-tile (f32 rows padded
    /// as the activations' are).
    fn row_words(&self) -> u64 {
        match self {
            TileWeight::Half(_) => W_STRIDE,
            TileWeight::Quant(q) => q.row_words(),
            TileWeight::F32(_) => A_STRIDE,
        }
    }
}

/// The tile and the warps per band of its rows when a matmul takes the
/// shared-memory tiled path: whole blocks of `THREADS`, one per 64 output
/// features. `None` unless the weight is f16/bf16, Q8_0/Q4_0/Q4_1 or f32, k a
/// multiple of 32 and the output width of 64.
pub(crate) fn tiled(spec: &KernelSpec) -> Option<(Tile, u64)> {
    let (k, n) = (fixed_last(spec, spec.operands.first()?).ok()?, fixed_last(spec, &spec.result).ok()?);
    let (typed, f32_weights) = match spec.operands.get(1)?.dtype {
        DType::F16 | DType::BF16 | DType::Q8_0 | DType::Q4_0 | DType::Q4_1 => (true, false),
        DType::F32 => (true, true),
        DType::I32 => (false, false),
    };
    if !spec.warp_matmul() || !typed || k % TILE_K != 0 || n % TILE_N != 0 {
        return None;
    }
    Some((Tile::for_width(n, spec.half_mma_activations, f32_weights), n / TILE_N * THREADS / WARP))
}

/// `out[r, j] = a[r, :] · w[j, :]` for `seq` rows: block `blk` of the launch
/// takes rows `m·(blk / (n/64))..` and features `64·(blk % (n/64))..`. Rows
/// past `seq` read the last row and are not stored. Stores go through
/// `store_result` (the fused epilogue).
/// `tile` is `tiled(spec)`'s, so the launch and the kernel agree.
pub(super) fn emit_tiled_mma(b: &mut KernelBuilder, tile: Tile, k: u64, n: u64, ins: &[V], out: &str, w: &TileWeight<'_>) {
    let Tile { m: tile_m, warps_m, nt, half, .. } = tile;
    let (a_buf, seq) = (&ins[0], b.seq());
    let kc = b.index(k);
    let one = b.index(1);
    let last_row = b.def(format!("arith.subi {seq}, {one} : index"));
    let tm = b.index(tile_m);
    let bands = b.def(format!("arith.ceildivui {seq}, {tm} : index"));
    let col_tiles = b.index(n / TILE_N);
    let blocks = b.muli(&bands, &col_tiles);
    let threads = b.index(THREADS);
    let work = b.muli(&blocks, &threads);
    let (a_stage, w_stage) = (tile_m * A_STRIDE, TILE_N * w.row_words());
    let k_tiles = k / TILE_K;
    let pairs = tile.pairs(k_tiles);
    let (ring, per_step) = if pairs { (PAIR_STAGES, 2) } else { (STAGES, 1) };
    let s_a = b.shared_f32("mma_tile_a", ring * a_stage);
    let s_w = b.shared_f32("mma_tile_w", ring * w_stage);
    b.parallel(&work, |b, u| {
        let blk = b.divui(u, &threads);
        let tid = b.remui(u, &threads);
        let band = b.divui(&blk, &col_tiles);
        let ct = b.remui(&blk, &col_tiles);
        let r0 = b.muli(&band, &tm);
        let tn = b.index(TILE_N);
        let c0 = b.muli(&ct, &tn);
        let (four, eight) = (b.index(4), b.index(8));
        // The copies of a k-tile, 16 bytes each: activation chunks `tid` (and
        // `tid + THREADS` at 64 rows; row c / 8, k 4·(c % 8)..), weight chunk
        // `tid` (row tid / 4, k 8·(tid % 4)..); global offsets at k-tile 0,
        // shared offsets in stage 0.
        let copies: Vec<Chunk> = {
            let rows = F32Rows { tid: &tid, four: &four, eight: &eight, kc: &kc };
            let mut v = rows.chunks(b, tile_m, &r0, Some(&last_row), a_buf, &s_a, a_stage);
            match w {
                TileWeight::Half(h) => {
                    let row = b.divui(&tid, &four);
                    let q = b.remui(&tid, &four);
                    let col = b.muli(&q, &eight);
                    let j = b.addi(&c0, &row);
                    let jk = b.muli(&j, &kc);
                    let g = b.addi(&jk, &col);
                    let stride = b.index(W_STRIDE);
                    let rs = b.muli(&row, &stride);
                    // 8 16-bit words are 4 of the shared array's 4-byte words.
                    let q4 = b.muli(&q, &four);
                    let sw = b.addi(&rs, &q4);
                    v.push(Chunk {
                        global: g,
                        shared: sw,
                        plane: h.words(),
                        elem: "i16",
                        ring: &s_w,
                        stage: w_stage,
                        advance: TILE_K,
                        guard: None,
                    });
                }
                // Like the activations, the 64 weight rows' 32 k.
                TileWeight::F32(buf) => v.extend(rows.chunks(b, TILE_N, &c0, None, buf, &s_w, w_stage)),
                TileWeight::Quant(qt) => {
                    // Row j's block of k-tile kt: bytes (j·k_tiles + kt)·qb..,
                    // one or two chunks; thread tid copies chunk tid.
                    let qb = qt.block_bytes();
                    let per_row = b.index(qb / 16);
                    let row = b.divui(&tid, &per_row);
                    let part = b.remui(&tid, &per_row);
                    let j = b.addi(&c0, &row);
                    let row_bytes = b.index(k_tiles * qb);
                    let jb = b.muli(&j, &row_bytes);
                    let sixteen = b.index(16);
                    let pb = b.muli(&part, &sixteen);
                    let g = b.addi(&jb, &pb);
                    let stride = b.index(qt.row_words());
                    let rs = b.muli(&row, &stride);
                    let pw = b.muli(&part, &four);
                    let sw = b.addi(&rs, &pw);
                    let chunks = b.index(TILE_N * qb / 16);
                    let guard = b.def(format!("arith.cmpi ult, {tid}, {chunks} : index"));
                    v.push(Chunk {
                        global: g,
                        shared: sw,
                        plane: qt.buf,
                        elem: "i8",
                        ring: &s_w,
                        stage: w_stage,
                        advance: qb,
                        guard: Some(guard),
                    });
                }
            }
            v
        };
        // Copies k-tile `kt` (an index value) into ring stage `st` (an index value).
        let issue = |b: &mut KernelBuilder, kt: &str, st: &str| {
            let tk = b.index(TILE_K);
            let k0_tile = b.muli(kt, &tk);
            for c in &copies {
                let copy = |b: &mut KernelBuilder| {
                    let k0 = if c.advance == TILE_K {
                        k0_tile.clone()
                    } else {
                        let adv = b.index(c.advance);
                        b.muli(kt, &adv)
                    };
                    let gi = b.addi(&c.global, &k0);
                    let per = b.index(c.stage);
                    let so = b.muli(st, &per);
                    let si = b.addi(&so, &c.shared);
                    let dst = b.shared_ptr(c.ring, &si);
                    b.cp_async16(&dst, c.plane, &gi, c.elem);
                };
                match &c.guard {
                    Some(g) => b.if_then(g, copy),
                    None => copy(b),
                }
            }
        };
        // In flight before the loop: STAGES - 1 k-tiles, one group each;
        // with pairs, the first pair as one group.
        if pairs {
            for s in 0..2 {
                let si = b.index(s);
                issue(b, &si, &si);
            }
            b.cp_async_commit();
        } else {
            for s in 0..STAGES - 1 {
                if s < k_tiles {
                    let si = b.index(s);
                    issue(b, &si, &si);
                }
                b.cp_async_commit();
            }
        }
        // The fragments: warp (wm, wn), lane (g, t) reads rows 16·wm + g and
        // + 8, weight rows 32·wn + 8q + g, each at k 8t.. of the k-tile; mma
        // step s reads k 8t + 2s as fragment column t and 8t + 2s + 1 as
        // column t + 4 (A and B alike, so the sum is the same).
        let lanes = b.index(WARP);
        let warp = b.divui(&tid, &lanes);
        let lane = b.remui(&tid, &lanes);
        let wmc = b.index(warps_m);
        let wm = b.remui(&warp, &wmc);
        let wn = b.divui(&warp, &wmc);
        let g = b.divui(&lane, &four);
        let t = b.remui(&lane, &four);
        let t8 = b.muli(&t, &eight);
        let t4 = b.muli(&t, &four);
        let sixteen = b.index(16);
        let ra_t = {
            let m = b.muli(&wm, &sixteen);
            b.addi(&m, &g)
        };
        let rb_t = b.addi(&ra_t, &eight);
        let fa: Vec<V> = [&ra_t, &rb_t]
            .into_iter()
            .map(|row| {
                let stride = b.index(A_STRIDE);
                let rp = b.muli(row, &stride);
                b.addi(&rp, &t8)
            })
            .collect();
        let wn_base = {
            let w32 = b.index(8 * nt);
            b.muli(&wn, &w32)
        };
        // The lane's word in a weight row (16-bit values: 8t / 2; quants:
        // `QuantTile::lane_word`) and, for Q4, the shift to its nibbles.
        let (lane_w, shift) = match w {
            TileWeight::Half(_) => (t4.clone(), None),
            TileWeight::F32(_) => (t8.clone(), None),
            TileWeight::Quant(qt) => {
                let (lw, sh) = qt.lane_word(b, &t);
                (lw, Some(sh))
            }
        };
        let fw: Vec<V> = (0..nt)
            .map(|q| {
                let off = b.index(8 * q);
                let j0 = b.addi(&wn_base, &off);
                let j = b.addi(&j0, &g);
                let stride = b.index(w.row_words());
                let rp = b.muli(&j, &stride);
                b.addi(&rp, &lane_w)
            })
            .collect();
        // Quants: the first scale block (k-tile 0) of the lane's two output
        // columns per n-tile (2t and 2t + 1, as its accumulators hold them).
        let scale_blocks: Vec<[V; 2]> = match w {
            TileWeight::Half(_) | TileWeight::F32(_) => Vec::new(),
            TileWeight::Quant(_) => (0..nt)
                .map(|q| {
                    let two = b.index(2);
                    let t2 = b.muli(&t, &two);
                    let off = b.index(8 * q);
                    let j0 = b.addi(&c0, &wn_base);
                    let j1 = b.addi(&j0, &off);
                    let j = b.addi(&j1, &t2);
                    let j2 = b.addi(&j, &one);
                    let kt = b.index(k_tiles);
                    [b.muli(&j, &kt), b.muli(&j2, &kt)]
                })
                .collect(),
        };
        let zero_i = b.index(0);
        let zero = b.f32(0.0);
        // With two n-tiles a warp, the `hi` and `lo` parts' products (with
        // `half`, the two k-steps') go to accumulators of their own (two
        // independent MMA chains per n-tile, summed at the end); with four,
        // one set: the 16 more registers would
        // be the whole kernel's, and its decode GEMV lost 3% to them (GPT-2
        // 124M on an H200).
        let per = (nt * 4) as usize;
        // Quants: one set (each k-tile's products have accumulators of their
        // own); f32 weights (32-row tiles: two n-tiles) always two.
        let sets = if nt <= 2 && !matches!(w, TileWeight::Quant(_)) { 2 } else { 1 };
        debug_assert!(sets == 2 || !matches!(w, TileWeight::F32(_)));
        // The lo parts of f32 weights and of the activations they meet are
        // scaled clear of f16's subnormals.
        let lo_scale = matches!(w, TileWeight::F32(_)).then_some(F32_LO_SCALE);
        let init: Vec<(V, String)> = (0..sets * per).map(|_| (zero.clone(), "f32".to_string())).collect();
        let (ktc, stages) = (b.index(k_tiles), b.index(ring));
        // One k-tile in stage `st` multiplied into `accs`.
        let mma_tile = |b: &mut KernelBuilder, st: &str, kt: &str, accs: &[V]| -> Vec<V> {
            let (a_per, w_per) = (b.index(a_stage), b.index(w_stage));
            let a_off = b.muli(st, &a_per);
            let w_off = b.muli(st, &w_per);
            let kind = w.mma_type();
            // Quants: the scales (and offsets) of the lane's columns for this
            // k-tile, their loads issued before anything else of the tile.
            let scales: Vec<Vec<(V, Option<V>)>> = match w {
                TileWeight::Half(_) | TileWeight::F32(_) => Vec::new(),
                TileWeight::Quant(qt) => scale_blocks
                    .iter()
                    .map(|blocks| {
                        blocks
                            .iter()
                            .map(|base| {
                                let blk = b.addi(base, kt);
                                qt.planes.scale_offset(b, &blk)
                            })
                            .collect()
                    })
                    .collect(),
            };
            // Per row: [hi, lo] of its 8 k, each as 4 words of two 16-bit
            // values (k 0-1, 2-3, 4-5, 6-7 of the lane's 8).
            let rows: Vec<[Vec<V>; 2]> = fa
                .iter()
                .map(|at| {
                    let i0 = b.addi(&a_off, at);
                    split_fragment(b, &s_a, &i0, &four, half, kind, lo_scale)
                })
                .collect();
            // Per n-tile: its 8 k of weights, 4 words of two values (as
            // stored; quants made f16; f32 split into [hi, lo]).
            let ws: Vec<[Vec<V>; 2]> = fw
                .iter()
                .map(|at| {
                    let i = b.addi(&w_off, at);
                    match (w, &shift) {
                        (TileWeight::Quant(qt), Some(sh)) => [qt.fragment(b, &s_w, &i, sh), Vec::new()],
                        (TileWeight::F32(_), _) => split_fragment(b, &s_w, &i, &four, false, kind, lo_scale),
                        _ => {
                            let p = b.shared_ptr(&s_w, &i);
                            let raw = b.def(format!("llvm.load {p} {{alignment = 16 : i64}} : !llvm.ptr<3> -> vector<4xi32>"));
                            [words(b, &raw, 4), Vec::new()]
                        }
                    }
                })
                .collect();
            // Step s reads pairs 2s and 2s + 1 of the lane's 8 k (k 8t + 4s
            // ..) as fragment columns 2t, 2t + 1 and 2t + 8, 2t + 9, A and
            // B alike, so the sum over the k-tile is the same.
            // Split: the lo products, then the hi ones; half: one part.
            let parts: &[usize] = if half { &[0] } else { &[1, 0] };
            let frag = |step: usize, part: usize| {
                let (c_lo, c_hi) = (2 * step, 2 * step + 1);
                [&rows[0][part][c_lo], &rows[1][part][c_lo], &rows[0][part][c_hi], &rows[1][part][c_hi]].map(|v| v.clone())
            };
            let steps = (TILE_K / 16) as usize;
            if let TileWeight::F32(_) = w {
                // Products of the parts, the small ones first: lo·hi and
                // hi·lo (2^11 too large: their lo parts are scaled) into set
                // 1, hi·hi into set 0 (half activations: hi·lo, hi·hi).
                let mut accs: Vec<V> = accs.to_vec();
                let products: &[(usize, usize)] = if half { &[(0, 1), (0, 0)] } else { &[(1, 0), (0, 1), (0, 0)] };
                for step in 0..steps {
                    for (q, wq) in ws.iter().enumerate() {
                        for &(a_part, w_part) in products {
                            let bq = [wq[w_part][2 * step].clone(), wq[w_part][2 * step + 1].clone()];
                            let set = usize::from(a_part + w_part > 0);
                            let at = set * per + q * 4;
                            let d = mma_sync_half(b, kind, &frag(step, a_part), &bq, &accs[at..at + 4]);
                            accs.splice(at..at + 4, d);
                        }
                    }
                }
                return accs;
            }
            let TileWeight::Quant(qt) = w else {
                // Each split part its own chain; half: the steps take the
                // sets in turn.
                let mut accs: Vec<V> = accs.to_vec();
                for step in 0..steps {
                    for (q, [wq, _]) in ws.iter().enumerate() {
                        let bq = [wq[2 * step].clone(), wq[2 * step + 1].clone()];
                        for &part in parts {
                            let chain = if half { step } else { part };
                            let at = (chain % sets) * per + q * 4;
                            let d = mma_sync_half(b, kind, &frag(step, part), &bq, &accs[at..at + 4]);
                            accs.splice(at..at + 4, d);
                        }
                    }
                }
                return accs;
            };
            // Quants: the k-tile's products Σ a·q per n-tile and, with an
            // offset, the row sums Σ a (a B of ones), from zero; then
            // acc += d·Σ a·q (+ m·Σ a) with the block's scale per column
            // (loaded first, above).
            let mut prods: Vec<V> = vec![zero.clone(); per];
            let mut row_sums: Option<Vec<V>> = qt.has_offset().then(|| vec![zero.clone(); 4]);
            let ones = QuantTile::ones(b);
            for step in 0..steps {
                for (q, [wq, _]) in ws.iter().enumerate() {
                    let bq = [wq[2 * step].clone(), wq[2 * step + 1].clone()];
                    for &part in parts {
                        let d = mma_sync_half(b, kind, &frag(step, part), &bq, &prods[q * 4..q * 4 + 4]);
                        prods.splice(q * 4..q * 4 + 4, d);
                    }
                }
                if let Some(sums) = row_sums.as_mut() {
                    for &part in parts {
                        *sums = mma_sync_half(b, kind, &frag(step, part), &[ones.clone(), ones.clone()], sums);
                    }
                }
            }
            let mut accs: Vec<V> = accs.to_vec();
            for (q, scales) in scales.iter().enumerate() {
                for i in 0..4 {
                    let (d, off) = &scales[i % 2];
                    let mut a = b.fma(d, &prods[q * 4 + i], &accs[q * 4 + i]);
                    if let (Some(o), Some(sums)) = (off, &row_sums) {
                        a = b.fma(o, &sums[i], &a);
                    }
                    accs[q * 4 + i] = a;
                }
            }
            accs
        };
        let steps = b.index(k_tiles / per_step);
        let res = b.for_fold_typed(&zero_i, &steps, 1, &init, |b, p, accs| {
            // The step's k-tiles have landed (this thread's copies, then
            // everyone's); every warp is done with the stages the next
            // copies overwrite (the previous step's).
            b.cp_async_wait(if pairs { 0 } else { (STAGES - 2) as u32 });
            b.barrier();
            let psc = b.index(per_step);
            let first = b.muli(p, &psc);
            let ahead = b.index(if pairs { 2 } else { STAGES - 1 });
            let next = b.addi(&first, &ahead);
            let more = b.def(format!("arith.cmpi ult, {next}, {ktc} : index"));
            b.if_then(&more, |b| {
                // With pairs, `next + 1` is in range too (an even count).
                for i in 0..per_step {
                    let ii = b.index(i);
                    let kt = b.addi(&next, &ii);
                    let st = b.remui(&kt, &stages);
                    issue(b, &kt, &st);
                }
            });
            b.cp_async_commit();
            let mut accs = accs.to_vec();
            for i in 0..per_step {
                let ii = b.index(i);
                let kt = b.addi(&first, &ii);
                let st = b.remui(&kt, &stages);
                accs = mma_tile(b, &st, &kt, &accs);
            }
            accs
        });
        let sums: Vec<V> = match (sets, lo_scale) {
            // Scaled lo parts (f32 weights): their products' sums scaled back.
            (2, Some(s)) => {
                let back = b.f32((1.0 / s) as f32);
                (0..per).map(|i| b.fma(&res[per + i], &back, &res[i])).collect()
            }
            (2, None) => (0..per).map(|i| b.add(&res[per + i], &res[i])).collect(),
            _ => res,
        };
        let rows = [b.addi(&r0, &ra_t), b.addi(&r0, &rb_t)];
        let cbase = b.addi(&c0, &wn_base);
        store_tiles(b, [&rows[0], &rows[1]], &cbase, &t, &sums, n, out);
    });
}

/// The lane's 8 f32 values at word `i0` of the shared array `ring` (16-byte
/// aligned) as `[hi, lo]`, each 4 words of `kind` pairs (k 0-1, 2-3, 4-5,
/// 6-7), `lo` scaled by `lo_scale` (`half_split_scaled`); with `half`, `hi`
/// alone, rounded (`lo` empty). `four` is the index constant 4.
fn split_fragment(b: &mut KernelBuilder, ring: &str, i0: &str, four: &str, half: bool, kind: &str, lo_scale: Option<f64>) -> [Vec<V>; 2] {
    let i1 = b.addi(i0, four);
    let halves = [b.load_shared_vec(ring, i0, 4), b.load_shared_vec(ring, &i1, 4)];
    let (mut hi, mut lo) = (Vec::new(), Vec::new());
    for h in &halves {
        if half {
            let v = half_round(b, h, 4, kind);
            hi.extend(words(b, &v, 2));
            continue;
        }
        let [vh, vl] = half_split_scaled(b, h, 4, kind, lo_scale);
        for (v, dst) in [(&vh, &mut hi), (&vl, &mut lo)] {
            dst.extend(words(b, v, 2));
        }
    }
    [hi, lo]
}
