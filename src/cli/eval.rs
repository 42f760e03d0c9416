//! `kvpack eval …`: quality measurements.

use super::GpuArgs;
use anyhow::{bail, Result};
use clap::Subcommand;
use kvpack::codec::gpu::GpuCodec;
use kvpack::codec::rng::SplitMix64;
use kvpack::codec::{expected_mse, Codec, ScaleMode, VecFormat};
use serde::Serialize;

#[derive(Subcommand)]
pub enum EvalCommand {
    /// Perplexity, mean KL divergence from the f32 cache and top-1 agreement per KV format.
    Ppl(super::ppl::PplArgs),
    /// KV-cache compaction (Attention Matching and eviction baselines): continuation and recall
    /// perplexity after the compacted context, the gap to the full context recovered, bytes and
    /// time.
    Compaction(super::compaction::CompactionArgs),
    /// Each layer's loss sensitivity to compaction: the mean KL divergence from the full
    /// context's next-token distribution with that layer alone compacted, at several sizes. Its
    /// `--out` file (a layer profile) shares tokens among layers with `--head-budgets profile`.
    Layers(super::layers::LayersArgs),
    /// TurboQuant distortion on the GPU: random unit vectors and queries; D_mse, d·D_prod
    /// (inner-product error), inner-product bias and bits per value, beside the paper's values
    /// and the Shannon bound 4^-b; q8_0 and q4_0 as baselines.
    Distortion {
        /// Head dimensions (powers of two, 32..=256).
        #[arg(long, value_delimiter = ',', default_value = "64,128")]
        dim: Vec<usize>,
        /// Bits per coordinate (1..=4).
        #[arg(long, value_delimiter = ',', default_value = "1,2,3,4")]
        bits: Vec<u8>,
        /// Random vectors per row.
        #[arg(long, default_value_t = 20000)]
        vectors: usize,
        /// Random queries per vector (inner-product measures).
        #[arg(long, default_value_t = 8)]
        queries: usize,
        /// Seed for the vectors and the codecs.
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// One row of `eval distortion`.
#[derive(Serialize)]
pub struct DistortionRow {
    format: String,
    dim: usize,
    bits: f64,
    bits_per_value: f64,
    d_mse: f64,
    d_prod_times_dim: f64,
    ip_bias: f64,
    paper_d_mse: Option<f64>,
    exact_d_mse: Option<f64>,
    paper_d_prod_times_dim: Option<f64>,
    shannon_bound: f64,
}

const PAPER_D_MSE: [f64; 4] = [0.3634, 0.1175, 0.0345, 0.0095];
const PAPER_D_PROD: [f64; 4] = [1.571, 0.571, 0.185, 0.054];

pub fn run(gpu_args: &GpuArgs, cmd: EvalCommand) -> Result<()> {
    match cmd {
        EvalCommand::Ppl(args) => super::ppl::run(gpu_args, args),
        EvalCommand::Compaction(args) => super::compaction::run(gpu_args, args),
        EvalCommand::Layers(args) => super::layers::run(gpu_args, args),
        EvalCommand::Distortion {
            dim,
            bits,
            vectors,
            queries,
            seed,
            json,
        } => distortion(gpu_args, &dim, &bits, vectors, queries, seed, json),
    }
}

fn unit_vectors(rng: &mut SplitMix64, n: usize, d: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n * d);
    for _ in 0..n {
        let mut v: Vec<f64> = (0..d / 2)
            .flat_map(|_| {
                let (a, b) = rng.next_gaussian_pair();
                [a, b]
            })
            .collect();
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        v.iter_mut().for_each(|x| *x /= norm);
        out.extend(v.iter().map(|&x| x as f32));
    }
    out
}

fn distortion(
    gpu_args: &GpuArgs,
    dims: &[usize],
    bits: &[u8],
    n: usize,
    queries: usize,
    seed: u64,
    json: bool,
) -> Result<()> {
    if n == 0 || queries == 0 {
        bail!("--vectors and --queries must be at least 1");
    }
    if let Some(b) = bits.iter().find(|b| !(1..=4).contains(*b)) {
        bail!("--bits {b} is out of range: TurboQuant formats have 1 to 4 bits");
    }
    let gpu = gpu_args.open()?;
    let mut rows = Vec::new();
    for &d in dims {
        VecFormat::turbo(1).validate_dim(d)?;
        let mut rng = SplitMix64::new(seed ^ d as u64);
        let xs = unit_vectors(&mut rng, n, d);
        let qs = unit_vectors(&mut rng, n * queries, d);
        let mut formats = Vec::new();
        for &b in bits {
            formats.push((VecFormat::turbo(b), b as f64));
            formats.push((
                VecFormat::Turbo {
                    bits: b,
                    scale: ScaleMode::Unbiased,
                },
                b as f64,
            ));
            formats.push((
                VecFormat::Turbo {
                    bits: b,
                    scale: ScaleMode::Norm,
                },
                b as f64,
            ));
            formats.push((VecFormat::TurboProd { bits: b }, b as f64));
        }
        formats.push((VecFormat::Q8_0, 8.0));
        formats.push((VecFormat::Q4_0, 4.0));
        for (format, b) in formats {
            let codec = GpuCodec::new(&gpu, Codec::with_seed(format, d, seed)?);
            let enc = pollster::block_on(codec.encode(&gpu, &xs))?;
            let dec = pollster::block_on(codec.decode(&gpu, &enc))?;
            rows.push(measure(format, d, b, &xs, &dec, &qs, queries));
        }
    }
    if json {
        let out = serde_json::json!({ "backend": gpu.backend_name(), "adapter": gpu.report().name,
            "vectors": n, "queries": queries, "rows": rows });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "TurboQuant distortion on {} ({}), {n} unit vectors × {queries} queries",
            gpu.report().name,
            gpu.backend_name()
        );
        println!(
            "{:<10} {:>4} {:>6} {:>9} {:>9} {:>9} {:>11} {:>10} {:>9} {:>8}",
            "format",
            "dim",
            "bits/v",
            "D_mse",
            "paper",
            "exact-d",
            "d·D_prod",
            "paper",
            "ip_bias",
            "4^-b"
        );
        for r in &rows {
            let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
            println!(
                "{:<10} {:>4} {:>6.3} {:>9.4} {:>9} {:>9} {:>11.4} {:>10} {:>+8.2}% {:>8.4}",
                r.format,
                r.dim,
                r.bits_per_value,
                r.d_mse,
                f(r.paper_d_mse),
                f(r.exact_d_mse),
                r.d_prod_times_dim,
                f(r.paper_d_prod_times_dim),
                r.ip_bias * 100.0,
                r.shannon_bound
            );
        }
    }
    Ok(())
}

