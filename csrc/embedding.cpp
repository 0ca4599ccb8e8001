// Token embedding + scale + position in one pass (csrc/embedding.h). At a decoder step the table's rows are cold
// (the step's weights streamed through the caches since the last lookup): every row's lines are prefetched before
// any is read, so the misses overlap instead of arriving one row at a time; and the three ATen calls it replaces
// cost more in dispatch than the arithmetic at a step's few rows.
#include "embedding.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace pyengine {

at::Tensor embed_rows(const at::Tensor& table, const at::Tensor& ids, double scale, const at::Tensor& positions_table,
                      const at::Tensor& positions, int64_t offset, bool zero_start) {
  TORCH_CHECK(table.dim() == 2 && positions_table.dim() == 2 && table.size(1) == positions_table.size(1),
              "embed_rows: table (V, D) and positions_table (P, D) expected");
  TORCH_CHECK(table.scalar_type() == at::kFloat && positions_table.scalar_type() == at::kFloat && table.is_cpu() &&
                  table.is_contiguous() && positions_table.is_contiguous(),
              "embed_rows: contiguous float32 CPU tables expected");
  TORCH_CHECK(ids.scalar_type() == at::kLong && positions.scalar_type() == at::kLong && ids.dim() == 1 &&
                  positions.dim() == 1 && ids.numel() == positions.numel(),
              "embed_rows: ids (N,) and positions (N,) int64 expected");
  const at::Tensor id = ids.contiguous(), pos = positions.contiguous();
  const int64_t n = id.numel(), d = table.size(1), vocab = table.size(0), span = positions_table.size(0);
  const int64_t* id_p = id.data_ptr<int64_t>();
  const int64_t* pos_p = pos.data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r) {
    TORCH_CHECK(id_p[r] >= 0 && id_p[r] < vocab, "embed_rows: token id ", id_p[r], " outside the table's ", vocab);
    TORCH_CHECK(pos_p[r] + offset >= 0 && pos_p[r] + offset < span, "embed_rows: position ", pos_p[r] + offset,
                " outside the table's ", span);
  }
  const float* emb = table.data_ptr<float>();
  const float* pe = positions_table.data_ptr<float>();
#if defined(__x86_64__) && defined(__GNUC__)
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < d; c += 16) _mm_prefetch(reinterpret_cast<const char*>(emb + id_p[r] * d + c), _MM_HINT_T0);
#endif
  at::Tensor out = at::empty({n, d}, table.options());
  float* y = out.data_ptr<float>();
  const float s = static_cast<float>(scale);
  for (int64_t r = 0; r < n; ++r) {
    const float* e = emb + id_p[r] * d;
    const float* p = pe + (pos_p[r] + offset) * d;
    float* o = y + r * d;
    if (zero_start && pos_p[r] == 0) {
      for (int64_t c = 0; c < d; ++c) o[c] = 0.0f + p[c];
    } else {
      for (int64_t c = 0; c < d; ++c) {
        const float v = e[c] * s;  // (rounded before the add: -ffp-contract=off)
        o[c] = v + p[c];
      }
    }
  }
  return out;
}

}  // namespace pyengine
