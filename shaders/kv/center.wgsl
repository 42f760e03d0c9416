// Key centering: keys are stored as k − μ, μ the per-channel mean of a KV head's first keys past
// the attention sinks. Exact for attention: a softmax ignores ⟨q, μ⟩ added to every score, and
// attention adds it back where centered and uncentered regions share one softmax.
// MEAN: μ[g] = mean over tokens first..n of xs[t·width + g] (one invocation per channel g);
// otherwise out[t·width + g] = xs[t·width + g] − μ[g] for every token t < n.

struct Params {
    n: u32,     // tokens in xs
    first: u32, // MEAN: first token averaged
    width: u32, // floats per token (KV heads × head_dim)
    _pad: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> xs: array<f32>;
@group(0) @binding(2) var<storage, read_write> mean: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

override MEAN: bool = false;
override WG: u32 = 64u;

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32,
        @builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (MEAN) {
        if (i < params.width && params.n > params.first) {
            var acc = 0.0;
            for (var t = params.first; t < params.n; t++) {
                acc += xs[t * params.width + i];
            }
            mean[i] = acc / f32(params.n - params.first);
        }
    } else if (i < params.n * params.width) {
        out[i] = xs[i] - mean[i % params.width];
    }
}
