#pragma once
#include "aten.h"

#include <vector>

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

// The same for C++ callers that checked their inputs (shapes, dtypes, unit stride on Dh): lengths (B,) keys per
// sentence (≤ Tk), rows (B·Tk) or nullptr, and the result written through out's strides ((B, H, Tq, Dh) float32,
// unit stride on Dh), so a caller can lay it out as its next GEMM reads it.
void decode_attention_into(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const std::vector<int64_t>& lengths, double scale, const int64_t* rows, const at::Tensor& out);

// decode_attention_into on the keys and values of layer `layer` of a (L, 2, P, H, T_max, Dh) cache or memory
// tensor (float32 or bfloat16, unit stride on Dh), their first Tk positions, read in place: a decoder step took
// eight select/narrow views a layer for them, ~0.7 µs each through the dispatcher; this builds none.
void decode_attention_layer(const at::Tensor& q, const at::Tensor& kv, int64_t layer, int64_t Tk,
                            const std::vector<int64_t>& lengths, double scale, const int64_t* rows,
                            const at::Tensor& out);

// Keys per sentence: kv_lengths (B,) clamped to [0, Tk], or Tk for every sentence when it is None.
std::vector<int64_t> key_lengths(const c10::optional<at::Tensor>& kv_lengths, int64_t B, int64_t Tk);

// Refuses a row index that is not a contiguous int64 (B, Tk) table of rows below kv_rows.
void check_rows(const at::Tensor& rows, int64_t B, int64_t Tk, int64_t kv_rows);

}  // namespace pyengine
