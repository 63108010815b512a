//! Which sparsity pattern a weight's zeros already have (a pre-pruned
//! checkpoint): N:M along the reduction axis, all-zero blocks, or unstructured
//! with the exact count, as the `Sparsity` whose magnitude pruning
//! (`sparse::prune`) drops only zeros and keeps every nonzero.
//!
//! The weight is viewed `[n, k]` as in `sparse.rs`. The checks, in order:
//! - N:M for `m` in 4, 8, 16 (dividing `k`): no group of `m` holds more than `n`
//!   nonzeros, and (the pattern is tight, not a loose bound on a sparser weight)
//!   at least 99% of the groups hold exactly `n`; the smallest `n/m` wins, the
//!   smaller `m` among equal ratios.
//! - Blocks of `r×c` (each of 1, 2, 4, 8, 16, not 1×1, dividing the view):
//!   every zero lies in an all-zero block; the largest block wins (squarer
//!   first among equal areas).
//! - Otherwise unstructured, with the ratio that prunes as many entries as
//!   there are zeros.
//!
//! A ratio is an f32 and `kept` floors `ratio · total`: where no f32 prunes
//! exactly the zero count, the ratio prunes the most it can without exceeding
//! it, and the format stores the few remaining zeros as values (`Detected::stored`
//! says how many entries are stored). Pruning with the detected pattern
//! never changes a value: zeros have the least magnitude (blocks: the least
//! energy), so they go first.

use crate::pattern::Sparsity;
use crate::sparse::kept;

/// The group sizes N:M detection tries.
pub const NM_GROUPS: [u32; 3] = [4, 8, 16];

/// Block sides detection tries (rows and columns independently; 1×1 is unstructured).
pub const BLOCK_SIDES: [u32; 5] = [1, 2, 4, 8, 16];

/// The share of N:M groups that must hold exactly `n` nonzeros.
const NM_TIGHT: f64 = 0.99;

/// What a weight's zeros say.
#[derive(Clone, Debug, PartialEq)]
pub struct Detected {
    /// `None`: no zeros, the weight stays dense.
    pub sparsity: Option<Sparsity>,
    /// Zero entries (±0.0).
    pub zeros: u64,
    /// Entries of the weight.
    pub total: u64,
    /// Entries the pattern keeps (values stored): the nonzeros, plus zeros a
    /// group, block or f32 ratio could not drop.
    pub stored: u64,
}

impl Detected {
    /// The fraction of entries that are zero.
    pub fn zero_ratio(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.zeros as f64 / self.total as f64
        }
    }

    /// A short description: `2:4`, `block 4x4 (ratio 0.5)`, `unstructured 0.37`, `dense`.
    pub fn describe(&self) -> String {
        match &self.sparsity {
            None => "dense (no zeros)".into(),
            Some(Sparsity::NM { n, m }) => format!("{n}:{m}"),
            Some(Sparsity::Block { ratio, rows, cols }) => format!("block {rows}x{cols} ratio {ratio:.4}"),
            Some(Sparsity::Unstructured { ratio }) => format!("unstructured ratio {ratio:.4}"),
        }
    }
}

/// Entries (or blocks) that pruning `ratio` of `total` drops.
fn dropped(total: u64, ratio: f32) -> u64 {
    total - kept(total, ratio)
}

/// An f32 ratio in [0, 1) that drops exactly `drop` of `total` entries: the
/// f32 nearest `drop / total` when it does (0.5 for half), else the nearest
/// above it that does; where no f32 can (totals past 2^24), the largest that
/// drops fewer.
pub fn ratio_dropping(total: u64, drop: u64) -> f32 {
    if total == 0 || drop == 0 {
        return 0.0;
    }
    let below_one = 1.0f32.next_down();
    let mut r = ((drop as f64 / total as f64) as f32).clamp(0.0, below_one);
    while r > 0.0 && dropped(total, r) > drop {
        r = r.next_down().max(0.0);
    }
    while dropped(total, r) < drop && r < below_one && dropped(total, r.next_up()) <= drop {
        r = r.next_up();
    }
    r
}

