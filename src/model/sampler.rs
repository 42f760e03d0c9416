//! Next-token sampling: greedy, or temperature with nucleus (top-p) truncation, seeded.

/// Sampling settings.
#[derive(Clone, Copy, Debug)]
pub struct Sampler {
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus mass kept (1 = all).
    pub top_p: f32,
    state: u64,
}

impl Sampler {
    /// A sampler; `seed` fixes the random stream.
    pub fn new(temperature: f32, top_p: f32, seed: u64) -> Self {
        Sampler {
            temperature,
            top_p,
            state: seed ^ 0x9E37_79B9_7F4A_7C15,
        }
    }

    /// Greedy decoding.
    pub fn greedy() -> Self {
        Sampler::new(0.0, 1.0, 0)
    }

    fn next_f64(&mut self) -> f64 {
        // SplitMix64.
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Pick a token from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let argmax = || {
            logits
                .iter()
                .enumerate()
                .fold((0usize, f32::NEG_INFINITY), |best, (i, &x)| {
                    if x > best.1 {
                        (i, x)
                    } else {
                        best
                    }
                })
                .0 as u32
        };
        if self.temperature <= 0.0 {
            return argmax();
        }
        let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &x)| (i as u32, (((x - m) / self.temperature) as f64).exp()))
            .collect();
        probs.sort_by(|a, b| b.1.total_cmp(&a.1));
        let total: f64 = probs.iter().map(|p| p.1).sum();
        let mut kept = 0.0;
        let mut cut = probs.len();
        for (i, p) in probs.iter().enumerate() {
            kept += p.1 / total;
            if kept >= self.top_p as f64 {
                cut = i + 1;
                break;
            }
        }
        probs.truncate(cut);
        let mass: f64 = probs.iter().map(|p| p.1).sum();
        let mut r = self.next_f64() * mass;
        for (id, p) in &probs {
            r -= p;
            if r <= 0.0 {
                return *id;
            }
        }
        probs.last().map_or_else(argmax, |p| p.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_largest() {
        assert_eq!(Sampler::greedy().sample(&[0.1, 3.0, -1.0, 2.9]), 1);
    }

    #[test]
    fn top_p_keeps_only_the_nucleus_and_seed_repeats() {
        let logits = [10.0, 9.5, -20.0, -20.0];
        let mut a = Sampler::new(1.0, 0.9, 5);
        let draws: Vec<u32> = (0..200).map(|_| a.sample(&logits)).collect();
        assert!(draws.iter().all(|&t| t < 2), "only the two likely tokens");
        assert!(draws.contains(&0) && draws.contains(&1));
        let mut b = Sampler::new(1.0, 0.9, 5);
        let again: Vec<u32> = (0..200).map(|_| b.sample(&logits)).collect();
        assert_eq!(draws, again);
    }
}
