//! `kvpack bench …`: speed measurements. Wall-clock medians of repeated runs, each ended by a
//! device wait; every figure is also given as a ratio to f16 and beside the adapter's own copy
//! bandwidth measured in the same run, since absolute times on a shared machine mean little.

use super::GpuArgs;
use anyhow::{bail, Result};
use clap::Subcommand;
use kvpack::attention::{
    decode_attention_into, AttentionScratch, AttentionShape, KvPages, Recent, ValueStore,
};
use kvpack::codec::gpu::{page_words, EncodeArgs, GpuCodec, Input};
use kvpack::codec::rng::SplitMix64;
use kvpack::codec::{Codec, KvFormat};
use kvpack::gpu::{grid, Batch, Binding, Gpu, GpuTimer};
use serde::Serialize;
use std::time::Instant;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Encode throughput and decode-attention time per KV format, with the buffer-copy bandwidth
    /// of the same adapter. Shape: the default model's (9 query heads, 3 KV heads, head_dim 64).
    Kernels {
        /// Context lengths for decode attention.
        #[arg(long, value_delimiter = ',', default_value = "1024,4096,16384,32768")]
        contexts: Vec<usize>,
        /// KV formats: one format for K and V (`turbo3`), or `K/V` (`turbo4/turbo2`, `k8v4`).
        /// Encode rows use the key format.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "f32,f16,q8_0,q4_0,turbo4,turbo3,turbo2"
        )]
        formats: Vec<String>,
        /// Timed repetitions per figure (the median is reported). Decode attention times the
        /// formats of one context in turn, rep by rep, so a load that comes and goes on the
        /// machine slows them alike and the ratios to f16 stay fair.
        #[arg(long, default_value_t = 7)]
        reps: usize,
        /// One attention workgroup per query head, each reading and decoding its KV head's keys
        /// and values itself (the kernel without GQA sharing), for comparison.
        #[arg(long)]
        per_query_head: bool,
        /// Query positions per attention call: 1 is a decode step; more is a prompt chunk (the
        /// last N tokens of the context, causal), as prefill runs it (64 per chunk).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
        queries: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Serialize, Clone)]
struct Row {
    kernel: String,
    format: String,
    context: usize,
    ms: f64,
    gbps: f64,
    ratio_vs_f16: Option<f64>,
    /// CPU time this process spent per run (mean over the timed runs). On a CPU adapter
    /// (lavapipe, llvmpipe, SwiftShader) the "GPU" is this process's threads, so this is the
    /// kernel's cost in CPU time, unmoved by other processes' load; on a real GPU it is the
    /// driver's overhead.
    cpu_ms: Option<f64>,
    /// f16's CPU time / this CPU time.
    cpu_ratio_vs_f16: Option<f64>,
}

/// CPU seconds (user + system, all threads) this process has used so far.
#[cfg(unix)]
fn process_cpu_seconds() -> Option<f64> {
    let mut u = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given; RUSAGE_SELF covers every thread.
    let r = unsafe { libc::getrusage(libc::RUSAGE_SELF, u.as_mut_ptr()) };
    if r != 0 {
        return None;
    }
    // SAFETY: initialized by the successful call above.
    let u = unsafe { u.assume_init() };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 * 1e-6;
    Some(t(u.ru_utime) + t(u.ru_stime))
}

#[cfg(not(unix))]
fn process_cpu_seconds() -> Option<f64> {
    None
}

pub fn run(gpu_args: &GpuArgs, cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Kernels {
            contexts,
            formats,
            reps,
            per_query_head,
            queries,
            json,
        } => kernels(
            gpu_args,
            &contexts,
            &formats,
            reps,
            per_query_head,
            queries as usize,
            json,
        ),
    }
}

/// One timed run of the dispatches `record` puts in one batch: GPU timestamps around the pass
/// when the adapter has them, otherwise wall clock from submit to device idle; and the process's
/// CPU seconds over the run.
fn time_once(
    gpu: &Gpu,
    timer: Option<&GpuTimer>,
    record: impl FnOnce(&mut Batch) -> Result<()>,
) -> Result<(f64, Option<f64>)> {
    let mut b = gpu.batch("bench");
    if let Some(timer) = timer {
        b = b.timed(timer);
    }
    record(&mut b)?;
    let cpu0 = process_cpu_seconds();
    let start = Instant::now();
    b.submit();
    gpu.wait_idle();
    let wall = start.elapsed().as_secs_f64() * 1e3;
    let cpu = cpu0.zip(process_cpu_seconds()).map(|(a, b)| b - a);
    let ms = match timer {
        Some(timer) => pollster::block_on(timer.elapsed_ms(gpu))?,
        None => wall,
    };
    Ok((ms, cpu))
}

/// The median of `t` (not empty).
fn median(mut t: Vec<f64>) -> f64 {
    t.sort_by(|a, b| a.total_cmp(b));
    t[t.len() / 2]
}

