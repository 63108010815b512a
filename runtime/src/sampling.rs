//! Next-token sampling: greedy at temperature 0, else softmax(logits / T) over
//! the top-k logits, drawn from a seeded ChaCha8 stream.

use rand::{Rng, SeedableRng};

pub struct Sampler {
    pub temperature: f32,
    /// 0 means the whole vocabulary.
    pub top_k: usize,
    rng: rand_chacha::ChaCha8Rng,
}

impl Sampler {
    pub fn new(temperature: f32, top_k: usize, seed: u64) -> Sampler {
        Sampler { temperature, top_k, rng: rand_chacha::ChaCha8Rng::seed_from_u64(seed) }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let argmax = || argmax(logits);
        if self.temperature <= 0.0 || logits.is_empty() {
            return argmax();
        }
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        if self.top_k > 0 && self.top_k < logits.len() {
            idx.select_nth_unstable_by(self.top_k - 1, |a, b| logits[*b].total_cmp(&logits[*a]));
            idx.truncate(self.top_k);
        }
        let m = idx.iter().map(|i| logits[*i]).fold(f32::NEG_INFINITY, f32::max);
        let w: Vec<f64> = idx.iter().map(|i| (((logits[*i] - m) / self.temperature) as f64).exp()).collect();
        let total: f64 = w.iter().sum();
        if !total.is_finite() || total <= 0.0 {
            return argmax();
        }
        let mut r = self.rng.gen::<f64>() * total;
        for (i, wi) in idx.iter().zip(&w) {
            r -= wi;
            if r <= 0.0 {
                return *i as u32;
            }
        }
        *idx.last().unwrap_or(&0) as u32
    }
}

/// The index of the largest logit, the last of equals (NaNs are skipped; 0
/// when there is none): a max pass and a search pass, both branch-light, since
/// greedy decoding runs this over the whole vocabulary every token.
pub fn argmax(logits: &[f32]) -> u32 {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    logits.iter().rposition(|&x| x == m).unwrap_or(0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_last_of_equals_and_skips_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 2.0, 3.0, -1.0]), 3);
        assert_eq!(argmax(&[f32::NAN, -2.0, -1.0]), 2);
        assert_eq!(argmax(&[f32::NEG_INFINITY; 3]), 2);
        assert_eq!(argmax(&[]), 0);
    }

    #[test]
    fn greedy_top_k_and_seeds() {
        let logits = [0.1, 3.0, -1.0, 2.9];
        assert_eq!(Sampler::new(0.0, 0, 1).sample(&logits), 1);
        // top-1 is greedy at any temperature
        assert_eq!(Sampler::new(5.0, 1, 7).sample(&logits), 1);
        // top-2 only ever picks 1 or 3
        let mut s = Sampler::new(1.0, 2, 3);
        let picks: Vec<u32> = (0..200).map(|_| s.sample(&logits)).collect();
        assert!(picks.iter().all(|p| *p == 1 || *p == 3) && picks.contains(&3) && picks.contains(&1));
        // same seed, same draws
        let a: Vec<u32> = {
            let mut s = Sampler::new(1.0, 0, 9);
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(1.0, 0, 9);
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b);
    }
}
