#pragma once
#include "aten.h"

#include <string>
#include <variant>
#include <vector>

namespace pyengine {

// One linear layer's int8 weight as int8_linear reads it (Int8Linear.pack builds it).
struct Int8Weight {
  at::Tensor packed, colsum, scale;
  c10::optional<at::Tensor> bias;
  int64_t n;
};

// One linear layer's bfloat16 weight as bf16_linear reads it (Bf16Linear.pack's record, packed by bf16_pack).
struct Bf16Weight {
  at::Tensor packed;
  c10::optional<at::Tensor> bias;
  int64_t n;
};

// One linear layer's float32 weight as FloatLinear runs it: oneDNN's prepacked copy (mkldnn._linear_pointwise, the
// activation fused) where the method made one, else PyTorch's linear on the (N, K) weight.
struct FloatWeight {
  at::Tensor weight;
  c10::optional<at::Tensor> packed;
  c10::optional<at::Tensor> bias;
  int64_t n;
};

// One linear layer's float32 weight as f32_linear reads it (F32Linear.pack's record, packed by f32_pack).
struct F32Weight {
  at::Tensor packed;
  c10::optional<at::Tensor> bias;
  int64_t n;
};

// A decoder linear in one of the weight types the native step runs (every linear of a model has the same type).
using StepWeight = std::variant<Int8Weight, Bf16Weight, FloatWeight, F32Weight>;

// act(x·Wᵀ + b) of a float32 weight, the operations FloatLinear.apply runs (relu, swish or gelu; "none").
at::Tensor float_linear(const at::Tensor& x, const FloatWeight& w, const std::string& activation);

// One Transformer decoder layer (self-attention, encoder-decoder attention, FFN; post- or pre-norm): what a decoder
// step needs, collected once at load.
struct DecoderLayer {
  StepWeight qkv, self_out, cross_q, cross_out, fc1, fc2;
  at::Tensor self_norm_w, self_norm_b, cross_norm_w, cross_norm_b, ffn_norm_w, ffn_norm_b;
  double eps;
  bool pre_norm;
  std::string activation;  // relu, swish (fused into fc1) or gelu
  int64_t heads;
  bool aten_norm;  // the layer norms as PyTorch's layer_norm (the model's Ops say which; float32 models), else ours
};

// One decoder step of every layer for N rows (one new token each, row r at positions[r]), in C++: the same operations,
// in the same order, as pyengine.model.transformer.DecoderLayer with int8, bf16 or float32 linears (the linear methods'
// own kernels) or PyTorch's float32 ones (FloatLinear's), without a Python call per op. x (N, D) float32; cache (L, 2,
// P, H, T_max, Dh) the indirect KV cache: row r writes this step's K/V into physical row write_rows[r] at positions[r]
// and reads key j < positions[r] + 1 from physical row rows[r, j] (rows (N, T), T = max position + 1); memory (L, 2,
// P', H, S, Dh) the encoder K/V in slots, key j of sentence b read from slot memory_rows[b, j] (memory_rows (B, S)),
// src_lengths (B,), the N rows being B sentences × N/B beams. kernel: the linears' kernel (int8_linear's, bf16_linear's
// or f32_linear's, the one the Python layers use, so that both agree). Returns the last layer's output (N, D).
at::Tensor decoder_step(const std::vector<DecoderLayer>& layers, const at::Tensor& x, const at::Tensor& cache,
                        const at::Tensor& positions, const at::Tensor& write_rows, const at::Tensor& rows,
                        const at::Tensor& memory, const at::Tensor& memory_rows, const at::Tensor& src_lengths,
                        const std::string& kernel);

// Each row's K and V (kv (N, 2·D) float32: K, then V) into physical row rows[i] of layer `layer` of a (L, 2, P, H, T,
// Dh) cache or memory, at position positions[i], in its dtype (float32, or bfloat16 rounded as PyTorch rounds):
// the encoder memory's write, one pass where indexed assignment took ~0.6 ns an element.
void write_kv(const at::Tensor& kv, const at::Tensor& cache, int64_t layer, const at::Tensor& rows,
              const at::Tensor& positions);

}  // namespace pyengine
