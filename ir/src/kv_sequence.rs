//! Sequence-axis compressed caches (`#kv(dct | pswf, axis = sequence)`, as
//! FreqKV compresses the context): the first `sinks` positions stay exact; the
//! positions after them are taken in blocks of `block`, and a complete block
//! is compressed per channel into `m = round(keep·block)` low-pass positions
//! by an `m × block` matrix (`resampling`), in one of two bases:
//! - DCT: the lowest `m` frequencies of the block's orthonormal DCT-II,
//!   resampled with an inverse DCT of length `m` and scaled by √(m/block);
//! - PSWF: the block's projection onto its `m` most concentrated discrete
//!   prolate spheroidal sequences (half-bandwidth `bandwidth`,
//!   `kv_basis::dpss`), averaged over `m` equal bins of positions.
//!
//! Either way the `m` low-pass positions keep the block's mean (a constant
//! block comes back as the same constant: exactly for the DCT, to within the
//! DPSS's leakage for PSWF), and `keep = 1` gives the block back. Blocks are
//! compressed independently (blockwise, not the whole history).
//!
//! The attention rule: a query at position p reads the sinks exactly, the
//! blocks wholly older than its last `recent` positions (blocks
//! `0..⌊max(0, p + 1 − sinks − recent)/block⌋`) as their `m` low-pass
//! positions, each with its score raised by ln(block/m) (it stands for
//! block/m positions, so a block keeps its share of the softmax), and every
//! later position exactly (between `recent` and `recent + block − 1` of
//! them). The rule depends on p alone: decode and prefill agree however the
//! calls split; it is the same for both bases (only the matrix differs).
//!
//! The cache buffer is the sinks' exact rows, then a ring of `ring` exact rows
//! (f32; position t ≥ sinks in row `(t − sinks) mod ring`, `ring` a multiple
//! of the block), then per complete block its `m` low-pass rows (f16, row-major).

use crate::pattern::{KvAxis, KvCompression, Pattern};
use half::f16;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// The basis a block is compressed in (in the manifest: `{"transform":
/// "dct"}` or `{"transform": "pswf", "bandwidth": W}`).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "transform", rename_all = "lowercase")]
pub enum SeqBasis {
    Dct,
    /// Discrete prolate spheroidal sequences of half-bandwidth `bandwidth`
    /// (0 < bandwidth < 0.5, in cycles per position).
    Pswf {
        bandwidth: f32,
    },
}

impl SeqBasis {
    /// The plan's default PSWF half-bandwidth at `keep`: keep/4, so the
    /// band's 2·block·W well-concentrated sequences are half of the `m` kept
    /// and the rest, which leak out of the band, reach the block's edges: a
    /// constant block comes back within 1e-4 (at W = keep/2, the band of
    /// exactly `m` sequences, its edge bins lose 11% at block 64, keep 1/4).
    pub fn default_bandwidth(keep: f32) -> f32 {
        keep / 4.0
    }
}

/// A sequence-axis pattern's parameters (`#kv(dct | pswf, axis = sequence)`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SeqParams {
    pub basis: SeqBasis,
    pub keep: f32,
    pub block: Option<u32>,
    pub sinks: u32,
    pub recent: u32,
}

impl SeqParams {
    /// The parameters of `kv` if it compresses along the sequence axis.
    pub fn of(kv: &KvCompression) -> Option<SeqParams> {
        match *kv {
            KvCompression::Dct { keep, axis: KvAxis::Sequence, block, sinks, recent } => {
                Some(SeqParams { basis: SeqBasis::Dct, keep, block, sinks, recent })
            }
            KvCompression::Pswf { keep, axis: KvAxis::Sequence, block, bandwidth, sinks, recent } => {
                Some(SeqParams { basis: SeqBasis::Pswf { bandwidth }, keep, block, sinks, recent })
            }
            _ => None,
        }
    }

    /// The parameters of an op's sequence-axis pattern, if it has one.
    pub fn of_patterns(patterns: &[Pattern]) -> Option<SeqParams> {
        patterns.iter().find_map(|p| match p {
            Pattern::Kv(kv) => SeqParams::of(kv),
            _ => None,
        })
    }

