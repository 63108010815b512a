//! Keys cached before RoPE (`#kv(pre_rope)`): the K cache holds `r`
//! coefficients per KV head in an orthonormal basis of the head's features;
//! attention expands each key it reads by the basis (operand 3, `[kvh·r, d]`)
//! and rotates it by its position, then scores it like any cached key.
//!
//! On the CPU the expansion writes the split variant's f32 key tile: the
//! coefficients of a key are staged in a small scratch row, each one
//! broadcast against its basis row (`r·d/VW` FMAs), and the result rotated
//! pair by pair. The tile's keys are consecutive positions, so the rotation
//! angles are computed once per tile (f64, `math::sincos_f64`) and advanced by
//! one position per key with a complex product (the step's cosine and sine are
//! compile-time constants); over a tile of 32 keys that drifts by about 1e-6.
//! Whole vectors of pairs rotate lane-wise (adjacent pairs deinterleaved by
//! shuffles and interleaved back); a head width that is not a multiple of 16
//! rotates pair by pair.
//! On NVIDIA a thread expands its key from scalar loads and computes every
//! angle in f64, as the rope kernel does.

use super::kv_quant::QuantRows;
use super::{KernelSpec, VW};
use crate::error::CompileError;
use crate::mlir::builder::{KernelBuilder, V};
use crate::mlir::math;
use sparsec_ir::{DType, KvCompression, Pattern};

/// `#kv(pre_rope)` of an attention kernel.
pub(super) struct KeyBasis {
    /// The basis `[kvh·r, d]` (f32).
    basis: V,
    pub(super) r: u64,
    d: u64,
    /// Pair i's frequency θ^(−2i/d), as `Op::Rope` computes it.
    freqs: Vec<f64>,
    /// Pairs (2i, 2i+1) (GGUF layout), else (i, i + d/2).
    adjacent: bool,
}

/// The rank, base and layout of an attention's `#kv(pre_rope)`, if it has one.
pub(super) fn pre_rope_of(spec: &KernelSpec) -> Option<(u64, f32, bool)> {
    spec.patterns.iter().find_map(|p| match p {
        Pattern::Kv(KvCompression::PreRope { rank, theta, adjacent }) => Some((*rank as u64, *theta, *adjacent)),
        _ => None,
    })
}

impl KeyBasis {
    /// The key basis of `spec` (head width `d`), reading the basis from
    /// `basis`; `None` without `#kv(pre_rope)`.
    pub(super) fn new(spec: &KernelSpec, basis: Option<&String>, d: u64) -> Result<Option<KeyBasis>, CompileError> {
        let Some((r, theta, adjacent)) = pre_rope_of(spec) else { return Ok(None) };
        let basis = basis.ok_or_else(|| spec.unsupported("#kv(pre_rope) attention lacks its basis (operand 3)"))?;
        if r == 0 || r > d || !d.is_multiple_of(2) {
            return Err(spec.unsupported(&format!("#kv(pre_rope) rank {r} of head width {d}")));
        }
        let freqs = (0..d / 2).map(|i| (theta as f64).powf(-2.0 * i as f64 / d as f64)).collect();
        Ok(Some(KeyBasis { basis: basis.clone(), r, d, freqs, adjacent }))
    }

    /// f32 words of the CPU scratch (`tile_start`, `expand_cpu`): the key's
    /// coefficients, then per pair the cosine, sine, and the step's cosine and sine.
    pub(super) fn scratch_words(&self) -> u64 {
        self.r + 2 * self.d
    }

    /// Whether the CPU split kernel takes it: whole vectors of features.
    pub(super) fn cpu_ok(&self) -> bool {
        self.d.is_multiple_of(VW as u64)
    }

