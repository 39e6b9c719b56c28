// Decode attention straight from the packed cache (oscar_cupy/layout.py) and the full-precision window in one launch
// (decode_attention): split-KV partial results, merged by one block per unit at the end of the grid. The CPU
// definition is oscar_cupy/attention.py (decode_attention); nothing here writes a dequantized cache anywhere.
//
// Compile-time parameters: HEAD_DIM (64, 128, 256), BITS (2, 4), IN_DTYPE (q and window: float16 or bfloat16),
// SCALE_DTYPE, VALUE_GROUP (32, 64, 128), ROW_TILES (1: up to 8 query rows per KV head and block, 2: up to 16) and
// STAGES (shared-memory buffers per warp of the packed path's copy pipeline; dynamic shared memory of
// WARPS * STAGES * sizeof(StepBuffer) bytes, see oscar_cupy/cuda_attention.py).
//
// The math. Rows are the query rows of one KV head: (query head of the group, query position). For a packed token t of
// key group g, with q the rotated query times softmax_scale * log2(e), s/z the key group's per-channel scale/zero, c the
// codes and n_t the token norm, the base-2 logit is n_t * (sum_c (q_c s_c) c_tc + sum_c q_c z_c): the key scales are
// folded into the query once per key group (q' = q * s) and the zeros into one bias per row and group, so the
// tensor-core product Q' . C^T reads the raw codes. Values: with per-token scale/zero (s_t, z_t) of each value group,
// sum_t p_t v_tc = sum_t (p_t s_t) c_tc + sum_t p_t z_t: the value scales are folded into the probabilities and the
// zeros into a second small product. Codes become tensor-core operands with one lop3 per pair (the magic-number trick,
// see code_pair: MAGIC + code * 2^k exactly, the 2^-k folded into the other operand, MAGIC times that operand's sum
// subtracted after the product). The query is rotated inside the kernel; the merge rotates the packed part back.
//
// Fragments (mma.m16n8k16, p = lane % 4, g = lane / 4). S = Q' C^T: A = Q' (16 rows x 16 channels), B = key codes
// (16 channels x 8 tokens). O^T = V^T P^T: A = value codes (16 channels x 16 tokens), B = P^T (16 tokens x 8 rows), so
// the C fragment of S (row g, tokens 2p, 2p+1) is already the B fragment of P^T. The channel order of the reduction and
// the token order of each tile are chosen so that every lane reads its own contiguous bits:
//   * keys: lane p reduces over channels [p D/4, (p+1) D/4), i.e. its own D*BITS/128 words of a key row;
//   * a 32-token step has 4 key tiles of 8 tokens; column n of tile t is token 8 (n/2) + 2t + n%2, so lane p's C
//     fragment (columns 2p, 2p+1 of all tiles) holds tokens 8p .. 8p+7 of the step: one value word row (4 bits) or half
//     of one (2 bits), and 8 consecutive token norms and value scales;
//   * value tile i (16 channels inside one 32-channel block) maps row m to channel 32 (i/2) + 4 (m%8) + 2 (i%2) + m/8,
//     so lane g reads the 4 consecutive words 32 (i/2) + 4g .. +3 with one 16-byte load.
#include "common.cuh"

#define THREADS 128
#define MIN_BLOCKS (ROW_TILES == 1 ? 3 : 2)  // blocks per SM for the register budget (4 spills: measured slower)
#define WARPS (THREADS / WARP)
#define STEP 32                                  // tokens per warp step
#define RPB (8 * ROW_TILES)                      // query rows per block
#define KSTEPS (HEAD_DIM / 16)                   // reduction steps of S (16 channels each)
#define KEY_WORDS (HEAD_DIM / PER_WORD)          // words per key row
#define LANE_KEY_WORDS (KEY_WORDS / 4)           // of which a lane reads
#define LANE_CHANNELS (HEAD_DIM / 4)             // key channels per lane
#define PAIRS_PER_WORD (PER_WORD / 2)
#define VALUE_TILES (HEAD_DIM / 16)
#define VALUE_BLOCKS (HEAD_DIM / 32)
#define VALUE_GROUPS (HEAD_DIM / VALUE_GROUP)
#define Q_LANE_STRIDE (HEAD_DIM / 8 + 4)         // shared query pairs: padded so that LDS.128 of a warp is conflict-free
#define Q_ROW_STRIDE (4 * Q_LANE_STRIDE + 32)
#define PAIR_MASK (LEVELS | (LEVELS << 16))
#define LN2 0.6931471805599453f
#define NEG_INF __int_as_float(0xff800000)

#if IN_DTYPE == DTYPE_F32
#error "decode attention takes float16 or bfloat16 queries and windows"
#endif

// tensor-core operand type: float16 with float16 scales, bfloat16 otherwise (the range of bfloat16/float32 scales)
#if SCALE_DTYPE == DTYPE_F16
#define MMA_TYPE "f16"
#define MAGIC 0x64006400u  // 1024.0 in both halves
#else
#define MMA_TYPE "bf16"
#define MAGIC 0x43004300u  // 128.0 in both halves
#endif

struct alignas(16) Vec4 { u32 w[4]; };
struct alignas(8) Vec2 { u32 w[2]; };

// N consecutive 32-bit words from 4 * N-byte aligned global memory into registers
template <int N>
__device__ __forceinline__ void load_words(u32 (&out)[N], const void* source) {
    if constexpr (N % 4 == 0) {
#pragma unroll
        for (int i = 0; i < N / 4; ++i) {
            const Vec4 v = reinterpret_cast<const Vec4*>(source)[i];
#pragma unroll
            for (int k = 0; k < 4; ++k) out[4 * i + k] = v.w[k];
        }
    } else if constexpr (N == 2) {
        const Vec2 v = *reinterpret_cast<const Vec2*>(source);
        out[0] = v.w[0];
        out[1] = v.w[1];
    } else {
        static_assert(N == 1, "load_words takes 1, 2 or a multiple of 4 words");
        out[0] = *reinterpret_cast<const u32*>(source);
    }
}

// two floats as one operand pair (low half = lo)
__device__ __forceinline__ u32 pack_pair(float lo, float hi) {
    u32 r;
    asm("cvt.rn." MMA_TYPE "x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ u32 mul_pair(u32 a, u32 b) {
    u32 r;
#if SCALE_DTYPE == DTYPE_F16
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
#else
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(0x80008000u));  // a * b + (-0)
#endif
    return r;
}

// Codes as tensor-core operands with one lop3 per pair: the two codes of slot pair i (bits BITS i and BITS i + 16 of a
// word) are or-ed into the mantissas of two copies of MAGIC, giving MAGIC + c * 2^(BITS k) exactly, where k = i % DIRECT
// and the word is first shifted right by BITS * DIRECT * (i / DIRECT) (one shift per word and run of DIRECT pairs). The
// factor 2^-(BITS k) is folded into the other operand (the query or the probabilities) and MAGIC * (sum of that
// operand) is subtracted after the product (see fold_query and the value correction).
#if SCALE_DTYPE == DTYPE_F16
#define MAGIC_VALUE 1024.f
#define MANTISSA_BITS 10
#define ONE_PAIR 0x3c003c00u
#else
#define MAGIC_VALUE 128.f
#define MANTISSA_BITS 7
#define ONE_PAIR 0x3f803f80u
#endif
#define DIRECT ((MANTISSA_BITS - BITS) / BITS + 1)  // slot pairs whose bits fit in the mantissa without a shift

__device__ __forceinline__ u32 code_pair(u32 word, int pair, u32 magic) {
    u32 r;
    asm("lop3.b32 %0, %1, %2, %3, 0xea;"  // (a & b) | c
        : "=r"(r) : "r"(word >> (BITS * DIRECT * (pair / DIRECT))), "r"(PAIR_MASK << (BITS * (pair % DIRECT))),
          "r"(magic));
    return r;
}

// MAGIC in a register the compiler cannot see through: with both constants immediate, each code pair's and-or would
// take two instructions
__device__ __forceinline__ u32 magic_register() {
    u32 magic;
    asm volatile("mov.b32 %0, %1;" : "=r"(magic) : "n"(MAGIC));
    return magic;
}

// 2^-(BITS k) of slot pair `pair` as a float
__device__ __forceinline__ float code_factor(int pair) { return __int_as_float((127 - BITS * (pair % DIRECT)) << 23); }

__device__ __forceinline__ void mma(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32." MMA_TYPE "." MMA_TYPE ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// ---------------------------------------------------------------------------------------------------------------
// the packed path's pipeline: each warp copies its next steps into its own STAGES shared-memory buffers with cp.async
// while it computes the current one. A step buffer holds, for 32 tokens, the key rows, the value word rows, the value
// scales and zeros, the key group's scales and the token norms, each a contiguous stretch of the packed layout.

#define STAGE_KEYS (STEP * KEY_WORDS)
#define STAGE_VALUES (STEP / PER_WORD * HEAD_DIM)
#define STAGE_VALUE_PARAMS (STEP * VALUE_GROUPS * (int)sizeof(scale_t) / 4)
#define STAGE_KEY_SCALES (HEAD_DIM * (int)sizeof(scale_t) / 4)
// byte offsets of the parts of a step buffer
#define AT_VALUES (4 * STAGE_KEYS)
#define AT_VALUE_SCALES (AT_VALUES + 4 * STAGE_VALUES)
#define AT_VALUE_ZEROS (AT_VALUE_SCALES + 4 * STAGE_VALUE_PARAMS)
#define AT_KEY_SCALES (AT_VALUE_ZEROS + 4 * STAGE_VALUE_PARAMS)
#define AT_NORMS (AT_KEY_SCALES + 4 * STAGE_KEY_SCALES)

struct alignas(16) StepBuffer {
    u32 keys[STAGE_KEYS];
    u32 values[STAGE_VALUES];
    u32 value_scales[STAGE_VALUE_PARAMS];
    u32 value_zeros[STAGE_VALUE_PARAMS];
    u32 key_scales[STAGE_KEY_SCALES];
    float norms[STEP];
};
static_assert(sizeof(StepBuffer) % 128 == 0, "step buffers start on 128-byte lines");

__device__ __forceinline__ u32 shared_address(const void* pointer) {
    u32 address;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(address) : "l"(pointer));
    return address;
}

