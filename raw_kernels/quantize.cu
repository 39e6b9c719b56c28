// Quantize-and-pack of keys and values into the packed layout of oscar_cupy/layout.py.
// The CPU definition is oscar_cupy/quantized_kv.py (quantize_kv); every code, scale, zero and norm matches it.
//
// Layout of the work: a lane holds PER = 16 consecutive channels of a token row, a row spans ROW_LANES = HEAD_DIM / 16
// lanes and a warp holds ROWS = 32 / ROW_LANES rows at once. Sixteen consecutive channels are exactly one 2-bit key word
// (two 4-bit words), so keys pack in registers; value words (consecutive tokens of one channel) are gathered in
// registers over a warp's rows and merged across its row slots with shuffles. No shared memory holds codes.
//
// Inputs are (B, H, T, D) with any element strides for B, H and T, contiguous channels and rows aligned to 16
// elements (the launcher copies other layouts). Tokens at or beyond a sequence's length (lengths[b]) are padding: never
// read, code 0, scale 0, zero 0, norm 0. Refusals are reported in *refused: bit 0 (keys) or 1 (values) for a non-finite
// valid input element, bit 2 (keys) or 3 (values) for a group beyond the scale dtype's range.
#include "common.cuh"

#define PER 16
#define ROW_LANES (HEAD_DIM / PER)
#define ROWS (WARP / ROW_LANES)
#define THREADS 256
#define WARPS (THREADS / WARP)
#define WORDS_PER_ROW (HEAD_DIM / PER_WORD)
#define WORDS_PER_LANE (PER / PER_WORD)  // key words: 1 at 2 bits, 2 at 4 bits
#define SCALING_NONE 0
#define SCALING_L2 1
#define SCALING_L2_PER_HEAD 2

struct alignas(16) Vector16 { u32 word[4]; };