    /// CPU: the angles of the tile's first key (position `tb`), and the
    /// step, into the scratch `mem`.
    pub(super) fn tile_start(&self, b: &mut KernelBuilder, mem: &str, tb: &str) {
        let half = self.d / 2;
        let freqs = b.f64_table("kv_pre_rope_freqs", &self.freqs);
        let cos_step: Vec<f64> = self.freqs.iter().map(|f| f.cos()).collect();
        let sin_step: Vec<f64> = self.freqs.iter().map(|f| f.sin()).collect();
        let cs = b.f64_table("kv_pre_rope_cos", &cos_step);
        let ss = b.f64_table("kv_pre_rope_sin", &sin_step);
        let pi = b.def(format!("arith.index_cast {tb} : index to i64"));
        let pf = b.def(format!("arith.sitofp {pi} : i64 to f64"));
        let (zero, halfc) = (b.index(0), b.index(half));
        b.for_each(&zero, &halfc, |b, i| {
            let f = b.def(format!("memref.load {freqs}[{i}] : memref<{half}xf64>"));
            let angle = b.def(format!("arith.mulf {pf}, {f} : f64"));
            let (sin, cos) = math::sincos_f64(b, &angle);
            let c1 = b.def(format!("memref.load {cs}[{i}] : memref<{half}xf64>"));
            let s1 = b.def(format!("memref.load {ss}[{i}] : memref<{half}xf64>"));
            for (k, x) in [cos, sin, c1, s1].iter().enumerate() {
                let x = b.def(format!("arith.truncf {x} : f64 to f32"));
                let o = b.index(self.r + k as u64 * half);
                let at = b.addi(&o, i);
                b.store(&x, mem, &at);
            }
        });
    }

    /// CPU: expands the key whose coefficients of KV head `kh` are loaded
    /// into `mem[0..r]` by `load_coefs`, rotates it by the scratch's angles,
    /// stores it at `tile[at..at + d]`, and advances the angles one position.
    pub(super) fn expand_cpu(&self, b: &mut KernelBuilder, mem: &str, kh: &str, tile: &str, at: &str) {
        let (d, r, half) = (self.d, self.r, self.d / 2);
        let nv = (d / VW as u64) as usize;
        let vty = KernelBuilder::vty(VW);
        let z = b.vzero(VW);
        let (zero, rc, dc) = (b.index(0), b.index(r), b.index(d));
        let row0 = b.muli(kh, &rc);
        let init: Vec<(V, String)> = (0..nv).map(|_| (z.clone(), vty.clone())).collect();
        let k = b.for_fold_typed(&zero, &rc, 1, &init, |b, c, acc| {
            let x = b.load(mem, c);
            let xv = b.vbroadcast(&x, VW);
            let row = b.addi(&row0, c);
            let rb = b.muli(&row, &dc);
            (0..nv)
                .map(|v| {
                    let o = b.index(v as u64 * VW as u64);
                    let i = b.addi(&rb, &o);
                    let w = b.vload(&self.basis, &i, VW);
                    b.vfma(&xv, &w, &acc[v], VW)
                })
                .collect()
        });
        if !d.is_multiple_of(2 * VW as u64) {
            // Pairs that do not fill whole vectors: rotated one at a time in the tile.
            for (v, x) in k.iter().enumerate() {
                let o = b.index(v as u64 * VW as u64);
                let i = b.addi(at, &o);
                b.vstore(x, tile, &i, VW);
            }
            self.rotate_scalar(b, mem, tile, at);
            return;
        }
        // The angles of pairs 8v..8v + 8, and the step's.
        let load = |b: &mut KernelBuilder, part: u64, v: usize| {
            let o = b.index(r + part * half + v as u64 * VW as u64);
            b.vload(mem, &o, VW)
        };
        let lanes = VW as usize;
        let shuffle = |b: &mut KernelBuilder, x: &str, y: &str, idx: &[usize]| {
            let ix: Vec<String> = idx.iter().map(|i| i.to_string()).collect();
            b.def(format!("vector.shuffle {x}, {y} [{}] : {vty}, {vty}", ix.join(", ")))
        };
        let mut out = k.clone();
        for v in 0..(half / VW as u64) as usize {
            let (cos, sin) = (load(b, 0, v), load(b, 1, v));
            // The pairs' first and second features, lane by lane.
            let (a, c) = if self.adjacent {
                let (x, y) = (&k[2 * v], &k[2 * v + 1]);
                let evens: Vec<usize> = (0..lanes).map(|i| 2 * i).collect();
                let odds: Vec<usize> = (0..lanes).map(|i| 2 * i + 1).collect();
                (shuffle(b, x, y, &evens), shuffle(b, x, y, &odds))
            } else {
                (k[v].clone(), k[v + nv / 2].clone())
            };
            let (ya, yb) = turn(b, (&a, &c), (&cos, &sin), Some(VW));
            if self.adjacent {
                let lo: Vec<usize> = (0..lanes / 2).flat_map(|i| [i, lanes + i]).collect();
                let hi: Vec<usize> = (lanes / 2..lanes).flat_map(|i| [i, lanes + i]).collect();
                out[2 * v] = shuffle(b, &ya, &yb, &lo);
                out[2 * v + 1] = shuffle(b, &ya, &yb, &hi);
            } else {
                out[v] = ya;
                out[v + nv / 2] = yb;
            }
            // The next position: (cos, sin) times the step.
            let (c1, s1) = (load(b, 2, v), load(b, 3, v));
            let (nc, ns) = turn(b, (&c1, &s1), (&cos, &sin), Some(VW));
            for (part, x) in [(0, nc), (1, ns)] {
                let o = b.index(r + part * half + v as u64 * VW as u64);
                b.vstore(&x, mem, &o, VW);
            }
        }
        for (v, x) in out.iter().enumerate() {
            let o = b.index(v as u64 * VW as u64);
            let i = b.addi(at, &o);
            b.vstore(x, tile, &i, VW);
        }
    }

