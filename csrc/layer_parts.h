#pragma once
// What the native decoder step and encoder stack share: a linear layer of either weight type into a buffer, and the
// residual + layer norm around a sub-layer (post-norm or pre-norm), each the operation the Python layers run.
#include "bf16_gemm.h"
#include "decoder_step.h"
#include "int8_gemm.h"
#include "layer_norm.h"

#include <string>
#include <variant>

namespace pyengine {

// act(x·Wᵀ + b) into `out` with the weight's own kernel (int8_linear or bf16_linear).
inline void linear_into(const at::Tensor& x, const StepWeight& weight, const at::Tensor& out, const std::string& kernel,
                        const std::string& activation = "none") {
  if (const auto* w = std::get_if<Int8Weight>(&weight)) {
    int8_linear(x, w->packed, w->colsum, w->scale, w->bias, w->n, out, kernel, activation);
  } else {
    const auto& b = std::get<Bf16Weight>(weight);
    bf16_linear(x, b.packed, b.bias, b.n, out, kernel, activation);
  }
}

inline int64_t out_features(const StepWeight& weight) {
  return std::visit([](const auto& w) { return w.n; }, weight);
}

// The residual stream after a sub-layer whose output is y: LN(y + x) into x (post-norm, cpp_add_layer_norm's
// operands in its order), or x + y (pre-norm: the next sub-layer normalizes at its start).
inline void residual(const at::Tensor& x, const at::Tensor& y, const at::Tensor& w, const at::Tensor& b,
                     bool pre_norm, double eps) {
  float* xp = x.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  if (pre_norm) {
    for (int64_t i = 0; i < x.numel(); ++i) xp[i] = xp[i] + yp[i];
    return;
  }
  add_layer_norm_rows(yp, xp, w.data_ptr<float>(), b.data_ptr<float>(), static_cast<float>(eps), x.size(0),
                      x.size(1), nullptr, xp);
}

// The sub-layer's input: LN(x) into h (pre-norm), x itself (post-norm).
inline const at::Tensor& sublayer_input(const at::Tensor& x, const at::Tensor& h, const at::Tensor& w,
                                        const at::Tensor& b, bool pre_norm, double eps) {
  if (!pre_norm) return x;
  add_layer_norm_rows(x.data_ptr<float>(), nullptr, w.data_ptr<float>(), b.data_ptr<float>(), static_cast<float>(eps),
                      x.size(0), x.size(1), nullptr, h.data_ptr<float>());
  return h;
}

}  // namespace pyengine
