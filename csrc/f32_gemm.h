#pragma once
#include "aten.h"

#include <string>
#include <tuple>

namespace pyengine {

// Pack float32 weights w (N, K) for f32_linear: (ceil(N/64), K·64) float32 in 64-column tiles, one k's 64 columns
// after another (one 64-byte load = 16 columns at one k); columns past N are zero.
at::Tensor f32_pack(const at::Tensor& w);

// The tile f32_linear runs for `kernel` here: "avx512" or "portable" ("auto": AVX-512 where the CPU has it).
std::string f32_kernel_name(const std::string& kernel);

// y = act(x·Wᵀ + bias) for x (M, K) float32 and W the packed float32 weight: each output a float32 FMA chain over k
// in order (k = 0 first), then + bias, then the activation ("none", "relu" or "swish"). The AVX-512 register tile
// and the portable loop give the same bits (but for swish's exp). A row's result does not depend on M. Returns
// (M, n_out) float32, written into `out` when given.
at::Tensor f32_linear(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                      int64_t n_out, const c10::optional<at::Tensor>& out, const std::string& kernel,
                      const std::string& activation);

// The output layer and the step's candidates in one pass (gemm_shared.h): each row's k best (y − logsumexp(y row),
// column) of y = x·Wᵀ + bias (as f32_linear), best first, ties to the lower column, y never written. `banned`
// columns count in the logsumexp but are never candidates.
std::tuple<at::Tensor, at::Tensor> f32_linear_log_softmax_topk(const at::Tensor& x, const at::Tensor& packed,
                                                               const c10::optional<at::Tensor>& bias, int64_t n_out,
                                                               int64_t k, const at::Tensor& banned,
                                                               const std::string& kernel);

}  // namespace pyengine