// the lane's PER channels of a row: widened to float32; `bad` turns NaN where an element is not finite
__device__ __forceinline__ void load_row(const in_t* __restrict__ row, float (&x)[PER], float& bad) {
    constexpr int vectors = PER * sizeof(in_t) / 16;
    alignas(16) in_t elements[PER];
#pragma unroll
    for (int i = 0; i < vectors; ++i)
        reinterpret_cast<Vector16*>(elements)[i] = reinterpret_cast<const Vector16*>(row)[i];
#pragma unroll
    for (int j = 0; j < PER; ++j) {
        x[j] = in_to_f32(elements[j]);
        bad = fmaf(x[j], 0.f, bad);  // inf * 0 and NaN * 0 are NaN
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

// min or max over the lanes of the same channels in the other row slots of the warp
__device__ __forceinline__ float across_rows_min(float value) {
#pragma unroll
    for (int offset = ROW_LANES; offset < WARP; offset *= 2)
        value = fminf(value, __shfl_xor_sync(0xffffffffu, value, offset));
    return value;
}
__device__ __forceinline__ float across_rows_max(float value) {
#pragma unroll
    for (int offset = ROW_LANES; offset < WARP; offset *= 2)
        value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
    return value;
}

// Keys. Grid (key groups of the capacity, B), min(heads, 8) warps; warp w quantizes heads w, w + warps, ... of one
// group of key_group tokens, ROWS tokens at a time. Per head: a first pass gathers per-channel min/max (and per-head
// norms), a second pass (reading the rows again, through L2) encodes and packs. With "l2" scaling a pass before both
// gathers each token's squares over all heads (of the keys as given: scaling.token_norms). Dynamic shared memory:
// l2: heads * key_group doubles, then key_group floats; l2_per_head: warps * key_group floats.
extern "C" __global__ void __launch_bounds__(THREADS, 3) quantize_keys(
    const in_t* __restrict__ keys, i64 stride_batch, i64 stride_head, i64 stride_token,
    const i64* __restrict__ lengths, int heads, int groups, int key_group, int rotate, int scaling,
    float hadamard_normalization, u32* __restrict__ codes_out, scale_t* __restrict__ scales_out,
    scale_t* __restrict__ zeros_out, float* __restrict__ norms_out, int* __restrict__ refused) {
    extern __shared__ double shared[];
    const int b = blockIdx.y, g = blockIdx.x;
    const int warps = blockDim.x / WARP, warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int slot = lane / ROW_LANES, row_lane = lane % ROW_LANES;  // row slot in the warp, lane within the row
    const int first = g * key_group;
    const int valid = max(0, min((int)lengths[b] - first, key_group));
    const i64 capacity = (i64)groups * key_group;
    const in_t* base = keys + b * stride_batch + first * stride_token + row_lane * PER;
    float bad = 0.f;
    bool in_range = true;

    double* squares = shared;  // l2: [heads][key_group]
    float* inverse_norms = reinterpret_cast<float*>(shared + (scaling == SCALING_L2 ? heads * key_group : 0));
    if (scaling == SCALING_L2_PER_HEAD) inverse_norms += warp * key_group;

    if (scaling == SCALING_L2) {
        for (int h = warp; h < heads; h += warps) {
            for (int t0 = 0; t0 < valid; t0 += ROWS) {  // norms are taken before the rotation (scaling.token_norms)
                const int t = t0 + slot;
                float x[PER] = {};
                if (t < valid) load_row(base + h * stride_head + t * stride_token, x, bad);
                const double sum = row_sum(t < valid ? row_squares(x) : 0.0, ROW_LANES);
                if (row_lane == 0 && t < valid) squares[h * key_group + t] = sum;
            }
        }
        __syncthreads();
        for (int t = threadIdx.x; t < key_group; t += blockDim.x) {
            double sum = 0.0;
            for (int h = 0; h < heads && t < valid; ++h) sum += squares[h * key_group + t];
            const float norm = norm_of(sum);
            inverse_norms[t] = 1.0f / norm;
            norms_out[b * capacity + first + t] = t < valid ? norm : 0.f;
        }
        __syncthreads();
    }

    for (int h = warp; h < heads; h += warps) {
        const in_t* head = base + h * stride_head;
        const i64 bh = (i64)b * heads + h;
        float minimum[PER], maximum[PER];
#pragma unroll
        for (int j = 0; j < PER; ++j) { minimum[j] = __int_as_float(0x7f800000); maximum[j] = -minimum[j]; }

        for (int t0 = 0; t0 < valid; t0 += ROWS) {  // pass 1: per-head norms and per-channel extremes
            const int t = t0 + slot;
            float x[PER] = {};
            if (t < valid) load_row(head + t * stride_token, x, bad);
            float inverse = 1.f;
            if (scaling == SCALING_L2) {
                inverse = t < valid ? inverse_norms[t] : 1.f;
            } else if (scaling == SCALING_L2_PER_HEAD) {  // before the rotation, as above
                const float norm = norm_of(row_sum(t < valid ? row_squares(x) : 0.0, ROW_LANES));
                inverse = 1.0f / norm;
                if (row_lane == 0 && t < valid) {
                    inverse_norms[t] = inverse;
                    norms_out[bh * capacity + first + t] = norm;
                }
            }
            if (rotate) fwht_row<HEAD_DIM, PER>(x, row_lane, hadamard_normalization);
            if (t < valid) {
#pragma unroll
                for (int j = 0; j < PER; ++j) {
                    const float value = scaling ? x[j] * inverse : x[j];
                    minimum[j] = fminf(minimum[j], value);
                    maximum[j] = fmaxf(maximum[j], value);
                }
            }
        }
        if (scaling == SCALING_L2_PER_HEAD && lane == 0)
            for (int t = valid; t < key_group; ++t) norms_out[bh * capacity + first + t] = 0.f;
        __syncwarp();

        float zero[PER], inverse_scale[PER];
        const i64 param = (bh * groups + g) * HEAD_DIM + row_lane * PER;
#pragma unroll
        for (int j = 0; j < PER; ++j) {
            minimum[j] = across_rows_min(minimum[j]);
            maximum[j] = across_rows_max(maximum[j]);
            in_range &= !(valid > 0 && out_of_range(minimum[j], maximum[j]));
            const GroupParams p = group_params(minimum[j], maximum[j], valid > 0);
            if (slot == j % ROWS) {  // the row slots share the writes
                scales_out[param + j] = p.scale;
                zeros_out[param + j] = p.zero;
            }
            zero[j] = p.zero_f32;
            inverse_scale[j] = p.inverse;
        }

        for (int t0 = 0; t0 < key_group; t0 += ROWS) {  // pass 2: encode and pack, one or two words per lane
            const int t = t0 + slot;
            float x[PER] = {};
            if (t < valid) load_row(head + t * stride_token, x, bad);
            if (rotate) fwht_row<HEAD_DIM, PER>(x, row_lane, hadamard_normalization);
            const float inverse = (scaling && t < valid) ? inverse_norms[t] : 1.f;
            u32 words[WORDS_PER_LANE];
#pragma unroll
            for (int w = 0; w < WORDS_PER_LANE; ++w) words[w] = 0;
            if (t < valid) {
#pragma unroll
                for (int j = 0; j < PER; ++j) {
                    const float value = scaling ? x[j] * inverse : x[j];
                    words[j / PER_WORD] |= encode(value, zero[j], inverse_scale[j]) << (BITS * slot_of(j % PER_WORD));
                }
            }
            if (t < key_group) {
                u32* out = codes_out + (bh * capacity + first + t) * WORDS_PER_ROW + row_lane * WORDS_PER_LANE;
#pragma unroll
                for (int w = 0; w < WORDS_PER_LANE; ++w) out[w] = words[w];
            }
        }
    }
    if (bad != 0.f) atomicOr(refused, 1);
    if (!in_range) atomicOr(refused, 4);
}

// Values. Grid (ceil(capacity / (WARPS * PER_WORD)), B * H); warp w quantizes the PER_WORD tokens of one word row of
// one (sequence, head), ROWS tokens at a time; a value group of value_group channels spans value_group / PER lanes of
// a row. Each lane gathers the bits of its 16 channels' words over the tokens of its row slot; the row slots' bits are
// then merged with shuffles and row slot 0 writes the 16 words.
extern "C" __global__ void __launch_bounds__(THREADS) quantize_values(
    const in_t* __restrict__ values, i64 stride_batch, i64 stride_head, i64 stride_token,
    const i64* __restrict__ lengths, int heads, int capacity, int value_group, int rotate,
    float hadamard_normalization, u32* __restrict__ codes_out, scale_t* __restrict__ scales_out,
    scale_t* __restrict__ zeros_out, int* __restrict__ refused) {
    const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int slot = lane / ROW_LANES, row_lane = lane % ROW_LANES;
    const int first = (blockIdx.x * WARPS + warp) * PER_WORD;  // this warp's first token
    if (first >= capacity) return;  // whole warps leave together
    const int length = (int)lengths[b];
    const int groups = HEAD_DIM / value_group, lanes_per_group = value_group / PER;
    const in_t* base = values + b * stride_batch + h * stride_head + row_lane * PER;
    float bad = 0.f;
    bool in_range = true;

    u32 words[PER];
#pragma unroll
    for (int j = 0; j < PER; ++j) words[j] = 0;
#pragma unroll
    for (int t0 = 0; t0 < PER_WORD; t0 += ROWS) {
        const int token = first + t0 + slot;
        const bool valid = token < length;
        float x[PER];
        if (valid) {
            load_row(base + token * stride_token, x, bad);
        } else {
#pragma unroll
            for (int j = 0; j < PER; ++j) x[j] = 0.f;
        }
        if (rotate) fwht_row<HEAD_DIM, PER>(x, row_lane, hadamard_normalization);
        float minimum = x[0], maximum = x[0];
#pragma unroll
        for (int j = 1; j < PER; ++j) { minimum = fminf(minimum, x[j]); maximum = fmaxf(maximum, x[j]); }
        for (int offset = 1; offset < lanes_per_group; offset *= 2) {
            minimum = fminf(minimum, __shfl_xor_sync(0xffffffffu, minimum, offset));
            maximum = fmaxf(maximum, __shfl_xor_sync(0xffffffffu, maximum, offset));
        }
        in_range &= !(valid && out_of_range(minimum, maximum));
        const GroupParams p = group_params(minimum, maximum, valid);
        if (row_lane % lanes_per_group == 0) {
            const i64 param = ((i64)bh * capacity + token) * groups + row_lane / lanes_per_group;
            scales_out[param] = p.scale;
            zeros_out[param] = p.zero;
        }
        if (valid) {
            const int shift = BITS * slot_of(t0 + slot);
#pragma unroll
            for (int j = 0; j < PER; ++j) words[j] |= encode(x[j], p.zero_f32, p.inverse) << shift;
        }
    }
#pragma unroll
    for (int j = 0; j < PER; ++j)
#pragma unroll
        for (int offset = ROW_LANES; offset < WARP; offset *= 2)
            words[j] |= __shfl_xor_sync(0xffffffffu, words[j], offset);
    if (slot == 0) {
        Vector16* out = reinterpret_cast<Vector16*>(
            codes_out + ((i64)bh * (capacity / PER_WORD) + first / PER_WORD) * HEAD_DIM + row_lane * PER);
#pragma unroll
        for (int i = 0; i < PER / 4; ++i) out[i] = reinterpret_cast<const Vector16*>(words)[i];
    }
    if (bad != 0.f) atomicOr(refused, 2);
    if (!in_range) atomicOr(refused, 8);
}
