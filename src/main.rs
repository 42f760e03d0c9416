//! The `kvpack` command.

fn main() {
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("warn,wgpu_hal::gles=off"),
    )
    .init();
    if let Err(e) = kvpack_cli::run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

#[path = "cli/mod.rs"]
mod kvpack_cli;