// `words` (a multiple of 4) 16-byte aligned words from global memory to shared memory, over the warp's lanes: this
// lane copies its 16-byte chunks lane, lane + 32, ... from `source` + `offset` bytes to shared address `target`, both
// already advanced by the lane's 16 bytes (one 64-bit add per call)
__device__ __forceinline__ void copy_async(u32 target, const char* source, u32 offset, int words, int lane) {
    const char* from = source + offset;
#pragma unroll
    for (int k = 0; 4 * (lane + WARP * k) < words; ++k)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;"
                     :: "r"(target + 16 * WARP * k), "l"(from + 16 * WARP * k));
}

__device__ __forceinline__ void commit_copies() { asm volatile("cp.async.commit_group;"); }

template <int PENDING>
__device__ __forceinline__ void wait_copies() { asm volatile("cp.async.wait_group %0;" :: "n"(PENDING)); }

// the first two accumulators (C fragment row g) only: rows g + 8 of A are zero or not needed
__device__ __forceinline__ void mma_low(float (&d)[2], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    float unused0, unused1;
    asm("mma.sync.aligned.m16n8k16.row.col.f32." MMA_TYPE "." MMA_TYPE ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%10,%10};"
        : "+f"(d[0]), "+f"(d[1]), "=f"(unused0), "=f"(unused1)
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "f"(0.f));
}

__device__ __forceinline__ float fast_exp2(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

// softmax state of the query rows a lane holds (rows 8 rt + 2p + e, e = 0, 1; the columns of S^T it holds): online
// maximum (base 2, the same in all lanes of a row) and the lane's part of the sum
struct RowState {
    float max[ROW_TILES][2], sum[ROW_TILES][2];
};

struct SharedMemory {
    float q[RPB][HEAD_DIM];  // query rows, float32 (staging)
    // packed path: rotated scaled query rows as operand pairs, and the same times each channel's code factor; window
    // path: unrotated scaled query rows as high and low pairs of the window's dtype (window_query_pairs)
    u32 q_pairs[RPB * Q_ROW_STRIDE];
    u32 q_code_pairs[RPB * Q_ROW_STRIDE];
    float row_max[WARPS][RPB], row_sum[WARPS][RPB];
};

// ---------------------------------------------------------------------------------------------------------------
// packed path: one warp's contiguous run of 32-token steps

struct PackedArgs {
    // copy sources of this (sequence, KV head), advanced by the lane's 16 bytes (copy_async): the token-indexed arrays
    // from the warp's first token on, the key scales from key group 0
    const char* k_codes; const char* v_codes; const char* v_scales; const char* v_zeros; const char* k_scales;
    const char* norms;                               // or null
    const scale_t* k_zeros;                          // this (sequence, KV head)'s key zeros from key group 0
    int first_token;                                 // the warp's first token
    int groups;                                      // key groups of the storage
    int key_group_shift;                             // log2(key group)
};

// the bias of 8 key groups g0 .. g0+7 for the lane's rows: C fragment (row g, group g0 + 2p + {0,1}; rows + 8)
__device__ __forceinline__ void key_bias_block(float (&bias)[4], const PackedArgs& a, const u32* q_pairs, int g0,
                                               int lane) {
    const int p = lane % 4, g = lane / 4;
    bias[0] = bias[1] = bias[2] = bias[3] = 0.f;
    u32 zeros[LANE_CHANNELS / 2];
    if (g0 + g < a.groups) {
        const scale_t* z = a.k_zeros + (g0 + g) * HEAD_DIM + p * LANE_CHANNELS;
#if SCALE_DTYPE == DTYPE_F32
#pragma unroll
        for (int n = 0; n < LANE_CHANNELS / 2; ++n) zeros[n] = pack_pair(z[2 * n], z[2 * n + 1]);
#else
        load_words(zeros, z);
#endif
    } else {
#pragma unroll
        for (int n = 0; n < LANE_CHANNELS / 2; ++n) zeros[n] = 0u;
    }
#pragma unroll
    for (int j = 0; j < KSTEPS; ++j) {
        const u32* row0 = q_pairs + g * Q_ROW_STRIDE + p * Q_LANE_STRIDE;
        const u32* row1 = row0 + 8 * Q_ROW_STRIDE;
        mma(bias, row0[2 * j], ROW_TILES > 1 ? row1[2 * j] : 0u, row0[2 * j + 1], ROW_TILES > 1 ? row1[2 * j + 1] : 0u,
            zeros[2 * j], zeros[2 * j + 1]);
    }
}

// copy step `step` (the warp's tokens 32 step ...) into the buffer at shared address `buffer` (advanced by the lane's
// 16 bytes); one commit group per step, empty or not
__device__ __forceinline__ void stage_step(u32 buffer, const PackedArgs& a, int step, int steps, int lane) {
    if (step < steps) {
        const u32 s = step * STEP;
        const u32 group = (u32)(a.first_token + s) >> a.key_group_shift;
        copy_async(buffer, a.k_codes, 4 * s * KEY_WORDS, STAGE_KEYS, lane);
        copy_async(buffer + AT_VALUES, a.v_codes, 4 * s / PER_WORD * HEAD_DIM, STAGE_VALUES, lane);
        copy_async(buffer + AT_VALUE_SCALES, a.v_scales, s * VALUE_GROUPS * sizeof(scale_t), STAGE_VALUE_PARAMS, lane);
        copy_async(buffer + AT_VALUE_ZEROS, a.v_zeros, s * VALUE_GROUPS * sizeof(scale_t), STAGE_VALUE_PARAMS, lane);
        copy_async(buffer + AT_KEY_SCALES, a.k_scales, group * HEAD_DIM * sizeof(scale_t), STAGE_KEY_SCALES, lane);
        if (a.norms != nullptr) copy_async(buffer + AT_NORMS, a.norms, 4 * s, STEP, lane);
    }
    commit_copies();
}

__device__ __forceinline__ void prefetch_l2(const void* address) {
    asm volatile("prefetch.global.L2 [%0];" :: "l"(address));
}

// the copies of the first STAGES - 1 steps of a warp's run (packed_run issues the others), and the key zeros of its
// first bias block into L2: issued before the query prologue, so that they are in flight while it runs
__device__ __forceinline__ void start_copies(StepBuffer* buffers, const PackedArgs& a, int steps, int lane) {
    const u32 buffer0 = shared_address(buffers) + 16 * lane;
#pragma unroll
    for (int step = 0; step < STAGES - 1; ++step)
        stage_step(buffer0 + step * (u32)sizeof(StepBuffer), a, step, steps, lane);
    if (steps > 0) {
        const int group = a.first_token >> a.key_group_shift;
        const int bytes = min(8, a.groups - group) * HEAD_DIM * (int)sizeof(scale_t);
        const char* zeros = reinterpret_cast<const char*>(a.k_zeros + group * HEAD_DIM);
        for (int offset = 128 * lane; offset < bytes; offset += 128 * WARP) prefetch_l2(zeros + offset);
    }
}

// a pair of 16-bit scale values from words holding them in order: elements `lo` and `hi`
template <int N>
__device__ __forceinline__ u32 scale_pair_at(const u32 (&raw)[N], int lo, int hi) {
#if SCALE_DTYPE == DTYPE_F32
    return pack_pair(__uint_as_float(raw[lo]), __uint_as_float(raw[hi]));
#else
    u32 r;
    const u32 selector = (lo % 2 ? 0x32u : 0x10u) | (hi % 2 ? 0x7600u : 0x5400u);
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(raw[lo / 2]), "r"(raw[hi / 2]), "r"(selector));
    return r;
#endif
}

// movmatrix: the 8x8 16-bit matrix whose row lane / 4, columns 2 (lane % 4) + {0, 1} this lane holds, transposed
__device__ __forceinline__ u32 transpose_pairs(u32 x) {
    u32 r;
    asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(r) : "r"(x));
    return r;
}

__device__ __forceinline__ float group_max(float x) {  // over the 8 lanes of one p = lane % 4
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 4));
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 8));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 16));
}

