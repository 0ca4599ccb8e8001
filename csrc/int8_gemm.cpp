// int8 linear layer for few rows (decoder steps) on AVX512-VNNI: y = act(x·Wᵀ·scales + b).
//
// The library GEMMs (FBGEMM, oneDNN) reach ~45-65% of this CPU's int8 rate at 32 rows on the decoder's
// 512-wide layers: their blocking is made for large matrices. A decoder step multiplies ≤ a few hundred
// rows by a weight read once per step, so here the weight streams once and each 64-byte weight load
// feeds up to 6 rows × VPDPBUSD from registers: a (6 rows × 64 columns) int32 tile stays in 24 zmm
// registers over the whole K.
//
// Quantization: weights symmetric per output row (pyengine.quant, as CTranslate2); activations asymmetric per
// input row, uint8 over [min(x, 0), max(x, 0)] (VPDPBUSD multiplies uint8 by int8): xq = round(x/s) + zp,
// s = range/255. The zero point is taken back with the weight's column sums, Σ(xq−zp)·w = Σ xq·w − zp·Σ w.
// (Symmetric activations, CTranslate2's choice, leave half the levels unused after ReLU/swish: measured to
// flip more translations of the test models than the libraries' per-tensor asymmetric rule.)
#include "int8_gemm.h"
#include "cpu_features.h"
#include "gemm_shared.h"
#include "vec_math.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

namespace pyengine {

namespace {

constexpr int64_t kCols = 64;     // columns per packed tile: four 16-lane int32 vectors
constexpr int kMaxRows = 6;       // rows per register tile (6 × 4 accumulators + 4 weights + 1 broadcast)
constexpr int kAmxRows = 16;      // rows per AMX tile

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// What a tile writes: y[m, n] = (acc − zp[m]·colsum[n]) · sx[m] · sw[n] + b[n] for its rows and `width` columns.
struct Epilogue {
  float* y;             // row m0, column n0
  int64_t ldy;          // y's row stride
  const float* sx;      // row scales from m0
  const int32_t* zp;    // row zero points from m0
  const int32_t* sums;  // column sums from n0
  const float* sw;      // column scales from n0
  const float* b;       // bias from n0, or nullptr
  int64_t width;        // columns to write (≤ 64)
  Activation act;       // applied last
};

inline float activate_portable(float v, Activation act) {
  if (act == Activation::kRelu) return std::max(v, 0.f);
  if (act == Activation::kSwish) return v / (1.f + std::exp(-v));
  return v;
}

// Scalar twin of the VNNI tile, for CPUs without AVX512-VNNI (and the reference the tests hold it to).
void tile_portable(const uint8_t* xq, int64_t Kp, int rows, const int8_t* w, const Epilogue& e, const int8_t*) {
  const int64_t K4 = Kp / 4;
  int32_t acc[kMaxRows * kCols] = {};
  for (int64_t k4 = 0; k4 < K4; ++k4) {
    const int8_t* wk = w + k4 * kCols * 4;
    for (int r = 0; r < rows; ++r) {
      const uint8_t* a = xq + r * Kp + k4 * 4;
      int32_t* out = acc + r * kCols;
      for (int64_t c = 0; c < kCols; ++c)
        for (int b = 0; b < 4; ++b) out[c] += int32_t(a[b]) * int32_t(wk[c * 4 + b]);
    }
  }
  for (int r = 0; r < rows; ++r)
    for (int64_t c = 0; c < e.width; ++c) {
      const float v = static_cast<float>(acc[r * kCols + c] - e.zp[r] * e.sums[c]) * (e.sx[r] * e.sw[c]);
      e.y[r * e.ldy + c] = activate_portable(e.b ? v + e.b[c] : v, e.act);
    }
}

void quantize_row_portable(const float* row, int64_t K, float inv, float zp, uint8_t* out) {
  for (int64_t k = 0; k < K; ++k) {
    const float q = std::nearbyint(row[k] * inv) + zp;  // default rounding mode: half to even
    out[k] = static_cast<uint8_t>(std::min(255.f, std::max(0.f, q)));
  }
}

void min_max_portable(const float* row, int64_t K, float* lo, float* hi) {
  float a = 0.f, b = 0.f;  // the range holds 0: zero quantizes exactly (padding, ReLU zeros)
  for (int64_t k = 0; k < K; ++k) a = std::min(a, row[k]), b = std::max(b, row[k]);
  *lo = a, *hi = b;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define PYENGINE_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))

PYENGINE_VNNI void min_max_vnni(const float* row, int64_t K, float* lo, float* hi) {
  __m512 a = _mm512_setzero_ps(), b = a;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m512 v = _mm512_loadu_ps(row + k);
    a = _mm512_min_ps(a, v), b = _mm512_max_ps(b, v);
  }
  float tail_lo, tail_hi;
  min_max_portable(row + k, K - k, &tail_lo, &tail_hi);
  *lo = std::min(_mm512_reduce_min_ps(a), tail_lo), *hi = std::max(_mm512_reduce_max_ps(b), tail_hi);
}

