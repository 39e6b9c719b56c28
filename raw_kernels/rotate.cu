// The normalized Walsh-Hadamard transform of contiguous rows of HEAD_DIM elements (16..256), in float32 and rounded
// once to the element type (oscar_cupy.hadamard; the query rotation of a decode step). CPU definition:
// oscar_cupy/cpu_kernels.py (fwht).
#include "common.cuh"

#define LANES_PER_ROW (HEAD_DIM < WARP ? HEAD_DIM : WARP)
#define PER (HEAD_DIM / LANES_PER_ROW)
#define ROWS_PER_WARP (WARP / LANES_PER_ROW)
#define THREADS 256
#define ROWS_PER_BLOCK ((THREADS / WARP) * ROWS_PER_WARP)

// Grid ceil(rows / ROWS_PER_BLOCK); in and out may be the same array.
extern "C" __global__ void __launch_bounds__(THREADS) hadamard_rows(
    const in_t* in, in_t* out, i64 rows, float normalization) {
    const int lane = threadIdx.x % LANES_PER_ROW;
    const i64 row = (i64)blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / LANES_PER_ROW;
    if ((i64)blockIdx.x * ROWS_PER_BLOCK + (threadIdx.x / WARP) * ROWS_PER_WARP >= rows) return;  // whole warps
    const bool active = row < rows;
    float x[PER];
#pragma unroll
    for (int j = 0; j < PER; ++j) x[j] = active ? in_to_f32(in[row * HEAD_DIM + lane * PER + j]) : 0.f;
    fwht_row<HEAD_DIM, PER>(x, lane, normalization);
    if (active) {
#pragma unroll
        for (int j = 0; j < PER; ++j) out[row * HEAD_DIM + lane * PER + j] = f32_to_in(x[j]);
    }
}