// S^T = C Q'^T, tokens as the 16 rows of the tensor-core product and query rows as its 8 columns: A = key codes
// (16 tokens x 16 channels), B = Q'^T (16 channels x 8 rows of row tile rt), so no half of an operand is padding. Row r
// of token tile mt is token tau(mt, r) = 8 (r % 8 / 2) + 4 mt + 2 (r / 8) + r % 2 of the step: lane (g, p) reads key
// rows 8 (g / 2) + g % 2 + 2 t for t = 2 mt + {0, 1} (rows g and g + 8 of tile mt) and holds the logits of these tokens
// for query rows 2p, 2p+1. Transposed (movmatrix), the probabilities of tile mt are the B fragment of P^T for the
// value k-step mt with the lane's tokens 8p + 4 mt + {0, 1} (b0) and + {2, 3} (b1): the order the value codes are read
// in.
__device__ __forceinline__ void packed_run(const PackedArgs& a, const SharedMemory& shared, StepBuffer* buffers,
                                           int steps, const int (&limit)[ROW_TILES][2], int warp_limit,
                                           int packed_end, int lane, RowState& state,
                                           float (&out)[ROW_TILES][VALUE_TILES][4], float (&zero_acc)[ROW_TILES][2],
                                           float (&correction)[ROW_TILES][VALUE_GROUPS][2]) {
    const int p = lane % 4, g = lane / 4;
    const u32 buffer0 = shared_address(buffers) + 16 * lane, magic = magic_register();  // the lane's copy targets
    constexpr u32 STAGE_BYTES = (u32)sizeof(StepBuffer);
    u32 fill = buffer0 + (STAGES - 1) * STAGE_BYTES;  // the buffer the next copies go to
    int stage = 0;                                     // the buffer of the current step
    const u32* my_q[ROW_TILES];
#pragma unroll
    for (int rt = 0; rt < ROW_TILES; ++rt)
        my_q[rt] = shared.q_code_pairs + (g + 8 * rt) * Q_ROW_STRIDE + p * Q_LANE_STRIDE;
    u32 q_scaled[ROW_TILES][LANE_CHANNELS / 2];
    float bias_block[4], bias[ROW_TILES][2];
    int current_group = -1, block_start = -1;
    const int key_token = 8 * (g / 2) + g % 2;  // + 2t: the lane's key rows of a step
    // the lane's value tokens 8p .. 8p+7 of the step: slot pairs 0-3 of word row p (4 bits), or of word row p / 2
    // shifted right by 8 bits for odd p (2 bits: a word row holds 16 tokens, the odd lane's are in pairs 4-7)
#if BITS == 2
    const int word_row = p / 2, value_shift = 8 * (p % 2);
#else
    const int word_row = p, value_shift = 0;
#endif

    for (int step = 0; step < steps; ++step) {
        stage_step(fill, a, step + STAGES - 1, steps, lane);
        fill = fill + STAGE_BYTES == buffer0 + STAGES * STAGE_BYTES ? buffer0 : fill + STAGE_BYTES;
        wait_copies<STAGES - 1>();
        __syncwarp();
        const StepBuffer& buffer = buffers[stage];
        stage = stage + 1 == STAGES ? 0 : stage + 1;
        const int t0 = a.first_token + step * STEP;
        const int group = t0 >> a.key_group_shift;
        if (group != current_group) {  // fold the key group's scales into the query, pick its bias
            if (block_start < 0 || group >= block_start + 8) {
                block_start = group;
                key_bias_block(bias_block, a, shared.q_pairs, block_start, lane);
            }
            const int slot = group - block_start;
            u32 scales[LANE_CHANNELS / 2];
            const scale_t* s = reinterpret_cast<const scale_t*>(buffer.key_scales) + p * LANE_CHANNELS;
#if SCALE_DTYPE == DTYPE_F32
#pragma unroll
            for (int n = 0; n < LANE_CHANNELS / 2; ++n) scales[n] = pack_pair(s[2 * n], s[2 * n + 1]);
#else
            load_words(scales, s);
#endif
#pragma unroll
            for (int rt = 0; rt < ROW_TILES; ++rt) {
#pragma unroll
                for (int n = 0; n < LANE_CHANNELS / 2; ++n) q_scaled[rt][n] = mul_pair(my_q[rt][n], scales[n]);
                // the sum of row g + 8 rt of the query operand over all channels, exactly as the tensor cores see it:
                // times MAGIC it is what the codes' offsets add to each of its logits. Rows g and g + 8 of A both
                // carry row g + 8 rt here (four pairs per product), so the sum is d[0] + d[2].
                float sum[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
                for (int n = 0; n < LANE_CHANNELS / 2; n += 4)
                    mma(sum, q_scaled[rt][n], q_scaled[rt][n + 1], q_scaled[rt][n + 2], q_scaled[rt][n + 3], ONE_PAIR,
                        ONE_PAIR);
                // row g + 8 rt's bias (held by lane 4g + slot / 2), then rows 8 rt + 2p + e of this lane
                const float block_bias = slot % 2 ? bias_block[2 * rt + 1] : bias_block[2 * rt];
                const float row_bias =
                    __shfl_sync(0xffffffffu, block_bias, 4 * g + slot / 2) - MAGIC_VALUE * (sum[0] + sum[2]);
                bias[rt][0] = __shfl_sync(0xffffffffu, row_bias, 8 * p);
                bias[rt][1] = __shfl_sync(0xffffffffu, row_bias, 8 * p + 4);
            }
            current_group = group;
        }

        // ---- S^T = C Q'^T over 2 tiles of 16 tokens: st[rt][mt] = (token rows g, g + 8; query columns 2p, 2p+1)
        float st[ROW_TILES][2][4];
        {
            u32 words[4][LANE_KEY_WORDS];
#pragma unroll
            for (int t = 0; t < 4; ++t)
                load_words(words[t], buffer.keys + (key_token + 2 * t) * KEY_WORDS + p * LANE_KEY_WORDS);
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
                for (int rt = 0; rt < ROW_TILES; ++rt)
                    st[rt][mt][0] = st[rt][mt][1] = st[rt][mt][2] = st[rt][mt][3] = 0.f;
#pragma unroll
                for (int j = 0; j < KSTEPS; ++j) {
                    const int n0 = 2 * j, n1 = 2 * j + 1;
                    const u32 a0 = code_pair(words[2 * mt][n0 / PAIRS_PER_WORD], n0 % PAIRS_PER_WORD, magic);
                    const u32 a1 = code_pair(words[2 * mt + 1][n0 / PAIRS_PER_WORD], n0 % PAIRS_PER_WORD, magic);
                    const u32 a2 = code_pair(words[2 * mt][n1 / PAIRS_PER_WORD], n1 % PAIRS_PER_WORD, magic);
                    const u32 a3 = code_pair(words[2 * mt + 1][n1 / PAIRS_PER_WORD], n1 % PAIRS_PER_WORD, magic);
#pragma unroll
                    for (int rt = 0; rt < ROW_TILES; ++rt)
                        mma(st[rt][mt], a0, a1, a2, a3, q_scaled[rt][n0], q_scaled[rt][n1]);
                }
            }
        }

        // ---- logits[rt][t][e]: token key_token + 2t (t = 2 mt + half), query row 8 rt + 2p + e; times the token
        // norms, masked where needed
        float logits[ROW_TILES][4][2];
        float norm[4];
#pragma unroll
        for (int t = 0; t < 4; ++t) norm[t] = a.norms != nullptr ? buffer.norms[key_token + 2 * t] : 1.f;
#pragma unroll
        for (int rt = 0; rt < ROW_TILES; ++rt)
#pragma unroll
            for (int t = 0; t < 4; ++t)
#pragma unroll
                for (int e = 0; e < 2; ++e) logits[rt][t][e] = norm[t] * (st[rt][t / 2][2 * (t % 2) + e] + bias[rt][e]);
        if (t0 + STEP > warp_limit) {  // a step at the end of the packed part or of a causal row: mask (uniform branch)
#pragma unroll
            for (int rt = 0; rt < ROW_TILES; ++rt)
#pragma unroll
                for (int t = 0; t < 4; ++t)
#pragma unroll
                    for (int e = 0; e < 2; ++e)
                        if (t0 + key_token + 2 * t >= limit[rt][e]) logits[rt][t][e] = NEG_INF;
        }

        // ---- online softmax (base 2) of the lane's query rows over the step's 32 tokens (8 lanes share a row)
        float alpha[ROW_TILES][2];
        bool rescale = false;
#pragma unroll
        for (int rt = 0; rt < ROW_TILES; ++rt) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const float m =
                    fmaxf(fmaxf(logits[rt][0][e], logits[rt][1][e]), fmaxf(logits[rt][2][e], logits[rt][3][e]));
                const float m_new = fmaxf(state.max[rt][e], group_max(m));
                const float m_use = m_new == NEG_INF ? 0.f : m_new;
                alpha[rt][e] = fast_exp2(state.max[rt][e] - m_use);
                rescale = rescale || alpha[rt][e] != 1.f;
                state.max[rt][e] = m_new;
                float sum = 0.f;
#pragma unroll
                for (int t = 0; t < 4; ++t) {
                    logits[rt][t][e] = fast_exp2(logits[rt][t][e] - m_use);
                    sum += logits[rt][t][e];
                }
                state.sum[rt][e] = state.sum[rt][e] * alpha[rt][e] + sum;
            }
        }
        if (__any_sync(0xffffffffu, rescale)) {  // O^T fragments hold the same rows 2p, 2p+1 as columns
#pragma unroll
            for (int rt = 0; rt < ROW_TILES; ++rt) {
                const float f0 = alpha[rt][0], f1 = alpha[rt][1];
#pragma unroll
                for (int i = 0; i < VALUE_TILES; ++i) {
                    out[rt][i][0] *= f0; out[rt][i][1] *= f1; out[rt][i][2] *= f0; out[rt][i][3] *= f1;
                }
                zero_acc[rt][0] *= f0; zero_acc[rt][1] *= f1;
#pragma unroll
                for (int vg = 0; vg < VALUE_GROUPS; ++vg) { correction[rt][vg][0] *= f0; correction[rt][vg][1] *= f1; }
            }
        }

        // ---- values of the lane's tokens t0 + 8p .. +7: scales (all groups), zeros (group g), codes
        constexpr int param_words = 8 * VALUE_GROUPS * (int)sizeof(scale_t) / 4;
        u32 v_scales[param_words];
        load_words(v_scales, buffer.value_scales + p * param_words);
        // zeros of group g (lanes g >= VALUE_GROUPS read group 0 and zero their operand below)
        const scale_t* v_zeros = reinterpret_cast<const scale_t*>(buffer.value_zeros) + 8 * p * VALUE_GROUPS +
                                 (g < VALUE_GROUPS ? g : 0);
        scale_t v_zero[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) v_zero[k] = v_zeros[k * VALUE_GROUPS];
        if (t0 + STEP > packed_end) {  // beyond the packed tokens the storage may hold anything: keep 0 * x finite
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                if (t0 + 8 * p + k >= packed_end) {
                    v_zero[k] = (scale_t)0;
#pragma unroll
                    for (int vg = 0; vg < VALUE_GROUPS; ++vg) {
                        const int element = k * VALUE_GROUPS + vg;
#if SCALE_DTYPE == DTYPE_F32
                        v_scales[element] = 0u;
#else
                        v_scales[element / 2] &= element % 2 ? 0x0000ffffu : 0xffff0000u;
#endif
                    }
                }
            }
        }
        u32 v_words[VALUE_BLOCKS][4];
