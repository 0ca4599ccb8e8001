// Decode-step attention, fused, on the CPU. At a decoder step each (sentence, head) has 1..16 query rows
// (beams fold into the query axis for cross-attention) and a few dozen keys: torch.matmul runs this as
// B·H tiny GEMMs plus a softmax, and its dispatch costs more than the arithmetic. Here one task per
// (sentence, head), scores kept in a small buffer. The same loop serves the encoder's self-attention on short
// sources (every token a query row; the CPU flash kernel is slower up to ~128 tokens).
// K/V may be float32 or bfloat16 (half the bytes: these loops are bound by reading K/V); rows are widened
// to float32 as they are read (once per task when several query rows share them), all arithmetic is float32.
#include "decode_attention.h"
#include "cpu_features.h"
#include "parallel.h"
#include "vec_math.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace pyengine {

namespace {

template <typename T>
struct View {  // a (B, H, T, Dh) tensor with a unit stride on Dh
  const T* data;
  int64_t sb, sh, st;
  const T* row(int64_t b, int64_t h, int64_t t) const { return data + b * sb + h * sh + t * st; }
};

// softmax of a row of n > 0 scores, in place.
void softmax_inplace(float* row, int64_t n) {
  const float mx = *std::max_element(row, row + n);
  float sum = 0.f;
  for (int64_t j = 0; j < n; ++j) sum += (row[j] = std::exp(row[j] - mx));
  const float inv = 1.f / sum;
  for (int64_t j = 0; j < n; ++j) row[j] *= inv;
}

// A task: tq query rows against n keys given as row pointers (in place, or through the cache's row indirection).
// Query row i's output goes to out + i·out_stride.
template <typename T>
using TaskFn = void (*)(const float* const*, const T* const*, const T* const*, int64_t, int64_t, float, float*, float*,
                        int64_t);

// A bfloat16 K/V row widened to float32 into `buf` (float32 rows are read in place).
inline const float* widen_portable(const at::BFloat16* row, float* buf, int64_t n) {
  for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(row[i]);
  return buf;
}

float dot_portable(const float* a, const float* b, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

void axpy_portable(float alpha, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

__attribute__((target("avx512f"))) float dot_avx512(const float* a, const float* b, int64_t n) {
  __m512 s0 = _mm512_setzero_ps(), s1 = s0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
  }
  for (; i + 16 <= n; i += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
  float s = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

__attribute__((target("avx512f"))) void axpy_avx512(float alpha, const float* x, float* y, int64_t n) {
  const __m512 a = _mm512_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(a, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += alpha * x[i];
}

// 16 K/V values as float32: bf16 is the high half of a float32, so zero-extend and shift into place.
__attribute__((target("avx512f"))) inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
__attribute__((target("avx512f"))) inline __m512 load16(const at::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

__attribute__((target("avx512f"))) const float* widen_avx512(const at::BFloat16* row, float* buf, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(buf + i, load16(row + i));
  for (; i < n; ++i) buf[i] = static_cast<float>(row[i]);
  return buf;
}

// 16 vectors of partial dot products → one vector of their 16 sums, lane j = sum of acc[j]: a transpose by
// halves (15 adds, 30 shuffles, one permute), where 16 horizontal reductions take ~4 shuffles and 4 adds each.
__attribute__((target("avx512f"))) inline __m512 reduce16(__m512* a) {
  for (int p = 0; p < 8; ++p)  // 128-bit halves: v[p] holds acc[2p] (lanes 0-1) and acc[2p+1] (lanes 2-3)
    a[p] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * p], a[2 * p + 1], 0x44),
                         _mm512_shuffle_f32x4(a[2 * p], a[2 * p + 1], 0xEE));
  for (int p = 0; p < 4; ++p)  // 128-bit lane l of a[p] holds acc[4p + l]
    a[p] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * p], a[2 * p + 1], 0x88),
                         _mm512_shuffle_f32x4(a[2 * p], a[2 * p + 1], 0xDD));
  for (int p = 0; p < 2; ++p)  // lane l of a[p]: pairs of acc[8p + l] and acc[8p + 4 + l]
    a[p] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * p], a[2 * p + 1], 0x44), _mm512_shuffle_ps(a[2 * p], a[2 * p + 1], 0xEE));
  // element 4l + e holds acc[l + 4e]; permute into order
  const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(a[0], a[1], 0x88), _mm512_shuffle_ps(a[0], a[1], 0xDD));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, r);
}

