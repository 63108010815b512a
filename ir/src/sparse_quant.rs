//! Sparse weights whose kept values are stored quantized: the value planes of
//! the `NmQ`, `CsrQ` and `BsrQ` formats (`sparse.rs`), the block quantizer that
//! defines their reference values, and the index choice for unstructured sparsity.
//!
//! Values: the stored values of a format, in its storage order (row by row in
//! `k` order for N:M and unstructured, block by block for BSR), cut into blocks
//! of `QB = 32` consecutive values (the last one may be partial), each with an
//! f16 scale `d` and, for 4-bit, an f16 minimum `m`: `w = d·q` with `q` in
//! `-127..=127` (q8, as Q8_0) or `w = d·q + m` with `q` in `0..=15` (q4, as
//! Q4_1). For `nb = ceil(stored/32)` blocks the values section is `q` (q8:
//! `nb·32` bytes; q4: `nb·16`), then `d` (`nb` f16), then for q4 `m` (`nb` f16).
//! Inside a block, stored value `t` sits in slot `PERM[t]` (q8: byte `slot`;
//! q4: the low nibble of byte `slot` below 16, the high nibble of byte
//! `slot - 16` above): the order in which the AVX2 2:4 kernel gathers
//! activations with `vpshufb`, so it loads a block's 32 quants as they lie.
//!
//! Indices (unchanged from the f32 formats, every section 4-byte aligned):
//! N:M keeps its bitmap (1 bit per weight); BSR its block pointers and u32
//! block columns; unstructured keeps `n+1` u32 row pointers and the smaller
//! of a per-row bitmap (`ceil(k/8)` bytes a row: 1 bit per weight) and u16
//! columns (u32 when `k > 65536`): the bitmap below a density of 1/16 kept
//! entries loses to 2-byte columns. (u8 column deltas would win between 1/16
//! and 1/8 density at 1 byte per kept entry; not implemented.)
//!
//! Bytes per weight (q4 = 0.5 + 4/32 bytes per stored value, q8 = 1 + 2/32),
//! against dense Q4_1 0.625 and Q8_0 1.0625 (pointers and the
//! 4-byte padding left out):
//!
//! | format | q4 | q8 | f32 (for comparison) |
//! | --- | --- | --- | --- |
//! | 2:4 (values + bitmap) | 0.3125 + 0.125 = 0.4375 | 0.531 + 0.125 = 0.656 | 2 + 0.125 = 2.125 |
//! | unstructured 50% (bitmap) | 0.4375 | 0.656 | 2 + 2 (u16 columns) = 4 |
//! | unstructured 90% (bitmap) | 0.0625 + 0.125 = 0.1875 | 0.106 + 0.125 = 0.231 | 0.4 + 0.2 = 0.6 |
//! | unstructured 95% (u16 columns) | 0.031 + 0.1 = 0.131 | 0.053 + 0.1 = 0.153 | 0.2 + 0.1 = 0.3 |
//! | block 4x4 at 50% (u32 block columns) | 0.3125 + 0.016 = 0.328 | 0.531 + 0.016 = 0.547 | 2.016 |
//!
//! Reference semantics: `materialize` prunes, then replaces every block of kept
//! values by its dequantized form through `qdq_block`, which is idempotent
//! (a block it returns quantizes back to itself exactly) and never turns a kept
//! value into 0, so re-pruning the result finds the same mask: materializing
//! twice changes nothing.

use half::f16;

/// Stored values per quantized block.
pub const QB: usize = 32;

/// Bits of a quantized value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QBits {
    Q8,
    Q4,
}

