//! Outlier-weighted layerwise sparsity (OWL, Yin et al. 2023): per-layer
//! ratios for calibrated unstructured pruning, from how many outliers each
//! layer's Wanda scores have.
//!
//! For layer `l`, `D_l` is the share of the scores `|W_jc|·‖X_c‖` of all its
//! pruned matrices (together) that exceed `threshold` × their mean. The
//! densities `1 − S_l` are `D` rescaled to a spread of `2λ` and shifted so their
//! mean is the rule's `1 − S`: layers with more outliers keep more weights,
//! and the model as a whole prunes as many as the rule says (exactly, when
//! every layer's pruned matrices have the same parameter count, as in Llama
//! and GPT-2; the mean is over layers, as in the paper). Ratios are clamped to
//! [0, 0.99].

use sparsec_ir::sparse_calibrated::Gram;
use sparsec_passes::plan::Owl;
use std::collections::BTreeMap;

/// One pruned matrix: its layer, weight data viewed `[n, k]` by
/// `transposed`, and the Gram matrix of its input.
pub struct Scored<'a> {
    pub layer: u64,
    pub w: &'a [f32],
    pub n: usize,
    pub k: usize,
    pub transposed: bool,
    pub gram: &'a Gram,
}

/// The outlier share `D_l` of each layer.
pub fn outlier_shares(mats: &[Scored<'_>], threshold: f32) -> BTreeMap<u64, f64> {
    let mut scores: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
    for m in mats {
        let norms: Vec<f64> = (0..m.k).map(|c| m.gram.xtx[c * m.gram.k + c].max(0.0).sqrt()).collect();
        let out = scores.entry(m.layer).or_default();
        for j in 0..m.n {
            for (c, norm) in norms.iter().enumerate() {
                let w = if m.transposed { m.w[j * m.k + c] } else { m.w[c * m.n + j] };
                out.push(w.abs() as f64 * norm);
            }
        }
    }
    scores
        .into_iter()
        .map(|(l, s)| {
            let mean = s.iter().sum::<f64>() / s.len().max(1) as f64;
            let above = s.iter().filter(|&&v| v > threshold as f64 * mean).count();
            (l, above as f64 / s.len().max(1) as f64)
        })
        .collect()
}

/// Per-layer sparsity ratios around `ratio` from the outlier shares.
pub fn layer_ratios(shares: &BTreeMap<u64, f64>, ratio: f32, owl: Owl) -> BTreeMap<u64, f32> {
    let (lo, hi) = shares.values().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &d| (lo.min(d), hi.max(d)));
    let spread = if hi > lo { hi - lo } else { 1.0 };
    let dens: Vec<(u64, f64)> = shares.iter().map(|(&l, &d)| (l, (d - lo) / spread * 2.0 * owl.lambda as f64)).collect();
    let mean = dens.iter().map(|(_, d)| d).sum::<f64>() / dens.len().max(1) as f64;
    dens.into_iter().map(|(l, d)| (l, (1.0 - (d - mean + 1.0 - ratio as f64)).clamp(0.0, 0.99) as f32)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owl() -> Owl {
        Owl { lambda: 0.08, threshold: 5.0 }
    }

    #[test]
    fn ratios_keep_the_mean_and_spread_two_lambda() {
        let shares: BTreeMap<u64, f64> = [(0, 0.01), (1, 0.03), (2, 0.02), (3, 0.01)].into_iter().collect();
        let r = layer_ratios(&shares, 0.5, owl());
        let mean = r.values().map(|&v| v as f64).sum::<f64>() / 4.0;
        assert!((mean - 0.5).abs() < 1e-6, "{r:?}");
        let (lo, hi) = r.values().fold((1f32, 0f32), |(a, b), &v| (a.min(v), b.max(v)));
        assert!((hi - lo - 0.16).abs() < 1e-6, "{r:?}");
        // The layer with the most outliers is pruned least.
        assert_eq!(r[&1], lo);
        assert_eq!(r[&0], hi);
        assert_eq!(r[&3], hi);
    }

    #[test]
    fn equal_shares_give_the_rule_ratio_everywhere() {
        let shares: BTreeMap<u64, f64> = (0..5).map(|l| (l, 0.02)).collect();
        assert!(layer_ratios(&shares, 0.7, owl()).values().all(|&v| (v - 0.7).abs() < 1e-6));
    }

    #[test]
    fn outliers_are_counted_against_the_layer_mean() {
        // One matrix [2, 4] per layer; unit input norms. Layer 1 has one score
        // far above its mean, layer 0 none.
        let gram = Gram { k: 4, xtx: (0..16).map(|i| if i % 5 == 0 { 1.0 } else { 0.0 }).collect(), rows: 1 };
        let flat = [1.0f32; 8];
        let spiky = [1.0f32, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 100.0];
        let mats = [
            Scored { layer: 0, w: &flat, n: 2, k: 4, transposed: true, gram: &gram },
            Scored { layer: 1, w: &spiky, n: 2, k: 4, transposed: true, gram: &gram },
        ];
        let d = outlier_shares(&mats, 5.0);
        assert_eq!(d[&0], 0.0);
        assert_eq!(d[&1], 1.0 / 8.0);
    }
}