    /// The pattern these parameters are.
    pub fn pattern(&self) -> KvCompression {
        let SeqParams { keep, block, sinks, recent, .. } = *self;
        match self.basis {
            SeqBasis::Dct => KvCompression::Dct { keep, axis: KvAxis::Sequence, block, sinks, recent },
            SeqBasis::Pswf { bandwidth } => KvCompression::Pswf { keep, axis: KvAxis::Sequence, block, bandwidth, sinks, recent },
        }
    }

    /// The cache layout for rows of `width` channels and calls of at most
    /// `max_call` rows (`SeqLayout::new`); `None` without a block or where it
    /// does not fit.
    pub fn layout(&self, width: usize, max_call: usize) -> Option<SeqLayout> {
        SeqLayout::new(self.basis, self.keep, self.block?, self.sinks, self.recent, width, max_call)
    }
}

/// Low-pass positions a block of `block` keeps at `keep`.
pub fn kept_rows(block: u32, keep: f32) -> u32 {
    ((keep as f64 * block as f64).round() as u32).min(block)
}

/// Where a sequence-axis cache keeps what.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SeqLayout {
    pub basis: SeqBasis,
    /// The fraction of a block kept (as the pattern gives it).
    pub keep: f32,
    pub block: usize,
    /// Low-pass positions per block (`kept_rows`).
    pub m: usize,
    pub sinks: usize,
    pub recent: usize,
    /// Channels of a row.
    pub width: usize,
    /// Exact rows after the sinks (a multiple of `block`).
    pub ring: usize,
}

impl SeqLayout {
    /// The layout for rows of `width` channels whose calls append at most
    /// `max_call` rows; `None` where it does not fit (zero sizes, nothing kept).
    pub fn new(basis: SeqBasis, keep: f32, block: u32, sinks: u32, recent: u32, width: usize, max_call: usize) -> Option<SeqLayout> {
        let m = kept_rows(block, keep) as usize;
        let (block, sinks, recent) = (block as usize, sinks as usize, recent as usize);
        if block == 0 || m == 0 || recent == 0 || width == 0 || max_call == 0 {
            return None;
        }
        // A call's first query reaches back `recent + block − 2` rows before its own.
        let ring = (recent + block + max_call).div_ceil(block) * block;
        Some(SeqLayout { basis, keep, block, m, sinks, recent, width, ring })
    }

    /// The most rows one call may append.
    pub fn max_call(&self) -> usize {
        self.ring - self.recent - self.block
    }

    /// Bytes of the exact rows (sinks and ring, f32).
    pub fn exact_bytes(&self) -> usize {
        (self.sinks + self.ring) * self.width * 4
    }

    /// Bytes of one block's low-pass rows (f16).
    pub fn block_bytes(&self) -> usize {
        self.m * self.width * 2
    }

    /// Complete blocks among `positions` positions.
    pub fn blocks(&self, positions: usize) -> usize {
        positions.saturating_sub(self.sinks) / self.block
    }

    /// Bytes a cache of `positions` positions takes (`None` on overflow).
    pub fn bytes(&self, positions: usize) -> Option<usize> {
        self.blocks(positions).checked_mul(self.block_bytes())?.checked_add(self.exact_bytes())
    }

    /// The exact row of position `t` (the sinks first, then the ring).
    pub fn exact_row(&self, t: usize) -> usize {
        if t < self.sinks {
            t
        } else {
            self.sinks + (t - self.sinks) % self.ring
        }
    }

    /// Blocks the query at position `p` reads low-pass.
    pub fn read_blocks(&self, p: usize) -> usize {
        (p + 1).saturating_sub(self.sinks + self.recent) / self.block
    }

    /// ln(block/m): what a low-pass position adds to its score.
    pub fn bonus(&self) -> f32 {
        (self.block as f64 / self.m as f64).ln() as f32
    }

