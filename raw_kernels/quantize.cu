// Quantize-and-pack of keys and values into the packed layout of oscar_cupy/layout.py, in one pass over the input.
// The CPU definition is oscar_cupy/quantized_kv.py (quantize_kv); every code, scale, zero and norm matches it.
//
// Inputs are (B, H, T, D) with any element strides for B, H and T and contiguous channels. Tokens at or beyond a
// sequence's length (lengths[b]) are padding: never read, code 0, scale 0, zero 0, norm 0. Refusals are reported in
// *refused: bit 0 (keys) or 1 (values) for a non-finite valid input element, bit 2 (keys) or 3 (values) for a group
// beyond the scale dtype's range.
#include "common.cuh"

#define PER (HEAD_DIM / WARP)  // channels per lane: a warp holds one token row
#define THREADS 256
#define WARPS (THREADS / WARP)
#define WORDS_PER_ROW (HEAD_DIM / PER_WORD)
#define SCALING_NONE 0
#define SCALING_L2 1
#define SCALING_L2_PER_HEAD 2

__device__ __forceinline__ void load_row(const in_t* base, int lane, float (&x)[PER], bool& finite) {
    const in_t* row = base + lane * PER;
#pragma unroll
    for (int j = 0; j < PER; ++j) {
        x[j] = in_to_f32(row[j]);
        finite &= isfinite(x[j]);
    }
}

__device__ __forceinline__ double row_squares(const float (&x)[PER]) {
    double sum = 0.0;
#pragma unroll
    for (int j = 0; j < PER; ++j) sum += (double)x[j] * (double)x[j];
    return sum;
}

// scaling.token_norms: sqrt of the float64 sum of squares, rounded once to float32; a zero norm becomes 1
__device__ __forceinline__ float norm_of(double squares) {
    const float norm = (float)sqrt(squares);
    return norm == 0.f ? 1.f : norm;
}

// Keys. Grid (key groups of the capacity, B); one block loops over the KV heads of its group of key_group tokens.
// Dynamic shared memory: key_group * (HEAD_DIM + 1) floats, key_group * HEAD_DIM codes, key_group norm inverses.
extern "C" __global__ void __launch_bounds__(THREADS, 1) quantize_keys(
    const in_t* __restrict__ keys, i64 stride_batch, i64 stride_head, i64 stride_token,
    const i64* __restrict__ lengths, int heads, int groups, int key_group, int rotate, int scaling, float hadamard_normalization,
    u32* __restrict__ codes_out, scale_t* __restrict__ scales_out, scale_t* __restrict__ zeros_out,
    float* __restrict__ norms_out, int* __restrict__ refused) {
    extern __shared__ float shared[];
    const int row_pitch = HEAD_DIM + 1;  // one float of padding: the per-channel column reads stay conflict-free
    float* tile = shared;
    float* inverse_norms = tile + key_group * row_pitch;
    u8* codes = reinterpret_cast<u8*>(inverse_norms + key_group);

    const int b = blockIdx.y, g = blockIdx.x;
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int first = g * key_group;
    const int valid = max(0, min((int)lengths[b] - first, key_group));
    const i64 capacity = (i64)groups * key_group;
    bool finite = true, in_range = true;

    if (scaling == SCALING_L2) {  // one norm per token over all KV heads
        for (int t = warp; t < key_group; t += WARPS) {
            double squares = 0.0;
            if (t < valid) {
                for (int h = 0; h < heads; ++h) {
                    float x[PER];
                    load_row(keys + b * stride_batch + h * stride_head + (first + t) * stride_token, lane, x, finite);
                    if (rotate) fwht_row<HEAD_DIM, PER>(x, lane, hadamard_normalization);
                    squares += row_squares(x);
                }
            }
            squares = warp_sum(squares);
            const float norm = norm_of(squares);
            if (lane == 0) {
                inverse_norms[t] = 1.0f / norm;
                norms_out[(i64)b * capacity + first + t] = t < valid ? norm : 0.f;
            }
        }
    }

    for (int h = 0; h < heads; ++h) {
        const i64 bh = (i64)b * heads + h;
        __syncthreads();  // the previous head is done with the tile and the codes
        for (int t = warp; t < valid; t += WARPS) {
            float x[PER];
            load_row(keys + b * stride_batch + h * stride_head + (first + t) * stride_token, lane, x, finite);
            if (rotate) fwht_row<HEAD_DIM, PER>(x, lane, hadamard_normalization);
            float inverse = 1.f;
            if (scaling == SCALING_L2) {
                inverse = inverse_norms[t];
            } else if (scaling == SCALING_L2_PER_HEAD) {
                const float norm = norm_of(warp_sum(row_squares(x)));
                inverse = 1.0f / norm;
                if (lane == 0) norms_out[bh * capacity + first + t] = norm;
            }
#pragma unroll
            for (int j = 0; j < PER; ++j) tile[t * row_pitch + lane * PER + j] = scaling ? x[j] * inverse : x[j];
        }
        if (scaling == SCALING_L2_PER_HEAD && lane == 0)
            for (int t = warp; t < key_group; t += WARPS)
                if (t >= valid) norms_out[bh * capacity + first + t] = 0.f;
        __syncthreads();

        // one thread per channel: min/max over the group's valid tokens, parameters, codes
        for (int c = threadIdx.x; c < HEAD_DIM; c += THREADS) {
            float minimum = __int_as_float(0x7f800000), maximum = -minimum;
            for (int t = 0; t < valid; ++t) {
                const float value = tile[t * row_pitch + c];
                minimum = fminf(minimum, value);
                maximum = fmaxf(maximum, value);
            }
            in_range &= !(valid > 0 && out_of_range(minimum, maximum));
            const GroupParams p = group_params(minimum, maximum, valid > 0);
            const i64 param = (bh * groups + g) * HEAD_DIM + c;
            scales_out[param] = p.scale;
            zeros_out[param] = p.zero;
            for (int t = 0; t < key_group; ++t)
                codes[t * HEAD_DIM + c] = t < valid ? (u8)encode(tile[t * row_pitch + c], p.zero_f32, p.inverse) : 0;
        }
        __syncthreads();

        // one thread per packed word: PER_WORD consecutive channels of one token
        for (int i = threadIdx.x; i < key_group * WORDS_PER_ROW; i += THREADS) {
            const int t = i / WORDS_PER_ROW, w = i % WORDS_PER_ROW;
            const u8* run = codes + t * HEAD_DIM + w * PER_WORD;
            u32 word = 0;
#pragma unroll
            for (int e = 0; e < PER_WORD; ++e) word |= (u32)run[e] << (BITS * slot_of(e));
            codes_out[(bh * capacity + first + t) * WORDS_PER_ROW + w] = word;
        }
    }
    if (!finite) atomicOr(refused, 1);
    if (!in_range) atomicOr(refused, 4);
}

