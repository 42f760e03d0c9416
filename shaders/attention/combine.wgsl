// Combine split-K partials (m, l, acc) of decode attention and leave the value format's domain:
// one inverse rotation per output (TurboQuant), not one per token.

#include "common/format.wgsl"

struct Params {
    n_q: u32,
    n_heads: u32,
    n_splits: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> partials: array<f32>;
@group(0) @binding(2) var<storage, read> fmt_page: array<u32>;
@group(0) @binding(3) var<storage, read> fmt_aux: array<u32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

override WG: u32 = 64u;

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32,
        @builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>) {
    let flat = wid.x + wid.y * nwg.x;
    if (flat >= params.n_q * params.n_heads) {
        return;
    }
    let stride = 2u + 2u * D;
    let base = flat * params.n_splits * stride;
    var m = -3.0e38;
    for (var s = 0u; s < params.n_splits; s++) {
        m = max(m, partials[base + s * stride]);
    }
    var l = 0.0;
    for (var s = 0u; s < params.n_splits; s++) {
        l += exp(partials[base + s * stride] - m) * partials[base + s * stride + 1u];
    }
    var inv = 0.0;
    if (l > 0.0) {
        inv = 1.0 / l;
    }
    for (var j = lid; j < D; j += WG) {
        var a = 0.0;
        var b = 0.0;
        for (var s = 0u; s < params.n_splits; s++) {
            let w = exp(partials[base + s * stride] - m);
            a += w * partials[base + s * stride + 2u + j];
            b += w * partials[base + s * stride + 2u + D + j];
        }
        tw[j] = a * inv;
        tq[j] = b * inv;
    }
    fmt_finish(lid, WG);
    for (var j = lid; j < D; j += WG) {
        out[flat * D + j] = tout[j];
    }
}
