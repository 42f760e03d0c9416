// The same scores as compact/scores.wgsl (Attention Matching, arXiv 2602.16284, §3), laid out
// for CPU adapters (lavapipe, llvmpipe, SwiftShader): one invocation per query row. Every
// invocation of a workgroup reads the same key and value at the same time, so a SIMD lane per
// row needs no gathers, and the dot products need no reductions across invocations:
//   e[i, j] = exp(s_ij − m_i) with s_ij = ⟨q_i, k_j⟩ · scale and m_i = max_j s_ij (0 past lens[i]),
//   stats[i] = (m_i, Σ_j e[i, j]),   y[i] = Σ_j e[i, j] v_j / Σ_j e[i, j].
// `e` must be zero on entry: weights past a row's visible length are not written.

struct Params {
    n_q: u32,
    n_k: u32,
    scale: f32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> k: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> v: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> lens: array<u32>;
@group(0) @binding(5) var<storage, read_write> e: array<f32>;
@group(0) @binding(6) var<storage, read_write> stats: array<f32>;
@group(0) @binding(7) var<storage, read_write> y: array<vec4<f32>>;

// Head dimension: a multiple of 4, at most 256.
override D: u32 = 64u;
// Rows (invocations) per workgroup.
override WG: u32 = 64u;

const MAX_D4: u32 = 64u;

// The longest visible length among the workgroup's rows: the key loop's uniform bound.
var<workgroup> wg_len: atomic<u32>;

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32,
        @builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = (wid.x + wid.y * nwg.x) * WG + lid;
    let live = row < params.n_q;
    let d4 = D / 4u;
    var len = 0u;
    if (live) {
        len = min(lens[row], params.n_k);
    }
    if (lid == 0u) {
        atomicStore(&wg_len, 0u);
    }
    workgroupBarrier();
    atomicMax(&wg_len, len);
    let n = workgroupUniformLoad(&wg_len);
    if (n == 0u) {
        if (live) {
            stats[2u * row] = 0.0;
            stats[2u * row + 1u] = 0.0;
            for (var c = 0u; c < d4; c++) {
                y[row * d4 + c] = vec4<f32>(0.0);
            }
        }
        return;
    }
    var qr: array<vec4<f32>, MAX_D4>;
    for (var c = 0u; c < d4; c++) {
        if (live) {
            qr[c] = q[row * d4 + c] * params.scale;
        } else {
            qr[c] = vec4<f32>(0.0);
        }
    }
    let base = row * params.n_k;
    // Pass 1: the scores and their maximum.
    var m = -3.4e38;
    for (var j = 0u; j < n; j++) {
        var s4 = vec4<f32>(0.0);
        for (var c = 0u; c < d4; c++) {
            s4 += qr[c] * k[j * d4 + c];
        }
        let s = s4.x + s4.y + s4.z + s4.w;
        if (j < len) {
            e[base + j] = s;
            m = max(m, s);
        }
    }
    // Pass 2: weights, their sum and the weighted values.
    var acc: array<vec4<f32>, MAX_D4>;
    for (var c = 0u; c < d4; c++) {
        acc[c] = vec4<f32>(0.0);
    }
    var l = 0.0;
    for (var j = 0u; j < n; j++) {
        var w = 0.0;
        if (j < len) {
            w = exp(e[base + j] - m);
            e[base + j] = w;
        }
        l += w;
        for (var c = 0u; c < d4; c++) {
            acc[c] += w * v[j * d4 + c];
        }
    }
    if (!live) {
        return;
    }
    let inv = select(0.0, 1.0 / l, l > 0.0);
    for (var c = 0u; c < d4; c++) {
        y[row * d4 + c] = acc[c] * inv;
    }
    if (len == 0u) {
        m = 0.0;
    }
    stats[2u * row] = m;
    stats[2u * row + 1u] = l;
}