// Values. Grid (capacity / 32, B * H); one block quantizes 32 tokens of one (sequence, head), a warp per token row;
// a value group of value_group channels spans value_group / PER lanes. Static shared memory: the tile's codes.
#define VALUE_TILE 32
extern "C" __global__ void __launch_bounds__(THREADS) quantize_values(
    const in_t* __restrict__ values, i64 stride_batch, i64 stride_head, i64 stride_token,
    const i64* __restrict__ lengths, int heads, int capacity, int value_group, int rotate, float hadamard_normalization,
    u32* __restrict__ codes_out, scale_t* __restrict__ scales_out, scale_t* __restrict__ zeros_out,
    int* __restrict__ refused) {
    __shared__ u8 codes[VALUE_TILE * HEAD_DIM];
    const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int first = blockIdx.x * VALUE_TILE;
    const int length = (int)lengths[b];
    const int groups = HEAD_DIM / value_group, lanes_per_group = value_group / PER;
    bool finite = true, in_range = true;

    for (int t = warp; t < VALUE_TILE; t += WARPS) {
        const int token = first + t;
        const bool valid = token < length;
        float x[PER];
        if (valid) {
            load_row(values + b * stride_batch + h * stride_head + token * stride_token, lane, x, finite);
            if (rotate) fwht_row<HEAD_DIM, PER>(x, lane, hadamard_normalization);
        } else {
#pragma unroll
            for (int j = 0; j < PER; ++j) x[j] = 0.f;
        }
        float minimum = x[0], maximum = x[0];
#pragma unroll
        for (int j = 1; j < PER; ++j) { minimum = fminf(minimum, x[j]); maximum = fmaxf(maximum, x[j]); }
        for (int offset = 1; offset < lanes_per_group; offset *= 2) {
            minimum = fminf(minimum, __shfl_xor_sync(0xffffffffu, minimum, offset));
            maximum = fmaxf(maximum, __shfl_xor_sync(0xffffffffu, maximum, offset));
        }
        in_range &= !(valid && out_of_range(minimum, maximum));
        const GroupParams p = group_params(minimum, maximum, valid);
        if (lane % lanes_per_group == 0) {
            const i64 param = ((i64)bh * capacity + token) * groups + lane / lanes_per_group;
            scales_out[param] = p.scale;
            zeros_out[param] = p.zero;
        }
#pragma unroll
        for (int j = 0; j < PER; ++j)
            codes[t * HEAD_DIM + lane * PER + j] = valid ? (u8)encode(x[j], p.zero_f32, p.inverse) : 0;
    }
    __syncthreads();

    // one thread per packed word: PER_WORD consecutive tokens of one channel
    for (int i = threadIdx.x; i < (VALUE_TILE / PER_WORD) * HEAD_DIM; i += THREADS) {
        const int r = i / HEAD_DIM, c = i % HEAD_DIM;
        u32 word = 0;
#pragma unroll
        for (int e = 0; e < PER_WORD; ++e) word |= (u32)codes[(r * PER_WORD + e) * HEAD_DIM + c] << (BITS * slot_of(e));
        codes_out[((i64)bh * (capacity / PER_WORD) + first / PER_WORD + r) * HEAD_DIM + c] = word;
    }
    if (!finite) atomicOr(refused, 2);
    if (!in_range) atomicOr(refused, 8);
}