/// Reads `[n, k]` element `(j, kk)` of a weight stored `[n, k]` (`transposed`) or `[k, n]`.
fn at(w: &[f32], n: usize, k: usize, transposed: bool, j: usize, kk: usize) -> f32 {
    if transposed {
        w[j * k + kk]
    } else {
        w[kk * n + j]
    }
}

/// The N:M pattern of `nz` (the `[n, k]` nonzero mask), if any is tight.
fn detect_nm(nz: &[bool], k: usize) -> Option<(u32, u32)> {
    let mut best: Option<(u32, u32)> = None;
    for m in NM_GROUPS {
        let mu = m as usize;
        if k == 0 || !k.is_multiple_of(mu) {
            continue;
        }
        let counts: Vec<u32> = nz.chunks(mu).map(|g| g.iter().filter(|b| **b).count() as u32).collect();
        let most = counts.iter().copied().max().unwrap_or(0);
        if most == 0 || most >= m {
            continue;
        }
        let exact = counts.iter().filter(|c| **c == most).count();
        if (exact as f64) < NM_TIGHT * counts.len() as f64 {
            continue;
        }
        // Smaller n/m first; equal ratios keep the smaller m (tried first).
        if best.is_none_or(|(bn, bm)| (most as u64) * (bm as u64) < (bn as u64) * (m as u64)) {
            best = Some((most, m));
        }
    }
    best
}

/// The block shape (and its zero blocks) every zero of `nz` lies in, if any.
fn detect_block(nz: &[bool], n: usize, k: usize) -> Option<(u32, u32, u64, u64)> {
    let mut best: Option<(u32, u32, u64, u64)> = None;
    for r in BLOCK_SIDES {
        for c in BLOCK_SIDES {
            let (ru, cu) = (r as usize, c as usize);
            if (r, c) == (1, 1) || n == 0 || k == 0 || !n.is_multiple_of(ru) || !k.is_multiple_of(cu) {
                continue;
            }
            let (br, bc) = (n / ru, k / cu);
            let mut zero_blocks = 0u64;
            let mut covered = true;
            'blocks: for bi in 0..br {
                for bj in 0..bc {
                    let mut any = false;
                    let mut all = true;
                    for j in bi * ru..(bi + 1) * ru {
                        for &b in &nz[j * k + bj * cu..j * k + (bj + 1) * cu] {
                            any |= b;
                            all &= b;
                        }
                    }
                    if !any {
                        zero_blocks += 1;
                    } else if !all {
                        covered = false;
                        break 'blocks;
                    }
                }
            }
            if !covered || zero_blocks == 0 {
                continue;
            }
            let better = match best {
                None => true,
                // Larger area; among equal areas the squarer shape.
                Some((br0, bc0, _, _)) => {
                    let (a, a0) = (r * c, br0 * bc0);
                    a > a0 || (a == a0 && r.abs_diff(c) < br0.abs_diff(bc0))
                }
            };
            if better {
                best = Some((r, c, zero_blocks, (br * bc) as u64));
            }
        }
    }
    best
}

