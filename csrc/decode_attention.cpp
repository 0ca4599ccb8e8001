// Decode-step attention, fused, on the CPU. At a decoder step each (sentence, head) has 1..16 query rows
// (beams fold into the query axis for cross-attention) and a few dozen keys: torch.matmul runs this as
// B·H tiny GEMMs plus a softmax, and its dispatch costs more than the arithmetic. Here one task per
// (sentence, head): each key row is loaded once for all query rows, scores kept in a small buffer.
// K/V may be float32 or bfloat16 (half the bytes: these loops are bound by reading K/V); rows are widened
// to float32 as they are read, all arithmetic is float32.
#include "decode_attention.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
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
template <typename T>
using TaskFn = void (*)(const float* const*, const T* const*, const T* const*, int64_t, int64_t, float, float*, float*);

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

// One (sentence, head) task with Dh = 16·NV held in registers: a query row's NV vectors stay in registers
// over its keys, and an output row is accumulated in registers over the keys and stored once (the
// generic path below loads and stores the output row for every key).

template <typename T, int NV>
__attribute__((target("avx512f"))) void task_registers(const float* const* q, const T* const* k, const T* const* v,
                                                      int64_t n, int64_t tq, float scale, float* scores, float* out) {
  for (int64_t i = 0; i < tq; ++i) {
    __m512 qr[NV];
    for (int u = 0; u < NV; ++u) qr[u] = _mm512_loadu_ps(q[i] + 16 * u);
    float* row = scores + i * n;
    for (int64_t j = 0; j < n; ++j) {
      const T* kj = k[j];
      __m512 acc = _mm512_mul_ps(qr[0], load16(kj));
      for (int u = 1; u < NV; ++u) acc = _mm512_fmadd_ps(qr[u], load16(kj + 16 * u), acc);
      row[j] = _mm512_reduce_add_ps(acc) * scale;
    }
    softmax_inplace(row, n);
    __m512 o[NV];
    for (int u = 0; u < NV; ++u) o[u] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      const T* vj = v[j];
      const __m512 p = _mm512_set1_ps(row[j]);
      for (int u = 0; u < NV; ++u) o[u] = _mm512_fmadd_ps(p, load16(vj + 16 * u), o[u]);
    }
    for (int u = 0; u < NV; ++u) _mm512_storeu_ps(out + i * 16 * NV + 16 * u, o[u]);
  }
}

template <typename T>
TaskFn<T> register_task(int64_t head_dim) {
  if (!__builtin_cpu_supports("avx512f")) return nullptr;
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
  if (__builtin_cpu_supports("avx512f")) return {dot_avx512, axpy_avx512, widen_avx512};
#endif
  return {dot_portable, axpy_portable, widen_portable};
}

inline const float* load(const float* row, float*, int64_t, const Kernels&) { return row; }
inline const float* load(const at::BFloat16* row, float* buf, int64_t n, const Kernels& kern) {
  return kern.widen_bf16(row, buf, n);
}

template <typename T>
View<T> view_of(const at::Tensor& t) { return {t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)}; }

// rows (B, Tk) or nullptr: key j of sentence b is read from batch row rows[b·Tk + j] of k and v (a beam-search
// cache whose rows are never moved, FasterTransformer's cache indirection), else from row b.
template <typename T>
void attend(const View<float>& qv, const View<T>& kv, const View<T>& vv, const std::vector<int64_t>& lengths,
            const int64_t* rows, int64_t B, int64_t H, int64_t Tq, int64_t Tk, int64_t Dh, float scale, float* o) {
  const Kernels kern = pick_kernels();
  const TaskFn<T> fast = register_task<T>(Dh);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, row_buf(Dh);
    std::vector<const float*> q_rows(Tq);
    std::vector<const T*> k_rows, v_rows;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, h = task % H, n = lengths[b];
      if (n == 0) continue;  // no keys: zeros (never happens in decoding: a source has at least EOS)
      scores.resize(Tq * n);
      k_rows.resize(n), v_rows.resize(n);
      for (int64_t j = 0; j < n; ++j) {
        const int64_t src = rows ? rows[b * Tk + j] : b;
        k_rows[j] = kv.row(src, h, j), v_rows[j] = vv.row(src, h, j);
      }
      for (int64_t i = 0; i < Tq; ++i) q_rows[i] = qv.row(b, h, i);
      float* ob = o + (b * H + h) * Tq * Dh;
      if (fast != nullptr) {
        fast(q_rows.data(), k_rows.data(), v_rows.data(), n, Tq, scale, scores.data(), ob);
        continue;
      }
      for (int64_t j = 0; j < n; ++j) {  // one pass over the keys serves every query row
        const float* kj = load(k_rows[j], row_buf.data(), Dh, kern);
        for (int64_t i = 0; i < Tq; ++i) scores[i * n + j] = kern.dot(q_rows[i], kj, Dh) * scale;
      }
      for (int64_t i = 0; i < Tq; ++i) softmax_inplace(scores.data() + i * n, n);
      for (int64_t j = 0; j < n; ++j) {
        const float* vj = load(v_rows[j], row_buf.data(), Dh, kern);
        for (int64_t i = 0; i < Tq; ++i) kern.axpy(scores[i * n + j], vj, ob + i * Dh, Dh);
      }
    }
  });
}

}  // namespace

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
    TORCH_CHECK(row_index.dim() == 2 && row_index.size(0) == B && row_index.size(1) == Tk,
                "decode_attention: rows must be (B, Tk)");
    const int64_t* r = row_index.data_ptr<int64_t>();
    for (int64_t i = 0; i < row_index.numel(); ++i)
      TORCH_CHECK(r[i] >= 0 && r[i] < k.size(0), "decode_attention: rows index past k's ", k.size(0), " rows");
  }
  const int64_t* row_ptr = rows ? row_index.data_ptr<int64_t>() : nullptr;
  std::vector<int64_t> lengths(B, Tk);
  if (kv_lengths.has_value()) {
    const at::Tensor len = kv_lengths->to(at::kLong).contiguous();
    TORCH_CHECK(len.numel() == B, "decode_attention: kv_lengths must have one entry per sentence");
    for (int64_t b = 0; b < B; ++b) lengths[b] = std::clamp<int64_t>(len.data_ptr<int64_t>()[b], 0, Tk);
  }
  at::Tensor out = at::zeros({B, H, Tq, Dh}, q.options());
  float* o = out.data_ptr<float>();
  const float s = static_cast<float>(scale);
  if (k.scalar_type() == at::kFloat) {
    attend(view_of<float>(q), view_of<float>(k), view_of<float>(v), lengths, row_ptr, B, H, Tq, Tk, Dh, s, o);
  } else {
    attend(view_of<float>(q), view_of<at::BFloat16>(k), view_of<at::BFloat16>(v), lengths, row_ptr, B, H, Tq, Tk,
           Dh, s, o);
  }
  return out;
}

}  // namespace pyengine
