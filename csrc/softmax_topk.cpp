// Fused log-softmax + top-k over the vocabulary for beam search, CPU implementation (a GPU runs the Triton
// twin, kernels/topk.py: no CUDA toolkit needed at install). Per row, while it sits in L2: max, sum of exp,
// maxima of 128-wide chunks; the k best values lie in the k chunks with the highest maxima, so only k·128
// values are ranked.
#include "softmax_topk.h"
#include "cpu_features.h"
#include "vec_math.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace pyengine {

namespace {

constexpr int64_t kChunk = 128;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Portable versions (any x86 or ARM CPU); the AVX-512 ones below are chosen at run time.
float max_portable(const float* x, int64_t n) {
  float m = kNegInf;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

float sum_exp_portable(const float* x, int64_t n, float max) {
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(x[i] - max);
  return static_cast<float>(sum);
}

#if defined(__x86_64__) && defined(__GNUC__)
#define PYENGINE_AVX512 1
#include <immintrin.h>

__attribute__((target("avx512f"))) float max_avx512(const float* x, int64_t n) {
  __m512 m = _mm512_set1_ps(kNegInf);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(x + i));
  float out = _mm512_reduce_max_ps(m);
  for (; i < n; ++i) out = std::max(out, x[i]);
  return out;
}

__attribute__((target("avx512f"))) float sum_exp_avx512(const float* x, int64_t n, float max) {
  const __m512 mx = _mm512_set1_ps(max);
  __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;  // independent chains hide the add latency
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    s0 = _mm512_add_ps(s0, exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(x + i), mx)));
    s1 = _mm512_add_ps(s1, exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(x + i + 16), mx)));
    s2 = _mm512_add_ps(s2, exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(x + i + 32), mx)));
    s3 = _mm512_add_ps(s3, exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(x + i + 48), mx)));
  }
  for (; i + 16 <= n; i += 16) s0 = _mm512_add_ps(s0, exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(x + i), mx)));
  float sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
  for (; i < n; ++i) sum += std::exp(x[i] - max);
  return sum;
}
#endif

struct Kernels {
  float (*max)(const float*, int64_t);
  float (*sum_exp)(const float*, int64_t, float);
};

Kernels pick_kernels() {
#ifdef PYENGINE_AVX512
  if (avx512_available()) return {max_avx512, sum_exp_avx512};
#endif
  return {max_portable, sum_exp_portable};
}

const Kernels kKernels = pick_kernels();

struct Candidate {
  float value;
  int64_t id;
};

// Better first: higher value, then lower id.
inline bool better(const Candidate& a, const Candidate& b) {
  return a.value > b.value || (a.value == b.value && a.id < b.id);
}

void row_topk(float* x, int64_t vocab, int64_t k, const int64_t* banned, int64_t num_banned, float* out_values,
              int64_t* out_ids, std::vector<Candidate>& chunks, std::vector<Candidate>& cands) {
  // chunk maxima first (their max is the row's), then the normalizer; banned ids are masked after it
  const int64_t n_chunks = (vocab + kChunk - 1) / kChunk;
  chunks.resize(n_chunks);
  float max = kNegInf;
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t lo = c * kChunk, len = std::min(kChunk, vocab - lo);
    chunks[c] = {kKernels.max(x + lo, len), c};
    max = std::max(max, chunks[c].value);
  }
  const float log_sum = max + std::log(kKernels.sum_exp(x, vocab, max));
  for (int64_t b = 0; b < num_banned; ++b) {
    x[banned[b]] = kNegInf;
    const int64_t c = banned[b] / kChunk, lo = c * kChunk;
    chunks[c].value = kKernels.max(x + lo, std::min(kChunk, vocab - lo));
  }
  const int64_t take = std::min(k, n_chunks);
  std::partial_sort(chunks.begin(), chunks.begin() + take, chunks.end(), better);
  cands.clear();
  for (int64_t c = 0; c < take; ++c) {
    const int64_t lo = chunks[c].id * kChunk, hi = std::min(lo + kChunk, vocab);
    for (int64_t i = lo; i < hi; ++i) cands.push_back({x[i], i});
  }
  std::partial_sort(cands.begin(), cands.begin() + k, cands.end(), better);
  for (int64_t j = 0; j < k; ++j) {
    out_values[j] = cands[j].value - log_sum;
    out_ids[j] = cands[j].id;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> log_softmax_topk(at::Tensor logits, int64_t k, const at::Tensor& banned) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_contiguous(),
              "log_softmax_topk: logits must be a contiguous (N, V) float32 tensor");
  TORCH_CHECK(banned.dim() == 1 && banned.scalar_type() == at::kLong, "log_softmax_topk: banned must be (M,) int64");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(k >= 1 && k <= vocab, "log_softmax_topk: k=", k, " outside [1, ", vocab, "]");
  auto values = at::empty({rows, k}, logits.options());
  auto ids = at::empty({rows, k}, logits.options().dtype(at::kLong));
  if (rows == 0) return {values, ids};
  auto banned_dev = banned.to(logits.device());
  if (banned_dev.numel()) {
    TORCH_CHECK(banned_dev.min().item<int64_t>() >= 0 && banned_dev.max().item<int64_t>() < vocab,
                "log_softmax_topk: banned token id outside the vocabulary");
  }
  TORCH_CHECK(logits.device().is_cpu(), "log_softmax_topk: CPU tensors only (a GPU runs kernels/topk.py)");
  float* x = logits.data_ptr<float>();
  const int64_t* ban = banned_dev.data_ptr<int64_t>();
  const int64_t num_banned = banned_dev.numel();
  float* out_v = values.data_ptr<float>();
  int64_t* out_i = ids.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<Candidate> chunks, cands;
    for (int64_t r = begin; r < end; ++r)
      row_topk(x + r * vocab, vocab, k, ban, num_banned, out_v + r * k, out_i + r * k, chunks, cands);
  });
  return {values, ids};
}

}  // namespace pyengine