inline __mmask16 first(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

// softmax of a row of n > 0 scores in place, 16 lanes (exp of x − max ≤ 0 by vec_math's polynomial).
__attribute__((target("avx512f"))) void softmax_avx512(float* row, int64_t n) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < n; j += 16)
    mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), first(n - j), row + j));
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = first(n - j);
    const __m512 e = _mm512_maskz_mov_ps(k, exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, row + j), m)));
    _mm512_mask_storeu_ps(row + j, k, e);
    sum = _mm512_add_ps(sum, e);
  }
  const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = first(n - j);
    _mm512_mask_storeu_ps(row + j, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, row + j), inv));
  }
}

// The dot products of a query row (NV vectors in registers) with keys k[0..m), m ≤ 16: lane j holds key j's (0 past m).
template <typename T, int NV>
__attribute__((target("avx512f"))) inline __m512 scores16(const __m512* qr, const T* const* k, int64_t m) {
  __m512 acc[16];
  for (int jj = 0; jj < 16; ++jj) {
    if (jj >= m) {
      acc[jj] = _mm512_setzero_ps();
      continue;
    }
    __m512 a = _mm512_mul_ps(qr[0], load16(k[jj]));
    for (int u = 1; u < NV; ++u) a = _mm512_fmadd_ps(qr[u], load16(k[jj] + 16 * u), a);
    acc[jj] = a;
  }
  return reduce16(acc);
}

// The dot products of R = 2 or 4 query rows with keys k[0..m), m ≤ 16, each key row loaded (and widened) once for
// all R rows: s[r] lane j holds row r's with key j (0 past m). A reduce16 takes the 16 / R keys of a group for every
// row (slot r·16/R + key), and the groups' results are transposed by 128-bit blocks into rows. Each (row, key) sum is
// the vector scores16 builds, reduced by the same reduce16 tree: the same results, to the bit.
template <typename T, int NV, int R>
__attribute__((target("avx512f"))) inline void scores16_rows(const float* const* q, const T* const* k, int64_t m,
                                                            __m512* s) {
  static_assert(R == 2 || R == 4);
  constexpr int per = 16 / R;  // keys per group
  __m512 g[R];
#pragma GCC unroll 4
  for (int grp = 0; grp < R; ++grp) {
    __m512 acc[16];
#pragma GCC unroll 8
    for (int kk = 0; kk < per; ++kk) {
      const int64_t j = grp * per + kk;
      if (j >= m) {
        for (int r = 0; r < R; ++r) acc[r * per + kk] = _mm512_setzero_ps();
        continue;
      }
      __m512 kv[NV];
#pragma GCC unroll 8
      for (int u = 0; u < NV; ++u) kv[u] = load16(k[j] + 16 * u);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        __m512 a = _mm512_mul_ps(_mm512_loadu_ps(q[r]), kv[0]);
#pragma GCC unroll 8
        for (int u = 1; u < NV; ++u) a = _mm512_fmadd_ps(_mm512_loadu_ps(q[r] + 16 * u), kv[u], a);
        acc[r * per + kk] = a;
      }
    }
    g[grp] = reduce16(acc);  // lane r·per + kk: row r, key grp·per + kk
  }
  if constexpr (R == 2) {  // row r: the r-th 256-bit half of each group
    s[0] = _mm512_shuffle_f32x4(g[0], g[1], 0x44);
    s[1] = _mm512_shuffle_f32x4(g[0], g[1], 0xEE);
  } else {  // row r: the r-th 128-bit block of each group (a 4 × 4 transpose of blocks)
    const __m512 t0 = _mm512_shuffle_f32x4(g[0], g[1], 0x44), t1 = _mm512_shuffle_f32x4(g[0], g[1], 0xEE);
    const __m512 t2 = _mm512_shuffle_f32x4(g[2], g[3], 0x44), t3 = _mm512_shuffle_f32x4(g[2], g[3], 0xEE);
    s[0] = _mm512_shuffle_f32x4(t0, t2, 0x88);
    s[1] = _mm512_shuffle_f32x4(t0, t2, 0xDD);
    s[2] = _mm512_shuffle_f32x4(t1, t3, 0x88);
    s[3] = _mm512_shuffle_f32x4(t1, t3, 0xDD);
  }
}

