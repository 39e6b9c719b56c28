// Quantize-and-pack of keys and values into the packed layout of oscar_cupy/layout.py.
// The CPU definition is oscar_cupy/quantized_kv.py (quantize_kv); every code, scale, zero and norm matches it.
//
// Both kernels read each input row from memory once and rotate it once, holding the rotated rows in registers from
// the statistics to the encoding, and compute each group's parameters once (bench/results/quantize_profile.md).
//
// Keys: a block quantizes one key group (key_group tokens) of one sequence, all heads. With "l2" token scaling a
// first phase reads every head's rows, sums their squares into per-token norms and keeps the raw rows in shared memory
// (the "stash", when it fits; otherwise the second phase reads them again, from L2). The second phase takes the heads
// a round at a time: a lane holds KEY_PER = 16 channels of KEY_LANE_ROWS rows (a warp holds KEY_WARP_ROWS rows,
// key_group / that many warps hold a head's group), rotates and scales them, and leaves per-channel partial extremes
// in shared memory; one thread per (head, channel) reduces them and computes the group's scale and zero; the lanes then
// encode their rows from registers. Sixteen consecutive channels are exactly one 2-bit key word (two 4-bit words), so
// keys pack in registers.
//
// Values: a lane holds VAL_PER channels (16 or 32: half of or a whole value group of 32) of one token; each row slot of
// a warp walks the PER_WORD tokens of one value word row, so a lane gathers whole words (one per channel) in registers
// and no shuffles merge them.
//
// Codes are packed by adding biased codes (the float bits that the rounding leaves) at their slots and subtracting the
// biases once per word: one integer instruction per code (biased_code, word_bias).
//
// Compile-time parameters besides those of common.cuh: KEY_LANE_ROWS and VAL_PER, the lane geometry, chosen by
// oscar_cupy/quantize_launch.py (which launches the kernels for it).
//
// Inputs are (B, H, T, D) with any element strides for B, H and T, contiguous channels and rows aligned to 16
// elements (the launcher copies other layouts). Tokens at or beyond a sequence's length (lengths[b]) are padding: never
// read, code 0, scale 0, zero 0, norm 0. Refusals are reported in *refused: bit 0 (keys) or 1 (values) for a non-finite
// valid input element, bit 2 (keys) or 3 (values) for a group beyond the scale dtype's range, bit 4 for a token norm
// beyond float32's range, bit 5 (keys) or 6 (values) for a group spanning more than float32's range.
#include "common.cuh"

#define SCALING_NONE 0
#define SCALING_L2 1
#define SCALING_L2_PER_HEAD 2

#define KEY_PER 16                                  // channels per lane
#define KEY_ROW_LANES (HEAD_DIM / KEY_PER)          // lanes per row
#define KEY_ROWS (WARP / KEY_ROW_LANES)             // row slots per warp
#define KEY_WARP_ROWS (KEY_ROWS * KEY_LANE_ROWS)    // rows a warp holds (KEY_LANE_ROWS: rows a lane holds at once)
#define KEY_BATCH 4                                 // rows per lane whose loads phase 1 issues together
#define KEY_WORDS_PER_ROW (HEAD_DIM / PER_WORD)
// per-channel floats in shared memory (partial extremes, group parameters): channel c of a row at SPREAD(c), four
// floats of padding after every 32 channels, so that a lane's 16 channels are one aligned stretch of 16-byte quads and
// the 8 lanes of a quarter warp reach 8 different bank groups (and 32 consecutive channels 32 different banks)
#define SPREAD_DIM (HEAD_DIM + HEAD_DIM / 8)
#define SPREAD(c) ((c) + (c) / 32 * 4)
#define KEY_WORDS_PER_LANE (KEY_PER / PER_WORD)     // 1 at 2 bits, 2 at 4 bits

