// out[t] = row ids[t] of a weight tensor, dequantized from its GGUF blocks. A tensor split into
// chunks is gathered by one dispatch per chunk; each writes the tokens whose rows it holds.

#include "common/ggml.wgsl"

struct Params {
    n_tok: u32,
    cols: u32,
    row_start: u32,
    rows: u32,
    total_rows: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> wq: array<u32>;
@group(0) @binding(2) var<storage, read> ids: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

override WG: u32 = 64u;

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32,
        @builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = wid.x + wid.y * nwg.x;
    if (t >= params.n_tok) {
        return;
    }
    let id = ids[t];
    let base = t * params.cols;
    let units = params.cols / 8u;
    if (id >= params.row_start && id - params.row_start < params.rows) {
        let rb = (id - params.row_start) * w_row_bytes(params.cols);
        for (var u = lid; u < units; u += WG) {
            let wu = w_unit(rb, u);
            for (var j = 0u; j < 4u; j++) {
                out[base + wu.lo_col + j] = wu.lo[j];
                out[base + wu.hi_col + j] = wu.hi[j];
            }
        }
    } else if (params.row_start == 0u && id >= params.total_rows) {
        // An id outside the vocabulary reads as a zero row (written once, by the first chunk).
        for (var c = lid; c < params.cols; c += WG) {
            out[base + c] = 0.0;
        }
    }
}