// scores16 of R query rows with keys k[0..m), m ≤ 16: bfloat16 keys by scores16_rows (each key row widened once for
// the R rows); float32 keys row by row, each query in registers (a float32 key row reloaded from L1 costs less than
// the groups' transposes). The same results either way, to the bit.
template <typename T, int NV, int R>
__attribute__((target("avx512f"))) inline void scores_of_rows(const float* const* q, const T* const* k, int64_t m,
                                                             __m512* s) {
  if constexpr (R == 1 || std::is_same_v<T, float>) {
    for (int r = 0; r < R; ++r) {
      __m512 qr[NV];
      for (int u = 0; u < NV; ++u) qr[u] = _mm512_loadu_ps(q[r] + 16 * u);
      s[r] = scores16<T, NV>(qr, k, m);
    }
  } else {
    scores16_rows<T, NV, R>(q, k, m, s);
  }
}

// R query rows of a task over n ≤ 64 keys, together: each row's scores stay in registers (four vectors of 16 keys),
// the rows' softmaxes run stage by stage side by side (one row's max → exp → sum → 1/sum is a chain of dependent
// instructions; R independent chains fill the pipeline where one row at a time waited on each), and each value row
// is loaded once for all R rows. The operations of each row are softmax_avx512's and the loop's below, in their
// order: the same results, to the bit.
constexpr int kChunks = 4;                    // vectors of 16 scores a row holds in registers
constexpr int64_t kTogetherKeys = 16 * kChunks;  // rows_together's keys at most

template <typename T, int NV, int R>
__attribute__((target("avx512f"))) void rows_together(const float* const* q, const T* const* k, const T* const* v,
                                                     int64_t n, float scale, float* out, int64_t out_stride) {
  const int chunks = static_cast<int>((n + 15) / 16);
  const __m512 sc = _mm512_set1_ps(scale), low = _mm512_set1_ps(-INFINITY);
  __m512 s[R][kChunks];
  for (int c = 0; c < chunks; ++c) {
    __m512 rows[R];
    scores_of_rows<T, NV, R>(q, k + 16 * c, std::min<int64_t>(16, n - 16 * c), rows);
    for (int r = 0; r < R; ++r) s[r][c] = _mm512_mul_ps(rows[r], sc);
  }
  __m512 top[R], sum[R];
  for (int r = 0; r < R; ++r) {
    __m512 mx = low;
    for (int c = 0; c < chunks; ++c) mx = _mm512_max_ps(mx, _mm512_mask_mov_ps(low, first(n - 16 * c), s[r][c]));
    top[r] = mx;
  }
  for (int r = 0; r < R; ++r) top[r] = _mm512_set1_ps(_mm512_reduce_max_ps(top[r]));
  for (int r = 0; r < R; ++r) sum[r] = _mm512_setzero_ps();
  for (int c = 0; c < chunks; ++c)
    for (int r = 0; r < R; ++r) {
      const __mmask16 live = first(n - 16 * c);
      s[r][c] = _mm512_maskz_mov_ps(live, exp_nonpositive(_mm512_sub_ps(_mm512_maskz_mov_ps(live, s[r][c]), top[r])));
      sum[r] = _mm512_add_ps(sum[r], s[r][c]);
    }
  alignas(64) float p[R][16 * kChunks];
  for (int r = 0; r < R; ++r) {
    const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum[r]));
    for (int c = 0; c < chunks; ++c) _mm512_store_ps(p[r] + 16 * c, _mm512_mul_ps(s[r][c], inv));
  }
  __m512 o[R][NV];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < NV; ++u) o[r][u] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const T* vj = v[j];
    for (int u = 0; u < NV; ++u) {
      const __m512 vv = load16(vj + 16 * u);
      for (int r = 0; r < R; ++r) o[r][u] = _mm512_fmadd_ps(_mm512_set1_ps(p[r][j]), vv, o[r][u]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < NV; ++u) _mm512_storeu_ps(out + r * out_stride + 16 * u, o[r][u]);
}