#define VAL_ROW_LANES (HEAD_DIM / VAL_PER)              // lanes per row (VAL_PER: channels per lane)
#define VAL_ROWS (WARP / VAL_ROW_LANES)             // row slots per warp, one value word row each
#define VAL_THREADS 128
#define VAL_WARPS (VAL_THREADS / WARP)

static_assert(KEY_LANE_ROWS >= 1 && KEY_WARP_ROWS <= 32, "a warp holds at most the 32 rows of the smallest key group");
static_assert((VAL_PER == 16 || VAL_PER == 32) && VAL_PER <= HEAD_DIM, "a lane holds 16 or 32 value channels");
static_assert(HEAD_DIM % 32 == 0, "SPREAD rows of 16-byte quads");

struct alignas(16) Vector16 { u32 word[4]; };
struct alignas(16) Quad { float value[4]; };

// N floats (a multiple of 4) stored to / loaded from 16-byte aligned shared memory in 16-byte quads
template <int N>
__device__ __forceinline__ void store_quads(float* to, const float (&x)[N]) {
#pragma unroll
    for (int i = 0; i < N / 4; ++i)
        reinterpret_cast<Quad*>(to)[i] = Quad{{x[4 * i], x[4 * i + 1], x[4 * i + 2], x[4 * i + 3]}};
}

template <int N>
__device__ __forceinline__ void load_quads(const float* from, float (&x)[N]) {
#pragma unroll
    for (int i = 0; i < N / 4; ++i) {
        const Quad quad = reinterpret_cast<const Quad*>(from)[i];
#pragma unroll
        for (int k = 0; k < 4; ++k) x[4 * i + k] = quad.value[k];
    }
}

#define ROW_WORDS(N) ((N) * (int)sizeof(in_t) / 4)  // the 32-bit words of N elements

// N consecutive elements at `from` (16-byte aligned, global or shared memory) as 32-bit words, in 16-byte chunks;
// chunk i is read from chunk i ^ swap (the stash's order, stash_swap)
template <int N>
__device__ __forceinline__ void load_words(const in_t* __restrict__ from, u32 (&w)[ROW_WORDS(N)], int swap = 0) {
#pragma unroll
    for (int i = 0; i < ROW_WORDS(N) / 4; ++i) {
        const Vector16 chunk = reinterpret_cast<const Vector16*>(from)[i ^ swap];
#pragma unroll
        for (int k = 0; k < 4; ++k) w[4 * i + k] = chunk.word[k];
    }
}

// load_words' inverse: chunk i of the words written to chunk i ^ swap at `to`
template <int N>
__device__ __forceinline__ void store_words(in_t* __restrict__ to, const u32 (&w)[ROW_WORDS(N)], int swap = 0) {
#pragma unroll
    for (int i = 0; i < ROW_WORDS(N) / 4; ++i)
        reinterpret_cast<Vector16*>(to)[i ^ swap] = Vector16{{w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]}};
}

// the N elements held in words (element j in the low half of word j / 2 when elements have 16 bits) widened to
// float32: a bfloat16's float32 bits are its own bits followed by 16 zeros
template <int N>
__device__ __forceinline__ void widen(const u32 (&w)[ROW_WORDS(N)], float (&x)[N]) {
#pragma unroll
    for (int j = 0; j < N; ++j) {
#if IN_DTYPE == DTYPE_F32
        x[j] = __uint_as_float(w[j]);
#elif IN_DTYPE == DTYPE_BF16
        x[j] = __uint_as_float(j % 2 ? w[j / 2] & 0xffff0000u : w[j / 2] << 16);
#else
        x[j] = in_to_f32((in_t)(j % 2 ? w[j / 2] >> 16 : w[j / 2]));
#endif
    }
}

// a row's chunks in the stash: a lane's 16-byte chunk i sits at i ^ swap, swap = ((lane in row / 4) ^ row) & 1, so
// that the 8 lanes of a quarter warp (one row for head_dim >= 128, two rows for 64) reach 8 different bank groups
__device__ __forceinline__ int stash_swap(int row_lane, int row) { return ((row_lane >> 2) ^ row) & 1; }