PYENGINE_VNNI void quantize_row_vnni(const float* row, int64_t K, float inv, float zp, uint8_t* out) {
  const __m512 s = _mm512_set1_ps(inv), z = _mm512_set1_ps(zp);
  const __m512 lo = _mm512_setzero_ps(), hi = _mm512_set1_ps(255.f);
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    // roundscale: half to even, as nearbyint; + zp, clamp, then exact float → int32 → uint8
    const __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_loadu_ps(row + k), s), _MM_FROUND_TO_NEAREST_INT);
    const __m512 q = _mm512_min_ps(hi, _mm512_max_ps(lo, _mm512_add_ps(r, z)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(q)));
  }
  quantize_row_portable(row + k, K - k, inv, zp, out + k);
}

// 16 of a tile's columns (group j) and what the epilogue needs of them; store() writes row r's 16 results from
// its int32 dot products. Shared by the VNNI register tile and the AMX tile, so both round alike, to the bit.
struct ColumnGroup {
  __mmask16 mask;
  __m512i sums;
  __m512 sw, b;
  int64_t col;

  PYENGINE_VNNI ColumnGroup(const Epilogue& e, int j) : col(16 * j) {
    const int64_t left = e.width - col;
    mask = left <= 0 ? __mmask16(0) : left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
    sums = _mm512_loadu_si512(e.sums + col);
    sw = _mm512_maskz_loadu_ps(mask, e.sw + col);
    b = e.b ? _mm512_maskz_loadu_ps(mask, e.b + col) : _mm512_setzero_ps();
  }

  PYENGINE_VNNI void store(const Epilogue& e, int r, __m512i acc) const {
    const __m512i comp = _mm512_mullo_epi32(_mm512_set1_epi32(e.zp[r]), sums);
    const __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc, comp));
    const __m512 scale = _mm512_mul_ps(_mm512_set1_ps(e.sx[r]), sw);  // sx·sw first, as the scalar twin
    __m512 y = _mm512_add_ps(_mm512_mul_ps(v, scale), b);
    if (e.act == Activation::kRelu) y = _mm512_max_ps(y, _mm512_setzero_ps());
    if (e.act == Activation::kSwish) y = silu(y);
    _mm512_mask_storeu_ps(e.y + r * e.ldy + col, mask, y);
  }
};

// rows × 64 columns of int32 dot products over Kp (a multiple of 4), accumulators in registers, then the
// epilogue from registers. next, when not nullptr: a tile of the same size to prefetch into L2 meanwhile (as
// fast as this tile is read), so that the next tile's first row block does not wait on memory.
template <int R, bool Prefetch>
PYENGINE_VNNI void tile_vnni(const uint8_t* xq, int64_t Kp, const int8_t* w, const Epilogue& e, const int8_t* next) {
  __m512i c[R][4];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) c[r][j] = _mm512_setzero_si512();
  const int64_t K4 = Kp / 4;
  for (int64_t k4 = 0; k4 < K4; ++k4) {
    const int8_t* wk = w + k4 * kCols * 4;
    const __m512i w0 = _mm512_loadu_si512(wk), w1 = _mm512_loadu_si512(wk + 64);
    const __m512i w2 = _mm512_loadu_si512(wk + 128), w3 = _mm512_loadu_si512(wk + 192);
    if (Prefetch) {
      for (int line = 0; line < 4; ++line)
        _mm_prefetch(reinterpret_cast<const char*>(next + k4 * kCols * 4 + 64 * line), _MM_HINT_T1);
    }
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      int32_t four;
      std::memcpy(&four, xq + r * Kp + k4 * 4, 4);
      const __m512i a = _mm512_set1_epi32(four);
      c[r][0] = _mm512_dpbusd_epi32(c[r][0], a, w0);
      c[r][1] = _mm512_dpbusd_epi32(c[r][1], a, w1);
      c[r][2] = _mm512_dpbusd_epi32(c[r][2], a, w2);
      c[r][3] = _mm512_dpbusd_epi32(c[r][3], a, w3);
    }
  }
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {  // a constant trip count: the accumulators stay registers (no break)
    const ColumnGroup g(e, j);
    if (!g.mask) continue;
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) g.store(e, r, c[r][j]);
  }
}

