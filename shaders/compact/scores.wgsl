// Attention of reference queries over one KV head's plain keys and values, for compaction
// (Attention Matching, arXiv 2602.16284, §3): per query row i over its first lens[i] keys,
//   e[i, j] = exp(s_ij − m_i) with s_ij = ⟨q_i, k_j⟩ · scale and m_i = max_j s_ij (0 past lens[i]),
//   stats[i] = (m_i, Σ_j e[i, j]),   y[i] = Σ_j e[i, j] v_j / Σ_j e[i, j].
// The row-shifted weights e give the attention probabilities, the mass Σ exp(s) = exp(m)·Σ e, and
// the design matrix of the bias and value fits. One workgroup per query row.

struct Params {
    n_q: u32,
    n_k: u32,
    scale: f32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read> lens: array<u32>;
@group(0) @binding(5) var<storage, read_write> e: array<f32>;
@group(0) @binding(6) var<storage, read_write> stats: array<f32>;
@group(0) @binding(7) var<storage, read_write> y: array<f32>;

// Head dimension (at most 256).
override D: u32 = 64u;
// Invocations per workgroup, a power of two (at most 256).
override WG: u32 = 64u;

var<workgroup> qs: array<f32, 256>;
var<workgroup> red: array<f32, 256>;

fn reduce(lid: u32, x: f32, is_max: bool) -> f32 {
    red[lid] = x;
    for (var h = WG / 2u; h > 0u; h = h / 2u) {
        workgroupBarrier();
        if (lid < h) {
            if (is_max) {
                red[lid] = max(red[lid], red[lid + h]);
            } else {
                red[lid] += red[lid + h];
            }
        }
    }
    workgroupBarrier();
    let r = red[0];
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32,
        @builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = wid.x + wid.y * nwg.x;
    // Rows past n_q still take part in the barriers, on zero keys.
    let live = row < params.n_q;
    var len = 0u;
    if (live) {
        len = min(lens[row], params.n_k);
        for (var c = lid; c < D; c += WG) {
            qs[c] = q[row * D + c];
        }
    }
    workgroupBarrier();
    let base = row * params.n_k;
    var m = -3.4e38;
    for (var j = lid; j < len; j += WG) {
        var s = 0.0;
        for (var c = 0u; c < D; c++) {
            s += qs[c] * k[j * D + c];
        }
        s *= params.scale;
        e[base + j] = s;
        m = max(m, s);
    }
    m = reduce(lid, m, true);
    var l = 0.0;
    if (live) {
        for (var j = lid; j < params.n_k; j += WG) {
            var w = 0.0;
            if (j < len) {
                w = exp(e[base + j] - m);
            }
            e[base + j] = w;
            l += w;
        }
    }
    l = reduce(lid, l, false);
    storageBarrier();
    if (!live) {
        return;
    }
    for (var c = lid; c < D; c += WG) {
        var acc = 0.0;
        for (var j = 0u; j < len; j++) {
            acc += e[base + j] * v[j * D + c];
        }
        var out = 0.0;
        if (l > 0.0) {
            out = acc / l;
        }
        y[row * D + c] = out;
    }
    if (lid == 0u) {
        if (len == 0u) {
            m = 0.0;
        }
        stats[2u * row] = m;
        stats[2u * row + 1u] = l;
    }
}