    /// CPU: rotates the key at `tile[at..at + d]` pair by pair by the
    /// scratch's angles, and advances them one position.
    fn rotate_scalar(&self, b: &mut KernelBuilder, mem: &str, tile: &str, at: &str) {
        let (r, half) = (self.r, self.d / 2);
        let (zero, halfc) = (b.index(0), b.index(half));
        b.for_each(&zero, &halfc, |b, i| {
            let part = |b: &mut KernelBuilder, k: u64| {
                let o = b.index(r + k * half);
                b.addi(&o, i)
            };
            let [ci, si, c1i, s1i] = [0, 1, 2, 3].map(|k| part(b, k));
            let (cos, sin, c1, s1) = (b.load(mem, &ci), b.load(mem, &si), b.load(mem, &c1i), b.load(mem, &s1i));
            let (ia, ib) = if self.adjacent {
                let two = b.index(2);
                let i2 = b.muli(i, &two);
                let one = b.index(1);
                let i21 = b.addi(&i2, &one);
                (b.addi(at, &i2), b.addi(at, &i21))
            } else {
                let ih = b.addi(i, &halfc);
                (b.addi(at, i), b.addi(at, &ih))
            };
            let (xa, xb) = (b.load(tile, &ia), b.load(tile, &ib));
            let (ya, yb) = turn(b, (&xa, &xb), (&cos, &sin), None);
            b.store(&ya, tile, &ia);
            b.store(&yb, tile, &ib);
            let (nc, ns) = turn(b, (&c1, &s1), (&cos, &sin), None);
            b.store(&nc, mem, &ci);
            b.store(&ns, mem, &si);
        });
    }

    /// CPU: stages the coefficients of KV head `kh` of cache row `j` in
    /// `mem[0..r]`: from a block-quantized cache (`quant`, whole blocks of 32)
    /// or an f32/f16 one (`load` reads one value).
    pub(super) fn stage_cpu(
        &self,
        b: &mut KernelBuilder,
        mem: &str,
        (j, kh): (&str, &str),
        quant: Option<&QuantRows>,
        load: &dyn Fn(&mut KernelBuilder, &str) -> V,
        kvh: u64,
    ) {
        let r = self.r;
        if let Some(q) = quant {
            let qk = sparsec_ir::quant::QK as u64;
            let per = b.index(r / qk);
            let blk0 = b.muli(kh, &per);
            for c in 0..r / qk {
                let ci = b.index(c);
                let blk = b.addi(&blk0, &ci);
                let (lo, hi) = q.load_block(b, j, &blk);
                let (o, o2) = (b.index(c * qk), b.index(c * qk + 16));
                b.vstore(&lo, mem, &o, 16);
                b.vstore(&hi, mem, &o2, 16);
            }
            return;
        }
        let (kvwc, rc) = (b.index(kvh * r), b.index(r));
        let rb = b.muli(j, &kvwc);
        let khr = b.muli(kh, &rc);
        let base = b.addi(&rb, &khr);
        for c in 0..r {
            let o = b.index(c);
            let i = b.addi(&base, &o);
            let x = load(b, &i);
            b.store(&x, mem, &o);
        }
    }

