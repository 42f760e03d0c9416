// The window of recent tokens shared by the attention kernels.

// How many of its last positions query qi (of n_q) reads from the window of `recent`: all
// `recent`, unless the cache was loaded (a compacted context, all in the pages) and `appended`
// tokens came since: then only those up to the query's own are in the window.
fn window_len(recent: u32, appended: u32, n_q: u32, qi: u32) -> u32 {
    if (appended == 0u) {
        return recent;
    }
    return min(recent, appended + qi + 1u - n_q);
}
