// Appending tokens to the full-precision window of the cache (oscar_cupy/cache.py, LayerCache.append on a GPU): each
// sequence's new tokens go after its own window tokens, at positions read on the device, so that a decode step captured
// in a CUDA graph appends where each replay finds the window (not where the capture found it). A plain copy of the
// caller's elements (IN_DTYPE), keys and values alike.
#include "common.cuh"

#define THREADS 256

// Grid ceil(elements / THREADS), elements = batch * heads * count * head_dim. Element (b, h, t, d) of the new tokens,
// read through the sources' element strides (channels contiguous), goes to [b, h, window_lengths[b] + t, d] of the
// window buffers (batch, heads, capacity, head_dim), contiguous. window_lengths is int64 (batch,), before the append.
extern "C" __global__ void __launch_bounds__(THREADS) window_append(
    const in_t* k, i64 k_batch, i64 k_head, i64 k_token, const in_t* v, i64 v_batch, i64 v_head, i64 v_token,
    const i64* window_lengths, in_t* window_k, in_t* window_v, int heads, int count, int head_dim, int capacity,
    i64 elements) {
    const i64 i = (i64)blockIdx.x * THREADS + threadIdx.x;
    if (i >= elements) return;
    const int d = (int)(i % head_dim);
    const i64 token_row = i / head_dim;
    const int t = (int)(token_row % count);
    const int h = (int)(token_row / count % heads);
    const i64 b = token_row / count / heads;
    const i64 at = ((b * heads + h) * capacity + window_lengths[b] + t) * head_dim + d;
    window_k[at] = k[b * k_batch + h * k_head + t * k_token + d];
    window_v[at] = v[b * v_batch + h * v_head + t * v_token + d];
}
