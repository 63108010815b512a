//! Keys quantized per channel, as KIVI does (`--kv-kivi`): the positions of a
//! KV cache are taken in groups of `GROUP`; once a group is complete, each
//! channel of it gets a 4-bit code per position with the group's f16 scale and
//! minimum for that channel, so an outlier channel spends its range on itself
//! instead of on every channel of a row. The newest, incomplete group stays
//! exact (f32) until it fills.
//!
//! A group of a `width`-channel cache is `group_bytes(width)` bytes: its 32
//! rows of codes (`width / 2` bytes each; per 32 channels the Q4 block order of
//! `quant`: byte j holds channel j in its low nibble and channel j + 16 in its
//! high one), then the scales (`width` f16), then the minimums (`width` f16).
//! That is 0.625 bytes per value, the size of Q4_1; the cache buffer is
//! `residual_bytes(width)` of exact rows followed by the groups.

use half::f16;

/// Positions per group.
pub const GROUP: usize = 32;

/// Bytes of one complete group of a cache `width` channels wide.
pub fn group_bytes(width: usize) -> usize {
    20 * width
}

/// Bytes of the exact rows of the incomplete group (f32).
pub fn residual_bytes(width: usize) -> usize {
    GROUP * width * 4
}

/// Byte offsets within a group: codes of row `w`, the scales, the minimums.
pub fn code_offset(width: usize, w: usize) -> usize {
    w * width / 2
}
pub fn scale_offset(width: usize) -> usize {
    16 * width
}
pub fn min_offset(width: usize) -> usize {
    18 * width
}

/// Packs `rows` (`GROUP` rows of `width` values, `width` a multiple of 32)
/// into `out` (`group_bytes(width)`). `false` if the sizes do not fit.
pub fn quantize_group(rows: &[f32], width: usize, out: &mut [u8]) -> bool {
    if !width.is_multiple_of(32) || rows.len() != GROUP * width || out.len() != group_bytes(width) {
        return false;
    }
    out[..scale_offset(width)].fill(0);
    for c in 0..width {
        let col = (0..GROUP).map(|w| rows[w * width + c]);
        let (lo, hi) = col.fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), x| (a.min(x), b.max(x)));
        // Codes against the stored (f16) scale and minimum, as they are read back.
        let min = f16::from_f32(lo);
        let scale = f16::from_f32((hi - lo) / 15.0);
        let (m, s) = (min.to_f32(), scale.to_f32());
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        let (blk, j) = (c / 32, c % 32);
        for w in 0..GROUP {
            let q = ((rows[w * width + c] - m) * inv).round().clamp(0.0, 15.0) as u8;
            let at = code_offset(width, w) + blk * 16 + j % 16;
            out[at] |= if j < 16 { q } else { q << 4 };
        }
        out[scale_offset(width) + 2 * c..][..2].copy_from_slice(&scale.to_le_bytes());
        out[min_offset(width) + 2 * c..][..2].copy_from_slice(&min.to_le_bytes());
    }
    true
}

/// The `GROUP × width` values a packed group stands for; `None` if the sizes
/// do not fit.
pub fn dequantize_group(group: &[u8], width: usize) -> Option<Vec<f32>> {
    if !width.is_multiple_of(32) || group.len() != group_bytes(width) {
        return None;
    }
    let half = |at: usize| f16::from_le_bytes([group[at], group[at + 1]]).to_f32();
    let mut out = vec![0f32; GROUP * width];
    for c in 0..width {
        let (s, m) = (half(scale_offset(width) + 2 * c), half(min_offset(width) + 2 * c));
        let (blk, j) = (c / 32, c % 32);
        for w in 0..GROUP {
            let byte = group[code_offset(width, w) + blk * 16 + j % 16];
            let q = if j < 16 { byte & 15 } else { byte >> 4 };
            out[w * width + c] = q as f32 * s + m;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_round_trips_within_half_a_step_per_channel() {
        let width = 64;
        // Channel 5 is an outlier (100x): per-channel steps keep the others fine.
        let rows: Vec<f32> = (0..GROUP * width)
            .map(|i| {
                let (w, c) = (i / width, i % width);
                let x = ((w * 7 + c * 13) % 23) as f32 / 23.0 - 0.5;
                if c == 5 {
                    100.0 * x
                } else {
                    x
                }
            })
            .collect();
        let mut g = vec![0u8; group_bytes(width)];
        assert!(quantize_group(&rows, width, &mut g));
        let back = dequantize_group(&g, width).unwrap();
        for c in 0..width {
            let col: Vec<f32> = (0..GROUP).map(|w| rows[w * width + c]).collect();
            let range = col.iter().cloned().fold(f32::NEG_INFINITY, f32::max) - col.iter().cloned().fold(f32::INFINITY, f32::min);
            for w in 0..GROUP {
                let e = (back[w * width + c] - rows[w * width + c]).abs();
                assert!(e <= range / 30.0 * 1.01 + 1e-3, "channel {c} row {w}: error {e}, range {range}");
            }
        }
        assert!(!quantize_group(&rows[1..], width, &mut g));
        assert!(dequantize_group(&g[1..], width).is_none());
    }
}
