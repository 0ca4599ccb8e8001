#pragma once
// Launcher of the CUDA twin of log_softmax_topk (softmax_topk_cuda.cu). Plain pointers, no torch
// headers, so the kernel compiles with nvcc alone (the tests compile it for sm_80 and sm_90).
#include <cstdint>

namespace pyengine {

// logits (rows, vocab) float32, modified at banned ids; banned (num_banned,) int64 on the device;
// values (rows, k) float32 and ids (rows, k) int64 outputs. Returns the cudaError_t of the launch.
int launch_log_softmax_topk(float* logits, int64_t rows, int64_t vocab, int64_t k, const int64_t* banned,
                            int64_t num_banned, float* values, int64_t* ids, void* stream);

}  // namespace pyengine
