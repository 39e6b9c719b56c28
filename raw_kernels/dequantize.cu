// Dequantization of the packed layout back to the caller's basis: the CPU definition is dequantize_kv in
// oscar_cupy/quantized_kv.py (decode, times the token norm, inverse rotation, zeros beyond each length, one rounding to
// the output dtype). For tests, debugging and evaluation only: attention reads the packed cache directly.
#include "common.cuh"

#define PER (HEAD_DIM / WARP)  // channels per lane: a warp writes one token row
#define THREADS 256
#define WARPS (THREADS / WARP)
#define WORDS_PER_ROW (HEAD_DIM / PER_WORD)

// Grid (ceil(tokens / WARPS), B * H). norms: (B, norm_heads, capacity) or null. out: contiguous (B, H, tokens, D).
extern "C" __global__ void __launch_bounds__(THREADS) dequantize_keys(
    const u32* __restrict__ codes, const scale_t* __restrict__ scales, const scale_t* __restrict__ zeros,
    const float* __restrict__ norms, int norm_heads, const i64* __restrict__ lengths, int heads, int capacity,
    int tokens, int key_group, int rotate, float hadamard_normalization, in_t* __restrict__ out) {
    const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
    const int lane = threadIdx.x % WARP;
    const int t = blockIdx.x * WARPS + threadIdx.x / WARP;
    if (t >= tokens) return;  // whole warps leave together
    const int c0 = lane * PER;
    const u32 word = codes[((i64)bh * capacity + t) * WORDS_PER_ROW + c0 / PER_WORD];
    const i64 param = ((i64)bh * (capacity / key_group) + t / key_group) * HEAD_DIM + c0;
    float x[PER];
#pragma unroll
    for (int j = 0; j < PER; ++j) {
        const u32 code = (word >> (BITS * slot_of((c0 + j) % PER_WORD))) & LEVELS;
        x[j] = decode(code, scale_to_f32(scales[param + j]), scale_to_f32(zeros[param + j]));
    }
    if (norms != nullptr) {
        const float norm = norms[((i64)b * norm_heads + (norm_heads == 1 ? 0 : h)) * capacity + t];
#pragma unroll
        for (int j = 0; j < PER; ++j) x[j] = x[j] * norm;
    }
    if (rotate) fwht_row<HEAD_DIM, PER>(x, lane, hadamard_normalization);
    const bool valid = t < lengths[b];
#pragma unroll
    for (int j = 0; j < PER; ++j) out[((i64)bh * tokens + t) * HEAD_DIM + c0 + j] = f32_to_in(valid ? x[j] : 0.f);
}

// Grid (ceil(tokens / WARPS), B * H). out: contiguous (B, H, tokens, D).
extern "C" __global__ void __launch_bounds__(THREADS) dequantize_values(
    const u32* __restrict__ codes, const scale_t* __restrict__ scales, const scale_t* __restrict__ zeros,
    const i64* __restrict__ lengths, int heads, int capacity, int tokens, int value_group, int rotate,
    float hadamard_normalization, in_t* __restrict__ out) {
    const int bh = blockIdx.y, b = bh / heads;
    const int lane = threadIdx.x % WARP;
    const int t = blockIdx.x * WARPS + threadIdx.x / WARP;
    if (t >= tokens) return;
    const int c0 = lane * PER;
    const int shift = BITS * slot_of(t % PER_WORD);
    const i64 param = ((i64)bh * capacity + t) * (HEAD_DIM / value_group) + c0 / value_group;
    const float scale = scale_to_f32(scales[param]), zero = scale_to_f32(zeros[param]);  // PER <= value_group
    float x[PER];
#pragma unroll
    for (int j = 0; j < PER; ++j) {
        const u32 word = codes[((i64)bh * (capacity / PER_WORD) + t / PER_WORD) * HEAD_DIM + c0 + j];
        x[j] = decode((word >> shift) & LEVELS, scale, zero);
    }
    if (rotate) fwht_row<HEAD_DIM, PER>(x, lane, hadamard_normalization);
    const bool valid = t < lengths[b];
#pragma unroll
    for (int j = 0; j < PER; ++j) out[((i64)bh * tokens + t) * HEAD_DIM + c0 + j] = f32_to_in(valid ? x[j] : 0.f);
}