template <bool Prefetch>
PYENGINE_VNNI void tile_vnni_rows(const uint8_t* xq, int64_t Kp, int rows, const int8_t* w, const Epilogue& e,
                                  const int8_t* next) {
  switch (rows) {
    case 1: return tile_vnni<1, Prefetch>(xq, Kp, w, e, next);
    case 2: return tile_vnni<2, Prefetch>(xq, Kp, w, e, next);
    case 3: return tile_vnni<3, Prefetch>(xq, Kp, w, e, next);
    case 4: return tile_vnni<4, Prefetch>(xq, Kp, w, e, next);
    case 5: return tile_vnni<5, Prefetch>(xq, Kp, w, e, next);
    default: return tile_vnni<6, Prefetch>(xq, Kp, w, e, next);
  }
}

PYENGINE_VNNI void tile_vnni_any(const uint8_t* xq, int64_t Kp, int rows, const int8_t* w, const Epilogue& e,
                                 const int8_t* next) {
  if (next != nullptr) return tile_vnni_rows<true>(xq, Kp, rows, w, e, next);
  tile_vnni_rows<false>(xq, Kp, rows, w, e, nullptr);
}

// -- AMX (Sapphire Rapids and later) ---------------------------------------------------------------------------
//
// TDPBUSD multiplies a 16 × 64 uint8 tile by a 16 × 64 int8 tile (16 k4-rows × 16 columns × 4 k) into 16 × 16
// int32: 16 rows × 16 columns × 64 k in one instruction, ~8x the VPDPBUSD rate per core. The packed weight
// is already in its layout: a B tile of 16 columns is read with a row stride of 256 bytes (one k4-row of the
// 64-column pack). A row block is 16 rows (the activations are padded to whole blocks with zero rows); the 64
// columns of a pack are four C tiles (tmm0-3), the activations tmm4, the weights alternate in tmm5/tmm6.
// Integer sums are exact, so the results equal the VNNI tile's to the bit (same epilogue).
#define PYENGINE_AMX __attribute__((target("avx512f,avx512bw,avx512vnni,amx-tile,amx-int8")))
// (the tile configuration, per thread: gemm::amx_begin / amx_end, gemm_shared.h)

// A 16-row block's 64 columns: the int32 sums into acc (the epilogue is run_tiles_amx's, overlapped with the next
// block's multiply: between k-steps, drain(s, steps) finishes a share of the previous block's rows).
template <typename Drain>
PYENGINE_AMX void multiply_amx(const uint8_t* xq, int64_t Kp, const int8_t* w, const int8_t* next, int32_t* acc,
                               Drain& drain) {
  constexpr int64_t stride = kCols * 4;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const int64_t steps = Kp / 64;
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t k = s * 64;
    const int8_t* wk = w + (k / 4) * stride;
    // the next k-step's 16 activation rows into L1: a tile load that misses waits on its 16 lines one by one (the
    // block's rows are 512+ bytes apart, which the hardware prefetcher does not follow); the fused output layer at
    // 128 rows x 58101 ran ~9-10 -> ~6 ms with it, A/B on an AMX Xeon
    if (k + 64 < Kp)
      for (int r = 0; r < kAmxRows; ++r) _mm_prefetch(reinterpret_cast<const char*>(xq + r * Kp + k + 64), _MM_HINT_T0);
    _tile_loadd(4, xq + k, Kp);
    _tile_loadd(5, wk, stride);
    _tile_dpbusd(0, 4, 5);
    _tile_loadd(6, wk + 64, stride);
    _tile_dpbusd(1, 4, 6);
    _tile_loadd(5, wk + 128, stride);
    _tile_dpbusd(2, 4, 5);
    _tile_loadd(6, wk + 192, stride);
    _tile_dpbusd(3, 4, 6);
    if (next != nullptr) {  // the next pack's same 4 KB into L2 while these tiles compute
      const char* ahead = reinterpret_cast<const char*>(next + (k / 4) * stride);
      for (int line = 0; line < 64; ++line) _mm_prefetch(ahead + 64 * line, _MM_HINT_T1);
    }
    drain(s + 1, steps);
  }
  _tile_stored(0, acc, stride);
  _tile_stored(1, acc + 16, stride);
  _tile_stored(2, acc + 32, stride);
  _tile_stored(3, acc + 48, stride);
}

