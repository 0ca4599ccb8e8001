#pragma once
#include <torch/extension.h>

#include <string>
#include <vector>

namespace pyengine {

// One linear layer's int8 weight as int8_linear reads it (Int8Ops.prepare_linear builds it: layer.int8).
struct Int8Weight {
  at::Tensor packed, colsum, scale;
  c10::optional<at::Tensor> bias;
  int64_t n;
};

// One Transformer decoder layer (self-attention, encoder-decoder attention, FFN; post- or pre-norm) with int8
// linears: what a decoder step needs, collected once at load.
struct Int8DecoderLayer {
  Int8Weight qkv, self_out, cross_q, cross_out, fc1, fc2;
  at::Tensor self_norm_w, self_norm_b, cross_norm_w, cross_norm_b, ffn_norm_w, ffn_norm_b;
  double eps;
  bool pre_norm;
  std::string activation;  // relu, swish (fused into fc1) or gelu
  int64_t heads;
};

// One decoder step of every layer for N rows (one new token each, row r at positions[r]), in C++: the same
// operations, in the same order, as pyengine.model.transformer.DecoderLayer with int8 linears, without a Python
// call per op. x (N, D) float32; cache (L, 2, P, H, T_max, Dh) the indirect KV cache: row r writes this step's
// K/V into physical row write_rows[r] at positions[r] and reads key j < positions[r] + 1 from physical row
// rows[r, j] (rows (N, T), T = max position + 1); memory (L, 2, P', H, S, Dh) the encoder K/V in slots, key j of
// sentence b read from slot memory_rows[b, j] (memory_rows (B, S)), src_lengths (B,), the N rows being
// B sentences × N/B beams. kernel: int8_linear's (the one the Python layers use, so that both agree). Returns
// the last layer's output (N, D).
at::Tensor int8_decoder_step(const std::vector<Int8DecoderLayer>& layers, const at::Tensor& x, const at::Tensor& cache,
                             const at::Tensor& positions, const at::Tensor& write_rows, const at::Tensor& rows,
                             const at::Tensor& memory, const at::Tensor& memory_rows, const at::Tensor& src_lengths,
                             const std::string& kernel);

}  // namespace pyengine
