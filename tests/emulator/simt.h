// The CUDA execution model on the host, for running the kernels of raw_kernels/ on a CPU: tests/emulator.py compiles a
// kernel module with g++ against this header and launches it through ctypes. Every thread of a block is a fiber
// (ucontext); the blocks of a grid run one after the other. __syncthreads, __syncwarp and the warp shuffles are
// barriers over the block's or the warp's live threads, which is exact for kernels whose warps are converged at every
// shuffle (as CUDA requires of full-mask shuffles). Floating point is IEEE binary32/64 with round to nearest even, no
// contraction (g++ -ffp-contract=off) and no flush to zero, as the write path's kernels are compiled (--fmad=false);
// the float16/bfloat16 conversions round as cvt.rn does. The tensor-core product (mma.sync m16n8k16 with 16-bit
// operands, float32 sums in k order) and movmatrix are warp-wide operations on the lanes' fragments. Blocks run in grid
// order, so a block that waits for earlier blocks' results (the decode kernel's merge blocks) finds them. Not modelled:
// blocks running at once, the memory model, the tensor cores' own summation order (tests compare within tolerance where
// the kernel is not bit-exact).
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <utility>
#include <vector>

namespace emu {

struct Dim3 { unsigned x = 1, y = 1, z = 1; };

struct Thread {
    ucontext_t context;
    Dim3 index;
    int warp = 0;
    bool done = false;
};

struct Barrier {  // the threads that must arrive are the live ones of its scope
    int arrived = 0;
    unsigned generation = 0;
};

struct Block {
    Dim3 index, size, grid;
    std::vector<Thread> threads;
    std::vector<Barrier> warp_barriers;
    std::vector<int> warp_live;
    Barrier block_barrier;
    int block_live = 0;
    std::vector<unsigned char> shared;  // the shared window: STATIC_SHARED bytes of __shared__ variables, then dynamic
    size_t static_used = 0;
    std::vector<std::pair<int, size_t>> statics;  // (variable, offset) of the __shared__ variables placed
    std::vector<uint64_t> exchange;  // a slot per thread for shuffles
    std::vector<uint32_t> fragments;  // 8 words per thread for warp-wide matrix operations
    std::function<void()> body;
    ucontext_t scheduler;
    Thread* current = nullptr;
    unsigned long progress = 0;
};

inline Block*& block() { static Block* active = nullptr; return active; }

constexpr size_t STACK_BYTES = 64 * 1024, MAX_THREADS = 1024, STATIC_SHARED = 64 * 1024;
inline char* stacks() {  // one stack per thread of a block, reused by every block
    static char* memory = static_cast<char*>(std::malloc(STACK_BYTES * MAX_THREADS));
    return memory;
}
inline Thread& self() { return *block()->current; }

inline void yield() { swapcontext(&self().context, &block()->scheduler); }

// arrive at `barrier` of `live` threads and wait until all of them have
inline void wait_at(Barrier& barrier, int live) {
    const unsigned generation = barrier.generation;
    if (++barrier.arrived >= live) {
        barrier.arrived = 0;
        ++barrier.generation;
        ++block()->progress;
        return;
    }
    while (barrier.generation == generation) yield();
}

inline void sync_warp() { Block& b = *block(); wait_at(b.warp_barriers[self().warp], b.warp_live[self().warp]); }
inline void sync_block() { Block& b = *block(); wait_at(b.block_barrier, b.block_live); }

// a thread that leaves releases the barriers that were waiting only for it
inline void release_on_exit(Barrier& barrier, int& live) {
    --live;
    if (barrier.arrived > 0 && barrier.arrived >= live) {
        barrier.arrived = 0;
        ++barrier.generation;
    }
}

inline void thread_main() {
    Block& b = *block();
    b.body();
    Thread& t = self();
    t.done = true;
    release_on_exit(b.warp_barriers[t.warp], b.warp_live[t.warp]);
    release_on_exit(b.block_barrier, b.block_live);
    ++b.progress;
}

// run `body` as every thread of block `index`: each thread until it waits or ends, round after round
inline void run_block(Dim3 grid, Dim3 index, Dim3 size, size_t shared_bytes, const std::function<void()>& body) {
    Block b;
    b.index = index, b.size = size, b.grid = grid, b.body = body;
    const int count = size.x * size.y * size.z, warps = (count + 31) / 32;
    if (count > int(MAX_THREADS) || count % 32) {
        std::fprintf(stderr, "emulated blocks hold whole warps, at most %zu threads (got %d)\n", MAX_THREADS, count);
        std::abort();
    }
    b.threads.resize(count);
    b.warp_barriers.resize(warps);
    b.warp_live.assign(warps, 0);
    b.block_live = count;
    b.shared.assign(STATIC_SHARED + shared_bytes + 128, 0xA5);  // garbage until written, as on the device
    b.exchange.resize(count);
    b.fragments.resize(8 * count);
    block() = &b;
    for (int i = 0; i < count; ++i) {
        Thread& t = b.threads[i];
        t.index = {unsigned(i % size.x), unsigned(i / size.x % size.y), unsigned(i / (size.x * size.y))};
        t.warp = i / 32;
        ++b.warp_live[t.warp];
        getcontext(&t.context);
        t.context.uc_stack.ss_sp = stacks() + size_t(i) * STACK_BYTES;
        t.context.uc_stack.ss_size = STACK_BYTES;
        t.context.uc_link = &b.scheduler;
        makecontext(&t.context, thread_main, 0);
    }
    for (int left = count; left > 0;) {
        const unsigned long before = b.progress;
        left = 0;
        for (Thread& t : b.threads) {
            if (t.done) continue;
            b.current = &t;
            swapcontext(&b.scheduler, &t.context);
            left += !t.done;
        }
        if (left > 0 && b.progress == before) {
            std::fprintf(stderr, "emulated block (%u, %u): every live thread waits at a barrier that cannot complete\n",
                         index.x, index.y);
            std::abort();
        }
    }
    block() = nullptr;
}

inline void launch(Dim3 grid, Dim3 size, size_t shared_bytes, const std::function<void()>& body) {
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) run_block(grid, {x, y, z}, size, shared_bytes, body);
}

