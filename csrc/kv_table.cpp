// The KV cache's row table in one pass a step (csrc/kv_table.h).
#include "kv_table.h"

#include <cstring>
#include <limits>
#include <vector>

namespace pyengine {
namespace {

void check_table(const char* who, const at::Tensor& origin, int64_t length) {
  TORCH_CHECK(origin.dim() == 2 && origin.scalar_type() == at::kLong && origin.is_cpu() && origin.is_contiguous(),
              who, ": the row table must be a contiguous (rows, T) int64 CPU tensor");
  TORCH_CHECK(length >= 0 && length <= origin.size(1), who, ": ", length, " positions outside the table's ",
              origin.size(1));
}

// rows' entries, each checked to lie in 0..limit-1 (rows: the caller's contiguous copy)
const int64_t* long_rows(const char* who, const at::Tensor& rows, int64_t limit, const char* what) {
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong && rows.is_cpu() && rows.is_contiguous(), who,
              ": ", what, "s must be an (n,) int64 CPU tensor");
  const int64_t* p = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows.numel(); ++i)
    TORCH_CHECK(p[i] >= 0 && p[i] < limit, who, ": ", what, " ", p[i], " outside 0..", limit - 1);
  return p;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> kv_step_table(at::Tensor origin, const at::Tensor& write_rows, int64_t position,
                                                 int64_t end) {
  check_table("kv_step_table", origin, end);
  const int64_t n = write_rows.numel(), width = origin.size(1);
  TORCH_CHECK(n <= origin.size(0), "kv_step_table: ", n, " rows, the table holds ", origin.size(0));
  TORCH_CHECK(position >= 0 && position < end, "kv_step_table: position ", position, " outside 0..", end - 1);
  // (the physical rows' bound is the cache's: decoder_step checks every row it reads against it)
  const at::Tensor written = write_rows.contiguous();
  const int64_t* dst = long_rows("kv_step_table", written, std::numeric_limits<int64_t>::max(), "write row");
  int64_t* table = origin.data_ptr<int64_t>();
  at::Tensor positions = at::empty({n}, origin.options()), rows_index = at::empty({n, end}, origin.options());
  int64_t* pos = positions.data_ptr<int64_t>();
  int64_t* index = rows_index.data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r) {
    table[r * width + position] = dst[r];
    pos[r] = position;
    std::memcpy(index + r * end, table + r * width, sizeof(int64_t) * end);
  }
  return {positions, rows_index};
}

void kv_select(at::Tensor origin, const at::Tensor& rows, int64_t length) {
  check_table("kv_select", origin, length);
  const int64_t n = rows.numel(), width = origin.size(1);
  TORCH_CHECK(n <= origin.size(0), "kv_select: ", n, " rows, the table holds ", origin.size(0));
  const at::Tensor kept = rows.contiguous();
  const int64_t* from = long_rows("kv_select", kept, origin.size(0), "row");
  int64_t* table = origin.data_ptr<int64_t>();
  std::vector<int64_t> gathered(static_cast<size_t>(n * length));
  for (int64_t r = 0; r < n; ++r)
    std::memcpy(gathered.data() + r * length, table + from[r] * width, sizeof(int64_t) * length);
  for (int64_t r = 0; r < n; ++r)
    std::memcpy(table + r * width, gathered.data() + r * length, sizeof(int64_t) * length);
}

}  // namespace pyengine
