// Decode n vectors of any format to f32: one workgroup per vector (docs/formats.md).
// TurboQuant (arXiv 2504.19874): x̃ = s · Dᵀ·Hᵀ·c[idx] (+ prod's QJL term).

#include "common/format.wgsl"

struct Params {
    n: u32,
    first: u32,
    scale_base: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> fmt_page: array<u32>;
@group(0) @binding(2) var<storage, read> fmt_aux: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

override WG: u32 = 64u;

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32,
        @builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>) {
    let v = wid.x + wid.y * nwg.x;
    if (v >= params.n) {
        return;
    }
    fmt_scale_base = params.scale_base;
    fmt_prepare(lid, WG);
    let i = params.first + v;
    for (var j = lid; j < D; j += WG) {
        tw[j] = fmt_value(i, j);
        if (FMT_KIND == 5u) {
            tq[j] = fmt_qjl(i, j);
        }
    }
    fmt_finish(lid, WG);
    for (var j = lid; j < D; j += WG) {
        out[v * D + j] = tout[j];
    }
}
