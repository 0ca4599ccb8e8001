#pragma once
#include "aten.h"

#include <string>
#include <vector>

#include "decoder_step.h"

namespace pyengine {

// One Transformer encoder layer (self-attention and FFN; post- or pre-norm) with int8, bf16 or float32 linears of
// pyengine's own GEMMs, collected once at load for encoder_stack.
struct EncoderLayer {
  StepWeight qkv, out, fc1, fc2;
  at::Tensor self_norm_w, self_norm_b, ffn_norm_w, ffn_norm_b;
  double eps;
  bool pre_norm;
  std::string activation;  // relu, swish (fused into fc1) or gelu
  int64_t heads;
  bool aten_norm;  // the layer norms as PyTorch's layer_norm (the model's Ops say which; float32 models), else ours
};

// Every encoder layer in one call over B sentences' tokens one after the other (x (T, D) float32, sentence b's
// lengths[b] tokens after sentence b-1's: pyengine.model.transformer.Ragged's layout), in C++: the operations of
// pyengine.model.transformer.EncoderLayer with int8, bf16 or float32 linears, in their order — GEMMs, layer norms and
// FFN on the T tokens, the attention on them padded to the longest (decode_attention's loop, which the Python layers
// run for sources of up to 128 tokens). kernel: the linears' kernel, as for decoder_step. Returns the last layer's
// output (T, D).
at::Tensor encoder_stack(const std::vector<EncoderLayer>& layers, const at::Tensor& x,
                         const std::vector<int64_t>& lengths, const std::string& kernel);

}  // namespace pyengine
