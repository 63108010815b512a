//! Weight layouts for matrix tiles: a transposed `[n, k]` matmul weight
//! rearranged so that each AMX B tile is one contiguous load (bf16 words) or
//! one record of nibbles and scales (q4_1). The compiler packs artifacts this way and the runtime packs
//! checkpoints at load with the same function; `untile` gives the row-major
//! words back (the interpreter's view of an artifact's weights).

/// How a weight buffer's bytes are arranged, when not row-major.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TileLayout {
    /// bf16 `[n, k]` as `tdpbf16ps` B tiles: for each block of [`TILE_N`]
    /// weight rows and each step of [`TILE_K`] along `k` (blocks in that
    /// order, `k` innermost), 16 tile rows of 64 bytes; tile row `r` holds,
    /// for each of the block's weight rows `c`, the pair `w[c][2r]`,
    /// `w[c][2r + 1]` of the step (the "VNNI" order: pairs along `k`).
    AmxBf16,
    /// q4_1 `[n, k]` as `tdpbsud` B tiles of its 4-bit values: for each block
    /// of [`TILE_N`] weight rows and each block of 32 along `k` (blocks in that
    /// order, `k` innermost), a record of [`Q4_RECORD`] bytes: 256 bytes of
    /// nibbles, then the 16 rows' f16 scales, then their 16 f16 minimums. The
    /// B tile (8 rows of 64 bytes) holds at byte `r·64 + c·4 + e` the value
    /// `q[c][4r + e]` (groups of 4 along `k`); record byte `i` holds tile byte
    /// `i` in its low nibble and tile byte `i + 256` in its high nibble. The
    /// same bytes as the row-major q4_1 planes, rearranged.
    AmxQ4_1,
}

/// Bytes of one `AmxQ4_1` record: 16 rows × 32 values of 4 bits, 16 f16
/// scales, 16 f16 minimums.
pub const Q4_RECORD: u64 = 256 + 32 + 32;

/// Weight rows per tile (a tile's 16 columns of f32 results).
pub const TILE_N: u64 = 16;
/// `k` per tile step: 32 bf16 values, 64 bytes per tile row.
pub const TILE_K: u64 = 32;
/// Bytes of one tile.
pub const TILE_BYTES: u64 = 1024;

impl TileLayout {
    /// Whether a `[n, k]` weight of type `dtype` can be tiled so: the
    /// layout's type, with `n` and `k` whole tiles.
    pub fn fits(self, dtype: crate::DType, n: u64, k: u64) -> bool {
        dtype == self.dtype() && n > 0 && n.is_multiple_of(TILE_N) && k > 0 && k.is_multiple_of(TILE_K)
    }

    /// The weight type this layout stores.
    pub fn dtype(self) -> crate::DType {
        match self {
            TileLayout::AmxBf16 => crate::DType::BF16,
            TileLayout::AmxQ4_1 => crate::DType::Q4_1,
        }
    }

    /// Where bf16 word `(row, col)` of the row-major `[n, k]` matrix goes (a word index).
    fn bf16_word(k: u64, row: u64, col: u64) -> u64 {
        let block = (row / TILE_N) * (k / TILE_K) + col / TILE_K;
        let (c, kk) = (row % TILE_N, col % TILE_K);
        block * (TILE_BYTES / 2) + (kk / 2) * (2 * TILE_N) + c * 2 + kk % 2
    }

    /// The stored bytes of a `[n, k]` weight of this layout's type, as the
    /// row-major packing has them (`2·n·k` bytes of bf16, or the q4_1 planes of
    /// `quant.rs`), in this layout; `None` when the shape does not fit or the
    /// byte count is wrong.
    pub fn tile(self, bytes: &[u8], n: u64, k: u64) -> Option<Vec<u8>> {
        self.permute(bytes, n, k, true)
    }

    /// The inverse of [`TileLayout::tile`].
    pub fn untile(self, bytes: &[u8], n: u64, k: u64) -> Option<Vec<u8>> {
        self.permute(bytes, n, k, false)
    }

    fn permute(self, bytes: &[u8], n: u64, k: u64, forward: bool) -> Option<Vec<u8>> {
        if !self.fits(self.dtype(), n, k) {
            return None;
        }
        match self {
            TileLayout::AmxBf16 => {
                if bytes.len() as u64 != 2 * n * k {
                    return None;
                }
                let mut out = vec![0u8; bytes.len()];
                for row in 0..n {
                    for col in 0..k {
                        let (rm, t) = ((row * k + col) as usize * 2, Self::bf16_word(k, row, col) as usize * 2);
                        let (from, to) = if forward { (rm, t) } else { (t, rm) };
                        out[to..to + 2].copy_from_slice(&bytes[from..from + 2]);
                    }
                }
                Some(out)
            }
            TileLayout::AmxQ4_1 => q4_permute(bytes, n, k, forward),
        }
    }
}

