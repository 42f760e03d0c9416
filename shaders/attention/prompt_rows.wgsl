// Prompt-chunk attention for CPU adapters over plain f32/f16 keys and values, optional per-key
// bias (Attention Matching's β). One invocation per query row (query position, query head of
// one KV head's group); the KV head's keys and values of one tile of tokens are bound as uniform
// buffers (prompt_tiles.wgsl gathers them). On drivers that run invocations as SIMD lanes of a
// CPU (lavapipe, llvmpipe, SwiftShader) a storage or workgroup load is a per-lane gather, while a
// uniform read at a workgroup-uniform index is a broadcast, and private arrays are registers or
// the stack: every token is read once per workgroup and meets WG queries. Loop bounds are
// workgroup-uniform (the last row's causal limit); each row masks the tokens past its own.
// Writes split-K partials (m, l, acc[D], acc_qjl[D] = 0) with split = tile, like decode.wgsl;
// combine.wgsl merges them.

#include "common/window.wgsl"

override D: u32 = 64u;
override K_F16: bool = false;
override V_F16: bool = false;
override HAS_BIAS: bool = false;
override WG: u32 = 64u;

// Tokens scored between two rescales of the accumulator (online softmax by chunks).
const CHUNK: u32 = 8u;
const NEG_BIG: f32 = -3.0e38;

struct Params {
    n_q: u32,          // query positions (the last n_q tokens of each head)
    n_heads: u32,      // query heads
    group: u32,        // query heads per KV head
    head: u32,         // this dispatch's KV head
    tile: u32,         // this dispatch's tile (its split within the region)
    tile_len: u32,     // tokens per tile
    total_len: u32,    // 0: main region; else queries sit at total_len − n_q + qi (prefix region)
    skip: u32,         // tokens at the start of every head that this region leaves out
    split_base: u32,   // this region's first split slot in `partials`
    split_stride: u32, // split slots per (position, head) in `partials`
    recent: u32,       // recent_mode 1: the query's last `recent` positions are left out
    recent_mode: u32,  // 0 all visible tokens; 1 all but the last `recent`
    scale: f32,        // softmax scale, 1/√d
    appended: u32,     // 0, or tokens appended since a load: the window holds no earlier ones
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
// The tile's keys and values: token tt at words tt·k_words .. (f16: two per word).
@group(0) @binding(2) var<uniform> kt: array<vec4<u32>, 4096>;
@group(0) @binding(3) var<uniform> vt: array<vec4<u32>, 4096>;
@group(0) @binding(4) var<storage, read> heads: array<u32>;
// HAS_BIAS: β per page index.
@group(0) @binding(5) var<storage, read> bias: array<f32>;
@group(0) @binding(6) var<storage, read_write> partials: array<f32>;

// The row's query (·scale) and value accumulator, four coordinates to a vec4 (D ≤ 128).
var<private> qp: array<vec4<f32>, 32>;
var<private> acc: array<vec4<f32>, 32>;

// End (exclusive) of the tokens that query position qi sees in this region: causal, and before
// its window of recent tokens when there is one.
fn limit_of(qi: u32, len: u32) -> u32 {
    let own = select(len, params.total_len, params.total_len > 0u) + qi + 1u;
    let visible = min(len, select(0u, own - params.n_q, own >= params.n_q));
    if (params.recent_mode == 1u) {
        let w = window_len(params.recent, params.appended, params.n_q, qi);
        return select(0u, visible - w, visible >= w);
    }
    return visible;
}

fn key_dot(tt: u32) -> f32 {
    var s = 0.0;
    if (K_F16) {
        let base = tt * (D / 8u);
        for (var j8 = 0u; j8 < D / 8u; j8++) {
            let w = kt[base + j8];
            s += dot(qp[2u * j8], vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y)));
            s += dot(qp[2u * j8 + 1u], vec4<f32>(unpack2x16float(w.z), unpack2x16float(w.w)));
        }
    } else {
        let base = tt * (D / 4u);
        for (var j4 = 0u; j4 < D / 4u; j4++) {
            s += dot(qp[j4], bitcast<vec4<f32>>(kt[base + j4]));
        }
    }
    return s;
}

