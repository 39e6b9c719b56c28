// The CUDA execution model on the host, for running the write path's kernels (raw_kernels/quantize.cu and the other
// kernels that use only what is here) on a CPU: tests/emulator.py compiles a kernel module with g++ against this header
// and launches it through ctypes. Every thread of a block is a fiber (ucontext); the blocks of a grid run one after the
// other. __syncthreads, __syncwarp and the warp shuffles are barriers over the block's or the warp's live threads,
// which is exact for kernels whose warps are converged at every shuffle (as CUDA requires of full-mask shuffles).
// Floating point is IEEE binary32/64 with round to nearest even, no contraction (g++ -ffp-contract=off) and no
// flush to zero, as the kernels are compiled (--fmad=false); the float16/bfloat16 conversions round as cvt.rn does.
// Not modelled: inline PTX other than the conversions, atomics across blocks running at once, the memory model.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
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
    std::vector<unsigned char> shared;
    std::vector<uint64_t> exchange;  // a slot per thread for shuffles
    std::function<void()> body;
    ucontext_t scheduler;
    Thread* current = nullptr;
    unsigned long progress = 0;
};

inline Block*& block() { static Block* active = nullptr; return active; }

constexpr size_t STACK_BYTES = 64 * 1024, MAX_THREADS = 1024;
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
    b.shared.assign(shared_bytes + 16, 0xA5);  // garbage until written, as on the device
    b.exchange.resize(count);
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

inline unsigned char* shared_memory() {
    uintptr_t p = reinterpret_cast<uintptr_t>(block()->shared.data());
    return reinterpret_cast<unsigned char*>((p + 15) & ~uintptr_t(15));
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

}  // namespace emu

// ---------------------------------------------------------------------------------------------------------------
// the CUDA names the kernels use

#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

#define threadIdx (emu::self().index)
#define blockIdx (emu::block()->index)
#define blockDim (emu::block()->size)
#define gridDim (emu::block()->grid)

inline void __syncthreads() { emu::sync_block(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::sync_warp(); }
template <typename T> T __shfl_xor_sync(unsigned, T value, int lane_mask) { return emu::shuffle(value, lane_mask, true); }
template <typename T> T __shfl_sync(unsigned, T value, int lane) { return emu::shuffle(value, lane, false); }
inline int atomicOr(int* address, int value) { const int old = *address; *address |= value; return old; }

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
