#pragma once
#include "aten.h"

#include <tuple>

namespace pyengine {

// Beam-search candidates straight from the logits, in one pass per row instead of log_softmax (a
// (N, V) write) followed by top-k: returns the k best (log-prob, token) per row, best first, ties to
// the lower token id. log-probs are logit - logsumexp(row) over the whole row; `banned` token ids
// (suppressed tokens, EOS under the minimum length) count in the logsumexp, as after HF's
// log_softmax + processors, but are never candidates. The logits at banned ids are overwritten
// with -inf. logits: (N, V) float32, contiguous; banned: (M,) int64.
std::tuple<at::Tensor, at::Tensor> log_softmax_topk(at::Tensor logits, int64_t k, const at::Tensor& banned);

}  // namespace pyengine