/// Median time of `reps` runs of `record` (after one warm-up run: pipelines compiled, buffers
/// touched), and the process's mean CPU milliseconds per timed run.
fn median_ms(
    gpu: &Gpu,
    reps: usize,
    mut record: impl FnMut(&mut Batch) -> Result<()>,
) -> Result<(f64, Option<f64>)> {
    let mut t = interleaved_ms(gpu, reps, 1, |_, b| record(b))?;
    Ok(t.remove(0))
}

/// `reps` timed runs of each of `n` variants (`record(i, batch)` records variant i), taken in
/// turn (variant 0, 1, …, n−1, then again), after one warm-up round: whatever else loads the
/// machine meanwhile slows every variant alike, so their ratios hold up better than when each
/// variant's runs come one after another. Per variant, the median time and the mean CPU
/// milliseconds per run.
fn interleaved_ms(
    gpu: &Gpu,
    reps: usize,
    n: usize,
    mut record: impl FnMut(usize, &mut Batch) -> Result<()>,
) -> Result<Vec<(f64, Option<f64>)>> {
    let timer = gpu.timer();
    let mut t = vec![Vec::with_capacity(reps); n];
    let mut cpu = vec![Some(0.0); n];
    for rep in 0..=reps {
        for i in 0..n {
            let (ms, c) = time_once(gpu, timer.as_ref(), |b| record(i, b))?;
            if rep > 0 {
                t[i].push(ms);
                cpu[i] = cpu[i].zip(c).map(|(a, b)| a + b);
            }
        }
    }
    Ok(t.into_iter()
        .zip(cpu)
        .map(|(t, c)| (median(t), c.map(|c| c * 1e3 / reps as f64)))
        .collect())
}

fn random(rng: &mut SplitMix64, n: usize) -> Vec<f32> {
    rng.gaussians_f32(n)
}

fn copy_gbps(gpu: &Gpu, reps: usize) -> Result<f64> {
    let words = 16 << 20; // 64 MiB
    let src = gpu.zeros::<u32>("copy src", words);
    let dst = gpu.zeros::<u32>("copy dst", words);
    let kernel = gpu.pipeline("gpu/copy", "main", &[], &[Binding::READ, Binding::RW])?;
    let (ms, _) = median_ms(gpu, reps, |b| {
        b.dispatch(
            &kernel,
            &[src.buffer(), dst.buffer()],
            grid((words / 4 / 256) as u32),
        );
        Ok(())
    })?;
    Ok(2.0 * (words * 4) as f64 / (ms * 1e6))
}