// The epilogue of rows [r0, r1) of a block from its int32 sums (the VNNI tile's, so both round alike).
PYENGINE_AMX void epilogue_rows(const int32_t* acc, const Epilogue& e, int r0, int r1) {
  for (int j = 0; j < 4; ++j) {
    const ColumnGroup g(e, j);
    if (!g.mask) break;
    for (int r = r0; r < r1; ++r) g.store(e, r, _mm512_load_si512(acc + r * kCols + 16 * j));
  }
}
#else
template <typename Drain>
void multiply_amx(const uint8_t*, int64_t, const int8_t*, const int8_t*, int32_t*, Drain&) {
  TORCH_CHECK(false, "AMX needs an x86-64 build");
}
void epilogue_rows(const int32_t*, const Epilogue&, int, int) {}
#endif

struct Kernels {
  // a row block's tile: rows ≤ `rows`, 64 columns, epilogue included; nullptr for AMX (run_tiles_amx)
  void (*tile)(const uint8_t*, int64_t, int, const int8_t*, const Epilogue&, const int8_t* next);
  void (*min_max)(const float*, int64_t, float*, float*);
  void (*quantize_row)(const float*, int64_t, float, float, uint8_t*);
  int rows;              // rows per tile call (the row block)
  const char* name;
};

// kernel: "auto" (AMX where the CPU has it and the shape suits it, else VNNI where the CPU has it, else the
// portable loop), "amx" (AMX where the shape suits it, else VNNI), "vnni" or "portable". The shape suits AMX when
// K is a multiple of 64 and there are more rows than one VNNI tile holds: a 16-row AMX block at 1-6 rows is
// slower (1 row: 11 vs 6 µs at 512×1536, 671 vs 553 µs on a 58101-wide output layer; equal at 6, AMX ahead from
// 8). An unavailable request is an error, never a silent change of kernel. Every pick gives the same result.
Kernels pick_kernels(const char* who, const std::string& kernel, int64_t M, int64_t Kp) {
  TORCH_CHECK(kernel == "auto" || kernel == "amx" || kernel == "vnni" || kernel == "portable", who,
              ": kernel must be auto, amx, vnni or portable, not ", kernel);
  TORCH_CHECK(kernel != "amx" || amx_available(), who, ": the amx kernel needs a CPU (and OS) with AMX-INT8");
  TORCH_CHECK(kernel != "vnni" || vnni_available(), who, ": the vnni kernel needs a CPU with AVX512-VNNI");
#if defined(__x86_64__) && defined(__GNUC__)
  const bool amx = kernel == "amx" || (kernel == "auto" && amx_available());
  if (amx && Kp % 64 == 0 && M > kMaxRows)
    return {nullptr, min_max_vnni, quantize_row_vnni, kAmxRows, "amx"};
  if (kernel != "portable" && vnni_available())
    return {tile_vnni_any, min_max_vnni, quantize_row_vnni, kMaxRows, "vnni"};
#endif
  return {tile_portable, min_max_portable, quantize_row_portable, kMaxRows, "portable"};
}

// Per-row asymmetric quantization of x (M, K) to uint8, rows padded to Kp with 0 (the padded weights are 0).
// Threads from 8192 values (16 rows of 512): a decoder step's 32 rows were quantized by one thread while the
// other waited (A/B, a step at 32 rows: 2% faster with the layer norm's like change).
void quantize_rows_u8(const Kernels& kern, const float* x, int64_t M, int64_t K, int64_t Kp, uint8_t* xq,
                      float* row_scale, int32_t* zero_point) {
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(K, 1));
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      float lo, hi;
      kern.min_max(x + m * K, K, &lo, &hi);
      // the same float32 operations as the reference: inv = 255 / (hi − lo), zp = round(−lo · inv),
      // q = round(x · inv) + zp, rounding half to even
      const float inv = hi > lo ? 255.f / (hi - lo) : 0.f;
      const float zp = std::nearbyint(-lo * inv);
      row_scale[m] = (hi - lo) / 255.f;
      zero_point[m] = static_cast<int32_t>(zp);
      kern.quantize_row(x + m * K, K, inv, zp, xq + m * Kp);
      std::memset(xq + m * Kp + K, 0, Kp - K);
    }
  });
}

}  // namespace

std::string int8_kernel_name(const std::string& kernel, int64_t rows, int64_t k) {
  return pick_kernels("int8_kernel_name", kernel, rows, round_up(k, 4)).name;
}

