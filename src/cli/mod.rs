//! Command-line front end: argument parsing (clap) and output; the work lives in the library.

mod bench;
mod chat;
mod compaction;
mod eval;
mod generate;
mod layers;
mod plot;
mod ppl;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use kvpack::gpu::{list_adapters, BackendChoice, Gpu, GpuOptions, Power};

/// kvpack: language models with a compressed KV cache on any GPU (TurboQuant + Attention Matching
/// in WGSL on wgpu: Vulkan, Metal, DX12, OpenGL, WebGPU).
#[derive(Parser)]
#[command(name = "kvpack", version, about, long_about = None, after_help = EXAMPLES)]
struct Cli {
    #[command(flatten)]
    gpu: GpuArgs,
    #[command(subcommand)]
    command: Command,
}

const EXAMPLES: &str = "Examples:
  kvpack generate --prompt \"The capital of France is\"   text with a TurboQuant cache
  kvpack generate --chat --prompt \"Tell me a joke\" --kv k4v2 --temperature 0.7
  kvpack info                              adapters found and the one chosen
  kvpack --backend gl info --json          the OpenGL adapter, as JSON
  kvpack eval distortion --dim 128         TurboQuant distortion beside the paper's numbers
  kvpack bench kernels --json              encode and attention speed per format";

/// Adapter selection, shared by every command.
#[derive(Args, Clone)]
struct GpuArgs {
    /// Backend: auto, vulkan, gl, metal, dx12 (auto honours WGPU_BACKEND).
    #[arg(long, global = true, default_value = "auto", env = "KVPACK_BACKEND")]
    backend: String,
    /// Power preference: low picks an integrated GPU, high a discrete one.
    #[arg(long, global = true, default_value = "default", env = "KVPACK_POWER")]
    power: String,
    /// Request exactly WebGPU's default limits, as a browser would give.
    #[arg(long, global = true, env = "KVPACK_WEBGPU_LIMITS", value_parser = clap::builder::BoolishValueParser::new())]
    webgpu_limits: bool,
}

impl GpuArgs {
    fn options(&self) -> Result<GpuOptions> {
        Ok(GpuOptions {
            backend: self.backend.parse::<BackendChoice>()?,
            power: self.power.parse::<Power>()?,
            webgpu_limits: self.webgpu_limits,
        })
    }

    fn open(&self) -> Result<Gpu> {
        let opts = self.options()?;
        Gpu::new_blocking(&opts).context("opening the GPU")
    }
}

#[derive(Subcommand)]
enum Command {
    /// Adapters found, the one chosen, its backend, limits and features.
    Info {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Generate text from a GGUF model with a compressed KV cache (the default model is fetched
    /// on first use). Streams the text, then reports memory and speed.
    Generate(generate::GenerateArgs),
    /// An interactive conversation with the ChatML template; the compressed cache is kept
    /// across turns.
    Chat(chat::ChatArgs),
    /// Compact a text's KV cache (Attention Matching or an eviction baseline) into a .kvpack
    /// file that `generate --cache` continues from.
    Compact(compaction::CompactArgs),
    /// Measure quality.
    #[command(subcommand)]
    Eval(eval::EvalCommand),
    /// Measure speed.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

/// Run the command line.
pub fn run() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Info { json } => info(&cli.gpu, json),
        Command::Generate(args) => generate::run(&cli.gpu, args),
        Command::Chat(args) => chat::run(&cli.gpu, args),
        Command::Compact(args) => compaction::run_compact(&cli.gpu, args),
        Command::Eval(cmd) => eval::run(&cli.gpu, cmd),
        Command::Bench(cmd) => bench::run(&cli.gpu, cmd),
    }
}

fn info(args: &GpuArgs, json: bool) -> Result<()> {
    let opts = args.options()?;
    let adapters = pollster::block_on(list_adapters(opts.backend));
    let gpu = Gpu::new_blocking(&opts);
    if json {
        let found: Vec<_> = adapters
            .iter()
            .map(|a| {
                serde_json::json!({
                    "name": a.name, "backend": format!("{:?}", a.backend).to_lowercase(),
                    "device_type": format!("{:?}", a.device_type), "driver": a.driver,
                })
            })
            .collect();
        let chosen = match &gpu {
            Ok(g) => serde_json::to_value(g.report())?,
            Err(e) => serde_json::json!({ "error": e.to_string() }),
        };
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({ "adapters": found, "chosen": chosen })
            )?
        );
    } else {
        println!("adapters found ({}):", adapters.len());
        for a in &adapters {
            println!("  - {}", kvpack::gpu::describe_adapter(a));
        }
        match &gpu {
            Ok(g) => {
                let r = g.report();
                println!("chosen: {} [{}; {}]", r.name, r.backend, r.device_type);
                println!("  driver:               {}", r.driver);
                println!("  webgpu limits forced: {}", r.webgpu_limits);
                println!("  max binding:          {} MiB", r.max_binding_bytes >> 20);
                println!("  max buffer:           {} MiB", r.max_buffer_bytes >> 20);
                println!("  invocations/wg:       {}", r.max_invocations);
                println!(
                    "  workgroup memory:     {} KiB",
                    r.max_workgroup_bytes >> 10
                );
                println!("  storage buffers:      {}", r.max_storage_buffers);
                println!("  timestamp queries:    {}", r.timestamps);
            }
            Err(e) => println!("chosen: none ({e})"),
        }
    }
    gpu.map(|_| ()).context("no usable adapter")
}

/// An evaluation text, with a hint to fetch the standard ones when it is missing.
pub fn read_eval_text(path: &std::path::Path) -> anyhow::Result<String> {
    use anyhow::Context;
    std::fs::read_to_string(path).with_context(|| {
        format!(
            "reading {} (fetch the evaluation texts with scripts/fetch-data.sh)",
            path.display()
        )
    })
}