inline unsigned char* shared_window() {  // 128-byte aligned
    uintptr_t p = reinterpret_cast<uintptr_t>(block()->shared.data());
    return reinterpret_cast<unsigned char*>((p + 127) & ~uintptr_t(127));
}
inline unsigned char* shared_memory() { return shared_window() + STATIC_SHARED; }  // the dynamic part

// a block's __shared__ variable number `id` (the same object for every thread of the block: the first to ask places it)
template <typename T>
T& static_shared(int id) {
    Block& b = *block();
    for (auto& [variable, offset] : b.statics)
        if (variable == id) return *reinterpret_cast<T*>(shared_window() + offset);
    const size_t offset = (b.static_used + alignof(T) - 1) / alignof(T) * alignof(T);
    if (offset + sizeof(T) > STATIC_SHARED) {
        std::fprintf(stderr, "emulated static shared memory exhausted\n");
        std::abort();
    }
    b.static_used = offset + sizeof(T);
    b.statics.push_back({id, offset});
    return *reinterpret_cast<T*>(shared_window() + offset);
}

template <typename T>
T shuffle(T value, int source_of_lane_xor, bool xor_mode) {
    static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
    Block& b = *block();
    const int me = int(&self() - b.threads.data()), lane = me % 32;
    std::memcpy(&b.exchange[me], &value, sizeof(T));
    sync_warp();
    const int from = me - lane + (xor_mode ? (lane ^ source_of_lane_xor) : (source_of_lane_xor & 31));
    T result;
    std::memcpy(&result, &b.exchange[from], sizeof(T));
    sync_warp();  // every lane has read before the slots are written again
    return result;
}

inline int lane_id() { return int(&self() - block()->threads.data()) % 32; }
inline uint32_t* warp_fragments() {  // the 8-word slots of the calling thread's warp
    Block& b = *block();
    const int me = int(&self() - b.threads.data());
    return b.fragments.data() + 8 * (me - me % 32);
}

inline bool any(bool predicate) {
    uint32_t* slots = warp_fragments();
    slots[8 * lane_id()] = predicate;
    sync_warp();
    bool result = false;
    for (int l = 0; l < 32; ++l) result = result || slots[8 * l];
    sync_warp();
    return result;
}

// float16 and bfloat16 from and to float32, rounding to nearest even (cvt.rn); g++'s _Float16 is IEEE binary16
inline float half_to_float(uint16_t h) { _Float16 x; std::memcpy(&x, &h, 2); return float(x); }
inline uint16_t float_to_half(float f) { const _Float16 x = _Float16(f); uint16_t h; std::memcpy(&h, &x, 2); return h; }

