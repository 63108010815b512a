//! Weight layouts for matrix tiles: a transposed `[n, k]` matmul weight of
//! 16-bit words rearranged so that each AMX B tile is one contiguous 1 KiB
//! load. The compiler packs artifacts this way and the runtime packs
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
}

/// Weight rows per tile (a tile's 16 columns of f32 results).
pub const TILE_N: u64 = 16;
/// `k` per tile step: 32 bf16 values, 64 bytes per tile row.
pub const TILE_K: u64 = 32;
/// Bytes of one tile.
pub const TILE_BYTES: u64 = 1024;

impl TileLayout {
    /// Whether a `[n, k]` weight of this type can be tiled so: bf16 with `n`
    /// and `k` whole tiles.
    pub fn fits(self, dtype: crate::DType, n: u64, k: u64) -> bool {
        match self {
            TileLayout::AmxBf16 => dtype == crate::DType::BF16 && n > 0 && n.is_multiple_of(TILE_N) && k > 0 && k.is_multiple_of(TILE_K),
        }
    }

    /// Where word `(row, col)` of the row-major `[n, k]` matrix goes (a word index).
    fn word(self, k: u64, row: u64, col: u64) -> u64 {
        match self {
            TileLayout::AmxBf16 => {
                let block = (row / TILE_N) * (k / TILE_K) + col / TILE_K;
                let (c, kk) = (row % TILE_N, col % TILE_K);
                block * (TILE_BYTES / 2) + (kk / 2) * (2 * TILE_N) + c * 2 + kk % 2
            }
        }
    }

    /// Row-major 16-bit words (`2·n·k` bytes) in this layout; `None` when the
    /// shape does not fit or the byte count is wrong.
    pub fn tile(self, bytes: &[u8], n: u64, k: u64) -> Option<Vec<u8>> {
        self.permute(bytes, n, k, true)
    }

    /// The inverse of [`TileLayout::tile`].
    pub fn untile(self, bytes: &[u8], n: u64, k: u64) -> Option<Vec<u8>> {
        self.permute(bytes, n, k, false)
    }

    fn permute(self, bytes: &[u8], n: u64, k: u64, forward: bool) -> Option<Vec<u8>> {
        if !self.fits(crate::DType::BF16, n, k) || bytes.len() as u64 != 2 * n * k {
            return None;
        }
        let mut out = vec![0u8; bytes.len()];
        for row in 0..n {
            for col in 0..k {
                let (rm, t) = ((row * k + col) as usize * 2, self.word(k, row, col) as usize * 2);
                let (from, to) = if forward { (rm, t) } else { (t, rm) };
                out[to..to + 2].copy_from_slice(&bytes[from..from + 2]);
            }
        }
        Some(out)
    }
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
    fn shapes_that_are_not_whole_tiles_are_refused() {
        assert!(TileLayout::AmxBf16.tile(&[0; 2 * 16 * 48], 16, 48).is_none());
        assert!(TileLayout::AmxBf16.tile(&[0; 2 * 8 * 32], 8, 32).is_none());
        assert!(TileLayout::AmxBf16.tile(&[0; 10], 16, 32).is_none());
        assert!(!TileLayout::AmxBf16.fits(crate::DType::F16, 16, 32));
    }
}
