// CUDA twin of softmax_topk.cpp: one block per row. Block reductions give the row max and the sum of
// exp; then k rounds of a block-wide arg-max, each excluding what earlier rounds took (ordered by
// value, then lower id), select the candidates. k rounds re-read the row, but the row (V floats) stays
// in L2 and k = 2 x beam is small; no per-thread candidate arrays, so nothing spills to local memory.
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

#include "softmax_topk_cuda.h"

namespace pyengine {

namespace {

constexpr int kThreads = 256;

struct Best {
  float value;
  int64_t id;
};

__device__ __forceinline__ bool better(float v, int64_t i, float w, int64_t j) {
  return v > w || (v == w && i < j);
}

// Combining rules of the two reductions; `identity` pads the last warp's unused lanes.
struct PickBest {
  static __device__ Best identity() { return {-FLT_MAX, INT64_MAX}; }
  __device__ Best operator()(Best a, Best b) const { return better(b.value, b.id, a.value, a.id) ? b : a; }
};

struct Sum {
  static __device__ float identity() { return 0.0f; }
  __device__ float operator()(float a, float b) const { return a + b; }
};

__device__ __forceinline__ float shfl_down(float x, int offset) { return __shfl_down_sync(0xffffffff, x, offset); }

__device__ __forceinline__ Best shfl_down(Best b, int offset) {
  return {__shfl_down_sync(0xffffffff, b.value, offset), __shfl_down_sync(0xffffffff, b.id, offset)};
}

template <typename T, typename Combine>
__device__ __forceinline__ T warp_reduce(T x, Combine combine) {
  for (int offset = 16; offset > 0; offset >>= 1) x = combine(x, shfl_down(x, offset));
  return x;
}

// Block-wide reduction through one shared slot per warp; the result is broadcast to every thread.
template <typename T, typename Combine>
__device__ T block_reduce(T x, T* scratch, Combine combine) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  x = warp_reduce(x, combine);
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = lane < kThreads / 32 ? scratch[lane] : Combine::identity();
    x = warp_reduce(x, combine);
    if (lane == 0) scratch[0] = x;
  }
  __syncthreads();
  x = scratch[0];
  __syncthreads();
  return x;
}

__global__ void __launch_bounds__(kThreads) log_softmax_topk_kernel(
    float* __restrict__ logits, int64_t vocab, int64_t k, const int64_t* __restrict__ banned, int64_t num_banned,
    float* __restrict__ values, int64_t* __restrict__ ids) {
  __shared__ Best best_scratch[kThreads / 32];
  __shared__ float sum_scratch[kThreads / 32];
  float* x = logits + blockIdx.x * vocab;

  Best local{-INFINITY, INT64_MAX};
  for (int64_t i = threadIdx.x; i < vocab; i += kThreads) local.value = fmaxf(local.value, x[i]);
  local.id = 0;
  const float max = block_reduce(local, best_scratch, PickBest{}).value;
  float sum = 0.0f;
  for (int64_t i = threadIdx.x; i < vocab; i += kThreads) sum += __expf(x[i] - max);
  const float log_sum = max + __logf(block_reduce(sum, sum_scratch, Sum{}));

  // banned ids count in the normalizer above but are never candidates
  for (int64_t b = threadIdx.x; b < num_banned; b += kThreads) x[banned[b]] = -INFINITY;
  __syncthreads();

  float last_value = INFINITY;
  int64_t last_id = -1;
  for (int64_t j = 0; j < k; ++j) {
    Best b{-INFINITY, INT64_MAX};
    for (int64_t i = threadIdx.x; i < vocab; i += kThreads) {
      const float v = x[i];
      if (better(last_value, last_id, v, i) && better(v, i, b.value, b.id)) b = {v, i};
    }
    b = block_reduce(b, best_scratch, PickBest{});
    if (threadIdx.x == 0) {
      values[blockIdx.x * k + j] = b.value - log_sum;
      ids[blockIdx.x * k + j] = b.id;
    }
    last_value = b.value;
    last_id = b.id;
  }
}

}  // namespace

int launch_log_softmax_topk(float* logits, int64_t rows, int64_t vocab, int64_t k, const int64_t* banned,
                            int64_t num_banned, float* values, int64_t* ids, void* stream) {
  if (rows == 0) return 0;
  log_softmax_topk_kernel<<<static_cast<unsigned>(rows), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      logits, vocab, k, banned, num_banned, values, ids);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace pyengine
