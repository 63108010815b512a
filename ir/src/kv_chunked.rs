//! Chunked-SVD KV caches (`#kv(chunked_svd)`, as ChunkedDecomp does): the
//! positions of a K or V cache are taken in chunks of `chunk`; once a chunk
//! is complete, each KV head's `chunk × d` block is replaced by a rank-r
//! factorization `U_r·Σ_r · V_rᵀ` (thin SVD, faer), the rank fixed or the
//! smallest keeping a fraction of the block's energy (Σσ²), at most the
//! layout's slot.
//!
//! The attention rule: a query at position p reads the keys and values of
//! every chunk before its own through the factors, and those of its own chunk
//! (positions `⌊p/chunk⌋·chunk ..= p`) exactly. A token's result is then the
//! same whether it is decoded or part of a prefill, however the calls split.
//!
//! The cache buffer is a ring of `ring` exact rows (f32; position t in row
//! `t mod ring`; `ring` a multiple of the chunk, at least a chunk more than
//! one call appends, so a call's queries still find their own chunk's rows),
//! then one record per complete chunk: a header of each KV head's rank (f16
//! integers, padded to a multiple of 8 halves), then per KV head the
//! coefficients transposed, `(U_r·Σ_r)ᵀ` (`slot × chunk` f16, row c =
//! coefficient c of every position), then the basis `V_rᵀ` (`slot × d` f16);
//! rows beyond the rank are zero. Attention reads a factored key as
//! `k_j = Σ_c coefᵀ[c, j]·basis[c, ..]` without forming it: q is projected on
//! the basis once per chunk (`p = basis·q`), the scores are `pᵀ·coefᵀ`, and
//! the weighted values are `(coefᵀ·w)ᵀ·basis`.

use crate::pattern::SvdRank;
use faer::Mat;
use half::f16;

/// Where a chunked-SVD cache keeps what: one per K or V cache of an attention.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ChunkLayout {
    /// Positions per chunk.
    pub chunk: usize,
    /// Rank rows reserved per (chunk, KV head): the fixed rank, or the
    /// energy rank's cap (`SvdRank::Energy::max_rank`).
    pub slot: usize,
    pub kv_heads: usize,
    /// Head width.
    pub d: usize,
    /// `Some(f)`: each head's rank is the smallest keeping `f` of its energy.
    pub energy: Option<f32>,
    /// Exact rows held (a multiple of `chunk`).
    pub ring: usize,
}

impl ChunkLayout {
    /// The layout of `#kv(chunked_svd, chunk, rank)` for `kv_heads` heads of
    /// width `d`, whose calls append at most `max_call` rows; `None` where the
    /// pattern does not fit (a zero chunk, rank, width or call; a fixed rank
    /// above the chunk or the head width is cut to it).
    pub fn new(chunk: u32, rank: SvdRank, kv_heads: usize, d: usize, max_call: usize) -> Option<ChunkLayout> {
        let chunk = chunk as usize;
        let full = chunk.min(d);
        let (slot, energy) = match rank {
            SvdRank::Fixed(r) => (r as usize, None),
            SvdRank::Energy { fraction, max_rank } => (max_rank.map_or((full / 2).max(1), |m| m as usize), Some(fraction)),
        };
        let slot = slot.min(full);
        // The own chunk's rows before a call (at most chunk - 1), and the call's.
        let ring = (chunk + max_call).saturating_sub(1).div_ceil(chunk.max(1)) * chunk;
        (chunk > 0 && slot > 0 && kv_heads > 0 && d > 0 && max_call > 0).then_some(ChunkLayout { chunk, slot, kv_heads, d, energy, ring })
    }

    /// The most rows one call may append.
    pub fn max_call(&self) -> usize {
        self.ring + 1 - self.chunk
    }

    /// The exact row of position `t`.
    pub fn ring_row(&self, t: usize) -> usize {
        t % self.ring
    }

    /// Channels of a cache row.
    pub fn width(&self) -> usize {
        self.kv_heads * self.d
    }

    /// Bytes of the ring of exact rows (f32).
    pub fn residual_bytes(&self) -> usize {
        self.ring * self.width() * 4
    }

