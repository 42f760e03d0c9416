// Rotary position embedding (Su et al. 2021, RoFormer), in place on [n_tok][n_heads][head_dim],
// on ADJACENT pairs (x[2i], x[2i+1]) as llama.cpp's GGUF layout wants:
//   θ = (pos0 + t) · base^(−2i/head_dim),  (x0, x1) ← (x0·cosθ − x1·sinθ, x0·sinθ + x1·cosθ).
// The frequencies come from the CPU (exact, and any scaling scheme fits); the angle is reduced to
// [−π, π] here in two steps (Cody–Waite), since GPU sin/cos are only accurate there.

struct Params {
    n_tok: u32,
    n_heads: u32,
    head_dim: u32,
    pos0: u32,
    // base^(−2i/head_dim) for i < head_dim / 2, four per vector.
    inv_freq: array<vec4<f32>, 32>,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;

override WG: u32 = 256u;

// 2π = TWO_PI_HI + TWO_PI_LO, TWO_PI_HI with 9 significant bits so k · TWO_PI_HI is exact.
const TWO_PI_HI: f32 = 6.28125;
const TWO_PI_LO: f32 = 0.0019353071795864769;
const INV_TWO_PI: f32 = 0.15915494309189535;

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32,
        @builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>) {
    let p = (wid.x + wid.y * nwg.x) * WG + lid;
    let half_dim = params.head_dim / 2u;
    let per_tok = params.n_heads * half_dim;
    if (p >= params.n_tok * per_tok) {
        return;
    }
    let t = p / per_tok;
    let i = p % half_dim;
    let theta = f32(params.pos0 + t) * params.inv_freq[i / 4u][i % 4u];
    let k = round(theta * INV_TWO_PI);
    let a = (theta - k * TWO_PI_HI) - k * TWO_PI_LO;
    let c = cos(a);
    let s = sin(a);
    let j = 2u * p;
    let x0 = x[j];
    let x1 = x[j + 1u];
    x[j] = x0 * c - x1 * s;
    x[j + 1u] = x0 * s + x1 * c;
}
