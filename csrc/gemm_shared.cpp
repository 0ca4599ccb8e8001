// What the int8, bf16 and float32 GEMMs share (gemm_shared.h): the activation argument, the activation scratch, and
// the fused output layer's running log-sum-exp + top-k state and its merge.
#include "gemm_shared.h"
#include "cpu_features.h"
#include "vec_math.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdlib>
#include <limits>

namespace pyengine {
namespace gemm {

namespace {
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// A lane's Σexp(x − offset) is kept against an offset that rises only when a logit exceeds it by more than this (so
// exp(x − offset) ≤ e^16, and a sum of 58k such terms stays far below float32's range), not at every new max: a
// part's lanes start empty, and rising at each new max took a rescale (and a mispredicted branch) on most of a
// part's first blocks — 16 parts cost the output layer ~10% that way.
constexpr float kLaneSlack = 16.f;

#if defined(__x86_64__) && defined(__GNUC__)
// exp(x) for x ≤ kLaneSlack: exp_nonpositive_short's range reduction, polynomial and vscalefps hold above 0 too.
__attribute__((target("avx512f"))) inline __m512 exp_short(__m512 x) { return exp_nonpositive_short(x); }
#endif
}  // namespace

Activation activation_named(const char* who, const std::string& activation) {
  if (activation == "relu") return Activation::kRelu;
  if (activation == "swish") return Activation::kSwish;
  TORCH_CHECK(activation == "none", who, ": activation must be none, relu or swish, not ", activation);
  return Activation::kNone;
}

uint8_t* thread_scratch(size_t bytes) {
  struct Buffer {
    uint8_t* data = nullptr;
    size_t size = 0;
    ~Buffer() { std::free(data); }
  };
  static thread_local Buffer buffer;
  if (bytes > buffer.size || buffer.data == nullptr || (buffer.size > kScratchKept && bytes <= kScratchKept)) {
    std::free(buffer.data);
    buffer.size = std::max<size_t>((bytes + 63) / 64 * 64, 64);
    buffer.data = static_cast<uint8_t*>(std::aligned_alloc(64, buffer.size));
    TORCH_CHECK(buffer.data != nullptr, "GEMM: could not allocate ", buffer.size, " bytes of scratch");
  }
  return buffer.data;
}

TopKState::TopKState(int64_t rows, int64_t k) : k(k), best_value(rows * k), best_id(rows * k), count(rows, 0) {}

LaneSums::LaneSums(int64_t parts, int64_t rows)
    : rows(rows), size(parts * rows * 16), offset(size, kNegInf), sum(size, 0.f) {}

void TopKState::offer(int64_t row, float v, int64_t id) {
  float* bv = best_value.data() + row * k;
  int64_t* bi = best_id.data() + row * k;
  int64_t& n = count[row];
  const auto beats = [&](int64_t j) { return v > bv[j] || (v == bv[j] && id < bi[j]); };  // (a NaN beats none)
  if (n == k && !beats(k - 1)) return;
  int64_t pos = n < k ? n++ : k - 1;
  for (; pos > 0 && beats(pos - 1); --pos) bv[pos] = bv[pos - 1], bi[pos] = bi[pos - 1];
  bv[pos] = v, bi[pos] = id;
}

#if defined(__x86_64__) && defined(__GNUC__)
namespace {
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
}  // namespace

__attribute__((target("amx-tile"))) void amx_begin(int64_t M) {
  TORCH_CHECK(M >= 1, "amx_begin: a GEMM of no rows");
  const uint8_t rows = static_cast<uint8_t>(std::min<int64_t>(M, kBlockRows));
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.rows[t] = t == 5 || t == 6 ? kBlockRows : rows, cfg.colsb[t] = 64;
  // not _tile_loadconfig: GCC 12's declares only 8 bytes of the config as read, and drops the stores above
  __asm__ volatile("ldtilecfg %0" : : "m"(cfg));
}

__attribute__((target("amx-tile"))) void amx_end() { _tile_release(); }
#else
void amx_begin(int64_t) { TORCH_CHECK(false, "AMX needs an x86-64 build"); }
void amx_end() {}
#endif

std::vector<int64_t> checked_banned(const char* who, const at::Tensor& banned, int64_t n_out, int64_t k) {
  TORCH_CHECK(banned.dim() == 1 && banned.scalar_type() == at::kLong && banned.device().is_cpu(),
              who, ": banned must be (B,) int64 on the CPU");
  std::vector<int64_t> ban(banned.data_ptr<int64_t>(), banned.data_ptr<int64_t>() + banned.numel());
  std::sort(ban.begin(), ban.end());
  ban.erase(std::unique(ban.begin(), ban.end()), ban.end());
  TORCH_CHECK(ban.empty() || (ban.front() >= 0 && ban.back() < n_out), who, ": banned token id outside the vocabulary");
  TORCH_CHECK(k >= 1 && k + static_cast<int64_t>(ban.size()) <= n_out, who, ": k=", k, " outside [1, ",
              n_out - static_cast<int64_t>(ban.size()), "] (the vocabulary less the banned ids)");
  return ban;
}

uint64_t banned_bits(const std::vector<int64_t>& banned, int64_t n0) {
  uint64_t bits = 0;
  for (auto it = std::lower_bound(banned.begin(), banned.end(), n0); it != banned.end() && *it < n0 + kCols; ++it)
    bits |= uint64_t{1} << (*it - n0);
  return bits;
}

namespace {

// scalar twin
void absorb_portable(const float* y, int rows, int64_t m0, int64_t n0, int64_t width, uint64_t banned,
                     TopKState& st) {
  for (int r = 0; r < rows; ++r) {
    const int64_t row = m0 + r;
    float& off = st.lane_offset[row * 16];
    float& sum = st.lane_sum[row * 16];
    for (int64_t c = 0; c < width; ++c) {
      const float v = y[r * kCols + c];
      if (v > off + kLaneSlack) sum *= std::exp(off - v), off = v;
      sum += std::exp(v - off);
      if (!(banned >> c & 1)) st.offer(row, v, n0 + c);
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// The logits of row r that reach the row's threshold, offered in column order.
__attribute__((target("avx512f"))) inline void offer_hits(const float* yr, int64_t row, int64_t n0, int64_t width,
                                                          uint64_t banned, TopKState& st) {
  for (int j = 0; j < 4 && 16 * j < width; ++j) {
    const int64_t left = width - 16 * j;
    const __mmask16 valid = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
    __mmask16 hit = _mm512_mask_cmp_ps_mask(valid & ~__mmask16(banned >> (16 * j)), _mm512_loadu_ps(yr + 16 * j),
                                            _mm512_set1_ps(st.threshold(row)), _CMP_GE_OQ);
    for (; hit; hit &= hit - 1) {
      const int lane = __builtin_ctz(hit);
      st.offer(row, yr[16 * j + lane], n0 + 16 * j + lane);
    }
  }
}

// A tile narrower than 64 columns (the vocabulary's last): group by group, masked.
__attribute__((target("avx512f"))) void absorb_partial(const float* y, int rows, int64_t m0, int64_t n0, int64_t width,
                                                       uint64_t banned, TopKState& st) {
  for (int r = 0; r < rows; ++r) {
    const int64_t row = m0 + r;
    __m512 off = _mm512_loadu_ps(st.lane_offset + row * 16), sum = _mm512_loadu_ps(st.lane_sum + row * 16);
    for (int j = 0; j < 4 && 16 * j < width; ++j) {
      const int64_t left = width - 16 * j;
      const __mmask16 valid = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
      const __m512 v = _mm512_maskz_loadu_ps(valid, y + r * kCols + 16 * j);
      const __mmask16 up =
          _mm512_mask_cmp_ps_mask(valid, v, _mm512_add_ps(off, _mm512_set1_ps(kLaneSlack)), _CMP_GT_OQ);
      if (up) {
        const __m512 raised = _mm512_mask_mov_ps(off, up, v);
        sum = _mm512_mask_mul_ps(sum, up, sum, exp_short(_mm512_sub_ps(off, raised)));
        off = raised;
      }
      sum = _mm512_mask_add_ps(sum, valid, sum, exp_short(_mm512_sub_ps(v, off)));
    }
    _mm512_storeu_ps(st.lane_offset + row * 16, off);
    _mm512_storeu_ps(st.lane_sum + row * 16, sum);
    offer_hits(y + r * kCols, row, n0, width, banned, st);
  }
}

// A full 64-column block, per row: one max over its four vectors decides whether a lane's offset rises (rescaling
// its sum once) and whether any logit can reach the row's k-th best; the four exps are independent
// (summed pairwise), where a group-at-a-time loop chained each on the previous group's max and sum and asked
// for the threshold four times.
__attribute__((target("avx512f"))) void absorb_avx512(const float* y, int rows, int64_t m0, int64_t n0,
                                                      int64_t width, uint64_t banned, TopKState& st) {
  if (width < kCols) return absorb_partial(y, rows, m0, n0, width, banned, st);
  for (int r = 0; r < rows; ++r) {
    const int64_t row = m0 + r;
    const float* yr = y + r * kCols;
    const __m512 v0 = _mm512_loadu_ps(yr), v1 = _mm512_loadu_ps(yr + 16);
    const __m512 v2 = _mm512_loadu_ps(yr + 32), v3 = _mm512_loadu_ps(yr + 48);
    const __m512 top = _mm512_max_ps(_mm512_max_ps(v0, v1), _mm512_max_ps(v2, v3));
    __m512 off = _mm512_loadu_ps(st.lane_offset + row * 16), sum = _mm512_loadu_ps(st.lane_sum + row * 16);
    const __mmask16 up = _mm512_cmp_ps_mask(top, _mm512_add_ps(off, _mm512_set1_ps(kLaneSlack)), _CMP_GT_OQ);
    if (up) {  // a lane's offset rises (at a part's first block, rarely later): its sum is rescaled to it
      const __m512 raised = _mm512_mask_mov_ps(off, up, top);
      sum = _mm512_mask_mul_ps(sum, up, sum, exp_short(_mm512_sub_ps(off, raised)));
      off = raised;
    }
    const __m512 e01 = _mm512_add_ps(exp_short(_mm512_sub_ps(v0, off)), exp_short(_mm512_sub_ps(v1, off)));
    const __m512 e23 = _mm512_add_ps(exp_short(_mm512_sub_ps(v2, off)), exp_short(_mm512_sub_ps(v3, off)));
    _mm512_storeu_ps(st.lane_offset + row * 16, off);
    _mm512_storeu_ps(st.lane_sum + row * 16, _mm512_add_ps(sum, _mm512_add_ps(e01, e23)));
    if (_mm512_cmp_ps_mask(top, _mm512_set1_ps(st.threshold(row)), _CMP_GE_OQ))
      offer_hits(yr, row, n0, width, banned, st);
  }
}
#endif

// Σ over the parts' lanes of lane_sum · exp(lane_offset − mx): in double, one lane at a time (the portable twin).
double lane_terms_portable(const LaneSums& lanes, int64_t row, float mx) {
  double sum = 0;
  for (size_t i = row * 16; i < static_cast<size_t>(lanes.size); i += lanes.rows * 16)
    for (int l = 0; l < 16; ++l) {
      const float lane_sum = lanes.sum[i + l];  // 0 for a lane that saw no column
      if (lane_sum > 0) sum += lane_sum * std::exp(double(lanes.offset[i + l]) - mx);
    }
  return sum;
}

#if defined(__x86_64__) && defined(__GNUC__)
// The same, a part's 16 lanes at once (float32 terms, ~2e-7 relative each, summed per lane, then in double).
__attribute__((target("avx512f"))) double lane_terms_avx512(const LaneSums& lanes, int64_t row, float mx) {
  __m512 sum = _mm512_setzero_ps();
  const __m512 top = _mm512_set1_ps(mx);
  for (size_t i = row * 16; i < static_cast<size_t>(lanes.size); i += lanes.rows * 16) {
    const __m512 s = _mm512_loadu_ps(lanes.sum.data() + i);
    const __mmask16 seen = _mm512_cmp_ps_mask(s, _mm512_setzero_ps(), _CMP_GT_OQ);
    sum = _mm512_mask3_fmadd_ps(s, exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(lanes.offset.data() + i), top)), sum,
                                seen);
  }
  alignas(64) float terms[16];
  _mm512_store_ps(terms, sum);
  double total = 0;
  for (float v : terms) total += v;
  return total;
}
#endif

// One row's merge (see merge_rows): the log-sum-exp, then the k best of the threads' lists (each best first) by
// taking the best head k times.
void merge_row(const LaneSums& lanes, const std::vector<TopKState>& states, int64_t row, bool vectorized,
               std::vector<int64_t>& heads, float* out_value, int64_t* out_id) {
  const int64_t k = states.front().k;
  float mx = kNegInf;
  for (size_t i = row * 16; i < static_cast<size_t>(lanes.size); i += lanes.rows * 16)
    for (int l = 0; l < 16; ++l) mx = std::max(mx, lanes.offset[i + l]);
#if defined(__x86_64__) && defined(__GNUC__)
  const double sum = vectorized ? lane_terms_avx512(lanes, row, mx) : lane_terms_portable(lanes, row, mx);
#else
  const double sum = lane_terms_portable(lanes, row, mx);
#endif
  const float log_sum = mx + static_cast<float>(std::log(sum));
  std::fill(heads.begin(), heads.end(), 0);
  int64_t taken = 0;
  for (; taken < k; ++taken) {
    int64_t from = -1;
    float best = 0;
    int64_t best_id = 0;
    for (size_t t = 0; t < states.size(); ++t) {
      const TopKState& st = states[t];
      if (heads[t] == st.count[row]) continue;
      const float v = st.best_value[row * k + heads[t]];
      const int64_t id = st.best_id[row * k + heads[t]];
      if (from < 0 || v > best || (v == best && id < best_id)) from = static_cast<int64_t>(t), best = v, best_id = id;
    }
    if (from < 0) break;
    ++heads[from];
    out_value[taken] = best - log_sum, out_id[taken] = best_id;
  }
  // a NaN logit is never offered (no comparison holds), so a row of NaN (a hidden state gone NaN) has too few
  TORCH_CHECK(taken == k && std::isfinite(log_sum), "output layer: row ", row,
              " has NaN logits (the decoder's hidden state is not finite)");
}

}  // namespace

AbsorbFn pick_absorb(bool vectorized) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (vectorized && avx512_available()) return absorb_avx512;
#endif
  return absorb_portable;
}

void merge_rows(const LaneSums& lanes, const std::vector<TopKState>& states, int64_t rows, float* values,
                int64_t* ids, bool vectorized) {
  const int64_t k = states.front().k;
#if defined(__x86_64__) && defined(__GNUC__)
  vectorized = vectorized && avx512_available();
#endif
  std::vector<int64_t> heads(states.size());
  for (int64_t row = 0; row < rows; ++row)
    merge_row(lanes, states, row, vectorized, heads, values + row * k, ids + row * k);
}

}  // namespace gemm
}  // namespace pyengine