    /// Halves of a record's header (the ranks, padded to a multiple of 8).
    pub fn header_halves(&self) -> usize {
        self.kv_heads.div_ceil(8) * 8
    }

    /// Halves one KV head's factors take in a record.
    pub fn head_halves(&self) -> usize {
        self.slot * (self.chunk + self.d)
    }

    /// Bytes of one complete chunk's record.
    pub fn chunk_bytes(&self) -> usize {
        2 * (self.header_halves() + self.kv_heads * self.head_halves())
    }

    /// Bytes a cache holding `positions` positions takes (`None` on overflow).
    pub fn bytes(&self, positions: usize) -> Option<usize> {
        (positions / self.chunk).checked_mul(self.chunk_bytes())?.checked_add(self.residual_bytes())
    }

    /// Offset in halves of chunk `c`'s record (from the buffer's start).
    pub fn record_half(&self, c: usize) -> usize {
        (self.residual_bytes() + c * self.chunk_bytes()) / 2
    }

    /// Offset in halves of KV head `kh`'s coefficients within a record; its
    /// basis follows `slot·chunk` halves later.
    pub fn head_half(&self, kh: usize) -> usize {
        self.header_halves() + kh * self.head_halves()
    }

    /// Factors the `chunk × width` rows of one complete chunk into `record`
    /// (`chunk_bytes` bytes). `None` if the sizes do not fit or an SVD fails.
    pub fn factor_into(&self, rows: &[f32], record: &mut [u8]) -> Option<()> {
        let (w, n, d) = (self.width(), self.chunk, self.d);
        if rows.len() != n * w || record.len() != self.chunk_bytes() {
            return None;
        }
        let mut halves = vec![f16::ZERO; record.len() / 2];
        for kh in 0..self.kv_heads {
            let m = Mat::<f64>::from_fn(n, d, |j, x| rows[j * w + kh * d + x] as f64);
            let svd = crate::simd_state::faer(|| m.thin_svd()).ok()?;
            let (u, s, v) = (svd.U(), svd.S().column_vector(), svd.V());
            let r = self.rank_of(&(0..s.nrows()).map(|i| s[i]).collect::<Vec<_>>());
            halves[kh] = f16::from_f32(r as f32);
            let at = self.head_half(kh);
            for c in 0..r {
                for j in 0..n {
                    halves[at + c * n + j] = f16::from_f64(u[(j, c)] * s[c]);
                }
                for x in 0..d {
                    halves[at + self.slot * n + c * d + x] = f16::from_f64(v[(x, c)]);
                }
            }
        }
        for (b, h) in record.chunks_exact_mut(2).zip(&halves) {
            b.copy_from_slice(&h.to_le_bytes());
        }
        Some(())
    }

    /// The rank a head with singular values `s` (descending) keeps.
    pub fn rank_of(&self, s: &[f64]) -> usize {
        let most = self.slot.min(s.len());
        match self.energy {
            None => most,
            Some(f) => {
                let total: f64 = s.iter().map(|x| x * x).sum();
                let mut kept = 0.0;
                for (i, x) in s.iter().enumerate().take(most) {
                    kept += x * x;
                    if kept >= f as f64 * total {
                        return i + 1;
                    }
                }
                most
            }
        }
    }

    /// The ranks a record holds, per KV head.
    pub fn ranks(&self, record: &[u8]) -> Vec<usize> {
        (0..self.kv_heads).map(|kh| half_at(record, kh).to_f32() as usize).collect()
    }

    /// The `chunk × width` rows a record stands for (row-major, f32).
    pub fn expand(&self, record: &[u8]) -> Option<Vec<f32>> {
        if record.len() != self.chunk_bytes() {
            return None;
        }
        let (w, n, d) = (self.width(), self.chunk, self.d);
        let mut out = vec![0f32; n * w];
        for (kh, r) in self.ranks(record).into_iter().enumerate() {
            if r > self.slot {
                return None;
            }
            let at = self.head_half(kh);
            for j in 0..n {
                for x in 0..d {
                    let v: f64 = (0..r)
                        .map(|c| half_at(record, at + c * n + j).to_f64() * half_at(record, at + self.slot * n + c * d + x).to_f64())
                        .sum();
                    out[j * w + kh * d + x] = v as f32;
                }
            }
        }
        Some(out)
    }

