#pragma once
#include "aten.h"

#include <tuple>

namespace pyengine {

// The KV cache's row table (pyengine/model/cache.py's `origin`: origin[r, s] is the physical row that holds position
// s of batch row r), int64 (rows, T) on the CPU. A step's bookkeeping of it in one pass each, where ATen took 4-6
// calls a step that ran with their code cold (the step's weights streamed through the caches in between).

// Rows 0..n-1 (n = write_rows.numel()) decode at one `position`: origin[r, position] = write_rows[r]. Returns
// (positions: (n,) each `position`; rows_index: origin[:n, :end], a contiguous copy, what the step's attention reads).
std::tuple<at::Tensor, at::Tensor> kv_step_table(at::Tensor origin, const at::Tensor& write_rows, int64_t position,
                                                 int64_t end);

// Batch rows kept in a new order (beam reorder, finished rows dropped): origin[:n, :length] = origin[rows, :length]
// with n = rows.numel(), every row gathered before any is written (rows repeat and move).
void kv_select(at::Tensor origin, const at::Tensor& rows, int64_t length);

}  // namespace pyengine