impl QBits {
    pub fn name(self) -> &'static str {
        match self {
            QBits::Q8 => "q8",
            QBits::Q4 => "q4",
        }
    }

    /// Bytes of one block's quants.
    pub fn quant_bytes(self) -> u64 {
        match self {
            QBits::Q8 => QB as u64,
            QBits::Q4 => QB as u64 / 2,
        }
    }

    /// f16 planes per block: the scale, and for q4 the minimum.
    pub fn f16_planes(self) -> u64 {
        match self {
            QBits::Q8 => 1,
            QBits::Q4 => 2,
        }
    }

    /// The quantized coding of a pattern's `#values`, `None` for f32.
    pub fn of(v: crate::pattern::ValueCoding) -> Option<QBits> {
        match v {
            crate::pattern::ValueCoding::F32 => None,
            crate::pattern::ValueCoding::Q8 => Some(QBits::Q8),
            crate::pattern::ValueCoding::Q4 => Some(QBits::Q4),
        }
    }
}

/// The slot of stored value `t` of a block: bits `t4 t3 t2 t1 t0` of `t` become
/// `t3 t4 t1 t2 t0`. For 2:4 (two kept values per group of 4, 64 weights a
/// block) slot `16·L + 8·h + 4·a + 2·b + s` holds kept value `s` of group
/// `g = 8·h + 4·L + 2·b + a`: each 16-slot lane gathers groups of one 32-weight
/// half, and each dword of slots holds two groups of one bitmap-nibble parity.
pub fn slot(t: usize) -> usize {
    let b = |i: usize| (t >> i) & 1;
    (b(3) << 4) | (b(4) << 3) | (b(1) << 2) | (b(2) << 1) | b(0)
}

/// Where the planes of `stored` quantized values start, from byte `start`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ValuePlanes {
    pub blocks: u64,
    /// Byte offset of the quants.
    pub q: u64,
    /// Byte offset of the f16 scales.
    pub d: u64,
    /// Byte offset of the f16 minimums (q4; equal to `end` for q8).
    pub m: u64,
    pub end: u64,
}

pub fn value_planes(bits: QBits, start: u64, stored: u64) -> ValuePlanes {
    let blocks = stored.div_ceil(QB as u64);
    let d = start + blocks * bits.quant_bytes();
    let m = d + 2 * blocks;
    let end = d + 2 * blocks * bits.f16_planes();
    ValuePlanes { blocks, q: start, d, m, end }
}

/// How an unstructured `[n, k]` weight with `nnz` kept entries indexes them:
/// the smaller of a per-row bitmap and column indices (ties: the bitmap).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CsrIndex {
    Bitmap,
    /// Column indices of this many bytes (2 or 4).
    Cols(u64),
}

pub fn csr_index(n: u64, k: u64, nnz: u64) -> CsrIndex {
    let ib = crate::sparse::SparseFormat::csr_index_bytes(k);
    if n * crate::sparse::SparseFormat::bitmap_row_bytes(k) <= nnz * ib {
        CsrIndex::Bitmap
    } else {
        CsrIndex::Cols(ib)
    }
}

/// One block's encoding: scale, minimum (0 for q8) and the quantized values in
/// stored order (q8 as i8 bit patterns, q4 in `0..=15`).
struct Encoded {
    d: f16,
    m: f16,
    q: Vec<u8>,
}

fn decode_one(bits: QBits, d: f16, m: f16, q: u8) -> f32 {
    match bits {
        QBits::Q8 => d.to_f32() * (q as i8) as f32,
        QBits::Q4 => d.to_f32() * q as f32 + m.to_f32(),
    }
}