    /// `rows` (positions `0..rows.len()/width`) with every complete chunk
    /// replaced by what its record stands for: what a query past them reads.
    /// `None` if a chunk does not factor.
    pub fn factored(&self, rows: &[f32]) -> Option<Vec<f32>> {
        let w = self.width();
        let mut out = rows.to_vec();
        let mut record = vec![0u8; self.chunk_bytes()];
        for c in 0..rows.len() / w / self.chunk {
            let span = c * self.chunk * w..(c + 1) * self.chunk * w;
            self.factor_into(&rows[span.clone()], &mut record)?;
            out[span].copy_from_slice(&self.expand(&record)?);
        }
        Some(out)
    }
}

fn half_at(bytes: &[u8], i: usize) -> f16 {
    f16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize, w: usize, seed: u64) -> Vec<f32> {
        let mut x = seed;
        (0..n * w)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    #[test]
    fn a_chunk_of_rank_r_comes_back_within_f16_rounding() {
        // Two heads of width 16, chunk 8, each block of rank 2 exactly.
        let l = ChunkLayout::new(8, SvdRank::Fixed(2), 2, 16, 1).unwrap();
        let (a, b) = (rows(8, 4, 1), rows(4, 16, 2));
        let mut m = vec![0f32; 8 * 32];
        for j in 0..8 {
            for kh in 0..2 {
                for x in 0..16 {
                    m[j * 32 + kh * 16 + x] = (0..2).map(|c| a[j * 4 + kh * 2 + c] * b[(kh * 2 + c) * 16 + x]).sum();
                }
            }
        }
        let mut rec = vec![0u8; l.chunk_bytes()];
        l.factor_into(&m, &mut rec).unwrap();
        assert_eq!(l.ranks(&rec), vec![2, 2]);
        let back = l.expand(&rec).unwrap();
        let err = m.iter().zip(&back).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(err < 2e-3, "max error {err}");
    }

    #[test]
    fn the_energy_rank_keeps_the_fraction_asked_within_the_slot() {
        let l = ChunkLayout::new(16, SvdRank::Energy { fraction: 0.9, max_rank: Some(8) }, 1, 16, 1).unwrap();
        // Energies 9, 1, 1, 0.25 of 11.25: 0.8, 0.89, 0.98 kept at ranks 1, 2, 3.
        assert_eq!(l.rank_of(&[3.0, 1.0, 1.0, 0.5]), 3);
        let l2 = ChunkLayout::new(16, SvdRank::Energy { fraction: 0.75, max_rank: None }, 1, 16, 1).unwrap();
        assert_eq!(l2.slot, 8);
        assert_eq!(l2.rank_of(&[3.0, 1.0, 1.0, 0.5]), 1);
        // The cap wins over the fraction.
        let capped = ChunkLayout::new(16, SvdRank::Energy { fraction: 1.0, max_rank: Some(2) }, 1, 16, 1).unwrap();
        assert_eq!(capped.rank_of(&[1.0; 16]), 2);
    }

    #[test]
    fn factored_keeps_the_incomplete_chunk_exact_and_sizes_follow_the_layout() {
        let l = ChunkLayout::new(4, SvdRank::Fixed(1), 1, 8, 1).unwrap();
        let m = rows(10, 8, 3);
        let read = l.factored(&m).unwrap();
        assert_eq!(read[64..], m[64..], "positions 8 and 9 are exact");
        assert_ne!(read[..32], m[..32], "a rank-1 chunk of random rows is not exact");
        assert_eq!((l.ring, l.max_call()), (4, 1));
        assert_eq!(l.bytes(10), Some(4 * 8 * 4 + 2 * l.chunk_bytes()));
        assert_eq!(l.chunk_bytes(), 2 * (8 + 4 + 8));
        assert!(l.factor_into(&m[..8], &mut vec![0u8; l.chunk_bytes()]).is_none());
        // Calls of up to 256 rows: the own chunk's 3 earlier rows and 256 more fit 260 = 65 chunks.
        let wide = ChunkLayout::new(4, SvdRank::Fixed(1), 1, 8, 256).unwrap();
        assert_eq!((wide.ring, wide.max_call(), wide.ring_row(261)), (260, 257, 1));
    }
}
