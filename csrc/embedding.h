#pragma once
#include "aten.h"

namespace pyengine {

// Token embeddings of rows each at its own position, one token a row (a decoder step; the encoder's tokens as rows):
// out[r] = table[ids[r]]·scale + positions_table[positions[r] + offset], each product and sum rounded to float32 in
// that order (the Python path's embedding, mul_ and add_, to the bit). zero_start: a row at position 0 takes the
// zero vector for its token's embedding (Marian's first decoder input), as masked_fill then add_ does.
at::Tensor embed_rows(const at::Tensor& table, const at::Tensor& ids, double scale, const at::Tensor& positions_table,
                      const at::Tensor& positions, int64_t offset, bool zero_start);

}  // namespace pyengine
