#pragma once
#include <torch/extension.h>

namespace pyengine {

// Beam reorder and finished-row dropping for the decoder self-attention cache. `active` and `spare`
// are the two preallocated (L, 2, R, H, T_max, Dh) buffers; afterwards row i holds what row rows[i]
// held, for the first `length` positions. Copies in place when few rows move (rows that are both a
// source and overwritten are saved to `spare` first), otherwise gathers every row into `spare`.
// Returns true when the result is in `spare` (the caller swaps the buffers).
bool kv_cache_select(at::Tensor active, at::Tensor spare, const at::Tensor& rows, int64_t length);

}  // namespace pyengine
