#pragma once
#include <torch/extension.h>

namespace pyengine {

// Attention of a decoder step on the CPU: softmax(q·kᵀ·scale)·v for a few query rows per (sentence, head),
// fused (no score tensor, no batched-GEMM dispatch per head). q (B, H, Tq, Dh), k and v (B, H, Tk, Dh),
// q float32, k and v float32 or bfloat16, any strides with a unit stride on Dh (cache and encoder-memory
// views are read in place);
// kv_lengths (B,) int64: keys at or past a sentence's length are padding (None: all Tk keys).
// rows (B, Tk) int64, optional: key j of sentence b is read from row rows[b, j] of k and v, which may then
// have any number of rows (a beam-search cache that is never reordered: only this index table is).
// Returns a contiguous (B, H, Tq, Dh) float32 tensor. No causal mask: a step's query sees every key given.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& kv_lengths, double scale,
                            const c10::optional<at::Tensor>& rows);

}  // namespace pyengine
