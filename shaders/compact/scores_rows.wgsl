// The same scores as compact/scores.wgsl (Attention Matching, arXiv 2602.16284, §3), laid out
// for CPU adapters (lavapipe, llvmpipe, SwiftShader), which pay for every storage load but read
// uniforms almost for free: one invocation per query row, and the keys (pass 0) or the values
// (pass 1) of one tile of tokens in a 64 KiB uniform buffer that every invocation reads at the
// same index. One dispatch per (pass, tile), tiles in order; the rows carry their state between
// dispatches in `stats` and `y`:
//   pass 0: s_ij = ⟨q_i, k_j⟩ · scale into e, m_i = max_j s_ij into stats[2i];
//   pass 1: e_ij = exp(s_ij − m_i), l_i = Σ_j e_ij into stats[2i + 1], Σ_j e_ij v_j into y;
//           the last tile divides y by l_i.
// Rows see their first lens[i] keys; weights past that stay as they were (zero: `e` must be zero
// on entry). A row that sees no key gets m = l = 0 and y = 0.

struct Params {
    n_q: u32,
    n_k: u32,
    scale: f32,
    // First key of this tile, and its keys.
    tile_first: u32,
    tile_len: u32,
    // 0: scores and maxima; 1: weights, sums and outputs (the pass).
    phase: u32,
    // Whether this is the first / last tile of the pass.
    first: u32,
    last: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;
// The tile's keys (pass 0) or values (pass 1), D / 4 vec4 per token.
@group(0) @binding(2) var<uniform> tile: array<vec4<f32>, 4096>;
@group(0) @binding(3) var<storage, read> lens: array<u32>;
@group(0) @binding(4) var<storage, read_write> e: array<f32>;
@group(0) @binding(5) var<storage, read_write> stats: array<f32>;
@group(0) @binding(6) var<storage, read_write> y: array<vec4<f32>>;

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
    let wl = workgroupUniformLoad(&wg_len);
    // This tile's tokens that some row of the workgroup sees, and those this row sees.
    let n = min(params.tile_len, select(0u, wl - params.tile_first, wl > params.tile_first));
    let mine = min(params.tile_len, select(0u, len - params.tile_first, len > params.tile_first));
    let base = row * params.n_k + params.tile_first;
    if (params.phase == 0u) {
        var m = -3.4e38;
        if (live && params.first == 0u) {
            m = stats[2u * row];
        }
        if (n > 0u) {
            var qr: array<vec4<f32>, MAX_D4>;
            for (var c = 0u; c < d4; c++) {
                if (live) {
                    qr[c] = q[row * d4 + c] * params.scale;
                } else {
                    qr[c] = vec4<f32>(0.0);
                }
            }
            for (var j = 0u; j < n; j++) {
                var s4 = vec4<f32>(0.0);
                for (var c = 0u; c < d4; c++) {
                    s4 += qr[c] * tile[j * d4 + c];
                }
                if (j < mine) {
                    let s = s4.x + s4.y + s4.z + s4.w;
                    e[base + j] = s;
                    m = max(m, s);
                }
            }
        }
        if (live) {
            stats[2u * row] = m;
        }
        return;
    }
    let m = select(0.0, stats[2u * row], live);
    var l = 0.0;
    var acc: array<vec4<f32>, MAX_D4>;
    for (var c = 0u; c < d4; c++) {
        if (live && params.first == 0u) {
            acc[c] = y[row * d4 + c];
        } else {
            acc[c] = vec4<f32>(0.0);
        }
    }
    if (live && params.first == 0u) {
        l = stats[2u * row + 1u];
    }
    for (var j = 0u; j < n; j++) {
        var w = 0.0;
        if (j < mine) {
            w = exp(e[base + j] - m);
            e[base + j] = w;
        }
        l += w;
        for (var c = 0u; c < d4; c++) {
            acc[c] += w * tile[j * d4 + c];
        }
    }
    if (!live) {
        return;
    }
    var inv = 1.0;
    if (params.last == 1u) {
        inv = select(0.0, 1.0 / l, l > 0.0);
        if (len == 0u) {
            stats[2u * row] = 0.0;
        }
    }
    for (var c = 0u; c < d4; c++) {
        y[row * d4 + c] = acc[c] * inv;
    }
    stats[2u * row + 1u] = l;
}
