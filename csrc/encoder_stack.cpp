// The encoder's layers in one call (encoder_stack.h). In Python each layer is some thirty small calls (the GEMMs,
// padding the sentences for the attention and back, residual + layer norm), whose dispatch cost a server's small
// cohorts about as much as their arithmetic, each call a point where the worker thread gives up the interpreter lock
// and waits to get it back; here a cohort's encoder is one call without the lock.
#include "encoder_stack.h"

#include "decode_attention.h"
#include "layer_parts.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>

namespace pyengine {

at::Tensor encoder_stack(const std::vector<EncoderLayer>& layers, const at::Tensor& x_in,
                         const std::vector<int64_t>& lengths, const std::string& kernel) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(),
              "encoder_stack: x must be float32 (T, D) on the CPU");
  TORCH_CHECK(!layers.empty() && !lengths.empty(), "encoder_stack: no layers or no sentences");
  const int64_t T = x_in.size(0), D = x_in.size(1), B = static_cast<int64_t>(lengths.size());
  std::vector<int64_t> start(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lengths[b] > 0, "encoder_stack: sentence ", b, " has no tokens");
    start[b + 1] = start[b] + lengths[b];
  }
  TORCH_CHECK(start[B] == T, "encoder_stack: the lengths add up to ", start[B], " tokens, x has ", T);
  const int64_t S = *std::max_element(lengths.begin(), lengths.end()), H = layers[0].heads, Dh = D / H;
  TORCH_CHECK(H * Dh == D, "encoder_stack: ", D, " is not ", H, " heads of a whole width");
  const double scale = std::pow(static_cast<double>(Dh), -0.5);  // as Python computes Dh ** -0.5

  const auto f32 = x_in.options();
  at::Tensor x = x_in.contiguous().clone(), h = at::empty({T, D}, f32), qkv = at::empty({T, 3 * D}, f32);
  at::Tensor ctx = at::empty({T, D}, f32), y = at::empty({T, D}, f32), f;
  // the attention's operands padded to (B, S): rows past a sentence's length stay zero (their outputs are not read)
  at::Tensor padded = at::zeros({B, S, 3 * D}, f32), padded_ctx = at::empty({B, S, D}, f32);
  const at::Tensor qkv_heads = padded.view({B, S, 3, H, Dh});
  const at::Tensor q = qkv_heads.select(2, 0).permute({0, 2, 1, 3}), k = qkv_heads.select(2, 1).permute({0, 2, 1, 3}),
                   v = qkv_heads.select(2, 2).permute({0, 2, 1, 3});  // each (B, H, S, Dh)
  const at::Tensor out = padded_ctx.view({B, S, H, Dh}).permute({0, 2, 1, 3});
  // copies a sentence's rows between the ragged (T, width) and padded (B, S, width) layouts
  auto move_rows = [&](const at::Tensor& ragged, const at::Tensor& pad, int64_t width, bool to_padded) {
    float* rp = ragged.data_ptr<float>();
    float* pp = pad.data_ptr<float>();
    at::parallel_for(0, B, 4, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        float* r = rp + start[b] * width;
        float* p = pp + b * S * width;
        std::memcpy(to_padded ? p : r, to_padded ? r : p, lengths[b] * width * sizeof(float));
      }
    });
  };
  for (const EncoderLayer& layer : layers) {
    TORCH_CHECK(layer.heads == H, "encoder_stack: every layer must have ", H, " heads");
    const bool aten = layer.aten_norm;
    linear_into(sublayer_input(x, h, layer.self_norm_w, layer.self_norm_b, layer.pre_norm, layer.eps, aten), layer.qkv,
                qkv, kernel);
    move_rows(qkv, padded, 3 * D, true);
    decode_attention_into(q, k, v, lengths, scale, nullptr, out);
    move_rows(ctx, padded_ctx, D, false);
    linear_into(ctx, layer.out, y, kernel);
    residual(x, y, layer.self_norm_w, layer.self_norm_b, layer.pre_norm, layer.eps, aten);

    feed_forward(x, h, y, f, layer.fc1, layer.fc2, layer.ffn_norm_w, layer.ffn_norm_b, layer.pre_norm, layer.eps,
                 layer.activation, kernel, aten);
  }
  return x;
}

}  // namespace pyengine