/// `AmxQ4_1` from the row-major q4_1 planes (`forward`) or back.
fn q4_permute(bytes: &[u8], n: u64, k: u64, forward: bool) -> Option<Vec<u8>> {
    use crate::quant::{planes, QK};
    let p = planes(crate::DType::Q4_1, (n * k) as usize)?;
    if bytes.len() != p.total {
        return None;
    }
    let (n, nbk) = (n as usize, k as usize / QK);
    let mut out = vec![0u8; bytes.len()];
    for row in 0..n {
        let (nt, c) = (row / TILE_N as usize, row % TILE_N as usize);
        for blk in 0..nbk {
            let b = row * nbk + blk;
            let rec = (nt * nbk + blk) * Q4_RECORD as usize;
            // The scale and the minimum.
            for (plane, at) in [(p.d, rec + 256), (p.m, rec + 288)] {
                let (rm, t) = (plane + 2 * b, at + 2 * c);
                let (from, to) = if forward { (rm, t) } else { (t, rm) };
                out[to..to + 2].copy_from_slice(&bytes[from..from + 2]);
            }
            // The 32 values: row-major value j of the block is in byte j % 16,
            // the low nibble for j < 16; in the record, tile byte t = (j/4)·64 + c·4 + j%4.
            for j in 0..QK {
                let (rm_byte, rm_high) = (b * QK / 2 + j % 16, j >= 16);
                let t = (j / 4) * 64 + c * 4 + j % 4;
                let (rec_byte, rec_high) = (rec + t % 256, t >= 256);
                let (src, src_high, dst, dst_high) =
                    if forward { (rm_byte, rm_high, rec_byte, rec_high) } else { (rec_byte, rec_high, rm_byte, rm_high) };
                let v = if src_high { bytes[src] >> 4 } else { bytes[src] & 0x0F };
                out[dst] |= if dst_high { v << 4 } else { v };
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_hold_pairs_along_k_and_round_trip() {
        let (n, k) = (32u64, 64u64);
        let bytes: Vec<u8> = (0..n * k).flat_map(|i| (i as u16).to_le_bytes()).collect();
        let t = TileLayout::AmxBf16.tile(&bytes, n, k).unwrap();
        let word = |at: usize| u16::from_le_bytes([t[2 * at], t[2 * at + 1]]) as u64;
        // Tile row 0 of the first tile: weight rows 0..16, each (k 0, k 1).
        assert_eq!((0..4).map(word).collect::<Vec<_>>(), [0, 1, k, k + 1]);
        // Tile row 3 (k 6, 7) of weight row 5.
        assert_eq!(word(3 * 32 + 5 * 2), 5 * k + 6);
        // The next tile is the next step along k of the same weight rows.
        assert_eq!(word(512), TILE_K);
        // The third tile starts the second block of weight rows.
        assert_eq!(word(2 * 512), TILE_N * k);
        assert_eq!(TileLayout::AmxBf16.untile(&t, n, k), Some(bytes));
    }

    #[test]
    fn q4_1_records_hold_tile_bytes_in_nibbles_and_round_trip() {
        let (n, k) = (32u64, 64u64);
        let values: Vec<f32> = crate::Init::Normal { seed: 3, std: 1.0 }.generate((n * k) as usize);
        let packed = crate::quant::quantize(crate::DType::Q4_1, &values).unwrap();
        let t = TileLayout::AmxQ4_1.tile(&packed, n, k).unwrap();
        assert_eq!(t.len(), packed.len());
        let mut want = vec![0f32; (n * k) as usize];
        crate::quant::dequantize(crate::DType::Q4_1, &packed, &mut want);
        // Dequantize from the records: row 16 + c of block 1 is record (1, 1).
        let nbk = (k / 32) as usize;
        for (row, blk) in [(0usize, 0usize), (5, 1), (17, 0), (31, 1)] {
            let (nt, c) = (row / 16, row % 16);
            let rec = &t[(nt * nbk + blk) * Q4_RECORD as usize..][..Q4_RECORD as usize];
            let f16 = |at: usize| half::f16::from_le_bytes([rec[at], rec[at + 1]]).to_f32();
            let (d, m) = (f16(256 + 2 * c), f16(288 + 2 * c));
            for j in 0..32 {
                let tb = (j / 4) * 64 + c * 4 + j % 4;
                let q = if tb < 256 { rec[tb] & 0x0F } else { rec[tb - 256] >> 4 };
                assert_eq!(d * q as f32 + m, want[row * k as usize + blk * 32 + j], "row {row}, block {blk}, value {j}");
            }
        }
        assert_eq!(TileLayout::AmxQ4_1.untile(&t, n, k), Some(packed));
    }

    #[test]
    fn shapes_that_are_not_whole_tiles_are_refused() {
        assert!(TileLayout::AmxBf16.tile(&[0; 2 * 16 * 48], 16, 48).is_none());
        assert!(TileLayout::AmxBf16.tile(&[0; 2 * 8 * 32], 8, 32).is_none());
        assert!(TileLayout::AmxBf16.tile(&[0; 10], 16, 32).is_none());
        assert!(!TileLayout::AmxBf16.fits(crate::DType::F16, 16, 32));
    }
}
