#pragma once
#include "aten.h"

#include <tuple>
#include <vector>

namespace pyengine {

// Pack int8 weights q (N, K) (symmetric per output row, pyengine.quant) for int8_linear:
// returns {packed (ceil(N/64), ceil(K/4)·4·64) int8, column sums (ceil(N/64)·64,) int32}.
std::vector<at::Tensor> int8_pack(const at::Tensor& q);

// The tile int8_linear runs for `kernel` on rows × k activations: "amx", "vnni" or "portable".
std::string int8_kernel_name(const std::string& kernel, int64_t rows, int64_t k);

enum class Activation { kNone, kRelu, kSwish };

// y = act(x·(q·scale)ᵀ + bias) for x (M, K) float32, with x quantized per row to uint8 (asymmetric, the range
// holding 0) and the products accumulated in int32. Returns (M, n_out) float32, written into `out` when given.
// kernel: "auto" (AMX where the CPU has it and the shape suits it — K a multiple of 64, more than 6 rows — else
// AVX512-VNNI where the CPU has it, else the portable scalar loop), "amx" (AMX where the shape suits it, else
// VNNI), "vnni" or "portable". Every kernel gives the same int32 sums, and AMX and VNNI the same epilogue: their
// results are equal to the bit.
// activation: "none", "relu" or "swish" (x·sigmoid(x)), applied to the tile in registers.
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& colsum,
                       const at::Tensor& scale, const c10::optional<at::Tensor>& bias, int64_t n_out,
                       const c10::optional<at::Tensor>& out, const std::string& kernel,
                       const std::string& activation);

// The output layer and the step's candidates in one pass: for y = x·(q·scale)ᵀ + bias (as int8_linear, no
// activation), each row's k best (y − logsumexp(y row), column), best first, ties to the lower column, as
// log_softmax_topk(int8_linear(...)) returns them, without writing y. `banned` columns count in the logsumexp
// but are never candidates. k + the number of banned columns must not exceed n_out.
std::tuple<at::Tensor, at::Tensor> int8_linear_log_softmax_topk(const at::Tensor& x, const at::Tensor& packed,
                                                                const at::Tensor& colsum, const at::Tensor& scale,
                                                                const c10::optional<at::Tensor>& bias, int64_t n_out,
                                                                int64_t k, const at::Tensor& banned,
                                                                const std::string& kernel);

}  // namespace pyengine