std::vector<at::Tensor> int8_pack(const at::Tensor& q) {
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == at::kChar && q.dim() == 2,
              "int8_pack: an int8 (N, K) CPU tensor");
  const auto qc = q.contiguous();
  const int64_t N = qc.size(0), K = qc.size(1);
  const int64_t Np = round_up(N, kCols), Kp = round_up(K, 4), K4 = Kp / 4;
  // packed[tile][k4][column (64)][4 consecutive k]: one 64-byte load = 16 columns × 4 k of a tile
  auto packed = at::zeros({Np / kCols, K4 * kCols * 4}, qc.options());
  auto colsum = at::zeros({Np}, qc.options().dtype(at::kInt));
  const int8_t* src = qc.data_ptr<int8_t>();
  int8_t* dst = packed.data_ptr<int8_t>();
  int32_t* sums = colsum.data_ptr<int32_t>();
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      int8_t* tile = dst + (n / kCols) * K4 * kCols * 4 + (n % kCols) * 4;
      int32_t s = 0;
      for (int64_t k = 0; k < K; ++k) {
        tile[(k / 4) * kCols * 4 + (k % 4)] = src[n * K + k];
        s += src[n * K + k];
      }
      sums[n] = s;
    }
  });
  return {packed, colsum};
}

namespace {

// int8_linear's operands, checked, with x quantized.
struct Operands {
  int64_t M, K, Kp, n_out, tiles, tile_bytes;
  Kernels kern;
  const uint8_t* xqp;
  const float* sx;
  const int32_t* zp;
  const int8_t* wp;
  const int32_t* sums;
  const float* sw;
  const float* b;
  Activation act;
};

Operands prepare(const char* who, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& colsum,
                 const at::Tensor& scale, const c10::optional<at::Tensor>& bias, int64_t n_out,
                 const std::string& kernel, const std::string& activation) {
  const Activation act = gemm::activation_named(who, activation);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              who, ": x must be a contiguous float32 (M, K) CPU tensor");
  const int64_t M = x.size(0), K = x.size(1), Kp = round_up(K, 4);
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.dim() == 2 && packed.is_contiguous() &&
                  packed.size(1) == Kp * kCols && packed.size(0) * kCols >= n_out && n_out > 0,
              who, ": packed weight does not match K=", K, " and N=", n_out, " (use int8_pack)");
  TORCH_CHECK(K <= 65536, who, ": K up to 65536 (int32 accumulation of 255·127·K)");
  TORCH_CHECK(colsum.scalar_type() == at::kInt && colsum.numel() == packed.size(0) * kCols,
              who, ": colsum does not match the packed weight");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == n_out && scale.is_contiguous(),
              who, ": scale must be float32 (N,)");
  if (bias) TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == n_out && bias->is_contiguous(),
                        who, ": bias must be float32 (N,)");
  Operands op{M, K, Kp, n_out, (n_out + kCols - 1) / kCols, Kp * kCols, pick_kernels(who, kernel, M, Kp)};
  const int64_t Mp = gemm::rows_allocated(M, op.kern.tile == nullptr);
  const int64_t xq_bytes = round_up(Mp * Kp, 64), scale_bytes = round_up(M * 4, 64);
  uint8_t* xq = gemm::thread_scratch(xq_bytes + 2 * scale_bytes);  // rows, then scales, then zero points
  std::memset(xq + M * Kp, 0, (Mp - M) * Kp);
  float* sx = reinterpret_cast<float*>(xq + xq_bytes);
  int32_t* zp = reinterpret_cast<int32_t*>(xq + xq_bytes + scale_bytes);
  quantize_rows_u8(op.kern, x.data_ptr<float>(), M, K, Kp, xq, sx, zp);
  op.xqp = xq;
  op.sx = sx;
  op.zp = zp;
  op.wp = packed.data_ptr<int8_t>();
  op.sums = colsum.data_ptr<int32_t>();
  op.sw = scale.data_ptr<float>();
  op.b = bias ? bias->data_ptr<float>() : nullptr;
  op.act = act;
  return op;
}

template <typename Out, typename After>
void run_tiles_amx(const Operands& op, Claims& tiles, Out out, After after);

