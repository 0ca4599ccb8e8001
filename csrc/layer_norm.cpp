// Residual + layer norm for the CPU decoder step. At a step the rows are few (32 sentences: 32×512 floats,
// 64 KB): ATen's add and layer_norm cost ~15-20 µs each there, mostly dispatch and a thread-pool round trip,
// against ~2 µs of arithmetic; a decoder step has 18 of them. Here one pass per row in the calling thread
// (rows split across threads only when there are many, as in the encoder).
//
// Arithmetic: float32, two passes (mean, then the squared deviations: no cancellation), 16 lanes with the
// tail masked, so every row is computed alike whatever its address (results do not depend on alignment).
#include "layer_norm.h"
#include "cpu_features.h"

#include <ATen/Parallel.h>

#include <cmath>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace pyengine {

namespace {

using RowFn = void (*)(const float*, const float*, const float*, const float*, float, int64_t, float*, float*);

void row_portable(const float* x, const float* r, const float* w, const float* b, float eps, int64_t D, float* sum,
                  float* y) {
  float total = 0.f;
  for (int64_t i = 0; i < D; ++i) total += r ? x[i] + r[i] : x[i];
  const float mean = total / static_cast<float>(D);
  float sq = 0.f;
  for (int64_t i = 0; i < D; ++i) {
    const float d = (r ? x[i] + r[i] : x[i]) - mean;
    sq += d * d;
  }
  const float rstd = 1.f / std::sqrt(sq / static_cast<float>(D) + eps);
  for (int64_t i = 0; i < D; ++i) {
    const float s = r ? x[i] + r[i] : x[i];
    if (sum) sum[i] = s;
    y[i] = (s - mean) * rstd * w[i] + b[i];
  }
}

#if defined(__x86_64__) && defined(__GNUC__)

__attribute__((target("avx512f"))) inline __m512 load_sum(const float* x, const float* r, int64_t i, __mmask16 m) {
  const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
  return r ? _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, r + i)) : v;
}

__attribute__((target("avx512f"))) void row_avx512(const float* x, const float* r, const float* w, const float* b,
                                                  float eps, int64_t D, float* sum, float* y) {
  auto mask = [D](int64_t i) { return D - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (D - i)) - 1); };
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < D; i += 16) acc = _mm512_add_ps(acc, load_sum(x, r, i, mask(i)));
  const float mean = _mm512_reduce_add_ps(acc) / static_cast<float>(D);
  const __m512 mu = _mm512_set1_ps(mean);
  acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < D; i += 16) {
    const __mmask16 m = mask(i);
    const __m512 d = _mm512_maskz_sub_ps(m, load_sum(x, r, i, m), mu);  // masked lanes stay 0
    acc = _mm512_add_ps(acc, _mm512_mul_ps(d, d));
  }
  const float rstd = 1.f / std::sqrt(_mm512_reduce_add_ps(acc) / static_cast<float>(D) + eps);
  const __m512 rs = _mm512_set1_ps(rstd);
  for (int64_t i = 0; i < D; i += 16) {
    const __mmask16 m = mask(i);
    const __m512 s = load_sum(x, r, i, m);
    if (sum) _mm512_mask_storeu_ps(sum + i, m, s);
    const __m512 n = _mm512_mul_ps(_mm512_mul_ps(_mm512_sub_ps(s, mu), rs), _mm512_maskz_loadu_ps(m, w + i));
    _mm512_mask_storeu_ps(y + i, m, _mm512_add_ps(n, _mm512_maskz_loadu_ps(m, b + i)));
  }
}
#endif

RowFn pick_row(bool portable) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (!portable && avx512_available()) return row_avx512;
#endif
  return row_portable;
}

}  // namespace

void add_layer_norm_rows(const float* x, const float* r, const float* w, const float* b, float eps, int64_t M,
                         int64_t D, float* sum, float* y, bool portable) {
  const RowFn row = pick_row(portable);
  // a row is read before it is written, so sum and y may alias x or r
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(D, 1));  // threads from 32 KB (a step's 32 rows)
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m)
      row(x + m * D, r ? r + m * D : nullptr, w, b, eps, D, sum ? sum + m * D : nullptr, y + m * D);
  });
}

at::Tensor add_layer_norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual, const at::Tensor& weight,
                          const at::Tensor& bias, double eps, bool portable) {
  auto is_f32 = [](const at::Tensor& t) {
    return t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous();
  };
  TORCH_CHECK(is_f32(x) && x.dim() >= 1 && x.size(-1) > 0, "add_layer_norm: x must be a contiguous float32 CPU tensor");
  const int64_t D = x.size(-1), M = x.numel() / D;
  TORCH_CHECK(is_f32(weight) && is_f32(bias) && weight.numel() == D && bias.numel() == D,
              "add_layer_norm: weight and bias must be contiguous float32 (", D, ",)");
  if (residual) TORCH_CHECK(is_f32(*residual) && residual->sizes() == x.sizes(),
                            "add_layer_norm: residual must be a contiguous float32 tensor shaped like x");
  at::Tensor y = at::empty_like(x);
  add_layer_norm_rows(x.data_ptr<float>(), residual ? residual->data_ptr<float>() : nullptr, weight.data_ptr<float>(),
                      bias.data_ptr<float>(), static_cast<float>(eps), M, D, nullptr, y.data_ptr<float>(), portable);
  return y;
}

}  // namespace pyengine
