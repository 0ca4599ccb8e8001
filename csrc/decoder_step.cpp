// A decoder step with int8 or bf16 linears, all layers in one call. In Python each layer is some sixty small calls
// (views, the GEMMs, cache writes, attention, residual + layer norm), whose dispatch costs about as much
// as the arithmetic at batch 1 and a sizeable share at batch 32. Here the step runs on a few buffers
// allocated once per call: the GEMMs write into them, the step attention writes its output laid out as
// the next GEMM reads it, and the cache writes, residual adds and layer norms are plain loops (ATen's add,
// copy and layer_norm cost 10-20 µs each at these sizes, mostly dispatch; A/B, a step at 32 rows with hot
// weights: 3.9 -> 3.6 ms). Every operation is the one the Python layers run with the same linear method, in the
// same order (tested equal to them, to the bit).
#include "decoder_step.h"
#include "cpu_features.h"

#include "decode_attention.h"
#include "bf16_gemm.h"
#include "int8_gemm.h"
#include "layer_norm.h"
#include "layer_parts.h"
#include "vec_math.h"

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>  // mkldnn::_linear_pointwise, called by its schema

#include <algorithm>
#include <cmath>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif
#include <cstring>

namespace pyengine {

namespace {

// float32 → bfloat16 as PyTorch converts (c10's rounding to nearest even).
void to_bf16_portable(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::BFloat16(src[i]).x;
}

#if defined(__x86_64__) && defined(__GNUC__)
// c10's rounding, 16 lanes (vec_math's bf16_bits: AVX512F integer ops; AVX512-BF16 is not needed)
__attribute__((target("avx512f"))) void to_bf16_avx512(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i bits = _mm512_cvtepi32_epi16(bf16_bits(_mm512_loadu_ps(src + i)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), bits);
  }
  to_bf16_portable(src + i, dst + i, n - i);
}
#endif

using ToBf16Fn = void (*)(const float*, uint16_t*, int64_t);
ToBf16Fn pick_to_bf16() {
#if defined(__x86_64__) && defined(__GNUC__)
  if (avx512_available()) return to_bf16_avx512;
#endif
  return to_bf16_portable;
}

// Row r's K (D values from src + r·ld) and V (the D after them) into physical row write_rows[r] of layer `layer`'s
// cache at positions[r]. cache (L, 2, P, H, T_max, Dh) float32 or bfloat16 with a unit stride on Dh.
void write_kv_rows(const float* src, int64_t ld, int64_t N, int64_t H, int64_t Dh, const at::Tensor& cache,
                   int64_t layer, const int64_t* write_rows, const int64_t* positions) {
  const int64_t D = H * Dh;
  const bool bf16 = cache.scalar_type() == at::kBFloat16;
  const ToBf16Fn convert = pick_to_bf16();
  const int64_t item = cache.element_size();
  char* base = static_cast<char*>(cache.data_ptr()) + item * layer * cache.stride(0);
  const at::IntArrayRef stride = cache.strides().slice(1);  // (2, P, H, T_max, Dh) of the layer
  // threads from 16 rows, as the layer norm and the quantization around it
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t which = 0; which < 2; ++which)
      for (int64_t r = begin; r < end; ++r)
        for (int64_t h = 0; h < H; ++h) {
          const float* from = src + r * ld + which * D + h * Dh;
          char* dst = base + item * (which * stride[0] + write_rows[r] * stride[1] + h * stride[2] +
                                     positions[r] * stride[3]);
          if (bf16) convert(from, reinterpret_cast<uint16_t*>(dst), Dh);
          else std::memcpy(dst, from, Dh * sizeof(float));
        }
  });
}

// Refuses a row or position outside the (L, 2, P, H, T_max, Dh) cache that rows[r], positions[r] write into (both
// cache writes check here); the highest position + 1.
int64_t checked_places(const char* who, const int64_t* rows, const int64_t* positions, int64_t N,
                       const at::Tensor& cache) {
  int64_t end = 0;
  for (int64_t r = 0; r < N; ++r) {
    TORCH_CHECK(positions[r] >= 0 && positions[r] < cache.size(4), who, ": position ", positions[r],
                " outside the cache's ", cache.size(4));
    TORCH_CHECK(rows[r] >= 0 && rows[r] < cache.size(2), who, ": write row ", rows[r], " outside the cache's ",
                cache.size(2));
    end = std::max(end, positions[r] + 1);
  }
  return end;
}

}  // namespace

