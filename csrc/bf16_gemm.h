#pragma once
#include "aten.h"

#include <string>
#include <tuple>

#include "int8_gemm.h"  // Activation

namespace pyengine {

// Pack weights w (N, K) (float32 or bfloat16; float32 is rounded to bfloat16, to nearest even) for bf16_linear:
// (ceil(N/64), ceil(K/32)·32·64) bfloat16, in 64-column tiles of k pairs (K is known to its padding only:
// the callers check an x against the layer's own width).
at::Tensor bf16_pack(const at::Tensor& w);

// The tile bf16_linear runs for `kernel` here: "amx", "avx512bf16", "avx512" or "portable".
std::string bf16_kernel_name(const std::string& kernel);

// x's two bfloat16 terms as `kernel` splits them for bf16_linear: hi = bf16(x), lo = bf16(x − hi), each rounded to
// nearest even (PyTorch's rounding; NaN as PyTorch makes it) with magnitudes below float32's smallest normal
// flushed to +0 (AMX reads bf16 subnormals as zero). (M, K) bfloat16 each; every kernel gives the same bits.
std::tuple<at::Tensor, at::Tensor> bf16_split(const at::Tensor& x, const std::string& kernel);

// y = act(x·Wᵀ + bias) for x (M, K) float32 and W the packed bfloat16 weight, in float32 to within float32's
// own rounding of x: x is split into two bfloat16 terms, x ≈ hi + lo with hi = bf16(x), lo = bf16(x − hi)
// (16 significant bits, where one bf16 keeps 8), every product of a bf16 weight and a term is exact in float32,
// and the sums are float32 — so a model whose weights are bfloat16 computes what float32 computes on them,
// to ~2^-17 relative. Returns (M, n_out) float32, written into `out` when given.
// kernel: "auto" (AMX-BF16 where the CPU has it, else the AVX512-BF16 register tile, else the AVX-512 FMA tile,
// else the portable loop), "amx", "avx512bf16", "avx512" or "portable". The last three add the same products in
// the same order (equal to the bit but for swish's exp); AMX sums them more precisely (equal within float32
// rounding).
// activation: "none", "relu" or "swish".
at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                       int64_t n_out, const c10::optional<at::Tensor>& out, const std::string& kernel,
                       const std::string& activation);

// The output layer and the step's candidates in one pass: each row's k best (y − logsumexp(y row), column) of
// y = x·Wᵀ + bias (as bf16_linear), best first, ties to the lower column, without writing y (gemm_shared.h).
// `banned` columns count in the logsumexp but are never candidates.
std::tuple<at::Tensor, at::Tensor> bf16_linear_log_softmax_topk(const at::Tensor& x, const at::Tensor& packed,
                                                                const c10::optional<at::Tensor>& bias, int64_t n_out,
                                                                int64_t k, const at::Tensor& banned,
                                                                const std::string& kernel);

}  // namespace pyengine