#pragma unroll
        for (int blk = 0; blk < VALUE_BLOCKS; ++blk) {
            load_words(v_words[blk], buffer.values + word_row * HEAD_DIM + 32 * blk + 4 * g);
#pragma unroll
            for (int k = 0; k < 4; ++k) v_words[blk][k] >>= value_shift;
        }

        // ---- O^T += V^T (P S_v)^T, zeros Z^T P^T, offsets sum_t (P S_v)^T; two k-steps of 16 tokens
#pragma unroll
        for (int ks = 0; ks < 2; ++ks) {
            u32 probs[ROW_TILES][2], scaled[ROW_TILES][VALUE_GROUPS][2];
#pragma unroll
            for (int rt = 0; rt < ROW_TILES; ++rt) {
                probs[rt][0] = transpose_pairs(pack_pair(logits[rt][2 * ks][0], logits[rt][2 * ks][1]));
                probs[rt][1] = transpose_pairs(pack_pair(logits[rt][2 * ks + 1][0], logits[rt][2 * ks + 1][1]));
                const float f0 = code_factor(2 * ks), f1 = code_factor(2 * ks + 1);
                const u32 folded0 = f0 == 1.f ? probs[rt][0] : mul_pair(probs[rt][0], pack_pair(f0, f0));
                const u32 folded1 = f1 == 1.f ? probs[rt][1] : mul_pair(probs[rt][1], pack_pair(f1, f1));
#pragma unroll
                for (int vg = 0; vg < VALUE_GROUPS; ++vg) {
                    const int k = 4 * ks;  // the lane's tokens k, k + 1 (b0) and k + 2, k + 3 (b1)
                    scaled[rt][vg][0] = mul_pair(folded0, scale_pair_at(v_scales, k * VALUE_GROUPS + vg,
                                                                         (k + 1) * VALUE_GROUPS + vg));
                    scaled[rt][vg][1] = mul_pair(folded1, scale_pair_at(v_scales, (k + 2) * VALUE_GROUPS + vg,
                                                                         (k + 3) * VALUE_GROUPS + vg));
                    mma_low(correction[rt][vg], ONE_PAIR, ONE_PAIR, ONE_PAIR, ONE_PAIR, scaled[rt][vg][0],
                            scaled[rt][vg][1]);
                }
            }
#if SCALE_DTYPE == DTYPE_F32
            u32 z0 = pack_pair(v_zero[4 * ks], v_zero[4 * ks + 1]);
            u32 z1 = pack_pair(v_zero[4 * ks + 2], v_zero[4 * ks + 3]);
#else
            u32 z0 = (u32)v_zero[4 * ks] | ((u32)v_zero[4 * ks + 1] << 16);
            u32 z1 = (u32)v_zero[4 * ks + 2] | ((u32)v_zero[4 * ks + 3] << 16);
#endif
            if (g >= VALUE_GROUPS) z0 = z1 = 0u;  // rows of Z^T beyond the value groups
#pragma unroll
            for (int rt = 0; rt < ROW_TILES; ++rt) mma_low(zero_acc[rt], z0, 0u, z1, 0u, probs[rt][0], probs[rt][1]);
            const int pair0 = 2 * ks;
#pragma unroll
            for (int i = 0; i < VALUE_TILES; ++i) {
                const u32 word_a = v_words[i / 2][2 * (i % 2)], word_b = v_words[i / 2][2 * (i % 2) + 1];
                const u32 a0 = code_pair(word_a, pair0, magic), a1 = code_pair(word_b, pair0, magic);
                const u32 a2 = code_pair(word_a, pair0 + 1, magic), a3 = code_pair(word_b, pair0 + 1, magic);
                const int vg = 32 * (i / 2) / VALUE_GROUP;
#pragma unroll
                for (int rt = 0; rt < ROW_TILES; ++rt)
                    mma(out[rt][i], a0, a1, a2, a3, scaled[rt][vg][0], scaled[rt][vg][1]);
            }
        }
        __syncwarp();  // the buffer is refilled next
    }
    wait_copies<0>();
}

// ---------------------------------------------------------------------------------------------------------------
// window path: full-precision keys and values on the tensor cores. A window split is 32 window tokens; a warp takes one
// split (WARPS consecutive splits per window block) for all of the block's query rows and writes their partial results
// itself (no merge with the other warps). Same products as the packed path, with the window's float16/bfloat16 keys and
// values as operands as they are: S^T = K Q^T (tokens as the 16 rows, the lane's quarter of the channels as its part of
// the reduction, so a lane reads 16-byte runs of its key rows; the query split into a high and a low half, both in the
// window's dtype, for float32-like logits), then O^T = V^T P^T, the value tiles transposed in registers (movmatrix)
// from 16-byte loads of value rows.

#define LANE_ELEMENTS (HEAD_DIM / WARP)
#define WINDOW_SPLIT 32  // window tokens per window split

#if IN_DTYPE == DTYPE_F16
#define IN_MMA_TYPE "f16"
#else
#define IN_MMA_TYPE "bf16"
#endif

// two floats as a pair of the window's dtype (low half = lo)
__device__ __forceinline__ u32 pack_in_pair(float lo, float hi) {
    u32 r;
    asm("cvt.rn." IN_MMA_TYPE "x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// the two halves of a pair of the window's dtype as floats
__device__ __forceinline__ float2 unpack_in_pair(u32 x) {
    return make_float2(in_to_f32((in_t)(x & 0xffffu)), in_to_f32((in_t)(x >> 16)));
}

__device__ __forceinline__ void mma_in(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32." IN_MMA_TYPE "." IN_MMA_TYPE ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// the query position of query row r (of `rows`, q_len positions per query head): it sees the tokens up to
// (all tokens) - q_len + position; a padding row beyond `rows` takes the last position
__device__ __forceinline__ int query_position(int r, int rows, int q_len) {
    return r < rows ? r % q_len : q_len - 1;
}

// the 128-byte lines of one window row into L2 (its last byte too: a row need not start on a line)
__device__ __forceinline__ void prefetch_row(const in_t* row) {
    const char* bytes = reinterpret_cast<const char*>(row);
#pragma unroll
    for (int offset = 0; offset < HEAD_DIM * (int)sizeof(in_t); offset += 128) prefetch_l2(bytes + offset);
    prefetch_l2(bytes + HEAD_DIM * sizeof(in_t) - 1);
}

// The query rows of the block, unrotated, times scale_log2, as high and low pairs of the window's dtype in the lanes'
// channel order (shared.q_pairs, shared.q_code_pairs: the packed path's layout), from shared.q.
__device__ __forceinline__ void window_query_pairs(SharedMemory& shared, float scale_log2) {
    for (int i = threadIdx.x; i < RPB * HEAD_DIM / 2; i += THREADS) {
        const int r = i / (HEAD_DIM / 2), c = 2 * (i % (HEAD_DIM / 2));
        const float x0 = shared.q[r][c] * scale_log2, x1 = shared.q[r][c + 1] * scale_log2;
        const u32 high = pack_in_pair(x0, x1);
        const float2 h = unpack_in_pair(high);
        const int index = r * Q_ROW_STRIDE + (c / LANE_CHANNELS) * Q_LANE_STRIDE + (c % LANE_CHANNELS) / 2;
        shared.q_pairs[index] = high;
        shared.q_code_pairs[index] = pack_in_pair(x0 - h.x, x1 - h.y);
    }
}

// Window tokens [start, stop) of (sequence, KV head) for all RPB query rows of the block, 32 at a time (more than 32
// only in the last split of a window longer than the plan's): local row r (query position r % q_len of block row
// r + row_offset, the last one for padding rows beyond `rows`) sees the window tokens below visible + its position.
// Writes partial rows `slot` + r for r < block_rows. Not inlined: in the kernel's body, its registers change how ptxas
// allocates the packed loop's (see DECODE_REGISTERS in oscar_cupy/kernels.py).
__device__ __noinline__ void window_split(const SharedMemory& shared, const in_t* keys, i64 key_stride,
                                          const in_t* values, i64 value_stride, i64 start, i64 stop, i64 visible,
                                          int row_offset, int block_rows, int rows, int q_len, int lane, i64 slot,
                                          float* __restrict__ partial_o, float2* __restrict__ partial_ml,
                                          int* __restrict__ unit_count) {
    const int p = lane % 4, g = lane / 4;
    i64 end[ROW_TILES][2];  // window tokens visible to the lane's query rows 8 rt + 2p + e
#pragma unroll
    for (int rt = 0; rt < ROW_TILES; ++rt)
#pragma unroll
        for (int e = 0; e < 2; ++e)
            end[rt][e] = min(stop, visible + query_position(row_offset + 8 * rt + 2 * p + e, rows, q_len));
    float row_max[ROW_TILES][2], row_sum[ROW_TILES][2], out[ROW_TILES][VALUE_TILES][4];
#pragma unroll
    for (int rt = 0; rt < ROW_TILES; ++rt) {
        row_max[rt][0] = row_max[rt][1] = NEG_INF;
        row_sum[rt][0] = row_sum[rt][1] = 0.f;
#pragma unroll
        for (int i = 0; i < VALUE_TILES; ++i) out[rt][i][0] = out[rt][i][1] = out[rt][i][2] = out[rt][i][3] = 0.f;
    }
    for (i64 first = start; first < stop; first += STEP) {
        // ---- S^T: token tile mt, rows g and g + 8 = tokens first + 16 mt + 8 h + g (h = 0, 1); zeros beyond stop
        float st[ROW_TILES][2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
            u32 words[2][LANE_CHANNELS / 2];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const i64 token = first + 16 * mt + 8 * h + g;
                if (token < stop) {
                    load_words(words[h], keys + token * key_stride + p * LANE_CHANNELS);
                } else {
#pragma unroll
                    for (int n = 0; n < LANE_CHANNELS / 2; ++n) words[h][n] = 0u;
                }
            }
#pragma unroll
            for (int rt = 0; rt < ROW_TILES; ++rt) {
                st[rt][mt][0] = st[rt][mt][1] = st[rt][mt][2] = st[rt][mt][3] = 0.f;
                const u32* high = shared.q_pairs + (g + 8 * rt) * Q_ROW_STRIDE + p * Q_LANE_STRIDE;
                const u32* low = shared.q_code_pairs + (g + 8 * rt) * Q_ROW_STRIDE + p * Q_LANE_STRIDE;
#pragma unroll
                for (int j = 0; j < KSTEPS; ++j) {
                    const u32 a0 = words[0][2 * j], a1 = words[1][2 * j], a2 = words[0][2 * j + 1],
                              a3 = words[1][2 * j + 1];
                    mma_in(st[rt][mt], a0, a1, a2, a3, high[2 * j], high[2 * j + 1]);
                    mma_in(st[rt][mt], a0, a1, a2, a3, low[2 * j], low[2 * j + 1]);
                }
            }
        }
        // ---- online softmax (base 2) of the lane's query rows 8 rt + 2p + e over the 32 tokens (8 lanes share a row)
        bool rescale = false;
        float alpha[ROW_TILES][2];
#pragma unroll
        for (int rt = 0; rt < ROW_TILES; ++rt) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                float m = NEG_INF;
#pragma unroll
                for (int mt = 0; mt < 2; ++mt)
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const i64 token = first + 16 * mt + 8 * h + g;
                        float& x = st[rt][mt][2 * h + e];
                        if (token >= end[rt][e]) x = NEG_INF;
                        m = fmaxf(m, x);
                    }
                const float m_new = fmaxf(row_max[rt][e], group_max(m));
                const float m_use = m_new == NEG_INF ? 0.f : m_new;
                alpha[rt][e] = fast_exp2(row_max[rt][e] - m_use);
                rescale = rescale || alpha[rt][e] != 1.f;
                row_max[rt][e] = m_new;
                float sum = 0.f;
#pragma unroll
                for (int mt = 0; mt < 2; ++mt)
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        float& x = st[rt][mt][2 * h + e];
                        x = fast_exp2(x - m_use);
                        sum += x;
                    }
                row_sum[rt][e] = row_sum[rt][e] * alpha[rt][e] + sum;
            }
        }
        if (__any_sync(0xffffffffu, rescale)) {
#pragma unroll
            for (int rt = 0; rt < ROW_TILES; ++rt)
#pragma unroll
                for (int i = 0; i < VALUE_TILES; ++i) {
                    out[rt][i][0] *= alpha[rt][0]; out[rt][i][1] *= alpha[rt][1];
                    out[rt][i][2] *= alpha[rt][0]; out[rt][i][3] *= alpha[rt][1];
                }
        }
        // ---- O^T += V^T P^T, k-step mt over tokens first + 16 mt ...: P^T from S^T's fragments transposed; value
        // tile i holds channels 32 (i / 2) + 8 (r % 8 / 2) + 2 t + r % 2 in its row r, t = 2 (i % 2) + r / 8
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
            u32 probs[ROW_TILES][2];