    /// The `m × block` matrix that takes a block's positions (per channel)
    /// to its low-pass positions (row-major, f64), computed once per process
    /// for each (block, m, basis): DCT: √(m/block) · DCT-III of length m · the
    /// first m rows of the orthonormal DCT-II of length block; PSWF: the bin
    /// averages · V·Vᵀ, V the block's m first DPSS. `None` if the DPSS
    /// eigendecomposition fails.
    pub fn resampling(&self) -> Option<Arc<Vec<f64>>> {
        type Key = (usize, usize, Option<u32>);
        static MADE: OnceLock<Mutex<HashMap<Key, Arc<Vec<f64>>>>> = OnceLock::new();
        let key = match self.basis {
            SeqBasis::Dct => (self.block, self.m, None),
            SeqBasis::Pswf { bandwidth } => (self.block, self.m, Some(bandwidth.to_bits())),
        };
        let made = MADE.get_or_init(Default::default);
        if let Some(r) = made.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return Some(r);
        }
        let r = Arc::new(match self.basis {
            SeqBasis::Dct => dct_resampling(self.block, self.m),
            SeqBasis::Pswf { bandwidth } => pswf_resampling(self.block, self.m, bandwidth as f64)?,
        });
        if let Ok(mut m) = made.lock() {
            m.insert(key, r.clone());
        }
        Some(r)
    }

    /// The `m × width` low-pass rows of one block's `block × width` rows
    /// (f16-rounded, as stored); `None` if the sizes do not fit.
    pub fn compress(&self, rows: &[f32]) -> Option<Vec<f32>> {
        let (n, m, w) = (self.block, self.m, self.width);
        if rows.len() != n * w {
            return None;
        }
        let r = self.resampling()?;
        let mut out = vec![0f32; m * w];
        let mut acc = vec![0f64; w];
        for j in 0..m {
            acc.iter_mut().for_each(|a| *a = 0.0);
            for i in 0..n {
                let c = r[j * n + i];
                for (a, x) in acc.iter_mut().zip(&rows[i * w..(i + 1) * w]) {
                    *a += c * *x as f64;
                }
            }
            for (o, a) in out[j * w..(j + 1) * w].iter_mut().zip(&acc) {
                *o = f16::from_f64(*a).to_f32();
            }
        }
        Some(out)
    }

    /// Packs `compress`'s rows as stored (f16) into `record` (`block_bytes`).
    pub fn compress_into(&self, rows: &[f32], record: &mut [u8]) -> Option<()> {
        let low = self.compress(rows)?;
        if record.len() != self.block_bytes() {
            return None;
        }
        for (b, x) in record.chunks_exact_mut(2).zip(&low) {
            b.copy_from_slice(&f16::from_f32(*x).to_le_bytes());
        }
        Some(())
    }
}

/// `resampling` in the DCT: √(m/n) · DCT-III of length m · the first m rows
/// of the orthonormal DCT-II of length n.
fn dct_resampling(n: usize, m: usize) -> Vec<f64> {
    let pi = std::f64::consts::PI;
    let unit = |k: usize, len: usize| if k == 0 { (1.0 / len as f64).sqrt() } else { (2.0 / len as f64).sqrt() };
    let scale = (m as f64 / n as f64).sqrt();
    let mut r = vec![0f64; m * n];
    for j in 0..m {
        for k in 0..m {
            // DCT-III (the inverse of length m) row j, column k, times DCT-II row k.
            let inv = unit(k, m) * (pi * (j as f64 + 0.5) * k as f64 / m as f64).cos();
            for i in 0..n {
                r[j * n + i] += scale * inv * unit(k, n) * (pi * (i as f64 + 0.5) * k as f64 / n as f64).cos();
            }
        }
    }
    r
}