at::Tensor float_linear(const at::Tensor& x, const FloatWeight& w, const std::string& activation) {
  TORCH_CHECK(activation == "none" || activation == "relu" || activation == "swish" || activation == "gelu",
              "float_linear: activation must be none, relu, swish or gelu, not ", activation);
  if (w.packed.has_value()) {  // FloatLinear's oneDNN path: (attr, algorithm) as linear.ONEDNN_ACTIVATIONS names them
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                               .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                                 c10::string_view, c10::List<c10::optional<at::Scalar>>,
                                                 c10::optional<c10::string_view>)>();
    return op.call(x, *w.packed, w.bias, activation, c10::List<c10::optional<at::Scalar>>(),
                   c10::string_view(activation == "gelu" ? "none" : ""));
  }
  at::Tensor y = at::linear(x, w.weight, w.bias);
  if (activation == "relu") return at::relu(y);
  if (activation == "swish") return at::silu(y);
  if (activation == "gelu") return at::gelu(y);
  return y;
}

at::Tensor decoder_step(const std::vector<DecoderLayer>& layers, const at::Tensor& x_in, const at::Tensor& cache,
                        const at::Tensor& positions, const at::Tensor& write_rows, const at::Tensor& rows,
                        const at::Tensor& memory, const at::Tensor& memory_rows, const at::Tensor& src_lengths,
                        const std::string& kernel) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "decoder_step: x must be float32 (N, D)");
  TORCH_CHECK(!layers.empty() && cache.dim() == 6 && memory.dim() == 6 &&
                  cache.size(0) == static_cast<int64_t>(layers.size()) && memory.size(0) == cache.size(0),
              "decoder_step: cache and memory must be (L, 2, ...) for the ", layers.size(), " layers");
  TORCH_CHECK(cache.scalar_type() == memory.scalar_type() &&
                  (cache.scalar_type() == at::kFloat || cache.scalar_type() == at::kBFloat16) &&
                  cache.stride(5) == 1 && memory.stride(5) == 1,
              "decoder_step: cache and memory both float32 or both bfloat16, unit stride on Dh");
  const int64_t N = x_in.size(0), D = x_in.size(1), B = memory_rows.size(0);
  TORCH_CHECK(B > 0 && N % B == 0, "decoder_step: ", N, " rows are not a whole number of beams of ", B,
              " sentences");
  TORCH_CHECK(src_lengths.numel() == B, "decoder_step: src_lengths must have one entry per sentence");
  const at::Tensor pos = positions.to(at::kLong).contiguous(), dst = write_rows.to(at::kLong).contiguous();
  TORCH_CHECK(pos.numel() == N && dst.numel() == N, "decoder_step: one position and one write row per row");
  const int64_t* pos_ptr = pos.data_ptr<int64_t>();
  const int64_t* dst_ptr = dst.data_ptr<int64_t>();
  const int64_t T = checked_places("decoder_step", dst_ptr, pos_ptr, N, cache);
  const int64_t H = layers[0].heads, Dh = D / H, S = memory.size(4), beam = N / B;
  TORCH_CHECK(H * Dh == D && cache.size(3) == H && cache.size(5) == Dh && memory.size(3) == H && memory.size(5) == Dh,
              "decoder_step: cache and memory must have ", H, " heads of ", Dh);
  const at::Tensor row_index = rows.to(at::kLong).contiguous();  // (a copy of the cache's origin table)
  check_rows(row_index, N, T, cache.size(2));  // once per step, not per layer
  const at::Tensor memory_index = memory_rows.to(at::kLong).contiguous();
  check_rows(memory_index, B, S, memory.size(2));
  std::vector<int64_t> self_len(N);
  for (int64_t r = 0; r < N; ++r) self_len[r] = pos_ptr[r] + 1;
  const std::vector<int64_t> cross_len = key_lengths(src_lengths, B, S);
  const int64_t* row_ptr = row_index.data_ptr<int64_t>();
  const int64_t* memory_ptr = memory_index.data_ptr<int64_t>();
  const double scale = std::pow(static_cast<double>(Dh), -0.5);  // as Python computes Dh ** -0.5

  // the step's buffers; attention outputs are written as the next GEMM reads them: (N, D) = (B, beam, H, Dh)
  const auto f32 = x_in.options();
  at::Tensor x = x_in.contiguous().clone(), h = at::empty({N, D}, f32), qkv = at::empty({N, 3 * D}, f32);
  at::Tensor ctx = at::empty({N, D}, f32), y = at::empty({N, D}, f32);
  const at::Tensor self_q = qkv.view({N, 3, H, Dh}).select(1, 0).unsqueeze(2);   // (N, H, 1, Dh)
  const at::Tensor self_ctx = ctx.view({N, H, 1, Dh});
  const at::Tensor cross_q = h.view({B, beam, H, Dh}).transpose(1, 2);          // (B, H, beam, Dh)
  const at::Tensor cross_ctx = ctx.view({B, beam, H, Dh}).transpose(1, 2);
  at::Tensor f;
  for (size_t l = 0; l < layers.size(); ++l) {
    const DecoderLayer& layer = layers[l];
    TORCH_CHECK(layer.heads == H, "decoder_step: every layer must have ", H, " heads");
    for (const StepWeight* w : {&layer.qkv, &layer.self_out, &layer.cross_q, &layer.cross_out, &layer.fc1, &layer.fc2})
      TORCH_CHECK(w->index() == layers[0].qkv.index(), "decoder_step: every linear must have one weight type (",
                  "int8, bf16 or float32)");
    // self-attention: this step's K/V into the cache, then the query against every position so far
    const bool aten = layer.aten_norm;
    linear_into(sublayer_input(x, h, layer.self_norm_w, layer.self_norm_b, layer.pre_norm, layer.eps, aten), layer.qkv,
                qkv, kernel);
    write_kv_rows(qkv.data_ptr<float>() + D, 3 * D, N, H, Dh, cache, static_cast<int64_t>(l), dst_ptr, pos_ptr);
    decode_attention_layer(self_q, cache, static_cast<int64_t>(l), T, self_len, scale, row_ptr, self_ctx);
    linear_into(ctx, layer.self_out, y, kernel);
    residual(x, y, layer.self_norm_w, layer.self_norm_b, layer.pre_norm, layer.eps, aten);

    // encoder-decoder attention: beams are extra query rows of their sentence (one K/V read serves them all)
    linear_into(sublayer_input(x, y, layer.cross_norm_w, layer.cross_norm_b, layer.pre_norm, layer.eps, aten),
                layer.cross_q, h, kernel);
    decode_attention_layer(cross_q, memory, static_cast<int64_t>(l), S, cross_len, scale, memory_ptr, cross_ctx);
    linear_into(ctx, layer.cross_out, y, kernel);
    residual(x, y, layer.cross_norm_w, layer.cross_norm_b, layer.pre_norm, layer.eps, aten);

    // feed-forward (relu/swish in the first GEMM's epilogue)
    feed_forward(x, h, y, f, layer.fc1, layer.fc2, layer.ffn_norm_w, layer.ffn_norm_b, layer.pre_norm, layer.eps,
                 layer.activation, kernel, aten);
  }
  return x;
}

