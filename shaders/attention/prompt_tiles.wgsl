// Gather one region's plain (f32 or f16) keys and values into 64 KiB tiles for prompt_rows.wgsl:
// per (KV head, tile of `tile` tokens) one K block and one V block of 4096 vec4 words, so the
// attention kernel binds each as a uniform buffer (a range of this scratch, aligned to 64 KiB;
// the pages' head offsets live on the GPU only). A word copy, no decoding.

struct Params {
    n_kv: u32,       // KV heads
    n_tiles: u32,    // tiles per head in this region
    tile: u32,       // tokens per tile
    k_words: u32,    // words per key (a multiple of 4)
    v_words: u32,    // words per value (a multiple of 4)
    skip: u32,       // tokens at the start of every head that this region leaves out
    block_base: u32, // this region's first block in `tiles`
    _pad: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
// (first page index, length) per KV head.
@group(0) @binding(1) var<storage, read> heads: array<u32>;
@group(0) @binding(2) var<storage, read> k_page: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> v_page: array<vec4<u32>>;
// Block 2·b: keys of block b = head·n_tiles + tile; block 2·b + 1: its values.
@group(0) @binding(4) var<storage, read_write> tiles: array<vec4<u32>>;

const BLOCK: u32 = 4096u;

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) lid: u32,
        @builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = (wid.x + wid.y * nwg.x) * 256u + lid;
    let block = e / BLOCK;
    if (block >= params.n_kv * params.n_tiles) {
        return;
    }
    let w4 = e % BLOCK;
    let h = block / params.n_tiles;
    let tile = block % params.n_tiles;
    let first = heads[2u * h];
    let len = heads[2u * h + 1u];
    let t0 = params.skip + tile * params.tile;
    let out = (params.block_base + 2u * block) * BLOCK + w4;
    let jk = 4u * w4 / params.k_words;
    if (jk < params.tile && t0 + jk < len) {
        tiles[out] = k_page[((first + t0 + jk) * params.k_words + 4u * w4 % params.k_words) / 4u];
    }
    let jv = 4u * w4 / params.v_words;
    if (jv < params.tile && t0 + jv < len) {
        tiles[out + BLOCK] = v_page[((first + t0 + jv) * params.v_words + 4u * w4 % params.v_words) / 4u];
    }
}