// R query rows of a task over any number of keys: scored 16 keys at a time into `scores` (R rows of n), each row's
// softmax (softmax_avx512), then each value row loaded once for the R rows' outputs, accumulated in registers.
template <typename T, int NV, int R>
__attribute__((target("avx512f"))) void rows_in_memory(const float* const* q, const T* const* k, const T* const* v,
                                                      int64_t n, float scale, float* scores, float* out,
                                                      int64_t out_stride) {
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t m = std::min<int64_t>(16, n - j0);
    __m512 rows[R];
    scores_of_rows<T, NV, R>(q, k + j0, m, rows);
    for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(scores + r * n + j0, first(m), _mm512_mul_ps(rows[r], sc));
  }
  for (int r = 0; r < R; ++r) softmax_avx512(scores + r * n, n);
  // (rows_together's value loop, written out again: one helper serving both, inlined, measured 3-6% slower with
  // the K/V in cache at one query row, the same results)
  __m512 o[R][NV];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < NV; ++u) o[r][u] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const T* vj = v[j];
    for (int u = 0; u < NV; ++u) {
      const __m512 vv = load16(vj + 16 * u);
      for (int r = 0; r < R; ++r) o[r][u] = _mm512_fmadd_ps(_mm512_set1_ps(scores[r * n + j]), vv, o[r][u]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < NV; ++u) _mm512_storeu_ps(out + r * out_stride + 16 * u, o[r][u]);
}

// One (sentence, head) task with Dh = 16·NV: its query rows four at a time (two of 128 wide: their sums fill 16
// registers), the rest one at a time, each group's scores in registers up to 64 keys (rows_together), in `scores`
// past them (rows_in_memory); each key and value row read once for the group (the generic path below loads and
// stores an output row for every key).
template <typename T, int NV>
__attribute__((target("avx512f"))) void task_registers(const float* const* q, const T* const* k, const T* const* v,
                                                      int64_t n, int64_t tq, float scale, float* scores, float* out,
                                                      int64_t out_stride) {
  constexpr int R = NV <= 4 ? 4 : 2;
  int64_t i = 0;
  if (n <= kTogetherKeys) {
    for (; i + R <= tq; i += R) rows_together<T, NV, R>(q + i, k, v, n, scale, out + i * out_stride, out_stride);
    for (; i < tq; ++i) rows_together<T, NV, 1>(q + i, k, v, n, scale, out + i * out_stride, out_stride);
    return;
  }
  for (; i + R <= tq; i += R) rows_in_memory<T, NV, R>(q + i, k, v, n, scale, scores, out + i * out_stride, out_stride);
  for (; i < tq; ++i) rows_in_memory<T, NV, 1>(q + i, k, v, n, scale, scores, out + i * out_stride, out_stride);
}

template <typename T>
TaskFn<T> register_task(int64_t head_dim) {
  if (!avx512_available()) return nullptr;
  switch (head_dim) {
    case 32: return task_registers<T, 2>;
    case 64: return task_registers<T, 4>;
    case 128: return task_registers<T, 8>;
    default: return nullptr;
  }
}
#else
template <typename T>
TaskFn<T> register_task(int64_t) { return nullptr; }
#endif

using DotFn = float (*)(const float*, const float*, int64_t);
using AxpyFn = void (*)(float, const float*, float*, int64_t);
using WidenFn = const float* (*)(const at::BFloat16*, float*, int64_t);

struct Kernels {
  DotFn dot;
  AxpyFn axpy;
  WidenFn widen_bf16;
};

