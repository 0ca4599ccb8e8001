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

// One decoder step of every layer for N rows (one new token each, all at `position`), in C++: the same
// operations, in the same order, as pyengine.model.DecoderLayer on Int8Ops, without a Python call per op.
// x (N, D) float32; cache (L, 2, P, H, T_max, Dh) an indirect KV cache (this step's K/V are written to rows
// 0..N-1 at `position`; key j of row r is read from row rows[r, j]); memory (L, 2, B, H, S, Dh) the encoder
// K/V with src_lengths (B,), the N rows being B sentences × N/B beams. kernel: int8_linear's (the one the Python
// layers use, so that both agree). Returns the last layer's output (N, D).
at::Tensor int8_decoder_step(const std::vector<Int8DecoderLayer>& layers, const at::Tensor& x, const at::Tensor& cache,
                             int64_t position, const at::Tensor& rows, const at::Tensor& memory,
                             const at::Tensor& src_lengths, const std::string& kernel);

}  // namespace pyengine
