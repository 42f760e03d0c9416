// Index of the largest value of each row (greedy decoding without reading the logits back).
// Ties go to the smallest index; NaN never wins over a number. One workgroup per row.

struct Params {
    n_rows: u32,
    n_cols: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<u32>;

// A power of two.
override WG: u32 = 256u;

const NONE: u32 = 0xffffffffu;

var<workgroup> best_v: array<f32, 256>;
var<workgroup> best_i: array<u32, 256>;

// Whether (v2, i2) beats (v1, i1).
fn beats(v1: f32, i1: u32, v2: f32, i2: u32) -> bool {
    if (i2 == NONE) {
        return false;
    }
    if (i1 == NONE || v2 > v1) {
        return true;
    }
    if (v2 == v1) {
        return i2 < i1;
    }
    // v1 is NaN (v2 > v1 and v2 == v1 are false for it) and v2 is a number.
    return !(v1 <= v2) && !(v1 > v2) && (v2 == v2);
}

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32,
        @builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = wid.x + wid.y * nwg.x;
    var bv = 0.0;
    var bi = NONE;
    if (row < params.n_rows) {
        let base = row * params.n_cols;
        for (var c = lid; c < params.n_cols; c += WG) {
            let v = x[base + c];
            if (beats(bv, bi, v, c)) {
                bv = v;
                bi = c;
            }
        }
    }
    best_v[lid] = bv;
    best_i[lid] = bi;
    for (var h = WG / 2u; h > 0u; h = h / 2u) {
        workgroupBarrier();
        if (lid < h && beats(best_v[lid], best_i[lid], best_v[lid + h], best_i[lid + h])) {
            best_v[lid] = best_v[lid + h];
            best_i[lid] = best_i[lid + h];
        }
    }
    if (lid == 0u && row < params.n_rows) {
        out[row] = best_i[0];
    }
}