Kernels pick_kernels() {
#if defined(__x86_64__) && defined(__GNUC__)
  if (avx512_available()) return {dot_avx512, axpy_avx512, widen_avx512};
#endif
  return {dot_portable, axpy_portable, widen_portable};
}

inline const float* load(const float* row, float*, int64_t, const Kernels&) { return row; }
inline const float* load(const at::BFloat16* row, float* buf, int64_t n, const Kernels& kern) {
  return kern.widen_bf16(row, buf, n);
}

// The step attention waits on its K/V rows, not on arithmetic (~0.5 instructions a cycle): a decoder step reads them
// through the cache's row table, a few KB a task at its (row, head) place, from DRAM once the step's weights have
// streamed through the caches, and the hardware prefetcher does not run ahead across tasks. So each task requests
// rows of the tasks after it: into L1 (locality 3) this task's V and the next task's K (benchmarks.ab_builds on an AMX
// Xeon, int8 batch 32: decoder seconds -6% at beam 4, -9% greedy; bf16 beam 4 -2%), and into L2 (locality 2) the K
// and V of the task kL2Ahead on, as one task's rows take about a task's time to arrive (AMD EPYC, benchmarks.ab_builds
// with both builds timing each phase: int8 greedy batch 32, self-attention 1.58x, cross-attention 1.07x, the call
// 1.03x; beam 4: 1.22x, 1.05x, 1.016x).
template <int Locality = 3, typename T>
inline void prefetch_row(const T* row, int64_t n) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < n * static_cast<int64_t>(sizeof(T)); off += 64) __builtin_prefetch(p + off, 0, Locality);
}

template <typename T>
inline void prefetch_rows(const std::vector<const T*>& rows, int64_t n) {
  for (const T* row : rows) prefetch_row(row, n);
}

constexpr int64_t kL2Ahead = 4;  // 2, 4, 6 and 8 alike in the engine

template <typename T>
View<T> view_of(const at::Tensor& t) { return {t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)}; }

// Multiply-adds (keys × heads × query rows × head size) under which a step's attention runs on the calling thread:
// a parallel region costs ~1.5-2 µs here, about what 64k multiply-adds of scattered rows take on one core.
constexpr int64_t kAloneWork = int64_t{1} << 16;

struct OutView {  // the (B, H, Tq, Dh) output, unit stride on Dh
  float* data;
  int64_t sb, sh, st;
};

// Contiguous ranges of the B·H (sentence, head) tasks, one per part, of about equal work (keys × query rows, plus a
// little per task) rather than equal counts: the rows of a continuous batch sit at different positions, the oldest
// cohorts first, and equal counts gave one thread the long rows (decoder steps ~20% slower per row than offline).
std::vector<int64_t> balanced_ranges(const std::vector<int64_t>& lengths, int64_t H, int64_t Tq, int64_t parts) {
  const int64_t tasks = static_cast<int64_t>(lengths.size()) * H;
  auto cost = [&](int64_t task) { return static_cast<double>(lengths[task / H] * Tq + 16); };
  double total = 0;
  for (int64_t task = 0; task < tasks; ++task) total += cost(task);
  std::vector<int64_t> bounds(parts + 1, tasks);
  bounds[0] = 0;
  double done = 0;
  int64_t p = 1;
  for (int64_t task = 0; task < tasks && p < parts; ++task) {
    done += cost(task);
    while (p < parts && done >= total * static_cast<double>(p) / static_cast<double>(parts)) bounds[p++] = task + 1;
  }
  return bounds;
}