fn kernels(
    gpu_args: &GpuArgs,
    contexts: &[usize],
    formats: &[String],
    reps: usize,
    per_query_head: bool,
    n_q: usize,
    json: bool,
) -> Result<()> {
    if reps == 0 {
        bail!("--reps must be at least 1");
    }
    let formats: Vec<KvFormat> = formats
        .iter()
        .map(|f| f.parse())
        .collect::<Result<_, _>>()?;
    let gpu = gpu_args.open()?;
    let shape = AttentionShape {
        n_heads: 9,
        n_kv_heads: 3,
        head_dim: 64,
    };
    let d = shape.head_dim;
    let copy = copy_gbps(&gpu, reps)?;
    let mut rng = SplitMix64::new(1);
    let mut rows: Vec<Row> = Vec::new();

    // Encode throughput: 64K vectors.
    let n_enc = 65536;
    let xs = gpu.upload("bench input", &random(&mut rng, n_enc * d));
    let status = gpu.upload("status", &[0u32, u32::MAX]);
    for kv in &formats {
        let f = &kv.k;
        let codec = GpuCodec::new(&gpu, Codec::with_seed(*f, d, 11)?);
        let page = gpu.zeros::<u32>("page", page_words(f, d, n_enc));
        let (ms, cpu_ms) = median_ms(&gpu, reps, |b| {
            codec.encode_into(
                &gpu,
                b,
                &EncodeArgs::packed(Input::F32(&xs), d, n_enc, &page, &status),
            )?;
            Ok(())
        })?;
        rows.push(Row {
            kernel: "encode".into(),
            format: f.name(),
            context: n_enc,
            ms,
            gbps: (n_enc * d * 4) as f64 / (ms * 1e6),
            ratio_vs_f16: None,
            cpu_ms,
            cpu_ratio_vs_f16: None,
        });
    }

    // Decode attention over compressed K and V.
    let max_ctx = contexts.iter().copied().max().unwrap_or(0);
    let kv_in = gpu.upload(
        "bench kv",
        &random(&mut rng, shape.n_kv_heads * max_ctx * d),
    );
    if let Some(&short) = contexts.iter().find(|&&c| c < n_q) {
        bail!("--queries {n_q} needs contexts of at least {n_q} tokens, got {short}");
    }
    let q = gpu.upload("q", &random(&mut rng, n_q * shape.n_heads * d));
    let out = gpu.zeros::<f32>("out", n_q * shape.n_heads * d);
    let attention_kernel = if n_q == 1 {
        "decode_attention".to_string()
    } else {
        format!("prefill_attention_{n_q}")
    };
    for &ctx in contexts {
        let heads: Vec<u32> = (0..shape.n_kv_heads)
            .flat_map(|h| [(h * ctx) as u32, ctx as u32])
            .collect();
        let heads = gpu.upload("heads", &heads);
        let mut scratch = AttentionScratch::new(&gpu, shape, n_q, ctx);
        scratch.share_kv_heads = !per_query_head;
        let n = shape.n_kv_heads * ctx;
        // Every format's pages first, then the formats timed in turn.
        let mut pages = Vec::with_capacity(formats.len());
        for f in &formats {
            let kc = GpuCodec::new(&gpu, Codec::with_seed(f.k, d, 21)?);
            let vc = GpuCodec::new(&gpu, Codec::with_seed(f.v, d, 22)?);
            let kp = gpu.zeros::<u32>("k page", page_words(&f.k, d, n));
            let vp = gpu.zeros::<u32>("v page", page_words(&f.v, d, n));
            let mut b = gpu.batch("fill");
            for (c, p) in [(&kc, &kp), (&vc, &vp)] {
                c.encode_into(
                    &gpu,
                    &mut b,
                    &EncodeArgs::packed(Input::F32(&kv_in), d, n, p, &status),
                )?;
            }
            b.submit();
            pages.push((kc, vc, kp, vp));
        }
        let timed = interleaved_ms(&gpu, reps, pages.len(), |i, b| {
            let (kc, vc, kp, vp) = &pages[i];
            let kv = KvPages {
                k_codec: kc,
                v_codec: vc,
                k_page: kp,
                v_page: vp,
                capacity: n,
                heads: &heads,
                max_len: ctx,
                bias: None,
                skip: 0,
                values: ValueStore::Codes,
                ring: 0,
                recent: Recent::All,
                center: None,
                appended: 0,
            };
            decode_attention_into(
                &gpu,
                b,
                shape,
                std::slice::from_ref(&kv),
                &q,
                n_q,
                &scratch,
                &out,
            )?;
            Ok(())
        })?;
        for ((f, (_, _, kp, vp)), (ms, cpu_ms)) in formats.iter().zip(&pages).zip(timed) {
            let bytes = (kp.bytes() + vp.bytes()) as f64;
            rows.push(Row {
                kernel: attention_kernel.clone(),
                format: f.to_string(),
                context: ctx,
                ms,
                gbps: bytes / (ms * 1e6),
                ratio_vs_f16: None,
                cpu_ms,
                cpu_ratio_vs_f16: None,
            });
        }
    }
    // ratio_vs_f16 = f16's time / this time (above 1: faster than f16).
    let snapshot = rows.clone();
    for r in rows.iter_mut() {
        if let Some(f16) = snapshot
            .iter()
            .find(|s| s.kernel == r.kernel && s.context == r.context && s.format == "f16")
        {
            r.ratio_vs_f16 = Some(f16.ms / r.ms);
            if let (Some(a), Some(b)) = (f16.cpu_ms, r.cpu_ms) {
                r.cpu_ratio_vs_f16 = Some(a / b);
            }
        }
    }
    if json {
        let out = serde_json::json!({ "backend": gpu.backend_name(), "adapter": gpu.report().name,
            "timing": if gpu.has_timestamps() { "gpu timestamps, median" } else { "wall clock, median" }, "copy_gbps": copy, "rows": rows });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "kvpack kernels on {} ({}); median of {reps} ({})",
            gpu.report().name,
            gpu.backend_name(),
            if gpu.has_timestamps() {
                "GPU timestamps"
            } else {
                "wall clock"
            }
        );
        println!("buffer copy bandwidth: {copy:.2} GB/s");
        println!(
            "{:<17} {:<10} {:>8} {:>10} {:>9} {:>10} {:>14} {:>10} {:>13}",
            "kernel",
            "format",
            "context",
            "ms",
            "GB/s",
            "vs copy",
            "f16 time/this",
            "cpu ms",
            "f16 cpu/this"
        );
        for r in &rows {
            println!(
                "{:<17} {:<10} {:>8} {:>10.3} {:>9.2} {:>9.1}% {:>14} {:>10} {:>13}",
                r.kernel,
                r.format,
                r.context,
                r.ms,
                r.gbps,
                100.0 * r.gbps / copy,
                r.ratio_vs_f16.map_or("-".into(), |x| format!("{x:.2}x")),
                r.cpu_ms.map_or("-".into(), |x| format!("{x:.1}")),
                r.cpu_ratio_vs_f16
                    .map_or("-".into(), |x| format!("{x:.2}x"))
            );
        }
    }
    Ok(())
}
