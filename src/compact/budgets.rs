//! Per-layer token budgets from the model's measured loss sensitivity.
//!
//! A [`LayerProfile`] records, for each layer, how much the model's next-token distribution moves
//! (mean KL divergence from the full context's, over a continuation) when that layer alone is
//! compacted to each of a few sizes, every other layer keeping its whole context. It is measured
//! once per model and method (`kvpack eval layers`) on a calibration text, and then
//! [`LayerProfile::allocate`] shares any job's tokens among the layers: the layers whose loss
//! drops most per token get more, within the same total, so the bytes are the uniform budget's.
//! This is Attention Matching's non-uniform budget allocation with loss, not the fit's own
//! error, as the measure ([`super::HeadBudgets::Sensitivity`] uses the latter).

use serde::{Deserialize, Serialize};

/// The loss sensitivity of each layer to compaction, as `kvpack eval layers` measures it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerProfile {
    /// SHA-256 of the model file the profile was measured on.
    pub model_sha256: String,
    /// The compaction method measured (`am-mix-window`, …).
    pub method: String,
    /// Tokens of context compacted while measuring.
    pub context: usize,
    /// Tokens after the context whose distributions were compared.
    pub continuation: usize,
    /// The sizes each layer was compacted to (tokens per KV head), ascending.
    pub tokens_per_head: Vec<usize>,
    /// `kl[l][k]`: mean KL divergence (nats per token) from the full context's next-token
    /// distribution with layer `l` alone compacted to `tokens_per_head[k]`.
    pub kl: Vec<Vec<f64>>,
}

impl LayerProfile {
    /// Layers measured.
    pub fn n_layer(&self) -> usize {
        self.kl.len()
    }

    /// Whether the sizes ascend, are at least 1 and every layer has one finite, non-negative
    /// KL per size.
    pub fn validate(&self) -> Result<(), String> {
        let s = &self.tokens_per_head;
        if s.is_empty() || s[0] == 0 || s.windows(2).any(|w| w[0] >= w[1]) {
            return Err(format!(
                "tokens_per_head must ascend from at least 1, got {s:?}"
            ));
        }
        if self.kl.is_empty() {
            return Err("the profile has no layers".into());
        }
        for (l, row) in self.kl.iter().enumerate() {
            if row.len() != s.len() || row.iter().any(|x| !x.is_finite() || *x < 0.0) {
                return Err(format!(
                    "layer {l}: {} KL values for {} sizes, each finite and ≥ 0 expected",
                    row.len(),
                    s.len()
                ));
            }
        }
        Ok(())
    }

    /// Layer `l`'s measured KL at `t` tokens per head: the measured points made non-increasing
    /// in t (a larger cache is never scored worse than a smaller one), linear in log t between
    /// them, 0 at the whole `context`, and the smallest size's value below it.
    pub fn kl_at(&self, l: usize, t: usize, context: usize) -> f64 {
        let mut pts: Vec<(f64, f64)> = Vec::with_capacity(self.tokens_per_head.len() + 1);
        let mut low = f64::INFINITY;
        for (&s, &k) in self.tokens_per_head.iter().zip(&self.kl[l]) {
            if s >= context {
                break;
            }
            low = low.min(k);
            pts.push(((s as f64).ln(), low));
        }
        pts.push(((context.max(1) as f64).ln(), 0.0));
        let x = (t.max(1) as f64).ln();
        if x <= pts[0].0 {
            return pts[0].1;
        }
        for w in pts.windows(2) {
            let ((x0, y0), (x1, y1)) = (w[0], w[1]);
            if x <= x1 {
                return y0 + (y1 - y0) * (x - x0) / (x1 - x0);
            }
        }
        0.0
    }