void write_kv(const at::Tensor& kv, const at::Tensor& cache, int64_t layer, const at::Tensor& rows,
              const at::Tensor& positions) {
  TORCH_CHECK(cache.device().is_cpu() && cache.dim() == 6 && cache.size(1) == 2 && cache.stride(5) == 1 &&
                  (cache.scalar_type() == at::kFloat || cache.scalar_type() == at::kBFloat16),
              "write_kv: cache must be a float32 or bfloat16 (L, 2, P, H, T, Dh) CPU tensor, unit stride on Dh");
  const int64_t H = cache.size(3), Dh = cache.size(5), D = H * Dh;
  TORCH_CHECK(kv.device().is_cpu() && kv.scalar_type() == at::kFloat && kv.dim() == 2 && kv.is_contiguous() &&
                  kv.size(1) == 2 * D,
              "write_kv: kv must be a contiguous float32 (N, ", 2 * D, ") CPU tensor (each row's K, then its V)");
  TORCH_CHECK(layer >= 0 && layer < cache.size(0), "write_kv: layer ", layer, " outside the cache's ", cache.size(0));
  const int64_t N = kv.size(0);
  const at::Tensor r = rows.to(at::kLong).contiguous(), t = positions.to(at::kLong).contiguous();
  TORCH_CHECK(r.numel() == N && t.numel() == N, "write_kv: one row and one position per kv row");
  const int64_t* rp = r.data_ptr<int64_t>();
  const int64_t* tp = t.data_ptr<int64_t>();
  checked_places("write_kv", rp, tp, N, cache);
  write_kv_rows(kv.data_ptr<float>(), 2 * D, N, H, Dh, cache, layer, rp, tp);
}

}  // namespace pyengine
