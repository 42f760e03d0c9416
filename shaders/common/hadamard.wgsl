// Workgroup scratch and the normalized Walsh–Hadamard transform, written once.
// TurboQuant's rotation is y = H·D·x (H normalized, symmetric, its own inverse).

var<workgroup> tw: array<f32, 256>;
var<workgroup> tr: array<f32, 256>;

// In-place normalized WHT of each block of `n` consecutive entries of tw[0..total).
// n is a power of two dividing total; every invocation of the workgroup must call it.
fn wht_blocks(lid: u32, wg: u32, n: u32, total: u32) {
    workgroupBarrier();
    var h = 1u;
    loop {
        if (h >= n) {
            break;
        }
        for (var i = lid; i < total / 2u; i += wg) {
            let a = (i / h) * 2u * h + (i % h);
            let x = tw[a];
            let y = tw[a + h];
            tw[a] = x + y;
            tw[a + h] = x - y;
        }
        workgroupBarrier();
        h = h * 2u;
    }
    let norm = inverseSqrt(f32(n));
    for (var i = lid; i < total; i += wg) {
        tw[i] = tw[i] * norm;
    }
    workgroupBarrier();
}

// Sum of `v` over the workgroup (wg a power of two). Every invocation must call it.
fn wg_sum(v: f32, lid: u32, wg: u32) -> f32 {
    workgroupBarrier();
    tr[lid] = v;
    workgroupBarrier();
    var h = wg / 2u;
    loop {
        if (h == 0u) {
            break;
        }
        if (lid < h) {
            tr[lid] = tr[lid] + tr[lid + h];
        }
        workgroupBarrier();
        h = h / 2u;
    }
    let s = tr[0];
    workgroupBarrier();
    return s;
}

// Maximum of `v` over the workgroup (wg a power of two). Every invocation must call it.
fn wg_max(v: f32, lid: u32, wg: u32) -> f32 {
    workgroupBarrier();
    tr[lid] = v;
    workgroupBarrier();
    var h = wg / 2u;
    loop {
        if (h == 0u) {
            break;
        }
        if (lid < h) {
            tr[lid] = max(tr[lid], tr[lid + h]);
        }
        workgroupBarrier();
        h = h / 2u;
    }
    let s = tr[0];
    workgroupBarrier();
    return s;
}