// rows (B, Tk) or nullptr: key j of sentence b is read from batch row rows[b·Tk + j] of k and v (a beam-search
// cache whose rows are never moved, FasterTransformer's cache indirection), else from row b.
template <typename T>
void attend(const View<float>& qv, const View<T>& kv, const View<T>& vv, const std::vector<int64_t>& lengths,
            const int64_t* rows, int64_t B, int64_t H, int64_t Tq, int64_t Tk, int64_t Dh, float scale,
            const OutView& o) {
  const Kernels kern = pick_kernels();
  const TaskFn<T> fast = register_task<T>(Dh);
  // a few parts a thread, so a thread done early can take some of another's (parallel.h); one part, run by the
  // calling thread, when the whole attention is smaller than a parallel region costs (a sentence's step at batch 1)
  int64_t keys = 0;
  for (const int64_t n : lengths) keys += std::min(n, Tk);
  const bool alone = keys * H * Tq * Dh < kAloneWork;
  const int64_t parts = alone ? 1 : std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads() * 4, B * H));
  const std::vector<int64_t> bounds = balanced_ranges(lengths, H, Tq, parts);
  const auto source = [&](int64_t b, int64_t j) { return rows ? rows[b * Tk + j] : b; };  // the batch row of key j
  parallel_claims(parts, [&](Claims& mine) {
    std::vector<float> scores, row_buf(Dh);
    std::vector<const float*> q_rows(Tq);
    std::vector<const T*> k_rows, v_rows;
    for (int64_t part; mine.next(part);) {
      for (int64_t task = bounds[part]; task < bounds[part + 1]; ++task) {
        const int64_t b = task / H, h = task % H, n = lengths[b];
        float* ob = o.data + b * o.sb + h * o.sh;
        if (n == 0 || fast == nullptr) {  // no keys: zeros (never in decoding: a source has at least EOS); the
          for (int64_t i = 0; i < Tq; ++i) std::fill_n(ob + i * o.st, Dh, 0.f);  // generic loop accumulates
          if (n == 0) continue;
        }
        scores.resize(Tq * n);
        k_rows.resize(n), v_rows.resize(n);
        for (int64_t j = 0; j < n; ++j) {
          k_rows[j] = kv.row(source(b, j), h, j), v_rows[j] = vv.row(source(b, j), h, j);
        }
        for (int64_t i = 0; i < Tq; ++i) q_rows[i] = qv.row(b, h, i);
        if (rows != nullptr) {  // a decoder step's K/V, through the row table: this task's V, the next task's K,
          prefetch_rows(v_rows, Dh);  // then the K and V kL2Ahead tasks on (from a part's first task: all up to it)
          const int64_t end = bounds[part + 1];
          if (task + 1 < end) {
            const int64_t nb = (task + 1) / H, nh = (task + 1) % H;
            for (int64_t j = 0; j < lengths[nb]; ++j) prefetch_row(kv.row(source(nb, j), nh, j), Dh);
          }
          for (int64_t d = task == bounds[part] ? 2 : kL2Ahead; d <= kL2Ahead && task + d < end; ++d) {
            const int64_t ab = (task + d) / H, ah = (task + d) % H;
            for (int64_t j = 0; j < lengths[ab]; ++j) {
              prefetch_row<2>(kv.row(source(ab, j), ah, j), Dh);
              prefetch_row<2>(vv.row(source(ab, j), ah, j), Dh);
            }
          }
        }
        if (fast != nullptr) {
          fast(q_rows.data(), k_rows.data(), v_rows.data(), n, Tq, scale, scores.data(), ob, o.st);
          continue;
        }
        for (int64_t j = 0; j < n; ++j) {  // one pass over the keys serves every query row
          const float* kj = load(k_rows[j], row_buf.data(), Dh, kern);
          for (int64_t i = 0; i < Tq; ++i) scores[i * n + j] = kern.dot(q_rows[i], kj, Dh) * scale;
        }
        for (int64_t i = 0; i < Tq; ++i) softmax_inplace(scores.data() + i * n, n);
        for (int64_t j = 0; j < n; ++j) {
          const float* vj = load(v_rows[j], row_buf.data(), Dh, kern);
          for (int64_t i = 0; i < Tq; ++i) kern.axpy(scores[i * n + j], vj, ob + i * o.st, Dh);
        }
      }
    }
  });
}

// attend on q (B, H, Tq, Dh) and k/v views of Tk keys, into out: what both entry points below share.
template <typename T>
void attend_into(const at::Tensor& q, const View<T>& k, const View<T>& v, int64_t Tk,
                 const std::vector<int64_t>& lengths, double scale, const int64_t* rows, const at::Tensor& out) {
  const OutView o{out.data_ptr<float>(), out.stride(0), out.stride(1), out.stride(2)};
  attend(view_of<float>(q), k, v, lengths, rows, q.size(0), q.size(1), q.size(2), Tk, q.size(3),
         static_cast<float>(scale), o);
}

}  // namespace