// N consecutive elements widened to float32 (`swap`: the chunk order of a stashed row)
template <int N>
__device__ __forceinline__ void load_row(const in_t* __restrict__ row, float (&x)[N], int swap = 0) {
    u32 w[ROW_WORDS(N)];
    load_words<N>(row, w, swap);
    widen<N>(w, x);
}

// `bad` turns NaN where an element is not finite (inf * 0 and NaN * 0 are NaN)
template <int N>
__device__ __forceinline__ void check_finite(const float (&x)[N], float& bad) {
#pragma unroll
    for (int j = 0; j < N; ++j) bad = fmaf(x[j], 0.f, bad);
}

#if IN_DTYPE == DTYPE_F32
typedef float finite_flag;  // check_finite's flag: non-zero once an element checked was not finite
#else
typedef u32 finite_flag;

// check_finite on 16-bit elements, two at a time: each half of `bad` turns NaN where that half of `pair` is not
// finite (a fused multiply-add by zero, as check_finite); it stays 0 otherwise
__device__ __forceinline__ u32 poison_pairs(u32 pair, u32 bad) {
    u32 out;
#if IN_DTYPE == DTYPE_F16
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(out) : "r"(pair), "r"(0u), "r"(bad));
#else
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(out) : "r"(pair), "r"(0u), "r"(bad));
#endif
    return out;
}
#endif

// load_row and check_finite in one (16-bit elements are checked in pairs, before they are widened)
template <int N>
__device__ __forceinline__ void load_checked_row(const in_t* __restrict__ row, float (&x)[N], finite_flag& bad) {
    u32 w[ROW_WORDS(N)];
    load_words<N>(row, w);
    widen<N>(w, x);
#if IN_DTYPE == DTYPE_F32
    check_finite(x, bad);
#else
#pragma unroll
    for (int i = 0; i < ROW_WORDS(N); ++i) bad = poison_pairs(w[i], bad);
#endif
}

// scaling.token_norms: squares of the float32 elements summed in float64 (a float32 squared is exact in float64, so
// the fused multiply-add rounds exactly as the product-then-sum of the definition)
template <int N>
__device__ __forceinline__ double row_squares(const float (&x)[N]) {
    double sum = 0.0;
#pragma unroll
    for (int j = 0; j < N; ++j) sum = fma((double)x[j], (double)x[j], sum);
    return sum;
}

// sqrt of the float64 sum of squares, rounded once to float32; a zero norm becomes 1
__device__ __forceinline__ float norm_of(double squares) {
    const float norm = (float)sqrt(squares);
    return norm == 0.f ? 1.f : norm;
}

// a finite float64 sum of squares means every element summed was finite
__device__ __forceinline__ bool finite_squares(double squares) { return squares <= 1.7976931348623157e308; }

// a norm rounded to float32 beyond its range (an infinite norm: the keys could not be scaled)
__device__ __forceinline__ bool norm_overflows(float norm) { return norm > 3.40282347e38f; }

// quantizer.encode's code, clamp(rint((x - zero) * inverse), 0, L), plus CODE_BIAS: the bits of the float sum
// rint(...) + 1.5 * 2^23, whose addition rounds half to even into the low mantissa bits. For an element of its group,
// x >= min >= zero, so the product is >= 0; and it is at most L * (1 + 3 * 2^-24), since zero + L * scale covers max,
// so rint never exceeds L: the clamp changes nothing. Only an infinite inverse (a subnormal bfloat16 or float32
// scale) could make it matter, so those scale dtypes keep it (clamping before rounding is the same for integer bounds,
// and sends NaN to 0 as the definition's clip does).
#define CODE_BIAS 0x4B400000u  // the bits of 1.5 * 2^23
__device__ __forceinline__ u32 biased_code(float x, float zero, float inverse) {
    float scaled = __fmul_rn(__fsub_rn(x, zero), inverse);
#if SCALE_DTYPE != DTYPE_F16
    scaled = fminf(fmaxf(scaled, 0.f), (float)LEVELS);
#endif
    return __float_as_uint(__fadd_rn(scaled, 12582912.0f));
}

