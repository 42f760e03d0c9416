// Y[y_first + t][y_offset + r] (+)= Σ_c X[t][c] · W[r][c] for CPU adapters (lavapipe, llvmpipe,
// SwiftShader), which pay for every storage load but read uniforms almost for free: the X tile
// sits in a uniform buffer, one invocation owns ROWS rows and reads each block of them once, with
// the fewest word loads, for all TOKS tokens of the tile. Same arithmetic as model/matmul.wgsl.

#include "common/ggml.wgsl"

struct Params {
    rows: u32,
    cols: u32,
    n_tok: u32,
    y_stride: u32,
    y_offset: u32,
    y_first: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> wq: array<u32>;
// The tile's n_tok rows of X, back to back (64 KiB: WebGPU's uniform binding limit).
@group(0) @binding(2) var<uniform> xu: array<vec4<f32>, 4096>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

override WG: u32 = 64u;
// Rows per invocation (≤ MAX_ROWS): each X value read serves them all.
override ROWS: u32 = 1u;
// Tokens per tile (≤ MAX_TOKS, TOKS · cols ≤ 16384).
override TOKS: u32 = 1u;
override ACCUMULATE: bool = false;

const MAX_ROWS: u32 = 4u;
const MAX_TOKS: u32 = 16u;

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32,
        @builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>) {
    let r0 = ((wid.x + wid.y * nwg.x) * WG + lid) * ROWS;
    if (r0 >= params.rows) {
        return;
    }
    let row_bytes = w_row_bytes(params.cols);
    // Rows past the end repeat the last one; their sums are never written.
    var rb: array<u32, MAX_ROWS>;
    for (var q = 0u; q < ROWS; q++) {
        rb[q] = min(r0 + q, params.rows - 1u) * row_bytes;
    }
    let x_row = params.cols / 4u;
    var acc: array<array<f32, MAX_TOKS>, MAX_ROWS>;
    if (WTYPE <= 1u) {
        for (var u = 0u; u < params.cols / 8u; u++) {
            var wu: array<WUnit, MAX_ROWS>;
            for (var q = 0u; q < ROWS; q++) {
                wu[q] = w_unit(rb[q], u);
            }
            for (var k = 0u; k < TOKS; k++) {
                let lo = xu[k * x_row + 2u * u];
                let hi = xu[k * x_row + 2u * u + 1u];
                for (var q = 0u; q < ROWS; q++) {
                    acc[q][k] += dot(wu[q].lo, lo) + dot(wu[q].hi, hi);
                }
            }
        }
    } else {
        let block_bytes = w_row_bytes(32u);
        for (var blk = 0u; blk < params.cols / 32u; blk++) {
            var wv: array<array<vec4<f32>, 8>, MAX_ROWS>;
            for (var q = 0u; q < ROWS; q++) {
                wv[q] = w_block(rb[q] + blk * block_bytes);
            }
            for (var k = 0u; k < TOKS; k++) {
                let xb = k * x_row + blk * 8u;
                var xv: array<vec4<f32>, 8>;
                for (var j = 0u; j < 8u; j++) {
                    xv[j] = xu[xb + j];
                }
                for (var q = 0u; q < ROWS; q++) {
                    var s = 0.0;
                    for (var j = 0u; j < 8u; j++) {
                        s += dot(wv[q][j], xv[j]);
                    }
                    acc[q][k] += s;
                }
            }
        }
    }
    for (var q = 0u; q < min(ROWS, params.rows - r0); q++) {
        for (var k = 0u; k < min(TOKS, params.n_tok); k++) {
            let i = (params.y_first + k) * params.y_stride + params.y_offset + r0 + q;
            if (ACCUMULATE) {
                y[i] += acc[q][k];
            } else {
                y[i] = acc[q][k];
            }
        }
    }
}