    /// NVPTX: the `d` features of the key at position `p` from its
    /// coefficients `coefs` (KV head `kh`), expanded and rotated.
    pub(super) fn expand_nvptx(&self, b: &mut KernelBuilder, coefs: &[V], kh: &str, p: &str) -> Vec<V> {
        let (d, r) = (self.d, self.r);
        let (rc, dc) = (b.index(r), b.index(d));
        let row0 = b.muli(kh, &rc);
        let mut k: Vec<V> = (0..d)
            .map(|j| {
                let mut acc = b.f32(0.0);
                for (c, x) in coefs.iter().enumerate() {
                    let ci = b.index(c as u64);
                    let row = b.addi(&row0, &ci);
                    let rb = b.muli(&row, &dc);
                    let o = b.index(j);
                    let i = b.addi(&rb, &o);
                    let w = b.load(&self.basis, &i);
                    acc = b.fma(x, &w, &acc);
                }
                acc
            })
            .collect();
        let pi = b.def(format!("arith.index_cast {p} : index to i64"));
        let pf = b.def(format!("arith.sitofp {pi} : i64 to f64"));
        for (i, f) in self.freqs.iter().enumerate() {
            let fc = b.f64(*f);
            let angle = b.def(format!("arith.mulf {pf}, {fc} : f64"));
            let (sin, cos) = math::sincos_f64(b, &angle);
            let (sin, cos) = (b.def(format!("arith.truncf {sin} : f64 to f32")), b.def(format!("arith.truncf {cos} : f64 to f32")));
            let (ia, ib) = if self.adjacent { (2 * i, 2 * i + 1) } else { (i, i + d as usize / 2) };
            let (ya, yb) = turn(b, (&k[ia].clone(), &k[ib].clone()), (&cos, &sin), None);
            (k[ia], k[ib]) = (ya, yb);
        }
        k
    }
}

/// `(x, y)` turned by the angle whose cosine and sine are `(c, s)`:
/// `(x·c − y·s, y·c + x·s)`, the second as one fused multiply-add; f32
/// scalars, or lane-wise vectors of `width`. It rotates a key's pairs and
/// advances the angles by the step (`(c1, s1)` turned by the angle is the
/// angle turned by the step, bit for bit: products commute).
fn turn(b: &mut KernelBuilder, (x, y): (&str, &str), (c, s): (&str, &str), width: Option<u32>) -> (V, V) {
    let ty = width.map_or_else(|| "f32".to_string(), KernelBuilder::vty);
    let xc = b.def(format!("arith.mulf {x}, {c} : {ty}"));
    let ys = b.def(format!("arith.mulf {y}, {s} : {ty}"));
    let u = b.def(format!("arith.subf {xc}, {ys} : {ty}"));
    let xs = b.def(format!("arith.mulf {x}, {s} : {ty}"));
    let v = match width {
        Some(w) => b.vfma(y, c, &xs, w),
        None => b.fma(y, c, &xs),
    };
    (u, v)
}

/// The element type a `#kv(pre_rope)` K cache may have on the CPU: whole
/// blocks of 32 coefficients per KV head when block-quantized.
pub(super) fn coefficient_cache_ok(kv: DType, r: u64) -> bool {
    !kv.is_quantized() || r.is_multiple_of(sparsec_ir::quant::QK as u64)
}
