//! Sequence-axis DCT caches (`#kv(dct, axis = sequence)`, as FreqKV
//! compresses the context): the first `sinks` positions stay exact; the
//! positions after them are taken in blocks of `block`, and a complete block
//! is compressed per channel by keeping the lowest `m = round(keep·block)`
//! frequencies of its orthonormal DCT-II and resampling them with an inverse
//! DCT of length `m`, scaled by √(m/block): `m` low-pass positions that keep
//! the block's mean (a constant block comes back as the same constant).
//! Blocks are compressed independently (blockwise, not the whole history).
//!
//! The attention rule: a query at position p reads the sinks exactly, the
//! blocks wholly older than its last `recent` positions (blocks
//! `0..⌊max(0, p + 1 − sinks − recent)/block⌋`) as their `m` low-pass
//! positions, each with its score raised by ln(block/m) (it stands for
//! block/m positions, so a block keeps its share of the softmax), and every
//! later position exactly (between `recent` and `recent + block − 1` of
//! them). The rule depends on p alone: decode and prefill agree however the
//! calls split.
//!
//! The cache buffer is the sinks' exact rows, then a ring of `ring` exact rows
//! (f32; position t ≥ sinks in row `(t − sinks) mod ring`, `ring` a multiple
//! of the block), then per complete block its `m` low-pass rows (f16, row-major).

use half::f16;

/// Low-pass positions a block of `block` keeps at `keep`.
pub fn kept_rows(block: u32, keep: f32) -> u32 {
    ((keep as f64 * block as f64).round() as u32).min(block)
}

/// Where a sequence-axis DCT cache keeps what.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SeqLayout {
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
    pub fn new(keep: f32, block: u32, sinks: u32, recent: u32, width: usize, max_call: usize) -> Option<SeqLayout> {
        let m = kept_rows(block, keep) as usize;
        let (block, sinks, recent) = (block as usize, sinks as usize, recent as usize);
        if block == 0 || m == 0 || recent == 0 || width == 0 || max_call == 0 {
            return None;
        }
        // A call's first query reaches back `recent + block − 2` rows before its own.
        let ring = (recent + block + max_call).div_ceil(block) * block;
        Some(SeqLayout { keep, block, m, sinks, recent, width, ring })
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
    /// to its low-pass positions: √(m/block) · DCT-III of length m · the
    /// first m rows of the orthonormal DCT-II of length block (row-major, f64).
    pub fn resampling(&self) -> Vec<f64> {
        let (n, m) = (self.block, self.m);
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

    /// The `m × width` low-pass rows of one block's `block × width` rows
    /// (f16-rounded, as stored); `None` if the sizes do not fit.
    pub fn compress(&self, rows: &[f32]) -> Option<Vec<f32>> {
        let (n, m, w) = (self.block, self.m, self.width);
        if rows.len() != n * w {
            return None;
        }
        let r = self.resampling();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_constant_block_keeps_its_value_and_keep_one_is_exact() {
        let l = SeqLayout::new(0.25, 16, 4, 32, 2, 1).unwrap();
        assert_eq!(l.m, 4);
        let rows: Vec<f32> = (0..16).flat_map(|_| [1.5f32, -0.25]).collect();
        let low = l.compress(&rows).unwrap();
        assert!(low.chunks(2).all(|r| (r[0] - 1.5).abs() < 1e-3 && (r[1] + 0.25).abs() < 1e-3), "{low:?}");
        // keep = 1: the DCT and its inverse of the same length give the rows back (f16-rounded).
        let all = SeqLayout::new(1.0, 8, 0, 8, 1, 1).unwrap();
        let x: Vec<f32> = (0..8).map(|i| (i as f32 * 0.7).sin()).collect();
        let back = all.compress(&x).unwrap();
        assert!(x.iter().zip(&back).all(|(a, b)| (a - b).abs() < 2e-3), "{back:?}");
        assert_eq!(all.bonus(), 0.0);
    }

    #[test]
    fn the_rule_and_the_sizes_follow_sinks_recent_and_blocks() {
        let l = SeqLayout::new(0.5, 16, 4, 32, 8, 256).unwrap();
        // Ring: 32 + 16 + 256 rows rounded up to blocks of 16.
        assert_eq!((l.ring, l.max_call()), (304, 256));
        // Position 51 sees 52 keys: 4 sinks, 48 after them, the last 32 recent: one block old.
        assert_eq!((l.read_blocks(50), l.read_blocks(51), l.read_blocks(52)), (0, 1, 1));
        assert_eq!(l.read_blocks(67), 2);
        assert_eq!((l.exact_row(3), l.exact_row(4), l.exact_row(4 + 304)), (3, 4, 4));
        assert_eq!(l.bytes(100), Some((4 + 304) * 8 * 4 + 6 * 8 * 8 * 2));
        assert!(SeqLayout::new(0.01, 16, 0, 8, 8, 1).is_none(), "keeps nothing");
    }
}
