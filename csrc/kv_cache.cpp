// KV-cache row selection without allocation: the CPU path copies only the rows whose origin changed
// (beam search keeps most rows in place from one step to the next), one memcpy per (layer, K/V, row,
// head) span of length x Dh values, in parallel.
#include "kv_cache.h"

#include <ATen/Parallel.h>

#include <cstring>
#include <unordered_map>
#include <vector>

namespace pyengine {

namespace {

struct Layout {
  int64_t layers, rows, heads, max_len, head_dim, elem;
  int64_t row_stride() const { return heads * max_len * head_dim * elem; }    // bytes between rows
  int64_t kv_stride() const { return rows * row_stride(); }                   // between K and V
  int64_t head_stride() const { return max_len * head_dim * elem; }
};

// Copy row `src` of `from` to row `dst` of `to` (first `length` positions of every layer, K and V, head).
void copy_row(const Layout& lay, const char* from, int64_t src, char* to, int64_t dst, int64_t length) {
  const int64_t span = length * lay.head_dim * lay.elem;
  for (int64_t lk = 0; lk < lay.layers * 2; ++lk) {
    const char* s = from + lk * lay.kv_stride() + src * lay.row_stride();
    char* d = to + lk * lay.kv_stride() + dst * lay.row_stride();
    for (int64_t h = 0; h < lay.heads; ++h) std::memcpy(d + h * lay.head_stride(), s + h * lay.head_stride(), span);
  }
}

struct Move {
  int64_t src, dst;
  bool from_spare;
};

void run_moves(const Layout& lay, const std::vector<Move>& moves, const char* active, char* spare_src,
               char* target, int64_t length) {
  at::parallel_for(0, static_cast<int64_t>(moves.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m)
      copy_row(lay, moves[m].from_spare ? spare_src : active, moves[m].src, target, moves[m].dst, length);
  });
}

}  // namespace

bool kv_cache_select(at::Tensor active, at::Tensor spare, const at::Tensor& rows, int64_t length) {
  TORCH_CHECK(active.dim() == 6 && active.sizes() == spare.sizes() && active.dtype() == spare.dtype(),
              "kv_cache_select: active and spare must be (L, 2, R, H, T, Dh) buffers of one shape and dtype");
  TORCH_CHECK(active.is_contiguous() && spare.is_contiguous(), "kv_cache_select: buffers must be contiguous");
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong, "kv_cache_select: rows must be (n,) int64");
  TORCH_CHECK(length >= 0 && length <= active.size(4), "kv_cache_select: length ", length, " outside the cache");
  const int64_t n = rows.numel();
  TORCH_CHECK(n <= active.size(2), "kv_cache_select: more rows than the cache holds");
  if (!active.device().is_cpu()) {  // one gather on the device
    auto src = active.narrow(4, 0, length);
    auto dst = spare.narrow(2, 0, n).narrow(4, 0, length);
    at::index_select_out(dst, src, 2, rows.to(active.device()));
    return true;
  }
  const Layout lay{active.size(0), active.size(2), active.size(3), active.size(4), active.size(5),
                   static_cast<int64_t>(active.element_size())};
  const int64_t* r = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(r[i] >= 0 && r[i] < lay.rows, "kv_cache_select: row ", r[i], " outside the cache");
  if (length == 0) return false;
  char* a = static_cast<char*>(active.data_ptr());
  char* s = static_cast<char*>(spare.data_ptr());

  // rows whose content changes, and which of their sources get overwritten before being read
  std::vector<char> overwritten(lay.rows, 0);
  int64_t moved = 0;
  for (int64_t i = 0; i < n; ++i)
    if (r[i] != i) overwritten[i] = 1, ++moved;
  std::unordered_map<int64_t, int64_t> saved;  // source row -> its slot in spare
  for (int64_t i = 0; i < n; ++i)
    if (r[i] != i && overwritten[r[i]] && !saved.count(r[i])) saved.emplace(r[i], static_cast<int64_t>(saved.size()));

  std::vector<Move> moves;
  if (moved + static_cast<int64_t>(saved.size()) >= n) {  // in place would copy more than a full gather
    for (int64_t i = 0; i < n; ++i) moves.push_back({r[i], i, false});
    run_moves(lay, moves, a, s, s, length);
    return true;
  }
  for (const auto& [row, slot] : saved) moves.push_back({row, slot, false});
  run_moves(lay, moves, a, s, s, length);
  moves.clear();
  for (int64_t i = 0; i < n; ++i) {
    if (r[i] == i) continue;
    auto it = saved.find(r[i]);
    moves.push_back(it == saved.end() ? Move{r[i], i, false} : Move{it->second, i, true});
  }
  run_moves(lay, moves, a, s, a, length);
  return false;
}

}  // namespace pyengine