/// `resampling` in the PSWF basis: the block's projection V·Vᵀ onto its `m`
/// most concentrated DPSS of half-bandwidth `w`, then averaged over `m`
/// equal bins (bin j covers positions [j·n/m, (j+1)·n/m), a position
/// straddling two bins split between them by its overlap).
fn pswf_resampling(n: usize, m: usize, w: f64) -> Option<Vec<f64>> {
    let v = crate::kv_basis::dpss(n, m, w)?;
    let bin = n as f64 / m as f64;
    let mut r = vec![0f64; m * n];
    for j in 0..m {
        let (lo, hi) = (j as f64 * bin, (j + 1) as f64 * bin);
        for i in 0..n {
            let share = ((i + 1) as f64).min(hi) - (i as f64).max(lo);
            if share <= 0.0 {
                continue;
            }
            let share = share / bin;
            // Row i of V·Vᵀ, weighted by position i's share of the bin.
            for t in 0..n {
                let p: f64 = (0..m).map(|k| v[i * m + k] * v[t * m + k]).sum();
                r[j * n + t] += share * p;
            }
        }
    }
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_constant_block_keeps_its_value_and_keep_one_is_exact() {
        let l = SeqLayout::new(SeqBasis::Dct, 0.25, 16, 4, 32, 2, 1).unwrap();
        assert_eq!(l.m, 4);
        let rows: Vec<f32> = (0..16).flat_map(|_| [1.5f32, -0.25]).collect();
        let low = l.compress(&rows).unwrap();
        assert!(low.chunks(2).all(|r| (r[0] - 1.5).abs() < 1e-3 && (r[1] + 0.25).abs() < 1e-3), "{low:?}");
        // keep = 1: the DCT and its inverse of the same length give the rows back (f16-rounded).
        let all = SeqLayout::new(SeqBasis::Dct, 1.0, 8, 0, 8, 1, 1).unwrap();
        let x: Vec<f32> = (0..8).map(|i| (i as f32 * 0.7).sin()).collect();
        let back = all.compress(&x).unwrap();
        assert!(x.iter().zip(&back).all(|(a, b)| (a - b).abs() < 2e-3), "{back:?}");
        assert_eq!(all.bonus(), 0.0);
    }

    #[test]
    fn the_rule_and_the_sizes_follow_sinks_recent_and_blocks() {
        let l = SeqLayout::new(SeqBasis::Dct, 0.5, 16, 4, 32, 8, 256).unwrap();
        // Ring: 32 + 16 + 256 rows rounded up to blocks of 16.
        assert_eq!((l.ring, l.max_call()), (304, 256));
        // Position 51 sees 52 keys: 4 sinks, 48 after them, the last 32 recent: one block old.
        assert_eq!((l.read_blocks(50), l.read_blocks(51), l.read_blocks(52)), (0, 1, 1));
        assert_eq!(l.read_blocks(67), 2);
        assert_eq!((l.exact_row(3), l.exact_row(4), l.exact_row(4 + 304)), (3, 4, 4));
        assert_eq!(l.bytes(100), Some((4 + 304) * 8 * 4 + 6 * 8 * 8 * 2));
        assert!(SeqLayout::new(SeqBasis::Dct, 0.01, 16, 0, 8, 8, 1).is_none(), "keeps nothing");
    }

    #[test]
    fn pswf_blocks_keep_their_bin_means_and_keep_one_is_exact() {
        let pswf = |keep: f32| SeqBasis::Pswf { bandwidth: SeqBasis::default_bandwidth(keep) };
        // keep = 1: V·Vᵀ is the identity and every bin one position.
        let all = SeqLayout::new(pswf(1.0), 1.0, 16, 0, 16, 1, 1).unwrap();
        let x: Vec<f32> = (0..16).map(|i| (i as f32 * 0.9).cos()).collect();
        let back = all.compress(&x).unwrap();
        assert!(x.iter().zip(&back).all(|(a, b)| (a - b).abs() < 2e-3), "{back:?}");
        // keep = 1/4 of 64: 16 bins of 4; a slow signal (well inside the band)
        // comes back as its bin means, a constant as itself.
        let l = SeqLayout::new(pswf(0.25), 0.25, 64, 4, 64, 2, 1).unwrap();
        assert_eq!(l.m, 16);
        let rows: Vec<f32> = (0..64).flat_map(|i| [0.75f32, (i as f32 * std::f32::consts::PI / 64.0).sin()]).collect();
        let low = l.compress(&rows).unwrap();
        for (j, r) in low.chunks(2).enumerate() {
            let mean = (0..4).map(|i| rows[(4 * j + i) * 2 + 1]).sum::<f32>() / 4.0;
            assert!((r[0] - 0.75).abs() < 1e-2 && (r[1] - mean).abs() < 1e-2, "bin {j}: {r:?} against 0.75 and {mean}");
        }
        // The two bases are different matrices, each made once.
        let dct = SeqLayout { basis: SeqBasis::Dct, ..l };
        let (a, b) = (l.resampling().unwrap(), dct.resampling().unwrap());
        assert!(a.iter().zip(b.iter()).any(|(x, y)| (x - y).abs() > 1e-3));
        assert!(Arc::ptr_eq(&a, &l.resampling().unwrap()));
    }
}
