// RMSNorm (Zhang & Sennrich 2019), per row: y = x · w / sqrt(mean(x²) + eps).
// One workgroup per row.

struct Params {
    n_rows: u32,
    dim: u32,
    eps: f32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

// A power of two.
override WG: u32 = 256u;

var<workgroup> red: array<f32, 256>;

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32,
        @builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = wid.x + wid.y * nwg.x;
    let n = params.dim;
    let base = row * n;
    var s = 0.0;
    if (row < params.n_rows) {
        for (var c = lid; c < n; c += WG) {
            let v = x[base + c];
            s += v * v;
        }
    }
    red[lid] = s;
    for (var h = WG / 2u; h > 0u; h = h / 2u) {
        workgroupBarrier();
        if (lid < h) {
            red[lid] += red[lid + h];
        }
    }
    workgroupBarrier();
    if (row >= params.n_rows) {
        return;
    }
    let scale = 1.0 / sqrt(red[0] / f32(n) + params.eps);
    for (var c = lid; c < n; c += WG) {
        y[base + c] = x[base + c] * scale * w[c];
    }
}