#pragma unroll
            for (int rt = 0; rt < ROW_TILES; ++rt)
#pragma unroll
                for (int h = 0; h < 2; ++h)
                    probs[rt][h] = transpose_pairs(pack_in_pair(st[rt][mt][2 * h], st[rt][mt][2 * h + 1]));
            u32 v[2][VALUE_BLOCKS][4];  // value rows first + 16 mt + 8 h + g: channels 32 blk + 8p .. + 7
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const i64 token = first + 16 * mt + 8 * h + g;
#pragma unroll
                for (int blk = 0; blk < VALUE_BLOCKS; ++blk) {
                    if (token < stop) {
                        load_words(v[h][blk], values + token * value_stride + 32 * blk + 8 * p);
                    } else {
                        v[h][blk][0] = v[h][blk][1] = v[h][blk][2] = v[h][blk][3] = 0u;
                    }
                }
            }
#pragma unroll
            for (int i = 0; i < VALUE_TILES; ++i) {
                const int blk = i / 2, t = 2 * (i % 2);
                const u32 a0 = transpose_pairs(v[0][blk][t]), a1 = transpose_pairs(v[0][blk][t + 1]);
                const u32 a2 = transpose_pairs(v[1][blk][t]), a3 = transpose_pairs(v[1][blk][t + 1]);
#pragma unroll
                for (int rt = 0; rt < ROW_TILES; ++rt) mma_in(out[rt][i], a0, a1, a2, a3, probs[rt][0], probs[rt][1]);
            }
        }
    }
    // ---- partial rows: O^T fragment (row g: channel c0, row g + 8: channel c0 + 2; query rows 2p, 2p + 1)
#pragma unroll
    for (int rt = 0; rt < ROW_TILES; ++rt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int row = 8 * rt + 2 * p + e;
            float sum = row_sum[rt][e];
#pragma unroll
            for (int off = 4; off < WARP; off *= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
            if (row >= block_rows) continue;
            float* target = partial_o + (slot + row) * HEAD_DIM;
#pragma unroll
            for (int i = 0; i < VALUE_TILES; ++i) {
                const int c0 = 32 * (i / 2) + 8 * (g / 2) + 4 * (i % 2) + g % 2;
                target[c0] = out[rt][i][e];
                target[c0 + 2] = out[rt][i][2 + e];
            }
            if (g == 0) partial_ml[slot + row] = make_float2(row_max[rt][e], sum);
        }
    }
    __threadfence();
    __syncwarp();
    if (lane == 0) atomicAdd(unit_count, 1);  // the warp's partial rows are written
}

// The block's partial rows, once every warp has stored its softmax statistics in shared.row_max/row_sum and its
// unnormalized output rows in `scratch` (warp w's row r at (w * RPB + r) * SCRATCH_ROW floats): thread i adds the
// warps' channels 4 (i % (D / 4)) .. + 3 of block row i / (D / 4), each warp's scaled to the block maximum, in warp
// order (deterministic), and writes them to partial_o; threads below block_rows write partial_ml. Rows from block_rows
// on are padding, never written (nor read).
#define SCRATCH_ROW (HEAD_DIM + 4)  // floats: padded so that the warps' 16-byte stores of 4 rows do not conflict
__device__ __forceinline__ void store_block_partials(const SharedMemory& shared, const float* scratch, i64 block,
                                                     int block_rows, float* __restrict__ partial_o,
                                                     float2* __restrict__ partial_ml) {
    auto factor = [&](int w, int row, float block_max) {
        const float mine = shared.row_max[w][row];
        return mine == NEG_INF ? 0.f : fast_exp2(mine - block_max);
    };
    auto block_max_of = [&](int row) {
        float m = NEG_INF;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) m = fmaxf(m, shared.row_max[w][row]);
        return m;
    };
    for (int i = threadIdx.x; i < block_rows * (HEAD_DIM / 4); i += THREADS) {
        const int row = i / (HEAD_DIM / 4), c = 4 * (i % (HEAD_DIM / 4));
        const float block_max = block_max_of(row);
        float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
        for (int w = 0; w < WARPS; ++w) {
            const float f = factor(w, row, block_max);
            const float4 x = *reinterpret_cast<const float4*>(scratch + (w * RPB + row) * SCRATCH_ROW + c);
            sum.x = fmaf(x.x, f, sum.x); sum.y = fmaf(x.y, f, sum.y);
            sum.z = fmaf(x.z, f, sum.z); sum.w = fmaf(x.w, f, sum.w);
        }
        *reinterpret_cast<float4*>(partial_o + (block * RPB + row) * HEAD_DIM + c) = sum;
    }
    if (threadIdx.x < block_rows) {
        const int row = threadIdx.x;
        const float block_max = block_max_of(row);
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) sum += shared.row_sum[w][row] * factor(w, row, block_max);
        partial_ml[block * RPB + row] = make_float2(block_max, sum);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The work of a launch. A unit is one (sequence, KV head, row block): u = (b * kv_heads + h) * row_blocks + rb, of
// `units`. Its packed part is unit_steps 32-token steps (the plan's longest sequence; a shorter sequence's steps beyond
// its end are empty, and the unit's last step runs to its end where a sequence is longer than the plan). The packed
// blocks share the steps of all units in a row, T = units * unit_steps of them (stream-K): block i takes steps
// [start(i), start(i + 1)), as one segment per unit it touches. The last late_blocks packed blocks take late_steps
// steps fewer than the others (PackedPartition; every block holds at least one step): their slots take the window
// blocks (after the packed ones in the grid) that find no free slot. Segment (i, u) writes its partial rows at
// index i + u (unique: from one segment of the blocks to the next, i or u grows), window split w of unit u at index
// packed_blocks + units + u * window_splits + w. Index n, block row r: row n * RPB + r of partial_o (unnormalized
// float32, rotated basis for packed segments) and partial_ml (base-2 max, sum), for the rows below `rows` (the others
// are padding: zero queries, never written).
struct PackedPartition {
    int blocks, late_blocks, late_steps;  // blocks below 1024 (u32 reciprocal, see start)
    int block_steps, remainder;  // T + late_steps * late_blocks = block_steps * blocks + remainder (below 2^31)
    u32 reciprocal;              // ceil(2^32 / blocks): __umulhi(a, reciprocal) = a / blocks for a < blocks^2

