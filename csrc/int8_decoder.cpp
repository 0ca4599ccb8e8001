// A decoder step with int8 linears, all layers in one call. In Python each layer is some sixty small calls
// (views, the int8 GEMMs, cache writes, attention, residual + layer norm), whose dispatch costs about as much
// as the arithmetic at batch 1 and a sizeable share at batch 32; here they are the same ATen and pyengine
// kernels called from C++ (tested equal to the Python layer, to the bit).
#include "int8_decoder.h"

#include "decode_attention.h"
#include "int8_gemm.h"

#include <cmath>

namespace pyengine {

namespace {

at::Tensor linear(const at::Tensor& x, const Int8Weight& w, const std::string& activation = "none") {
  return int8_linear(x, w.packed, w.colsum, w.scale, w.bias, w.n, c10::nullopt, false, activation);
}

at::Tensor norm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, double eps) {
  return at::layer_norm(x, {x.size(-1)}, w, b, eps);
}

// Residual sub-layer: x + fn(LN(x)) (pre-norm) or LN(fn(x) + x) (post-norm), as pyengine.model._sublayer.
template <typename Fn>
at::Tensor sublayer(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, const Int8DecoderLayer& layer,
                    Fn fn) {
  if (layer.pre_norm) return x + fn(norm(x, w, b, layer.eps));
  return norm(fn(x) + x, w, b, layer.eps);
}

}  // namespace

at::Tensor int8_decoder_step(const std::vector<Int8DecoderLayer>& layers, const at::Tensor& x_in, const at::Tensor& cache,
                             int64_t position, const at::Tensor& rows, const at::Tensor& memory,
                             const at::Tensor& src_lengths) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "int8_decoder_step: x must be float32 (N, D)");
  TORCH_CHECK(cache.dim() == 6 && memory.dim() == 6 && cache.size(0) == static_cast<int64_t>(layers.size()) &&
                  memory.size(0) == cache.size(0),
              "int8_decoder_step: cache and memory must be (L, 2, ...) for the ", layers.size(), " layers");
  const int64_t N = x_in.size(0), D = x_in.size(1), B = memory.size(2);
  TORCH_CHECK(B > 0 && N % B == 0, "int8_decoder_step: ", N, " rows are not a whole number of beams of ", B,
              " sentences");
  TORCH_CHECK(position >= 0 && position < cache.size(4), "int8_decoder_step: position ", position, " outside the cache");
  TORCH_CHECK(N <= cache.size(2), "int8_decoder_step: more rows than the cache holds");
  const int64_t beam = N / B;
  at::Tensor x = x_in.contiguous();
  for (size_t l = 0; l < layers.size(); ++l) {
    const Int8DecoderLayer& layer = layers[l];
    const int64_t H = layer.heads, Dh = D / H;
    const double scale = std::pow(static_cast<double>(Dh), -0.5);  // as Python computes Dh ** -0.5
    const at::Tensor kv_cache = cache.select(0, l);  // (2, P, H, T_max, Dh)

    x = sublayer(x, layer.self_norm_w, layer.self_norm_b, layer, [&](const at::Tensor& h) {
      const at::Tensor qkv = linear(h, layer.qkv).view({N, 3, H, Dh});
      kv_cache.select(0, 0).narrow(0, 0, N).select(2, position).copy_(qkv.select(1, 1));
      kv_cache.select(0, 1).narrow(0, 0, N).select(2, position).copy_(qkv.select(1, 2));
      const at::Tensor k = kv_cache.select(0, 0).narrow(2, 0, position + 1);
      const at::Tensor v = kv_cache.select(0, 1).narrow(2, 0, position + 1);
      const at::Tensor ctx = decode_attention(qkv.select(1, 0).unsqueeze(2), k, v, c10::nullopt, scale, rows);
      return linear(ctx.view({N, D}), layer.self_out);
    });
    x = sublayer(x, layer.cross_norm_w, layer.cross_norm_b, layer, [&](const at::Tensor& h) {
      // beams are extra query rows of their sentence: one K/V read serves them all
      const at::Tensor q = linear(h, layer.cross_q).view({B, beam, H, Dh}).transpose(1, 2);
      const at::Tensor mem = memory.select(0, l);
      const at::Tensor ctx = decode_attention(q, mem.select(0, 0), mem.select(0, 1), src_lengths, scale, c10::nullopt);
      return linear(ctx.transpose(1, 2).reshape({N, D}), layer.cross_out);
    });
    x = sublayer(x, layer.ffn_norm_w, layer.ffn_norm_b, layer, [&](const at::Tensor& h) {
      const bool fused = layer.activation == "relu" || layer.activation == "swish";
      at::Tensor f = linear(h, layer.fc1, fused ? layer.activation : "none");
      if (!fused) f = at::gelu(f);  // HF "gelu" is the exact erf form
      return linear(f, layer.fc2);
    });
  }
  return x;
}

}  // namespace pyengine
