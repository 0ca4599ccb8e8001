#pragma once
// What the native decoder step and encoder stack share: a linear layer of either weight type into a buffer, the
// residual + layer norm around a sub-layer (post-norm or pre-norm) and the feed-forward sub-layer, each the operation
// the Python layers run.
#include "bf16_gemm.h"
#include "decoder_step.h"
#include "f32_gemm.h"
#include "int8_gemm.h"
#include "layer_norm.h"

#include <string>
#include <variant>

namespace pyengine {

// act(x·Wᵀ + b) into `out` with the weight's own kernel (int8_linear, bf16_linear or f32_linear; FloatLinear's).
inline void linear_into(const at::Tensor& x, const StepWeight& weight, const at::Tensor& out, const std::string& kernel,
                        const std::string& activation = "none") {
  if (const auto* w = std::get_if<Int8Weight>(&weight)) {
    int8_linear(x, w->packed, w->colsum, w->scale, w->bias, w->n, out, kernel, activation);
  } else if (const auto* f = std::get_if<FloatWeight>(&weight)) {
    out.copy_(float_linear(x, *f, activation));
  } else if (const auto* g = std::get_if<F32Weight>(&weight)) {
    f32_linear(x, g->packed, g->bias, g->n, out, kernel, activation);
  } else {
    const auto& b = std::get<Bf16Weight>(weight);
    bf16_linear(x, b.packed, b.bias, b.n, out, kernel, activation);
  }
}

// Whether linear_into applies `activation` itself: relu and swish in our GEMMs' epilogue, every one for a float32
// weight (FloatLinear's); else it runs after (gelu).
inline bool fuses(const StepWeight& weight, const std::string& activation) {
  return activation == "relu" || activation == "swish" || std::holds_alternative<FloatWeight>(weight);
}

inline int64_t out_features(const StepWeight& weight) {
  return std::visit([](const auto& w) { return w.n; }, weight);
}

// The residual stream after a sub-layer whose output is y: LN(y + x) into x (post-norm, cpp_add_layer_norm's
// operands in its order; aten_norm: torch_add_layer_norm's), or x + y (pre-norm: the next sub-layer normalizes at its
// start).
inline void residual(const at::Tensor& x, const at::Tensor& y, const at::Tensor& w, const at::Tensor& b,
                     bool pre_norm, double eps, bool aten_norm = false) {
  float* xp = x.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  if (pre_norm) {
    for (int64_t i = 0; i < x.numel(); ++i) xp[i] = xp[i] + yp[i];
    return;
  }
  if (aten_norm) {
    x.copy_(at::layer_norm(y + x, {x.size(1)}, w, b, eps));
    return;
  }
  add_layer_norm_rows(yp, xp, w.data_ptr<float>(), b.data_ptr<float>(), static_cast<float>(eps), x.size(0),
                      x.size(1), nullptr, xp);
}

// The sub-layer's input: LN(x) into h (pre-norm), x itself (post-norm).
inline const at::Tensor& sublayer_input(const at::Tensor& x, const at::Tensor& h, const at::Tensor& w,
                                        const at::Tensor& b, bool pre_norm, double eps, bool aten_norm = false) {
  if (!pre_norm) return x;
  if (aten_norm) {
    h.copy_(at::layer_norm(x, {x.size(1)}, w, b, eps));
    return h;
  }
  add_layer_norm_rows(x.data_ptr<float>(), nullptr, w.data_ptr<float>(), b.data_ptr<float>(), static_cast<float>(eps),
                      x.size(0), x.size(1), nullptr, h.data_ptr<float>());
  return h;
}

// The feed-forward sub-layer on the residual stream x (M, D): fc2(act(fc1(sublayer input))) into y, then the residual.
// relu and swish are applied in fc1's epilogue, gelu (HF's exact erf form) after it. h: the pre-norm input's buffer;
// f: the (M, ffn) buffer, made or remade here when it is not that size.
inline void feed_forward(const at::Tensor& x, const at::Tensor& h, const at::Tensor& y, at::Tensor& f,
                         const StepWeight& fc1, const StepWeight& fc2, const at::Tensor& norm_w, const at::Tensor& norm_b,
                         bool pre_norm, double eps, const std::string& activation, const std::string& kernel,
                         bool aten_norm = false) {
  const int64_t ffn = out_features(fc1);
  if (!f.defined() || f.size(0) != x.size(0) || f.size(1) != ffn) f = at::empty({x.size(0), ffn}, x.options());
  const bool fused = fuses(fc1, activation);
  linear_into(sublayer_input(x, h, norm_w, norm_b, pre_norm, eps, aten_norm), fc1, f, kernel,
              fused ? activation : "none");
  if (!fused) f = at::gelu(f);
  linear_into(f, fc2, y, kernel);
  residual(x, y, norm_w, norm_b, pre_norm, eps, aten_norm);
}

}  // namespace pyengine