fn add_value(tt: u32, p: f32) {
    if (V_F16) {
        let base = tt * (D / 8u);
        for (var j8 = 0u; j8 < D / 8u; j8++) {
            let w = vt[base + j8];
            acc[2u * j8] += p * vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y));
            acc[2u * j8 + 1u] += p * vec4<f32>(unpack2x16float(w.z), unpack2x16float(w.w));
        }
    } else {
        let base = tt * (D / 4u);
        for (var j4 = 0u; j4 < D / 4u; j4++) {
            acc[j4] += p * bitcast<vec4<f32>>(vt[base + j4]);
        }
    }
}

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32,
        @builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>) {
    let rows = params.n_q * params.group;
    let row0 = (wid.x + wid.y * nwg.x) * WG;
    if (row0 >= rows) {
        return;
    }
    let row = row0 + lid;
    // Rows past the end compute the last row's attention and write nothing.
    let r = min(row, rows - 1u);
    let qi = r / params.group;
    let hq = params.head * params.group + r % params.group;
    let first = heads[2u * params.head];
    let len = heads[2u * params.head + 1u];
    // Workgroup-uniform bounds: the tile, up to the limit of the workgroup's last position.
    let t0 = params.skip + params.tile * params.tile_len;
    let last_qi = (min(row0 + WG, rows) - 1u) / params.group;
    let t1 = min(t0 + params.tile_len, limit_of(last_qi, len));
    let end = min(limit_of(qi, len), t1);

    let qbase = (qi * params.n_heads + hq) * D;
    for (var j4 = 0u; j4 < D / 4u; j4++) {
        qp[j4] = vec4<f32>(q[qbase + 4u * j4], q[qbase + 4u * j4 + 1u], q[qbase + 4u * j4 + 2u],
                           q[qbase + 4u * j4 + 3u]) * params.scale;
        acc[j4] = vec4<f32>(0.0);
    }
    var m = NEG_BIG;
    var l = 0.0;
    for (var base = t0; base < t1; base += CHUNK) {
        var s: array<f32, CHUNK>;
        var cmax = NEG_BIG;
        for (var c = 0u; c < CHUNK; c++) {
            // Clamped to the tile's last token: the index stays uniform and in range.
            let t = min(base + c, t1 - 1u);
            var sc = key_dot(t - t0);
            if (HAS_BIAS) {
                sc += bias[first + t];
            }
            sc = select(NEG_BIG, sc, base + c < end);
            s[c] = sc;
            cmax = max(cmax, sc);
        }
        let m_new = max(m, cmax);
        let alpha = exp(m - m_new);
        m = m_new;
        l *= alpha;
        for (var j4 = 0u; j4 < D / 4u; j4++) {
            acc[j4] *= alpha;
        }
        for (var c = 0u; c < CHUNK; c++) {
            let t = min(base + c, t1 - 1u);
            let p = select(0.0, exp(s[c] - m), base + c < end);
            l += p;
            add_value(t - t0, p);
        }
    }
    if (row >= rows) {
        return;
    }
    let out = ((qi * params.n_heads + hq) * params.split_stride + params.split_base + params.tile) * (2u + 2u * D);
    partials[out] = m;
    partials[out + 1u] = l;
    for (var j4 = 0u; j4 < D / 4u; j4++) {
        let a = acc[j4];
        partials[out + 2u + 4u * j4] = a.x;
        partials[out + 3u + 4u * j4] = a.y;
        partials[out + 4u + 4u * j4] = a.z;
        partials[out + 5u + 4u * j4] = a.w;
    }
    for (var j = 0u; j < D; j++) {
        partials[out + 2u + D + j] = 0.0;
    }
}