// Words are packed by adding biased codes shifted to their slots (one multiply-add or shift-add each), modulo 2^32:
// the codes' bits never overlap, so the sum is the word plus the shifted biases, which one subtraction takes away.
// word_bias: the biases of a word whose slots all hold a code.
__device__ __forceinline__ constexpr u32 word_bias() {
    u32 bias = 0;
    for (int slot = 0; slot < PER_WORD; ++slot) bias += CODE_BIAS << (BITS * slot);
    return bias;
}

// a * b + c, one integer multiply-add (for a power-of-two b the compiler would emit a shift and an addition)
__device__ __forceinline__ u32 multiply_add(u32 a, u32 b, u32 c) {
    u32 d;
    asm("mad.lo.u32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// Keys. Grid (key groups of the capacity, B); block 32 * warps_per_head * heads_per_round threads, warps_per_head =
// key_group / KEY_WARP_ROWS. Dynamic shared memory, in this order (bytes, see launch_quantize_keys):
//   l2: squares, double [heads][key_group]; inverse norms, float [key_group]
//   partial extremes, float [heads_per_round][2][key_group / KEY_LANE_ROWS][SPREAD_DIM]
//   group parameters (float32 zero and inverse scale), float [heads_per_round][2][SPREAD_DIM]
//   stash (l2 only, when it fits): in_t [heads][key_group][HEAD_DIM], chunks swapped as stash_swap says
extern "C" __global__ void __launch_bounds__(512) quantize_keys(
    const in_t* __restrict__ keys, i64 stride_batch, i64 stride_head, i64 stride_token,
    const i64* __restrict__ lengths, int heads, int groups, int key_group, int rotate, int scaling,
    float hadamard_normalization, int heads_per_round, int stash, u32* __restrict__ codes_out,
    scale_t* __restrict__ scales_out, scale_t* __restrict__ zeros_out, float* __restrict__ norms_out,
    int* __restrict__ refused) {
    extern __shared__ __align__(16) unsigned char shared[];
    const int b = blockIdx.y, g = blockIdx.x;
    const int warps = blockDim.x / WARP, warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int slot = lane / KEY_ROW_LANES, row_lane = lane % KEY_ROW_LANES;
    const int first = g * key_group;
    const int valid = max(0, min((int)lengths[b] - first, key_group));
    const i64 capacity = (i64)groups * key_group;
    const int warps_per_head = key_group / KEY_WARP_ROWS, partials = key_group / KEY_LANE_ROWS;
    const in_t* base = keys + b * stride_batch + first * stride_token + row_lane * KEY_PER;
    float bad = 0.f;
    bool in_range = true, norms_in_range = true, narrow = true;

    unsigned char* next = shared;
    double* squares = reinterpret_cast<double*>(next);
    float* inverse_norms = reinterpret_cast<float*>(next + heads * key_group * sizeof(double));
    if (scaling == SCALING_L2) next += heads * key_group * sizeof(double) + key_group * sizeof(float);
    float* extremes = reinterpret_cast<float*>(next);
    next += heads_per_round * 2 * partials * SPREAD_DIM * sizeof(float);
    float* params = reinterpret_cast<float*>(next);
    next += heads_per_round * 2 * SPREAD_DIM * sizeof(float);
    in_t* stashed = reinterpret_cast<in_t*>(next) + row_lane * KEY_PER;

    if (scaling == SCALING_L2) {  // phase 1: token norms over all heads (before the rotation: scaling.token_norms)
        const int rows = heads * key_group, stride = warps * KEY_ROWS;
        for (int i0 = warp * KEY_ROWS; i0 < rows; i0 += KEY_BATCH * stride) {  // KEY_BATCH rows' loads in flight
            u32 elements[KEY_BATCH][ROW_WORDS(KEY_PER)];
#pragma unroll
            for (int k = 0; k < KEY_BATCH; ++k) {
                const int i = i0 + k * stride + slot, h = i / key_group, t = i % key_group;
                if (i < rows && t < valid) load_words<KEY_PER>(base + h * stride_head + t * stride_token, elements[k]);
            }
#pragma unroll
            for (int k = 0; k < KEY_BATCH; ++k) {
                const int i = i0 + k * stride + slot, t = i % key_group;
                const bool row_valid = i < rows && t < valid;
                double sum = 0.0;
                if (row_valid) {
                    if (stash)
                        store_words<KEY_PER>(stashed + (i64)i * HEAD_DIM, elements[k], stash_swap(row_lane, i));
                    float x[KEY_PER];
                    widen<KEY_PER>(elements[k], x);
                    sum = row_squares(x);
                }
                sum = row_sum(sum, KEY_ROW_LANES);
                if (row_valid && row_lane == 0) squares[i] = sum;
            }
        }
        __syncthreads();
        for (int t = threadIdx.x; t < key_group; t += blockDim.x) {
            double sum = 0.0;
            for (int h = 0; h < heads && t < valid; ++h) sum += squares[h * key_group + t];
            if (!finite_squares(sum)) bad = __int_as_float(0x7fc00000);
            const float norm = norm_of(sum);
            norms_in_range &= !norm_overflows(norm);
            inverse_norms[t] = 1.0f / norm;
            norms_out[b * capacity + first + t] = t < valid ? norm : 0.f;
        }
        __syncthreads();
    }

    const int head_slot = warp / warps_per_head, part = warp % warps_per_head;
    for (int h0 = 0; h0 < heads; h0 += heads_per_round) {  // phase 2, a round of heads at a time
        const int h = h0 + head_slot;
        const bool active = h < heads;  // warp-uniform
        const i64 bh = (i64)b * heads + h;
        float x[KEY_LANE_ROWS][KEY_PER];  // every warp runs this (no divergent shuffles); inactive ones load nothing
#pragma unroll
        for (int r = 0; r < KEY_LANE_ROWS; ++r) {
            const int t = part * KEY_WARP_ROWS + r * KEY_ROWS + slot;
            const bool row_valid = active && t < valid;
#pragma unroll
            for (int j = 0; j < KEY_PER; ++j) x[r][j] = 0.f;
            if (row_valid) {
                if (stash)
                    load_row<KEY_PER>(stashed + ((i64)h * key_group + t) * HEAD_DIM, x[r], stash_swap(row_lane, t));
                else
                    load_row<KEY_PER>(base + h * stride_head + t * stride_token, x[r]);
                if (scaling == SCALING_NONE) check_finite(x[r], bad);
            }
            float inverse = 1.f;
            if (scaling == SCALING_L2) {
                inverse = row_valid ? inverse_norms[t] : 1.f;
            } else if (scaling == SCALING_L2_PER_HEAD) {  // before the rotation, as above
                const double sum = row_sum(row_squares(x[r]), KEY_ROW_LANES);
                if (!finite_squares(sum)) bad = __int_as_float(0x7fc00000);
                const float norm = norm_of(sum);
                norms_in_range &= !(row_valid && norm_overflows(norm));
                inverse = 1.0f / norm;
                if (active && row_lane == 0) norms_out[bh * capacity + first + t] = row_valid ? norm : 0.f;
            }
            if (rotate) fwht_row<HEAD_DIM, KEY_PER>(x[r], row_lane, hadamard_normalization);
            if (scaling != SCALING_NONE) {
#pragma unroll
                for (int j = 0; j < KEY_PER; ++j) x[r][j] = x[r][j] * inverse;
            }
        }
        if (active) {  // this lane's extremes over its valid rows, as one of the group's partials
            float minimum[KEY_PER], maximum[KEY_PER];
#pragma unroll
            for (int j = 0; j < KEY_PER; ++j) {
                minimum[j] = __int_as_float(0x7f800000);
                maximum[j] = -minimum[j];
#pragma unroll
                for (int r = 0; r < KEY_LANE_ROWS; ++r) {
                    if (part * KEY_WARP_ROWS + r * KEY_ROWS + slot < valid) {
                        minimum[j] = fminf(minimum[j], x[r][j]);
                        maximum[j] = fmaxf(maximum[j], x[r][j]);
                    }
                }
            }
            float* partial = extremes + ((head_slot * 2) * partials + part * KEY_ROWS + slot) * SPREAD_DIM
                             + SPREAD(row_lane * KEY_PER);
            store_quads(partial, minimum);
            store_quads(partial + partials * SPREAD_DIM, maximum);
        }
        __syncthreads();
        for (int i = threadIdx.x; i < heads_per_round * HEAD_DIM; i += blockDim.x) {  // one thread per channel
            const int hs = i / HEAD_DIM, c = i % HEAD_DIM;
            if (h0 + hs >= heads) break;
            const float* partial = extremes + (hs * 2) * partials * SPREAD_DIM + SPREAD(c);
            float minimum = __int_as_float(0x7f800000), maximum = -minimum;
            for (int p = 0; p < partials; ++p) {
                minimum = fminf(minimum, partial[p * SPREAD_DIM]);
                maximum = fmaxf(maximum, partial[(partials + p) * SPREAD_DIM]);
            }
            in_range &= !(valid > 0 && out_of_range(minimum, maximum));
            const GroupParams q = group_params(minimum, maximum, valid > 0);
            narrow &= !(valid > 0 && q.too_wide);
            const i64 param = (((i64)b * heads + h0 + hs) * groups + g) * HEAD_DIM + c;
            scales_out[param] = q.scale;
            zeros_out[param] = q.zero;
            params[hs * 2 * SPREAD_DIM + SPREAD(c)] = q.zero_f32;
            params[(hs * 2 + 1) * SPREAD_DIM + SPREAD(c)] = q.inverse;
        }
        __syncthreads();
        if (active) {  // encode and pack the rows held, one or two words per row
            u32 words[KEY_LANE_ROWS][KEY_WORDS_PER_LANE] = {};
            float zero[KEY_PER], inverse[KEY_PER];
            const float* lane_params = params + head_slot * 2 * SPREAD_DIM + SPREAD(row_lane * KEY_PER);
            load_quads(lane_params, zero);
            load_quads(lane_params + SPREAD_DIM, inverse);
#pragma unroll
            for (int j = 0; j < KEY_PER; ++j) {
#pragma unroll
                for (int r = 0; r < KEY_LANE_ROWS; ++r)
                    words[r][j / PER_WORD] +=
                        biased_code(x[r][j], zero[j], inverse[j]) << (BITS * slot_of(j % PER_WORD));
            }
#pragma unroll
            for (int r = 0; r < KEY_LANE_ROWS; ++r) {
                const int t = part * KEY_WARP_ROWS + r * KEY_ROWS + slot;
                u32* out = codes_out + (bh * capacity + first + t) * KEY_WORDS_PER_ROW + row_lane * KEY_WORDS_PER_LANE;
#pragma unroll
                for (int w = 0; w < KEY_WORDS_PER_LANE; ++w) out[w] = t < valid ? words[r][w] - word_bias() : 0u;
            }
        }
    }
    if (bad != 0.f) atomicOr(refused, 1);
    if (!in_range) atomicOr(refused, 4);
    if (!norms_in_range) atomicOr(refused, 16);
    if (!narrow) atomicOr(refused, 32);
}

// Values. Grid (ceil(word rows / (VAL_WARPS * VAL_ROWS)), B * H): row slot s of warp w packs value word row
// (blockIdx.x * VAL_WARPS + w) * VAL_ROWS + s, its PER_WORD tokens one after the other; a value group of value_group
// channels spans value_group / VAL_PER lanes of a row.
extern "C" __global__ void __launch_bounds__(VAL_THREADS) quantize_values(
    const in_t* __restrict__ values, i64 stride_batch, i64 stride_head, i64 stride_token,
    const i64* __restrict__ lengths, int heads, int capacity, int value_group, int rotate,
    float hadamard_normalization, u32* __restrict__ codes_out, scale_t* __restrict__ scales_out,
    scale_t* __restrict__ zeros_out, int* __restrict__ refused) {
    const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int slot = lane / VAL_ROW_LANES, row_lane = lane % VAL_ROW_LANES;
    const int warp_row = (blockIdx.x * VAL_WARPS + warp) * VAL_ROWS;
    if (warp_row * PER_WORD >= capacity) return;  // whole warps leave together
    const int word_row = warp_row + slot, first = word_row * PER_WORD;
    const bool in_capacity = first < capacity;
    const int length = (int)lengths[b];
    const int groups = HEAD_DIM / value_group, lanes_per_group = value_group / VAL_PER;
    const in_t* base = values + b * stride_batch + h * stride_head + row_lane * VAL_PER;
    const bool writes_params = in_capacity && row_lane % lanes_per_group == 0;  // the group's first lane
    const i64 first_param = ((i64)bh * capacity + first) * groups + row_lane / lanes_per_group;
    finite_flag bad = 0;
    bool in_range = true, narrow = true;

    u32 words[VAL_PER], bias = 0;  // biased codes added at their slots; the sum of their biases
#pragma unroll
    for (int j = 0; j < VAL_PER; ++j) words[j] = 0;
#pragma unroll 1  // one token at a time: unrolled, the loop's code outgrows the instruction cache
    for (int e = 0; e < PER_WORD; ++e) {
        const int token = first + e;
        const bool valid = in_capacity && token < length;
        float x[VAL_PER];
        if (valid) {
            load_checked_row<VAL_PER>(base + token * stride_token, x, bad);
        } else {
#pragma unroll
            for (int j = 0; j < VAL_PER; ++j) x[j] = 0.f;
        }
        if (rotate) fwht_row<HEAD_DIM, VAL_PER>(x, row_lane, hadamard_normalization);
        float minimum = x[0], maximum = x[0];
#pragma unroll
        for (int j = 1; j < VAL_PER; ++j) { minimum = fminf(minimum, x[j]); maximum = fmaxf(maximum, x[j]); }
        for (int offset = 1; offset < lanes_per_group; offset *= 2) {
            minimum = fminf(minimum, __shfl_xor_sync(0xffffffffu, minimum, offset));
            maximum = fmaxf(maximum, __shfl_xor_sync(0xffffffffu, maximum, offset));
        }
        in_range &= !(valid && out_of_range(minimum, maximum));
        const GroupParams p = group_params(minimum, maximum, valid);
        narrow &= !(valid && p.too_wide);
        if (writes_params) {
            scales_out[first_param + e * groups] = p.scale;
            zeros_out[first_param + e * groups] = p.zero;
        }
        if (valid) {
            const u32 step = 1u << (BITS * slot_of(e));
            bias += CODE_BIAS * step;
#pragma unroll
            for (int j = 0; j < VAL_PER; ++j)
                words[j] = multiply_add(biased_code(x[j], p.zero_f32, p.inverse), step, words[j]);
        }
    }
    if (in_capacity) {
#pragma unroll
        for (int j = 0; j < VAL_PER; ++j) words[j] -= bias;
        Vector16* out = reinterpret_cast<Vector16*>(
            codes_out + ((i64)bh * (capacity / PER_WORD) + word_row) * HEAD_DIM + row_lane * VAL_PER);
#pragma unroll
        for (int i = 0; i < VAL_PER / 4; ++i) out[i] = reinterpret_cast<const Vector16*>(words)[i];
    }
    if (bad != 0) atomicOr(refused, 2);
    if (!in_range) atomicOr(refused, 8);
    if (!narrow) atomicOr(refused, 64);
}