void decode_attention_into(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const std::vector<int64_t>& lengths, double scale, const int64_t* rows, const at::Tensor& out) {
  if (k.scalar_type() == at::kFloat) {
    attend_into(q, view_of<float>(k), view_of<float>(v), k.size(2), lengths, scale, rows, out);
  } else {
    attend_into(q, view_of<at::BFloat16>(k), view_of<at::BFloat16>(v), k.size(2), lengths, scale, rows, out);
  }
}

void decode_attention_layer(const at::Tensor& q, const at::Tensor& kv, int64_t layer, int64_t Tk,
                            const std::vector<int64_t>& lengths, double scale, const int64_t* rows,
                            const at::Tensor& out) {
  const int64_t at = layer * kv.stride(0), sb = kv.stride(2), sh = kv.stride(3), st = kv.stride(4);
  const auto run = [&](auto* base) {  // keys at [layer, 0], values at [layer, 1]: (P, H, T_max, Dh) each
    using T = std::remove_pointer_t<decltype(base)>;
    attend_into(q, View<T>{base + at, sb, sh, st}, View<T>{base + at + kv.stride(1), sb, sh, st}, Tk, lengths, scale,
                rows, out);
  };
  if (kv.scalar_type() == at::kFloat) run(kv.data_ptr<float>());
  else run(kv.data_ptr<at::BFloat16>());
}

std::vector<int64_t> key_lengths(const c10::optional<at::Tensor>& kv_lengths, int64_t B, int64_t Tk) {
  std::vector<int64_t> lengths(B, Tk);
  if (kv_lengths.has_value()) {
    const at::Tensor len = kv_lengths->to(at::kLong).contiguous();
    TORCH_CHECK(len.numel() == B, "decode_attention: kv_lengths must have one entry per sentence");
    for (int64_t b = 0; b < B; ++b) lengths[b] = std::clamp<int64_t>(len.data_ptr<int64_t>()[b], 0, Tk);
  }
  return lengths;
}

void check_rows(const at::Tensor& rows, int64_t B, int64_t Tk, int64_t kv_rows) {
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.is_contiguous() && rows.dim() == 2 && rows.size(0) == B &&
                  rows.size(1) == Tk,
              "decode_attention: rows must be a contiguous int64 (", B, ", ", Tk, ") tensor");
  const int64_t* r = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows.numel(); ++i)
    TORCH_CHECK(r[i] >= 0 && r[i] < kv_rows, "decode_attention: rows index past k's ", kv_rows, " rows");
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& kv_lengths, double scale,
                            const c10::optional<at::Tensor>& rows) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "decode_attention: CPU tensors");
  TORCH_CHECK(q.scalar_type() == at::kFloat, "decode_attention: float32 q");
  TORCH_CHECK(k.scalar_type() == v.scalar_type() && (k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16),
              "decode_attention: k and v both float32 or both bfloat16");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "decode_attention: (B, H, T, Dh) tensors");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: unit stride on Dh");
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), Dh = q.size(3), Tk = k.size(2);
  TORCH_CHECK(k.size(1) == H && k.size(3) == Dh && v.sizes() == k.sizes() && (rows || k.size(0) == B),
              "decode_attention: k and v must be (B, H, Tk, Dh) like q (any number of rows with `rows`)");
  at::Tensor row_index;
  if (rows) {
    row_index = rows->to(at::kLong).contiguous();
    check_rows(row_index, B, Tk, k.size(0));
  }
  const std::vector<int64_t> lengths = key_lengths(kv_lengths, B, Tk);
  at::Tensor out = at::empty({B, H, Tq, Dh}, q.options());  // every row written (zeros where no keys)
  decode_attention_into(q, k, v, lengths, scale, rows ? row_index.data_ptr<int64_t>() : nullptr, out);
  return out;
}

}  // namespace pyengine