/// Quantizes one block (one pass). q8: `d = amax/127` in f16, nudged down until
/// the largest value lands on ±127; q4: `m = min` in f16, `d = (max − m)/15`.
/// A value that would decode to exactly 0 takes the neighbouring level instead
/// (an all-zero block gets the smallest positive f16 as its scale or minimum),
/// so kept values stay nonzero.
fn encode(bits: QBits, x: &[f32]) -> Encoded {
    let tiny = f16::from_bits(1);
    match bits {
        QBits::Q8 => {
            let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
            let mut d = f16::from_f32(amax / 127.0);
            if !d.is_finite() {
                d = f16::MAX;
            }
            while d.to_f32() > 0.0 && (amax / d.to_f32()).round() < 127.0 {
                d = f16::from_bits(d.to_bits() - 1);
            }
            if d.to_f32() == 0.0 {
                d = tiny;
            }
            let q = x
                .iter()
                .map(|v| {
                    let q = (v / d.to_f32()).round().clamp(-127.0, 127.0) as i8;
                    let q = if q == 0 {
                        if *v < 0.0 {
                            -1
                        } else {
                            1
                        }
                    } else {
                        q
                    };
                    q as u8
                })
                .collect();
            Encoded { d, m: f16::ZERO, q }
        }
        QBits::Q4 => {
            let min = x.iter().copied().fold(f32::INFINITY, f32::min);
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut m = f16::from_f32(min);
            if !m.is_finite() {
                m = if min < 0.0 { f16::MIN } else { f16::MAX };
            }
            let mut d = f16::from_f32(((max - m.to_f32()) / 15.0).max(0.0));
            if !d.is_finite() {
                d = f16::MAX;
            }
            if d.to_f32() == 0.0 && m.to_f32() == 0.0 {
                m = tiny;
            }
            let q = x
                .iter()
                .map(|v| {
                    let q = if d.to_f32() > 0.0 { ((v - m.to_f32()) / d.to_f32()).round().clamp(0.0, 15.0) as u8 } else { 0 };
                    if decode_one(bits, d, m, q) == 0.0 {
                        if q < 15 {
                            q + 1
                        } else {
                            q - 1
                        }
                    } else {
                        q
                    }
                })
                .collect();
            Encoded { d, m, q }
        }
    }
}

fn qdq_once(bits: QBits, x: &mut [f32]) {
    let e = encode(bits, x);
    for (v, q) in x.iter_mut().zip(&e.q) {
        *v = decode_one(bits, e.d, e.m, *q);
    }
}

/// Replaces a block of at most 32 stored values by their dequantized form.
/// Idempotent: the result is a fixed point of the quantizer (one pass is, but
/// for f16 rounding corner cases; those take up to four more passes, and a
/// block that still moves becomes a constant block, which is one).
pub fn qdq_block(bits: QBits, x: &mut [f32]) {
    let orig_mean = x.iter().map(|v| *v as f64).sum::<f64>() / x.len().max(1) as f64;
    qdq_once(bits, x);
    for _ in 0..4 {
        let mut y = x.to_vec();
        qdq_once(bits, &mut y);
        if y.iter().zip(x.iter()).all(|(a, b)| a.to_bits() == b.to_bits()) {
            return;
        }
        x.copy_from_slice(&y);
    }
    let c = match bits {
        QBits::Q8 => f16::from_bits(1),
        QBits::Q4 => {
            let c = f16::from_f32(orig_mean as f32);
            if c.to_f32() == 0.0 || !c.is_finite() {
                f16::from_bits(1)
            } else {
                c
            }
        }
    };
    x.iter_mut().for_each(|v| *v = c.to_f32());
}

/// Quantizes `values` (a format's stored values in storage order) into the
/// planes at `vp` of `out`.
pub fn encode_values(bits: QBits, values: &[f32], vp: &ValuePlanes, out: &mut [u8]) {
    for (b, x) in values.chunks(QB).enumerate() {
        let e = encode(bits, x);
        let qb = (vp.q + b as u64 * bits.quant_bytes()) as usize;
        for (t, q) in e.q.iter().enumerate() {
            let s = slot(t);
            match bits {
                QBits::Q8 => out[qb + s] = *q,
                QBits::Q4 if s < 16 => out[qb + s] |= q & 0x0F,
                QBits::Q4 => out[qb + s - 16] |= (q & 0x0F) << 4,
            }
        }
        let at = (vp.d + 2 * b as u64) as usize;
        out[at..at + 2].copy_from_slice(&e.d.to_le_bytes());
        if bits == QBits::Q4 {
            let at = (vp.m + 2 * b as u64) as usize;
            out[at..at + 2].copy_from_slice(&e.m.to_le_bytes());
        }
    }
}