inline uint16_t float_to_bfloat16(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    if (std::isnan(f)) return uint16_t((bits >> 16) | 0x40);  // a quiet NaN
    return uint16_t((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

template <typename To, typename From>
To bit_cast(From from) { To to; std::memcpy(&to, &from, sizeof(To)); return to; }

inline float bfloat16_to_float(uint16_t h) { return bit_cast<float>(uint32_t(h) << 16); }
inline float half_of(uint32_t pair, int high, bool bf16) {
    const uint16_t h = uint16_t(high ? pair >> 16 : pair & 0xffffu);
    return bf16 ? bfloat16_to_float(h) : half_to_float(h);
}
inline uint32_t pack(float lo, float hi, bool bf16) {  // cvt.rn.{f16,bf16}x2.f32
    return bf16 ? uint32_t(float_to_bfloat16(lo)) | uint32_t(float_to_bfloat16(hi)) << 16
                : uint32_t(float_to_half(lo)) | uint32_t(float_to_half(hi)) << 16;
}
// a * b (+ c), per half, rounded once (the products of two 16-bit floats are exact in float32)
inline uint32_t multiply_pairs(uint32_t a, uint32_t b, bool bf16) {
    return pack(half_of(a, 0, bf16) * half_of(b, 0, bf16), half_of(a, 1, bf16) * half_of(b, 1, bf16), bf16);
}

inline uint32_t prmt(uint32_t a, uint32_t b, uint32_t selector) {  // prmt.b32, default mode
    const uint64_t bytes = uint64_t(a) | uint64_t(b) << 32;
    uint32_t result = 0;
    for (int i = 0; i < 4; ++i) {
        const uint32_t nibble = selector >> (4 * i) & 0xf;
        uint32_t byte = uint32_t(bytes >> (8 * (nibble & 7))) & 0xff;
        if (nibble & 8) byte = byte & 0x80 ? 0xff : 0;  // sign replication
        result |= byte << (8 * i);
    }
    return result;
}

// mma.sync.aligned.m16n8k16.row.col.f32 with 16-bit operands: d = A B + c over the warp's fragments (lane 4g + p holds
// A rows g, g + 8 and columns 2p, 2p + 1, 2p + 8, 2p + 9; B columns g, rows 2p, 2p + 1, 2p + 8, 2p + 9; C and D rows
// g, g + 8, columns 2p, 2p + 1), products summed in k order in float32
inline void mma(float (&d)[4], const float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], bool bf16) {
    uint32_t* slots = warp_fragments();
    const int lane = lane_id();
    for (int i = 0; i < 4; ++i) slots[8 * lane + i] = a[i];
    for (int i = 0; i < 2; ++i) slots[8 * lane + 4 + i] = b[i];
    sync_warp();
    auto a_at = [&](int m, int k) {
        return half_of(slots[8 * (4 * (m % 8) + (k % 8) / 2) + (m >= 8) + 2 * (k >= 8)], k % 2, bf16);
    };
    auto b_at = [&](int k, int n) { return half_of(slots[8 * (4 * n + (k % 8) / 2) + 4 + (k >= 8)], k % 2, bf16); };
    const int g = lane / 4, p = lane % 4;
    float result[4];
    for (int i = 0; i < 4; ++i) {
        const int m = g + 8 * (i / 2), n = 2 * p + i % 2;
        float sum = c[i];
        for (int k = 0; k < 16; ++k) sum += a_at(m, k) * b_at(k, n);
        result[i] = sum;
    }
    sync_warp();
    for (int i = 0; i < 4; ++i) d[i] = result[i];
}

// movmatrix.sync.aligned.m8n8.trans.b16: lane l holds row l / 4, columns 2 (l % 4) + {0, 1}; returns the transpose's
inline uint32_t movmatrix(uint32_t x) {
    uint32_t* slots = warp_fragments();
    const int lane = lane_id();
    slots[8 * lane] = x;
    sync_warp();
    uint32_t result = 0;
    for (int e = 0; e < 2; ++e) {
        const int row = 2 * (lane % 4) + e, column = lane / 4;  // element (row, column) of the original
        const uint32_t word = slots[8 * (4 * row + column / 2)];
        result |= (column % 2 ? word >> 16 : word & 0xffffu) << (16 * e);
    }
    sync_warp();
    return result;
}

}  // namespace emu

// ---------------------------------------------------------------------------------------------------------------
// the CUDA names the kernels use

#define __device__
#define __global__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

#define threadIdx (emu::self().index)
#define blockIdx (emu::block()->index)
#define blockDim (emu::block()->size)
#define gridDim (emu::block()->grid)

inline void __syncthreads() { emu::sync_block(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::sync_warp(); }
template <typename T> T __shfl_xor_sync(unsigned, T value, int lanes) { return emu::shuffle(value, lanes, true); }
template <typename T> T __shfl_sync(unsigned, T value, int lane) { return emu::shuffle(value, lane, false); }
inline int atomicOr(int* address, int value) { const int old = *address; *address |= value; return old; }
inline int atomicAdd(int* address, int value) { const int old = *address; *address += value; return old; }
inline bool __any_sync(unsigned, bool predicate) { return emu::any(predicate); }
inline void __threadfence() {}
inline void __nanosleep(unsigned) { emu::yield(); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __log2f(float x) { return std::log2(x); }
struct alignas(8) float2 { float x, y; };
inline float2 make_float2(float x, float y) { return {x, y}; }
struct alignas(16) float4 { float x, y, z, w; };
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline unsigned __umulhi(unsigned a, unsigned b) { return unsigned((uint64_t(a) * b) >> 32); }
inline int __ffs(int x) { return x ? __builtin_ctz(unsigned(x)) + 1 : 0; }
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
template <typename T> T __ldcg(const T* address) { return *address; }

inline float __int_as_float(int x) { return emu::bit_cast<float>(x); }
inline float __uint_as_float(unsigned x) { return emu::bit_cast<float>(x); }
inline unsigned __float_as_uint(float x) { return emu::bit_cast<unsigned>(x); }
inline int __float_as_int(float x) { return emu::bit_cast<int>(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
using std::fma;
using std::fmaf;
using std::fmaxf;
using std::fminf;
inline float fabsf(float x) { return std::fabs(x); }
using std::sqrt;
template <typename A, typename B> auto min(A a, B b) { return a < b ? a : b; }
template <typename A, typename B> auto max(A a, B b) { return a < b ? b : a; }