    /// Tokens per KV head for each layer, `mean` on average over the layers (the total never
    /// exceeds `mean × layers`), for a `context` of that many tokens: every layer starts at the
    /// smaller of `mean` and the profile's smallest size, and tokens go, a step at a time, to the
    /// layer whose interpolated KL ([`LayerProfile::kl_at`]) drops most per token. A layer gets
    /// at most the whole context. Layers the profile rates alike get equal shares.
    pub fn allocate(&self, mean: usize, context: usize) -> Vec<usize> {
        let n = self.n_layer();
        let mean = mean.clamp(1, context.max(1));
        let floor = self.tokens_per_head[0].min(mean);
        let step = (mean / 16).max(1);
        let candidates: Vec<Vec<(usize, f64)>> = (0..n)
            .map(|l| {
                let mut sizes: Vec<usize> = (floor..context).step_by(step).collect();
                sizes.push(context);
                sizes
                    .into_iter()
                    .map(|t| (t, self.kl_at(l, t, context)))
                    .collect()
            })
            .collect();
        let pick = super::allocate_budgets(&candidates, mean * n);
        let mut out: Vec<usize> = pick.iter().zip(&candidates).map(|(&k, c)| c[k].0).collect();
        // Tokens the steps could not place (the last partial step) go to the layers with the
        // steepest KL, one each.
        let mut left = (mean * n).saturating_sub(out.iter().sum());
        let mut order: Vec<usize> = (0..n).collect();
        let slope = |l: usize, t: usize| self.kl_at(l, t, context) - self.kl_at(l, t + 1, context);
        order.sort_by(|&a, &b| {
            slope(b, out[b])
                .total_cmp(&slope(a, out[a]))
                .then(a.cmp(&b))
        });
        for &l in order.iter().cycle().take(n * step) {
            if left == 0 {
                break;
            }
            if out[l] < context {
                out[l] += 1;
                left -= 1;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(kl: Vec<Vec<f64>>) -> LayerProfile {
        LayerProfile {
            model_sha256: "x".into(),
            method: "am-mix-window".into(),
            context: 1024,
            continuation: 128,
            tokens_per_head: vec![16, 32, 64, 128],
            kl,
        }
    }

    #[test]
    fn equal_layers_get_equal_budgets_and_the_total_is_kept() {
        let p = profile(vec![vec![0.4, 0.2, 0.1, 0.05]; 6]);
        p.validate().unwrap();
        for mean in [20, 67, 100] {
            let b = p.allocate(mean, 1024);
            assert_eq!(b.iter().sum::<usize>(), mean * 6, "{b:?}");
            let (lo, hi) = (b.iter().min().unwrap(), b.iter().max().unwrap());
            assert!(hi - lo <= (mean / 16).max(1), "{mean}: {b:?}");
        }
    }

    #[test]
    fn the_sensitive_layer_gets_more_tokens_and_the_loss_model_drops() {
        // Layer 0 loses ten times more than the others at every size.
        let mut kl = vec![vec![0.1, 0.05, 0.025, 0.0125]; 5];
        kl[0] = vec![1.0, 0.5, 0.25, 0.125];
        let p = profile(kl);
        let b = p.allocate(32, 1024);
        assert_eq!(b.iter().sum::<usize>(), 32 * 5);
        assert!(b[0] > 2 * b[1], "{b:?}");
        assert!(
            b[1..].iter().all(|&x| x == b[1] || x.abs_diff(b[1]) <= 2),
            "{b:?}"
        );
        let loss = |b: &[usize]| -> f64 { (0..5).map(|l| p.kl_at(l, b[l], 1024)).sum() };
        assert!(
            loss(&b) < loss(&[32; 5]),
            "{} vs {}",
            loss(&b),
            loss(&[32; 5])
        );
    }

    #[test]
    fn kl_is_interpolated_in_log_tokens_made_monotone_and_zero_at_the_whole_context() {
        let p = profile(vec![vec![0.4, 0.5, 0.1, 0.05]]);
        assert_eq!(p.kl_at(0, 8, 1024), 0.4);
        assert_eq!(p.kl_at(0, 16, 1024), 0.4);
        // 32 measured worse than 16: the monotone envelope keeps 0.4.
        assert_eq!(p.kl_at(0, 32, 1024), 0.4);
        let mid = p.kl_at(0, 45, 1024); // between 32 (0.4) and 64 (0.1), in log t
        let want = 0.4 + (0.1 - 0.4) * ((45f64).ln() - (32f64).ln()) / (2f64).ln();
        assert!((mid - want).abs() < 1e-12);
        assert_eq!(p.kl_at(0, 1024, 1024), 0.0);
        assert!(p.kl_at(0, 512, 1024) > 0.0 && p.kl_at(0, 512, 1024) < 0.05);
    }

    #[test]
    fn bad_profiles_are_refused() {
        let mut p = profile(vec![vec![0.4, 0.2, 0.1, 0.05]]);
        p.tokens_per_head = vec![16, 16, 64, 128];
        assert!(p.validate().is_err());
        let mut p = profile(vec![vec![0.4, 0.2, 0.1]]);
        assert!(p.validate().unwrap_err().contains("layer 0"));
        p.kl = vec![vec![0.4, f64::NAN, 0.1, 0.0]];
        assert!(p.validate().is_err());
        p.kl = vec![];
        assert!(p.validate().is_err());
    }
}