/// Stored value `p` of the planes at `vp` of `bytes`, dequantized.
pub fn decode_value(bits: QBits, vp: &ValuePlanes, bytes: &[u8], p: u64) -> f32 {
    let (b, t) = (p / QB as u64, p as usize % QB);
    let s = slot(t);
    let qb = (vp.q + b * bits.quant_bytes()) as usize;
    let q = match bits {
        QBits::Q8 => bytes[qb + s],
        QBits::Q4 if s < 16 => bytes[qb + s] & 0x0F,
        QBits::Q4 => bytes[qb + s - 16] >> 4,
    };
    let h = |at: u64| f16::from_le_bytes([bytes[at as usize], bytes[at as usize + 1]]);
    let m = if bits == QBits::Q4 { h(vp.m + 2 * b) } else { f16::ZERO };
    decode_one(bits, h(vp.d + 2 * b), m, q)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_a_permutation() {
        let mut seen = [false; QB];
        for t in 0..QB {
            seen[slot(t)] = true;
        }
        assert!(seen.iter().all(|s| *s));
        // Kept values 0, 1 (group 0) and 4, 5 (group 2) share the first dword.
        assert_eq!([slot(0), slot(1), slot(4), slot(5)], [0, 1, 2, 3]);
    }

    fn blocks() -> Vec<Vec<f32>> {
        let normal = crate::Init::Normal { seed: 3, std: 1.0 }.generate(32 * 40);
        let mut out: Vec<Vec<f32>> = normal.chunks(32).map(|c| c.to_vec()).collect();
        out.push(vec![0.0; 32]);
        out.push(vec![1.0; 7]);
        out.push(vec![-3.5; 32]);
        out.push((0..32).map(|i| 1000.0 + i as f32 * 1e-4).collect());
        out.push((0..32).map(|i| 1e-6 * i as f32).collect());
        out.push((0..32).map(|i| if i == 5 { 1e4 } else { 1e-3 }).collect());
        out.push((0..32).map(|i| -(i as f32) / 15.0).collect());
        out
    }

    #[test]
    fn qdq_is_idempotent_close_and_never_zero() {
        for bits in [QBits::Q8, QBits::Q4] {
            for x in blocks() {
                let mut y = x.clone();
                qdq_block(bits, &mut y);
                assert!(y.iter().all(|v| *v != 0.0), "{bits:?} {x:?} -> {y:?}");
                let mut z = y.clone();
                qdq_block(bits, &mut z);
                assert_eq!(y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), z.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
                // Encoding a fixed point decodes to it exactly.
                let vp = value_planes(bits, 0, y.len() as u64);
                let mut bytes = vec![0u8; vp.end as usize];
                encode_values(bits, &y, &vp, &mut bytes);
                for (p, v) in y.iter().enumerate() {
                    assert_eq!(decode_value(bits, &vp, &bytes, p as u64).to_bits(), v.to_bits());
                }
            }
            // Ordinary data: the error is within a step of the block's grid.
            let x = crate::Init::Normal { seed: 9, std: 1.0 }.generate(32);
            let mut y = x.clone();
            qdq_block(bits, &mut y);
            let (lo, hi) = x.iter().fold((f32::MAX, f32::MIN), |(a, b), v| (a.min(*v), b.max(*v)));
            let step = match bits {
                QBits::Q8 => hi.abs().max(lo.abs()) / 127.0,
                QBits::Q4 => (hi - lo) / 15.0,
            };
            let err = x.iter().zip(&y).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err <= 0.51 * step + 1e-3, "{bits:?}: error {err}, step {step}");
        }
    }
}
