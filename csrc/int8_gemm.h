#pragma once
#include <torch/extension.h>

#include <tuple>
#include <vector>

namespace pyengine {

// True when this CPU has AVX512-VNNI (and AVX512F/BW), which the fast int8 tile needs.
bool vnni_available();

// Pack int8 weights q (N, K) (symmetric per output row, pyengine.quant) for int8_linear:
// returns {packed (ceil(N/64), ceil(K/4)·4·64) int8, column sums (ceil(N/64)·64,) int32}.
std::vector<at::Tensor> int8_pack(const at::Tensor& q);

enum class Activation { kNone, kRelu, kSwish };

// y = act(x·(q·scale)ᵀ + bias) for x (M, K) float32, with x quantized per row to uint8 (asymmetric, the range
// holding 0) and the products accumulated in int32. Returns (M, n_out) float32, written into `out` when given.
// portable: the scalar loop instead of the AVX512-VNNI one (for tests and CPUs without VNNI).
// activation: "none", "relu" or "swish" (x·sigmoid(x)), applied to the tile in registers.
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& colsum,
                       const at::Tensor& scale, const c10::optional<at::Tensor>& bias, int64_t n_out,
                       const c10::optional<at::Tensor>& out, bool portable, const std::string& activation);

// The output layer and the step's candidates in one pass: for y = x·(q·scale)ᵀ + bias (as int8_linear, no
// activation), each row's k best (y − logsumexp(y row), column), best first, ties to the lower column, as
// log_softmax_topk(int8_linear(...)) returns them, without writing y. `banned` columns count in the logsumexp
// but are never candidates. k + the number of banned columns must not exceed n_out.
std::tuple<at::Tensor, at::Tensor> int8_linear_log_softmax_topk(const at::Tensor& x, const at::Tensor& packed,
                                                                const at::Tensor& colsum, const at::Tensor& scale,
                                                                const c10::optional<at::Tensor>& bias, int64_t n_out,
                                                                int64_t k, const at::Tensor& banned, bool portable);

}  // namespace pyengine