    __device__ PackedPartition(int units, int unit_steps, int blocks_, int late_blocks_, int late_steps_)
        : blocks(blocks_), late_blocks(late_blocks_), late_steps(late_steps_) {
        const int rate = units * unit_steps + late_steps * late_blocks;
        block_steps = rate / blocks;
        remainder = rate - block_steps * blocks;
        reciprocal = 0xffffffffu / blocks + 1;
    }

    __device__ int early() const { return blocks - late_blocks; }

    // the first step of packed block i (i = blocks: T): i * remainder < blocks^2, and blocks^3 < 2^32 makes the
    // reciprocal's quotient exact
    __device__ int start(int i) const {
        return i * block_steps - max(0, i - early()) * late_steps + (int)__umulhi(i * remainder, reciprocal);
    }

    // the packed block that holds step x (the largest i with start(i) <= x): block boundaries lie within a step of
    // multiples of the blocks' mean size, so the float32 estimate is off by at most one block
    __device__ int block_of(int x) const {
        const float mean = block_steps + remainder * __int_as_float(0x2f800000) * reciprocal;  // 2^-32
        const int boundary = start(early());
        int i = x < boundary ? (int)(x * __fdividef(1.f, mean))
                             : early() + (int)((x - boundary) * __fdividef(1.f, mean - late_steps));
        i = min(i, blocks - 1);
        if (start(i) > x) --i;
        else if (i + 1 < blocks && start(i + 1) <= x) ++i;
        return i;
    }
};

// The query rows rb * RPB ... of (sequence b, KV head h), zeros beyond `rows`, in two parts so that the loads are in
// flight while the block works out its segment: load_queries takes the rows into registers with 16-byte loads, 8
// channels per chunk (the plan hands over rows that are 16-byte aligned: _row_strides in oscar_cupy/cuda_attention.py),
// store_queries puts them into shared.q as float32.
#define Q_CHUNKS_TOTAL (RPB * HEAD_DIM / 8)
#define Q_CHUNKS ((Q_CHUNKS_TOTAL + THREADS - 1) / THREADS)  // per thread
__device__ __forceinline__ void load_queries(u32 (&chunks)[Q_CHUNKS][4], const in_t* __restrict__ q, i64 q_sb, i64 q_sh,
                                             i64 q_sl, i64 b, int h, int rb, int rows, int q_len) {
    const int group_size = rows / q_len;  // query heads per KV head
#pragma unroll
    for (int k = 0; k < Q_CHUNKS; ++k) {
        const int chunk = threadIdx.x + k * THREADS, r = rb * RPB + chunk / (HEAD_DIM / 8);
        chunks[k][0] = chunks[k][1] = chunks[k][2] = chunks[k][3] = 0u;
        if (chunk < Q_CHUNKS_TOTAL && r < rows)
            load_words(chunks[k], q + b * q_sb + (i64)(h * group_size + r / q_len) * q_sh + (i64)(r % q_len) * q_sl +
                                      8 * (chunk % (HEAD_DIM / 8)));
    }
}

__device__ __forceinline__ void store_queries(SharedMemory& shared, const u32 (&chunks)[Q_CHUNKS][4]) {
#pragma unroll
    for (int k = 0; k < Q_CHUNKS; ++k) {
        const int chunk = threadIdx.x + k * THREADS;
        if (chunk < Q_CHUNKS_TOTAL) {
            float* target = &shared.q[chunk / (HEAD_DIM / 8)][8 * (chunk % (HEAD_DIM / 8))];
#pragma unroll
            for (int e = 0; e < 8; e += 4)
                *reinterpret_cast<float4*>(target + e) = make_float4(
                    in_to_f32((in_t)(chunks[k][e / 2] & 0xffffu)), in_to_f32((in_t)(chunks[k][e / 2] >> 16)),
                    in_to_f32((in_t)(chunks[k][e / 2 + 1] & 0xffffu)), in_to_f32((in_t)(chunks[k][e / 2 + 1] >> 16)));
        }
    }
}

// Segment [first_step, stop_step) of unit u's packed steps (see above) by one packed block: its query rows rotated into
// shared memory, the warps' runs of steps, their merge into partial rows `partial_index`. Not inlined: in the loop of
// decode_attention over a block's segments, ptxas would allocate the packed loop's registers otherwise (731 instead of
// 691 SASS instructions per step). ptxas lays a kernel's functions out in the order of their mangled names: this one
// comes right after the kernel's body, before window_split (placed after the former window functions, 150 KB on, the
// packed blocks at batch 1 stalled on instruction fetches: 13.3 -> 15.0 us at 1 x 4k).
__device__ __noinline__ void run_segment(
    SharedMemory& shared, StepBuffer* step_buffers, const in_t* __restrict__ q, i64 q_sb, i64 q_sh, i64 q_sl,
    const u32* __restrict__ k_codes, const scale_t* __restrict__ k_scales, const scale_t* __restrict__ k_zeros,
    const u32* __restrict__ v_codes, const scale_t* __restrict__ v_scales, const scale_t* __restrict__ v_zeros,
    const float* __restrict__ norms, int norm_heads, const i64* __restrict__ packed_lengths, int capacity,
    const i64* __restrict__ window_lengths, int kv_heads, int q_len, int rows, int row_blocks, int key_group,
    int unit_steps, int rotate, float hadamard_normalization, float scale_log2, int u, int first_step, int stop_step,
    i64 partial_index, float* __restrict__ partial_o, float2* __restrict__ partial_ml, int* __restrict__ unit_count) {
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    StepBuffer* buffers = step_buffers + warp * STAGES;

    const int bh = u / row_blocks, rb = u % row_blocks, h = bh % kv_heads;
    const i64 b = bh / kv_heads;
    u32 query_chunks[Q_CHUNKS][4];
    load_queries(query_chunks, q, q_sb, q_sh, q_sl, b, h, rb, rows, q_len);
    const i64 packed = packed_lengths[b], windowed = window_lengths != nullptr ? window_lengths[b] : 0;
    // the segment's tokens: to the sequence's end in the unit's last step
    const i64 split_start = (i64)first_step * STEP;
    const i64 split_stop = stop_step == unit_steps ? packed : min(packed, (i64)stop_step * STEP);
    const int steps = split_stop > split_start ? (int)((split_stop - split_start + STEP - 1) / STEP) : 0;
    const int per_warp = (steps + WARPS - 1) / WARPS;
    const int my_first = min(steps, warp * per_warp), my_steps = min(steps, my_first + per_warp) - my_first;
    const int first_token = (int)split_start + my_first * STEP;
    const i64 first_row = (i64)bh * capacity + first_token;  // the warp's first token in the storage
    auto lane_source = [&](const void* array) { return reinterpret_cast<const char*>(array) + 16 * lane; };
    PackedArgs args;
    args.key_group_shift = __ffs(key_group) - 1;
    args.groups = capacity >> args.key_group_shift;
    args.k_codes = lane_source(k_codes + first_row * KEY_WORDS);
    args.v_codes = lane_source(v_codes + first_row / PER_WORD * HEAD_DIM);
    args.v_scales = lane_source(v_scales + first_row * VALUE_GROUPS);
    args.v_zeros = lane_source(v_zeros + first_row * VALUE_GROUPS);
    args.k_scales = lane_source(k_scales + (i64)bh * args.groups * HEAD_DIM);
    args.norms = norms != nullptr
                     ? lane_source(norms + (b * norm_heads + (norm_heads == 1 ? 0 : h)) * capacity + first_token)
                     : nullptr;
    args.k_zeros = k_zeros + (i64)bh * args.groups * HEAD_DIM;
    args.first_token = first_token;
    start_copies(buffers, args, my_steps, lane);
    store_queries(shared, query_chunks);
    __syncthreads();

    // rotate the query rows, scale, store as operand pairs in the lanes' channel order
    const int block_rows = min(RPB, rows - rb * RPB);  // the block's query rows below `rows` (the rest: padding)
    for (int r = warp; r < RPB; r += WARPS) {
        float x[LANE_ELEMENTS];
#pragma unroll
        for (int j = 0; j < LANE_ELEMENTS; ++j) x[j] = shared.q[r][lane * LANE_ELEMENTS + j];
        if (rotate && r < block_rows) fwht_row<HEAD_DIM, LANE_ELEMENTS>(x, lane, hadamard_normalization);
#pragma unroll
        for (int j = 0; j < LANE_ELEMENTS; j += 2) {
            const int c = lane * LANE_ELEMENTS + j;  // channel pair c, c + 1 belongs to lane c / LANE_CHANNELS
            const int index = r * Q_ROW_STRIDE + (c / LANE_CHANNELS) * Q_LANE_STRIDE + (c % LANE_CHANNELS) / 2;
            const float f = code_factor((c % LANE_CHANNELS) / 2 % PAIRS_PER_WORD);  // its key slot pair's factor
            shared.q_pairs[index] = pack_pair(x[j] * scale_log2, x[j + 1] * scale_log2);
            shared.q_code_pairs[index] = pack_pair(x[j] * scale_log2 * f, x[j + 1] * scale_log2 * f);
        }
    }
    __syncthreads();

    // the exclusive token limit of the lane's query rows 8 rt + 2p + e (causal over the last q_len tokens: row r
    // sees up to packed + windowed - q_len + its position)
    int limit[ROW_TILES][2];
    int warp_limit = (int)split_stop;
#pragma unroll
    for (int rt = 0; rt < ROW_TILES; ++rt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int r = rb * RPB + 8 * rt + 2 * (lane % 4) + e;
            limit[rt][e] = (int)min(split_stop, packed + windowed - q_len + query_position(r, rows, q_len) + 1);
            warp_limit = min(warp_limit, limit[rt][e]);
        }
    }