// One thread's tiles (Claims, parallel.h), each for every row block: the block's result goes to out(m0, n0) (a pointer
// and its row stride), then after(m0, 0, rows, n0, width) sees it (gemm_shared.h).
template <typename Out, typename After>
void run_tiles(const Operands& op, Claims& tiles, Out out, After after) {
  if (op.kern.tile == nullptr) return run_tiles_amx(op, tiles, out, after);  // AMX
  const int block = op.kern.rows;
  for (int64_t t; tiles.next(t);) {
    const int64_t n0 = t * kCols, width = std::min(kCols, op.n_out - n0);
    for (int64_t m0 = 0; m0 < op.M; m0 += block) {
      const int rows = static_cast<int>(std::min<int64_t>(block, op.M - m0));
      const auto [y, ldy] = out(m0, n0);
      const Epilogue e{y, ldy, op.sx + m0, op.zp + m0, op.sums + n0, op.sw + n0, op.b ? op.b + n0 : nullptr, width,
                       op.act};
      // the second row block fetches the thread's next tile (its first row block then finds it in L2)
      const int64_t next = m0 == block ? tiles.upcoming() : -1;
      op.kern.tile(op.xqp + m0 * op.Kp, op.Kp, rows, op.wp + t * op.tile_bytes, e,
                   next >= 0 ? op.wp + next * op.tile_bytes : nullptr);
      after(m0, 0, rows, n0, width);
    }
  }
}

// run_tiles on AMX: each block's epilogue (and `after`) overlapped with the next block's multiply
// (gemm::overlapped_blocks; A/B, alternated processes on an AMX Xeon: int8 batch 32 beam 4 0.341 -> 0.305 s, median
// of six rounds' best; the fused output layer at 32 rows 2.2 -> 1.9 ms).
template <typename Out, typename After>
void run_tiles_amx(const Operands& op, Claims& tiles, Out out, After after) {
  static_assert(kAmxRows == gemm::kBlockRows);
  const auto multiply = [&](int64_t t, int64_t m0, int64_t next, int32_t* acc, auto& drain) {
    const int8_t* w = op.wp + t * op.tile_bytes;
    multiply_amx(op.xqp + m0 * op.Kp, op.Kp, w, next >= 0 ? op.wp + next * op.tile_bytes : nullptr, acc, drain);
  };
  const auto epilogue = [&](const int32_t* acc, int64_t m0, int64_t n0, int64_t width, float* y, int64_t ldy, int r0,
                            int r1) {
    const float* b = op.b ? op.b + n0 : nullptr;
    epilogue_rows(acc, Epilogue{y, ldy, op.sx + m0, op.zp + m0, op.sums + n0, op.sw + n0, b, width, op.act}, r0, r1);
  };
  gemm::amx_begin(op.M);
  gemm::overlapped_blocks<int32_t>(tiles, op.M, op.n_out, multiply, epilogue, out, after);
  gemm::amx_end();
}

}  // namespace

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& colsum,
                       const at::Tensor& scale, const c10::optional<at::Tensor>& bias, int64_t n_out,
                       const c10::optional<at::Tensor>& out, const std::string& kernel,
                       const std::string& activation) {
  const Operands op = prepare("int8_linear", x, packed, colsum, scale, bias, n_out, kernel, activation);
  return gemm::linear_into("int8_linear", x, op.M, n_out, op.tiles, out, [&](Claims& tiles, float* yp) {
    run_tiles(
        op, tiles, [&](int64_t m0, int64_t n0) { return std::pair<float*, int64_t>{yp + m0 * n_out + n0, n_out}; },
        [](int64_t, int, int, int64_t, int64_t) {});
  });
}

// -- the output layer with log-softmax and top-k fused (gemm_shared.h) --------------------------------------------

std::tuple<at::Tensor, at::Tensor> int8_linear_log_softmax_topk(const at::Tensor& x, const at::Tensor& packed,
                                                                const at::Tensor& colsum, const at::Tensor& scale,
                                                                const c10::optional<at::Tensor>& bias, int64_t n_out,
                                                                int64_t k, const at::Tensor& banned,
                                                                const std::string& kernel) {
  constexpr const char* who = "int8_linear_log_softmax_topk";
  const Operands op = prepare(who, x, packed, colsum, scale, bias, n_out, kernel, "none");
  static_assert(kCols == gemm::kCols && kAmxRows <= gemm::kBlockRows && kMaxRows <= gemm::kBlockRows);
  return gemm::linear_log_softmax_topk(
      who, x, op.M, n_out, op.tiles, k, banned, std::string(op.kern.name) != "portable",
      [&](Claims& tiles, float* block, auto after) {
        run_tiles(op, tiles, [&](int64_t, int64_t) { return std::pair<float*, int64_t>{block, kCols}; }, after);
      });
}

}  // namespace pyengine