/// Detects the pattern of `w`'s zeros (`w` a matmul weight stored `[n, k]` if
/// `transposed`, else `[k, n]`).
pub fn detect(w: &[f32], n: usize, k: usize, transposed: bool) -> Detected {
    let total = (n * k) as u64;
    let mut nz = vec![false; n * k];
    for j in 0..n {
        for kk in 0..k {
            nz[j * k + kk] = at(w, n, k, transposed, j, kk) != 0.0;
        }
    }
    let nonzeros = nz.iter().filter(|b| **b).count() as u64;
    let zeros = total - nonzeros;
    if zeros == 0 {
        return Detected { sparsity: None, zeros, total, stored: total };
    }
    if let Some((keep, m)) = detect_nm(&nz, k) {
        let stored = (n * (k / m as usize)) as u64 * keep as u64;
        return Detected { sparsity: Some(Sparsity::NM { n: keep, m }), zeros, total, stored };
    }
    if let Some((rows, cols, zero_blocks, blocks)) = detect_block(&nz, n, k) {
        let ratio = ratio_dropping(blocks, zero_blocks);
        let stored = kept(blocks, ratio) * (rows * cols) as u64;
        return Detected { sparsity: Some(Sparsity::Block { ratio, rows, cols }), zeros, total, stored };
    }
    let ratio = ratio_dropping(total, zeros);
    Detected { sparsity: Some(Sparsity::Unstructured { ratio }), zeros, total, stored: kept(total, ratio) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sparse::prune;
    use proptest::prelude::*;

    fn data(len: usize, seed: u64) -> Vec<f32> {
        crate::Init::Normal { seed, std: 1.0 }.generate(len)
    }

    /// Pruning `w` with `d`'s pattern keeps every value (it drops zeros only).
    fn keeps_every_value(w: &[f32], d: &Detected, n: usize, k: usize, transposed: bool) -> bool {
        let Some(s) = &d.sparsity else { return true };
        let mut again = w.to_vec();
        let keep = prune(s, &mut again, n, k, transposed);
        again == w && keep.iter().filter(|b| **b).count() as u64 == d.stored
    }

    #[test]
    fn ratios_drop_exactly_where_an_f32_can() {
        for (total, drop) in [(10u64, 3u64), (1000, 500), (884_736, 442_368), (884_736, 1), (7, 7), (28_311_552, 14_155_777)] {
            let r = ratio_dropping(total, drop);
            assert!((0.0..1.0).contains(&r), "{total} {drop}: {r}");
            let d = dropped(total, r);
            assert!(d <= drop, "{total} {drop}: drops {d}");
            // Short of `drop` only where the next f32 passes it.
            if d < drop && r < 1.0f32.next_down() {
                assert!(dropped(total, r.next_up()) > drop, "{total} {drop}: {r} could drop more");
            }
            if total < 1 << 20 && drop < total {
                assert_eq!(d, drop, "{total} {drop}");
            }
        }
        assert_eq!(ratio_dropping(100, 0), 0.0);
        assert_eq!(ratio_dropping(128, 64), 0.5);
    }

    #[test]
    fn patterns_are_found() {
        let (n, k) = (32, 64);
        let cases = [
            Sparsity::NM { n: 2, m: 4 },
            Sparsity::NM { n: 1, m: 4 },
            Sparsity::NM { n: 4, m: 8 },
            Sparsity::NM { n: 3, m: 16 },
            Sparsity::Block { ratio: 0.5, rows: 4, cols: 4 },
            Sparsity::Block { ratio: 0.75, rows: 8, cols: 8 },
            Sparsity::Block { ratio: 0.5, rows: 1, cols: 8 },
            Sparsity::Block { ratio: 0.25, rows: 16, cols: 16 },
        ];
        for transposed in [true, false] {
            for s in &cases {
                let mut w = data(n * k, 7);
                prune(s, &mut w, n, k, transposed);
                let d = detect(&w, n, k, transposed);
                assert_eq!(d.sparsity.as_ref(), Some(s), "transposed {transposed}");
                assert!(keeps_every_value(&w, &d, n, k, transposed));
            }
            let mut w = data(n * k, 8);
            prune(&Sparsity::Unstructured { ratio: 0.37 }, &mut w, n, k, transposed);
            let d = detect(&w, n, k, transposed);
            assert_eq!(d.zeros, (n * k) as u64 - kept((n * k) as u64, 0.37));
            assert!(matches!(d.sparsity, Some(Sparsity::Unstructured { .. })), "{d:?}");
            assert_eq!(d.stored, (n * k) as u64 - d.zeros);
            assert!(keeps_every_value(&w, &d, n, k, transposed));
        }
    }

    #[test]
    fn dense_and_all_zero_weights() {
        let w = data(64, 1);
        let d = detect(&w, 8, 8, true);
        assert_eq!((d.sparsity, d.zeros, d.stored), (None, 0, 64));
        // All zeros: the coarsest block, every block dropped.
        let z = vec![0.0f32; 16 * 16];
        let d = detect(&z, 16, 16, true);
        assert!(matches!(d.sparsity, Some(Sparsity::Block { rows: 16, cols: 16, .. })), "{d:?}");
        assert!(keeps_every_value(&z, &d, 16, 16, true));
        // Odd shapes only admit unstructured; -0.0 is a zero.
        let mut w = data(15, 2);
        w[3] = -0.0;
        let d = detect(&w, 3, 5, false);
        assert_eq!(d.sparsity, Some(Sparsity::Unstructured { ratio: ratio_dropping(15, 1) }));
        assert_eq!(d.zeros, 1);
    }

    #[test]
    fn a_loose_bound_is_not_nm() {
        // 90% unstructured: every group of 16 has at most a few nonzeros, but
        // they vary, so it is not 'n:16'.
        let (n, k) = (64, 64);
        let mut w = data(n * k, 3);
        prune(&Sparsity::Unstructured { ratio: 0.9 }, &mut w, n, k, true);
        let d = detect(&w, n, k, true);
        assert!(matches!(d.sparsity, Some(Sparsity::Unstructured { .. })), "{d:?}");
    }

    fn pattern() -> impl Strategy<Value = Sparsity> {
        prop_oneof![
            (0.2f32..0.9).prop_map(|ratio| Sparsity::Unstructured { ratio }),
            (prop::sample::select(vec![4u32, 8, 16]), 1u32..16).prop_map(|(m, n)| Sparsity::NM { n: 1 + n % (m - 1), m }),
            (0.2f32..0.9, prop::sample::select(vec![1u32, 2, 4, 8, 16]), prop::sample::select(vec![2u32, 4, 8, 16]))
                .prop_map(|(ratio, rows, cols)| Sparsity::Block { ratio, rows, cols }),
        ]
    }

    proptest! {
        /// On 64×64 random weights nothing coarser fits by chance: prune with a
        /// pattern, detect, get that pattern back (unstructured: the same count).
        #[test]
        fn detect_recovers_the_pattern(s in pattern(), seed in 0u64..1000, transposed: bool) {
            let (n, k) = (64, 64);
            let mut w = data(n * k, seed);
            prune(&s, &mut w, n, k, transposed);
            let d = detect(&w, n, k, transposed);
            prop_assert!(keeps_every_value(&w, &d, n, k, transposed));
            match (&s, &d.sparsity) {
                (Sparsity::Unstructured { ratio }, Some(Sparsity::Unstructured { ratio: got })) => {
                    prop_assert_eq!(kept((n * k) as u64, *ratio), kept((n * k) as u64, *got));
                }
                (Sparsity::Block { ratio, rows, cols }, Some(Sparsity::Block { ratio: got, rows: r, cols: c })) => {
                    prop_assert_eq!((rows, cols), (r, c));
                    let blocks = ((n / *rows as usize) * (k / *cols as usize)) as u64;
                    prop_assert_eq!(kept(blocks, *ratio), kept(blocks, *got));
                }
                (want, got) => prop_assert_eq!(Some(want), got.as_ref()),
            }
        }

        /// On small shapes a coarser description may fit by chance; whatever
        /// is found keeps every value and counts the zeros.
        #[test]
        fn detect_is_exact_on_any_shape(s in pattern(), n in 1usize..12, kg in 1usize..5, seed in 0u64..1000, transposed: bool) {
            let k = 16 * kg;
            let n = match &s { Sparsity::Block { rows, .. } => n * *rows as usize, _ => n };
            let mut w = data(n * k, seed);
            let keep = prune(&s, &mut w, n, k, transposed);
            let d = detect(&w, n, k, transposed);
            prop_assert!(keeps_every_value(&w, &d, n, k, transposed));
            prop_assert_eq!(d.zeros, keep.iter().filter(|b| !**b).count() as u64);
        }
    }
}
