// Shared device code of the write path: element conversions, directed rounding, the scalar quantizer, the warp
// Hadamard transform and the packed bit order. Every function reproduces, operation for operation, the CPU definition
// it names (oscar_cupy/quantizer.py, oscar_cupy/cpu_kernels.py, oscar_cupy/layout.py), so results match bit for bit.
// Modules are compiled with --fmad=false: no multiply-add is contracted behind the definition's back.
//
// Compile-time parameters (-D): HEAD_DIM (16..256), IN_DTYPE and SCALE_DTYPE (0 float16, 1 bfloat16, 2 float32),
// BITS (2 or 4) where codes are involved.
#pragma once

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

#define WARP 32
#define DTYPE_F16 0
#define DTYPE_BF16 1
#define DTYPE_F32 2

// ---------------------------------------------------------------------------------------------------------------
// 16-bit floats as raw bits (no CUDA headers needed)

__device__ __forceinline__ float f16_to_f32(u16 h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ u16 f32_to_f16(float f) { u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }
__device__ __forceinline__ u16 f32_to_bf16(float f) { u16 h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }

// the next 16-bit float (float16 or bfloat16 bits alike) toward +inf / -inf, as numpy's nextafter
__device__ __forceinline__ u16 half_bits_up(u16 h) { return h == 0x8000 ? (u16)0x0001 : ((h & 0x8000) ? h - 1 : h + 1); }
__device__ __forceinline__ u16 half_bits_down(u16 h) { return h == 0x0000 ? (u16)0x8001 : ((h & 0x8000) ? h + 1 : h - 1); }

// ---------------------------------------------------------------------------------------------------------------
// the caller's element type

#if IN_DTYPE == DTYPE_F32
typedef float in_t;
__device__ __forceinline__ float in_to_f32(in_t x) { return x; }
__device__ __forceinline__ in_t f32_to_in(float x) { return x; }
#else
typedef u16 in_t;
#if IN_DTYPE == DTYPE_F16
__device__ __forceinline__ float in_to_f32(in_t x) { return f16_to_f32(x); }
__device__ __forceinline__ in_t f32_to_in(float x) { return f32_to_f16(x); }
#else
__device__ __forceinline__ float in_to_f32(in_t x) { return bf16_to_f32(x); }
__device__ __forceinline__ in_t f32_to_in(float x) { return f32_to_bf16(x); }
#endif
#endif

// ---------------------------------------------------------------------------------------------------------------
// scale dtype and directed rounding (quantizer.round_down / round_up: the nearest value on the required side)

#ifdef SCALE_DTYPE
#define LEVELS ((1 << BITS) - 1)
#if SCALE_DTYPE == DTYPE_F32
#define SCALE_MAX 3.40282347e38f
typedef float scale_t;
__device__ __forceinline__ float scale_to_f32(scale_t s) { return s; }
__device__ __forceinline__ scale_t scale_round_down(float x) { return x; }
__device__ __forceinline__ scale_t scale_nearest(float x) { return x; }
__device__ __forceinline__ scale_t scale_up(scale_t c) { return __uint_as_float(__float_as_uint(c) + 1u); }  // c >= +0
#else
typedef u16 scale_t;
#if SCALE_DTYPE == DTYPE_F16
#define SCALE_MAX 65504.f
__device__ __forceinline__ float scale_to_f32(scale_t s) { return f16_to_f32(s); }
__device__ __forceinline__ scale_t scale_nearest(float x) { return f32_to_f16(x); }
#else
#define SCALE_MAX 3.38953139e38f
__device__ __forceinline__ float scale_to_f32(scale_t s) { return bf16_to_f32(s); }
__device__ __forceinline__ scale_t scale_nearest(float x) { return f32_to_bf16(x); }
#endif
__device__ __forceinline__ scale_t scale_up(scale_t c) { return half_bits_up(c); }
// as quantizer.round_down: the nearest value, or the one below it when the nearest is above x (that one is not above
// x, or the nearest would not be the nearest)
__device__ __forceinline__ scale_t scale_round_down(float x) {
    const scale_t c = scale_nearest(x);
    return scale_to_f32(c) > x ? half_bits_down(c) : c;
}
#endif

// quantizer.group_params' scale, round_up(float64(range) / L): the smallest scale value c with c * L >= range.
// c * L is exact in float64 (at most 24 + 4 significant bits), so the comparisons are exact, and no float64 division
// is needed; the float64 quotient of the definition and the exact one have the same scale value above them (a scale
// value times L is a float64, so the quotient's rounding cannot pass one). The estimate, the scale value nearest to
// the float32 rounding of range * float64(1 / L), is never above the answer (that product is within 2^-52 of the
// quotient, relatively, and both roundings to nearest stop at the answer, a float32 and a scale value) and at most
// one step below it (the roundings move it by less than one step): one step up ends the search.
__device__ __forceinline__ scale_t scale_of_range(double range) {  // range >= 0
    const scale_t c = scale_nearest((float)(range * (1.0 / LEVELS)));
    return (double)scale_to_f32(c) * LEVELS < range ? scale_up(c) : c;
}

// quantizer.check_range: a group whose extremes exceed the scale dtype's finite range is refused
__device__ __forceinline__ bool out_of_range(float minimum, float maximum) {
    return fabsf(minimum) > SCALE_MAX || fabsf(maximum) > SCALE_MAX;
}

// quantizer.group_params + inverse_scale: parameters of a group with float32 extremes (valid: it has an element)
struct GroupParams {
    scale_t scale, zero;
    float zero_f32, inverse;
    bool too_wide;  // quantizer.check_span: max - zero beyond float32's range (x - zero would overflow)
};

__device__ __forceinline__ GroupParams group_params(float minimum, float maximum, bool valid) {
    GroupParams p;
    if (!valid) { minimum = 0.f; maximum = 0.f; }
    minimum = __fadd_rn(minimum, 0.f);  // -0 becomes +0: which zero a minimum over both picks is not defined
    maximum = __fadd_rn(maximum, 0.f);
    p.zero = scale_round_down(minimum);
    p.zero_f32 = scale_to_f32(p.zero);
    const double range = (double)maximum - (double)p.zero_f32;
    p.too_wide = range > (double)3.40282347e38f;
    p.scale = scale_of_range(range);
    const float scale = scale_to_f32(p.scale);
    p.inverse = scale > 0.f ? 1.0f / scale : 0.f;
    return p;
}

// quantizer.decode: float32(code * scale) + zero
__device__ __forceinline__ float decode(u32 code, float scale, float zero) {
    return __fadd_rn(__fmul_rn((float)code, scale), zero);
}
#endif  // SCALE_DTYPE

// ---------------------------------------------------------------------------------------------------------------
// packed bit order (layout.slot_of_element): element e of a word sits in slot e / 2 + (E / 2) * (e % 2)

#ifdef BITS
#define PER_WORD (32 / BITS)
__device__ __forceinline__ int slot_of(int element) { return (element >> 1) + (PER_WORD / 2) * (element & 1); }
#endif

// ---------------------------------------------------------------------------------------------------------------
// the normalized Walsh-Hadamard transform of one row of N elements held by N / PER consecutive lanes, PER
// consecutive elements each (cpu_kernels.fwht): float32 butterflies of stride 1, 2, 4, ..., then one multiplication.
// `lane` is the lane's index within its row; rows occupy aligned groups of N / PER lanes of the warp.

template <int N, int PER>
__device__ __forceinline__ void fwht_row(float (&x)[PER], int lane, float normalization) {
#pragma unroll
    for (int stride = 1; stride < PER; stride *= 2) {
#pragma unroll
        for (int j = 0; j < PER; ++j) {
            if ((j & stride) == 0) {
                const float low = x[j], high = x[j + stride];
                x[j] = low + high;
                x[j + stride] = low - high;
            }
        }
    }
#pragma unroll
    for (int stride = PER; stride < N; stride *= 2) {
        const int lane_bit = stride / PER;
        // low lane: x + partner; high lane: partner - x; a product by +-1 is exact, so the fma rounds once, as a - b
        const float sign = (lane & lane_bit) ? -1.f : 1.f;
#pragma unroll
        for (int j = 0; j < PER; ++j) x[j] = fmaf(sign, x[j], __shfl_xor_sync(0xffffffffu, x[j], lane_bit));
    }
#pragma unroll
    for (int j = 0; j < PER; ++j) x[j] = x[j] * normalization;
}

// sum over the `lanes` consecutive lanes (a power of two, aligned) that hold one row
template <typename T>
__device__ __forceinline__ T row_sum(T value, int lanes) {
    for (int offset = 1; offset < lanes; offset *= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
    return value;
}