#pragma unroll
    for (int off = 1; off < 4; off *= 2)
        warp_limit = min(warp_limit, __shfl_xor_sync(0xffffffffu, warp_limit, off));

    RowState state;
    float out[ROW_TILES][VALUE_TILES][4], zero_acc[ROW_TILES][2], correction[ROW_TILES][VALUE_GROUPS][2];
#pragma unroll
    for (int rt = 0; rt < ROW_TILES; ++rt) {
        state.max[rt][0] = state.max[rt][1] = NEG_INF;
        state.sum[rt][0] = state.sum[rt][1] = 0.f;
        zero_acc[rt][0] = zero_acc[rt][1] = 0.f;
#pragma unroll
        for (int vg = 0; vg < VALUE_GROUPS; ++vg) correction[rt][vg][0] = correction[rt][vg][1] = 0.f;
#pragma unroll
        for (int i = 0; i < VALUE_TILES; ++i) out[rt][i][0] = out[rt][i][1] = out[rt][i][2] = out[rt][i][3] = 0.f;
    }
    packed_run(args, shared, buffers, my_steps, limit, warp_limit, (int)packed, lane, state, out, zero_acc,
               correction);

    // value zeros in, code offsets out: channel block blk is value group 32 blk / VALUE_GROUP; its zeros are held
    // by lanes 4 vg + p
    const int p = lane % 4, g = lane / 4;
#pragma unroll
    for (int rt = 0; rt < ROW_TILES; ++rt) {
#pragma unroll
        for (int blk = 0; blk < VALUE_BLOCKS; ++blk) {
            const int vg = 32 * blk / VALUE_GROUP, source = vg * 4 + p;
            const float z0 = __shfl_sync(0xffffffffu, zero_acc[rt][0], source) - MAGIC_VALUE * correction[rt][vg][0];
            const float z1 = __shfl_sync(0xffffffffu, zero_acc[rt][1], source) - MAGIC_VALUE * correction[rt][vg][1];
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                out[rt][2 * blk + hh][0] += z0; out[rt][2 * blk + hh][1] += z1;
                out[rt][2 * blk + hh][2] += z0; out[rt][2 * blk + hh][3] += z1;
            }
        }
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            float sum = state.sum[rt][e];
#pragma unroll
            for (int off = 4; off < WARP; off *= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
            if (g == 0) {
                shared.row_max[warp][8 * rt + 2 * p + e] = state.max[rt][e];
                shared.row_sum[warp][8 * rt + 2 * p + e] = sum;
            }
        }
    }
    __syncthreads();  // every warp's copies are done: the step buffers take the warps' output rows
    float* scratch = reinterpret_cast<float*>(step_buffers);
#pragma unroll
    for (int rt = 0; rt < ROW_TILES; ++rt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int row = 8 * rt + 2 * p + e;
            if (row >= block_rows) continue;
            float* target = scratch + (warp * RPB + row) * SCRATCH_ROW + 4 * g;
#pragma unroll
            for (int blk = 0; blk < VALUE_BLOCKS; ++blk)  // channels 32 blk + 4 g .. + 3 (see the O^T fragments)
                *reinterpret_cast<float4*>(target + 32 * blk) =
                    make_float4(out[rt][2 * blk][e], out[rt][2 * blk][2 + e], out[rt][2 * blk + 1][e],
                                out[rt][2 * blk + 1][2 + e]);
        }
    }
    __syncthreads();
    store_block_partials(shared, scratch, partial_index, block_rows, partial_o, partial_ml);
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) atomicAdd(unit_count, 1);  // the block's partial rows are written
}

// The partial results of unit u: `packed` segments at partial indices first + u, first + u + 1, ... (those of packed
// blocks first ... first + packed - 1), then its window splits
struct UnitParts {
    int first, packed;

    __device__ UnitParts(int units, int unit_steps, int packed_blocks, int late_blocks, int late_steps, int u) {
        first = packed = 0;
        if (unit_steps > 0 && late_blocks == 0 && packed_blocks % units == 0) {  // whole blocks per unit (batch 1)
            packed = packed_blocks / units;
            first = u * packed;
        } else if (unit_steps > 0) {
            const PackedPartition partition(units, unit_steps, packed_blocks, late_blocks, late_steps);
            first = partition.block_of(u * unit_steps);
            packed = partition.block_of((u + 1) * unit_steps - 1) - first + 1;
        }
    }
};

__device__ __forceinline__ int load_acquire(const int* address) {
    int value;
    asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(value) : "l"(address) : "memory");
    return value;
}

// N words as load_words, through L2 (ld.global.cg): partial results that other blocks of the launch wrote
template <int N>
__device__ __forceinline__ void load_words_l2(u32 (&out)[N], const void* source) {
    if constexpr (N % 4 == 0) {
#pragma unroll
        for (int i = 0; i < N / 4; ++i) {
            const uint4 v = __ldcg(reinterpret_cast<const uint4*>(source) + i);
            out[4 * i] = v.x; out[4 * i + 1] = v.y; out[4 * i + 2] = v.z; out[4 * i + 3] = v.w;
        }
    } else {
        static_assert(N == 2, "load_words_l2 takes 2 or a multiple of 4 words");
        const uint2 v = __ldcg(reinterpret_cast<const uint2*>(source));
        out[0] = v.x; out[1] = v.y;
    }
}

// The outputs of unit u from its partial results (UnitParts), by a merge block of the unit: every row of the unit, a
// warp each (row < 0), or block row `row` alone, by a team of the block's WARPS warps. A warp or team merges the packed
// segments' and then the window splits' partial rows in a fixed order (member w of a team takes the chunks w,
// w + WARPS, ... and the members' parts are merged in order through `scratch`), rotates the packed part back
// (unrotate), adds the window part, normalizes and writes out (B, q_heads, q_len, D) contiguous in the query dtype and
// lse (B, q_heads, q_len) float32 (natural log; -inf and a zero row where nothing is visible). The partial rows come
// MERGE_CHUNK at a time, all of a chunk's loads in flight at once (lane s of the chunk reads split s's statistics,
// every lane its channels of every split), with a running maximum across chunks. Not inlined: its name places it after
// the window function, away from the packed blocks' instructions.
#define MERGE_CHUNK (64 / LANE_ELEMENTS < WARP ? 64 / LANE_ELEMENTS : WARP)  // 64 registers in flight (128 spill)
#define MEMBER_FLOATS (2 * LANE_ELEMENTS * WARP + 2)  // a team member's part in scratch: outputs, then max and sum
__device__ __noinline__ void write_unit_outputs(const float* __restrict__ partial_o,
                                                const float2* __restrict__ partial_ml, const UnitParts& parts, int u,
                                                int row, float* scratch, int units,
                                                int packed_blocks, int window_splits, int kv_heads, int q_len,
                                                int rows, int row_blocks, int unrotate, float hadamard_normalization,
                                                in_t* __restrict__ out, float* __restrict__ lse) {
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int team = row < 0 ? 1 : WARPS, member = warp % team;  // a team of WARPS: the block, one row
    const int bh = u / row_blocks, rb = u % row_blocks, block_rows = min(RPB, rows - rb * RPB);
    const int splits = parts.packed + window_splits;
    for (int local = row < 0 ? warp : row; local < block_rows; local += row < 0 ? WARPS : RPB) {
        const i64 packed_row = ((i64)parts.first + u) * RPB + local;  // partial row of packed split s: + s * RPB
        const i64 window_row = ((i64)packed_blocks + units + (i64)u * window_splits - parts.packed) * RPB + local;
        auto partial_row = [&](int s) { return (s < parts.packed ? packed_row : window_row) + (i64)s * RPB; };

        float m = NEG_INF, sum = 0.f, packed[LANE_ELEMENTS], window[LANE_ELEMENTS];
#pragma unroll
        for (int e = 0; e < LANE_ELEMENTS; ++e) packed[e] = window[e] = 0.f;
        for (int first = member * MERGE_CHUNK; first < splits; first += team * MERGE_CHUNK) {
            const int mine = first + lane;
            const float2 ml = lane < MERGE_CHUNK && mine < splits ? __ldcg(partial_ml + partial_row(mine))
                                                                    : make_float2(NEG_INF, 0.f);
            u32 o[MERGE_CHUNK][LANE_ELEMENTS];
#pragma unroll
            for (int k = 0; k < MERGE_CHUNK; ++k) {
                if (first + k < splits) {
                    load_words_l2(o[k], partial_o + partial_row(first + k) * HEAD_DIM + lane * LANE_ELEMENTS);
                } else {
#pragma unroll
                    for (int e = 0; e < LANE_ELEMENTS; ++e) o[k][e] = 0u;
                }
            }
            float chunk_max = ml.x;
#pragma unroll
            for (int off = 16; off > 0; off /= 2)
                chunk_max = fmaxf(chunk_max, __shfl_xor_sync(0xffffffffu, chunk_max, off));
            const float m_new = fmaxf(m, chunk_max);
            if (m_new != m) {  // uniform: rescale what the earlier chunks added (nothing before the first)
                const float alpha = m == NEG_INF ? 0.f : fast_exp2(m - m_new);
                sum *= alpha;
#pragma unroll
                for (int e = 0; e < LANE_ELEMENTS; ++e) { packed[e] *= alpha; window[e] *= alpha; }
                m = m_new;
            }
            const float factor = ml.x == NEG_INF ? 0.f : fast_exp2(ml.x - m);  // split `mine`'s
            sum += ml.y * factor;
#pragma unroll
            for (int k = 0; k < MERGE_CHUNK; ++k) {
                const float f = __shfl_sync(0xffffffffu, factor, k);
                const bool is_packed = first + k < parts.packed;
                const float fp = is_packed ? f : 0.f, fw = is_packed ? 0.f : f;
#pragma unroll
                for (int e = 0; e < LANE_ELEMENTS; ++e) {
                    packed[e] = fmaf(__uint_as_float(o[k][e]), fp, packed[e]);
                    window[e] = fmaf(__uint_as_float(o[k][e]), fw, window[e]);
                }
            }
        }
#pragma unroll
        for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
        if (team > 1) {  // the members' parts, in member order, by member 0 (one row per block: one pass)
            float* mine = scratch + warp * MEMBER_FLOATS;
#pragma unroll
            for (int e = 0; e < LANE_ELEMENTS; ++e) {
                mine[e * WARP + lane] = packed[e];
                mine[(LANE_ELEMENTS + e) * WARP + lane] = window[e];
            }
            if (lane == 0) { mine[MEMBER_FLOATS - 2] = m; mine[MEMBER_FLOATS - 1] = sum; }
            __syncthreads();
            if (member != 0) continue;
            float team_max = NEG_INF;
            for (int w = 0; w < team; ++w) team_max = fmaxf(team_max, scratch[(w + 1) * MEMBER_FLOATS - 2]);
            m = team_max;
            sum = 0.f;
#pragma unroll
            for (int e = 0; e < LANE_ELEMENTS; ++e) packed[e] = window[e] = 0.f;
            for (int w = 0; w < team; ++w) {
                const float* theirs = scratch + w * MEMBER_FLOATS;
                const float their_max = theirs[MEMBER_FLOATS - 2];
                const float f = their_max == NEG_INF ? 0.f : fast_exp2(their_max - team_max);
                sum = fmaf(theirs[MEMBER_FLOATS - 1], f, sum);
#pragma unroll
                for (int e = 0; e < LANE_ELEMENTS; ++e) {
                    packed[e] = fmaf(theirs[e * WARP + lane], f, packed[e]);
                    window[e] = fmaf(theirs[(LANE_ELEMENTS + e) * WARP + lane], f, window[e]);
                }
            }
        }
        if (unrotate) fwht_row<HEAD_DIM, LANE_ELEMENTS>(packed, lane, hadamard_normalization);
        const float inverse = sum > 0.f ? __fdividef(1.f, sum) : 0.f;
        const int r = rb * RPB + local, group_size = rows / q_len;
        const i64 b = bh / kv_heads;
        const i64 head = (bh % kv_heads) * group_size + r / q_len;
        const i64 out_row = (b * kv_heads * group_size + head) * q_len + r % q_len;
#pragma unroll
        for (int e = 0; e < LANE_ELEMENTS; ++e)
            out[out_row * HEAD_DIM + lane * LANE_ELEMENTS + e] = f32_to_in((packed[e] + window[e]) * inverse);
        if (lane == 0) lse[out_row] = sum > 0.f ? (m + __log2f(sum)) * LN2 : NEG_INF;
    }
}

