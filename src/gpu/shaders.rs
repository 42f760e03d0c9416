//! The WGSL registry: every file under `shaders/` embedded at build time, with a tiny
//! `#include "common/x.wgsl"` preprocessor so helpers (f16 packing, Hadamard, code extraction) are
//! written once and composed in.

use super::GpuError;

macro_rules! shader_files {
    ($($path:literal),* $(,)?) => {
        /// Every WGSL file: (path relative to `shaders/`, source).
        pub const SHADER_FILES: &[(&str, &str)] = &[
            $(($path, include_str!(concat!("../../shaders/", $path)))),*
        ];
    };
}

shader_files!(
    "common/bits.wgsl",
    "common/hadamard.wgsl",
    "common/format.wgsl",
    "common/window.wgsl",
    "codec/encode.wgsl",
    "codec/decode.wgsl",
    "attention/decode.wgsl",
    "attention/combine.wgsl",
    "attention/prompt_rows.wgsl",
    "attention/prompt_tiles.wgsl",
    "kv/center.wgsl",
    "gpu/copy.wgsl",
    "common/ggml.wgsl",
    "model/matmul.wgsl",
    "model/matmul_cpu.wgsl",
    "model/embed.wgsl",
    "model/rmsnorm.wgsl",
    "model/rope.wgsl",
    "model/swiglu.wgsl",
    "model/add.wgsl",
    "model/argmax.wgsl",
    "compact/scores.wgsl",
    "compact/scores_rows.wgsl",
);

/// Names of the kernels (files outside `common/`, without `.wgsl`).
pub fn shader_names() -> Vec<&'static str> {
    SHADER_FILES
        .iter()
        .filter(|(p, _)| !p.starts_with("common/"))
        .map(|(p, _)| p.trim_end_matches(".wgsl"))
        .collect()
}

fn raw(path: &str) -> Option<&'static str> {
    SHADER_FILES
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, s)| *s)
}

/// The complete source of kernel `name` (e.g. `"codec/decode"`), includes resolved once each.
pub fn shader_source(name: &str) -> Result<String, GpuError> {
    let path = format!("{name}.wgsl");
    let src = raw(&path).ok_or_else(|| GpuError::UnknownShader(name.to_string()))?;
    let mut out = String::new();
    let mut seen = Vec::new();
    expand(&path, src, &mut out, &mut seen)?;
    Ok(out)
}

fn expand(path: &str, src: &str, out: &mut String, seen: &mut Vec<String>) -> Result<(), GpuError> {
    for line in src.lines() {
        if let Some(rest) = line.trim_start().strip_prefix("#include") {
            let inc = rest.trim().trim_matches('"');
            if seen.iter().any(|s| s == inc) {
                continue;
            }
            seen.push(inc.to_string());
            let inc_src = raw(inc)
                .ok_or_else(|| GpuError::UnknownShader(format!("{inc} (included from {path})")))?;
            expand(inc, inc_src, out, seen)?;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    Ok(())
}
