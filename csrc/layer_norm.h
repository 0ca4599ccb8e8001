#pragma once
#include "aten.h"

#include <cstdint>

namespace pyengine {

// Residual + layer norm over the rows of float32 (M, D) data: s = x + r, y = (s − mean)·rstd·w + b with
// rstd = 1/sqrt(var + eps), mean and (biased) var over each row of s. r may be nullptr (y = LN(x)); `sum`, when
// not nullptr, receives s (the pre-norm residual stream); it may alias x, and y may alias x or r.
void add_layer_norm_rows(const float* x, const float* r, const float* w, const float* b, float eps, int64_t M,
                         int64_t D, float* sum, float* y, bool portable = false);

// The same on tensors: LN(x + residual) (or LN(x)) for contiguous float32 CPU tensors (…, D) and weight and
// bias (D,); returns a new tensor. portable: the scalar loop (tests; CPUs without AVX-512).
at::Tensor add_layer_norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual, const at::Tensor& weight,
                          const at::Tensor& bias, double eps, bool portable);

}  // namespace pyengine