// Grid (packed_blocks + units * ceil(window_splits / WARPS) + merge blocks), THREADS threads: the packed blocks, then
// the window blocks (window split s of a unit covers window tokens [32 s, 32 s + 32), the last one to the end), then
// the merge blocks: one per unit (merge_rows RPB), or one per row of each unit (merge_rows 1: units * min(RPB, rows),
// for launches that fit on the GPU at once). Each packed segment (a block) and each window split (a warp) adds one to
// its unit's count in unit_counts (int32, zero at the launch and again after it) once its partial rows are written; the
// unit's merge blocks wait for the count (the blocks before them in the grid are all resident or done by then: blocks
// start in grid order) and write the outputs (write_unit_outputs). One launch instead of a second kernel for the merge
// (measured on the H100 at 1 x 4k: 13.4 -> 13.2 us replayed in a CUDA graph, 62 -> 37 us per call launched from
// Python). The counts sit at the ends of run_segment and window_split: a global memory access in this body after their
// calls makes ptxas keep the memory descriptor in ordinary registers in every function (an R2UR before each load, the
// packed loop 691 -> 722 instructions).
extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS) decode_attention(
    const in_t* __restrict__ q, i64 q_sb, i64 q_sh, i64 q_sl,
    const u32* __restrict__ k_codes, const scale_t* __restrict__ k_scales, const scale_t* __restrict__ k_zeros,
    const u32* __restrict__ v_codes, const scale_t* __restrict__ v_scales, const scale_t* __restrict__ v_zeros,
    const float* __restrict__ norms, int norm_heads, const i64* __restrict__ packed_lengths, int capacity,
    const in_t* __restrict__ window_k, i64 wk_sb, i64 wk_sh, i64 wk_st,
    const in_t* __restrict__ window_v, i64 wv_sb, i64 wv_sh, i64 wv_st, const i64* __restrict__ window_lengths,
    int kv_heads, int q_len, int rows, int row_blocks, int units, int key_group, int packed_blocks, int unit_steps,
    int late_blocks, int late_steps, int window_splits, int merge_rows, int rotate, int unrotate,
    float hadamard_normalization, float scale_log2, float* __restrict__ partial_o, float2* __restrict__ partial_ml,
    int* __restrict__ unit_counts, in_t* __restrict__ out, float* __restrict__ lse) {
    __shared__ SharedMemory shared;
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int window_blocks = (window_splits + WARPS - 1) / WARPS;  // per unit
    const int window_grid = units * window_blocks;                   // window blocks of the launch
    const i64 window_base = (i64)packed_blocks + units;  // partial index of unit 0's window split 0

    // STAGES step buffers per warp for the packed blocks, 128-byte aligned: the copies of a warp fill whole 128-byte
    // lines of shared memory (a base 16 bytes off, as a static shared size of 11536 bytes gives, measured 5-9% slower)
    extern __shared__ __align__(128) StepBuffer step_buffers[];

    if (blockIdx.x >= (unsigned)(packed_blocks + window_grid)) {
        // ---- merge block k of unit u (merge_rows 1: one per row of the unit, its warps sharing the row; RPB: one for
        // all of the unit's rows): waits for the unit's partial results and merges them; the last of the unit's merge
        // blocks to see the count resets it
        const bool one_row = merge_rows == 1;
        const int per_unit = one_row ? min(RPB, rows) : 1;
        const int j = blockIdx.x - (packed_blocks + window_grid), u = j / per_unit, k = j % per_unit;
        const int mergers = one_row ? min(RPB, rows - u % row_blocks * RPB) : 1;  // the unit's blocks with a row
        if (k >= mergers) return;
        const UnitParts parts(units, unit_steps, packed_blocks, late_blocks, late_steps, u);
        if (threadIdx.x == 0) {
            const int count = parts.packed + window_splits;
            while (load_acquire(unit_counts + u) < count) __nanosleep(100);
            if (mergers == 1 || atomicAdd(unit_counts + u, 1) == count + mergers - 1) unit_counts[u] = 0;
        }
        __syncthreads();
        write_unit_outputs(partial_o, partial_ml, parts, u, one_row ? k : -1, reinterpret_cast<float*>(step_buffers),
                           units, packed_blocks, window_splits, kv_heads, q_len, rows, row_blocks, unrotate,
                           hadamard_normalization, out, lse);
        return;
    }
    if (blockIdx.x < (unsigned)packed_blocks) {
        // ---- packed block i: its steps of the units, one segment per unit
        const PackedPartition partition(units, unit_steps, packed_blocks, late_blocks, late_steps);
        const int i = blockIdx.x;
        const int block_start_step = partition.start(i), block_stop_step = partition.start(i + 1);
        for (int x = block_start_step; x < block_stop_step;) {
            if (x > block_start_step) __syncthreads();  // the shared memory of the block's previous segment is free
            const int u = x / unit_steps;
            const int first_step = x - u * unit_steps;
            const int stop_step = min(block_stop_step - u * unit_steps, unit_steps);
            x += stop_step - first_step;
            run_segment(shared, step_buffers, q, q_sb, q_sh, q_sl, k_codes, k_scales, k_zeros, v_codes, v_scales,
                        v_zeros, norms, norm_heads, packed_lengths, capacity, window_lengths, kv_heads, q_len, rows,
                        row_blocks, key_group, unit_steps, rotate, hadamard_normalization, scale_log2, u, first_step,
                        stop_step, (i64)i + u, partial_o, partial_ml, unit_counts + u);
        }
        return;
    }

    // window block wb of unit u: split wb * WARPS + warp for each warp, 32 window tokens each
    const int index = blockIdx.x - packed_blocks, u = index / window_blocks, wb = index % window_blocks;
    const int bh = u / row_blocks, rb = u % row_blocks, h = bh % kv_heads;
    const i64 b = bh / kv_heads;
    u32 query_chunks[Q_CHUNKS][4];
    load_queries(query_chunks, q, q_sb, q_sh, q_sl, b, h, rb, rows, q_len);
    const i64 windowed = window_lengths[b];
    const int split = wb * WARPS + warp;
    const i64 block_start = (i64)wb * WARPS * WINDOW_SPLIT;
    const i64 block_stop = min(windowed, block_start + WARPS * WINDOW_SPLIT);
    const in_t* window_keys = window_k + b * wk_sb + h * wk_sh;
    const in_t* window_values = window_v + b * wv_sb + h * wv_sh;
    // the block's window rows on their way to L2 while the query rows are staged
    for (i64 j = block_start + threadIdx.x; j < block_stop; j += THREADS) {
        prefetch_row(window_keys + j * wk_st);
        prefetch_row(window_values + j * wv_st);
    }
    store_queries(shared, query_chunks);
    __syncthreads();
    window_query_pairs(shared, scale_log2);
    __syncthreads();
    if (split >= window_splits) return;
    const i64 start = (i64)split * WINDOW_SPLIT;
    const i64 stop = split == window_splits - 1 ? windowed : min(windowed, start + WINDOW_SPLIT);
    window_split(shared, window_keys, wk_st, window_values, wv_st, start, stop, windowed - q_len + 1, rb * RPB,
                 min(RPB, rows - rb * RPB), rows, q_len, lane, (window_base + (i64)u * window_splits + split) * RPB,
                 partial_o, partial_ml, unit_counts + u);
}