fn measure(
    format: VecFormat,
    d: usize,
    bits: f64,
    xs: &[f32],
    dec: &[f32],
    qs: &[f32],
    queries: usize,
) -> DistortionRow {
    let n = xs.len() / d;
    let mut mse = 0f64;
    let (mut err2, mut cross, mut base2) = (0f64, 0f64, 0f64);
    for i in 0..n {
        let u = &xs[i * d..][..d];
        let v = &dec[i * d..][..d];
        mse += u
            .iter()
            .zip(v)
            .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
            .sum::<f64>();
        for k in 0..queries {
            let q = &qs[(i * queries + k) * d..][..d];
            let a: f64 = q.iter().zip(u).map(|(x, y)| *x as f64 * *y as f64).sum();
            let b: f64 = q.iter().zip(v).map(|(x, y)| *x as f64 * *y as f64).sum();
            err2 += (a - b).powi(2);
            cross += a * b;
            base2 += a * a;
        }
    }
    let m = (n * queries) as f64;
    let (paper_d_mse, exact_d_mse, paper_d_prod) = match format {
        VecFormat::Turbo {
            bits,
            scale: ScaleMode::Paper,
        } => (
            Some(PAPER_D_MSE[bits as usize - 1]),
            Some(expected_mse(d, bits)),
            None,
        ),
        VecFormat::TurboProd { bits } => (None, None, Some(PAPER_D_PROD[bits as usize - 1])),
        _ => (None, None, None),
    };
    DistortionRow {
        format: format.name(),
        dim: d,
        bits,
        bits_per_value: format.bits_per_value(d),
        d_mse: mse / n as f64,
        d_prod_times_dim: d as f64 * err2 / m,
        ip_bias: cross / base2 - 1.0,
        paper_d_mse,
        exact_d_mse,
        paper_d_prod_times_dim: paper_d_prod,
        shannon_bound: 4f64.powf(-bits),
    }
}
