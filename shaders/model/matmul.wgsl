// Y[t][y_offset + r] (+)= Σ_c X[x_first + t][c] · W[r][c], with W read in its GGUF blocks and
// dequantized here: no f32 copy of a weight ever exists.
//
// A workgroup owns WG / LANES rows and TOKS tokens. The LANES invocations of a row walk its 8-value
// units; each unit is dequantized once and applied to all TOKS tokens (prefill reads the weights
// n_tok / TOKS times, decode once). Partial sums meet in a tree over the row's lanes.

#include "common/ggml.wgsl"

struct Params {
    rows: u32,
    cols: u32,
    n_tok: u32,
    tok_tiles: u32,
    y_stride: u32,
    y_offset: u32,
    x_first: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> wq: array<u32>;
@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

// Invocations per workgroup, and per row (a power of two dividing WG).
override WG: u32 = 64u;
override LANES: u32 = 32u;
// Tokens per workgroup, at most MAX_TOKS.
override TOKS: u32 = 1u;
// Add to Y instead of overwriting it (fuses the residual add).
override ACCUMULATE: bool = false;

const MAX_TOKS: u32 = 16u;
// WG * TOKS partial sums.
var<workgroup> red: array<f32, 2048>;

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32,
        @builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>) {
    let flat = wid.x + wid.y * nwg.x;
    let tok_tile = flat % params.tok_tiles;
    let row_tile = flat / params.tok_tiles;
    let lane = lid % LANES;
    let sub = lid / LANES;
    let r = row_tile * (WG / LANES) + sub;
    let t0 = tok_tile * TOKS;

    var acc: array<f32, MAX_TOKS>;
    if (r < params.rows) {
        let rb = r * w_row_bytes(params.cols);
        let units = params.cols / 8u;
        let x_row = params.cols / 4u;
        var xb: array<u32, MAX_TOKS>;
        for (var k = 0u; k < TOKS; k++) {
            // Tokens past the end repeat the last one; their sums are never written.
            xb[k] = (params.x_first + min(t0 + k, params.n_tok - 1u)) * x_row;
        }
        for (var u = lane; u < units; u += LANES) {
            let wu = w_unit(rb, u);
            let lo = wu.lo_col / 4u;
            let hi = wu.hi_col / 4u;
            for (var k = 0u; k < TOKS; k++) {
                acc[k] += dot(wu.lo, x[xb[k] + lo]) + dot(wu.hi, x[xb[k] + hi]);
            }
        }
    }
    for (var k = 0u; k < TOKS; k++) {
        red[k * WG + lid] = acc[k];
    }
    for (var s = LANES / 2u; s > 0u; s = s / 2u) {
        workgroupBarrier();
        if (lane < s) {
            for (var k = 0u; k < TOKS; k++) {
                red[k * WG + lid] += red[k * WG + lid + s];
            }
        }
    }
    workgroupBarrier();
    // Lane k of a row writes its token k.
    for (var k = lane; k < TOKS; k += LANES) {
        let t = t0 + k;
        if (r < params.rows && t < params.n_tok) {
            let i = t * params.y_stride + params.y_offset + r;
            let v = red[k * WG + sub * LANES];
            if (ACCUMULATE) {
                y[i] += v;
            } else {
                y[i] = v;
            }
        }
    }
}
