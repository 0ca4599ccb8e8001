// bfloat16-weight linear layer with float32 activations: y = act(x·Wᵀ + b), float32 to within float32's rounding.
//
// A bf16 GEMM rounds both operands to bf16. For a model whose weights are bf16 (the shipped default model), the
// weight rounding is free, and it is the activations' rounding (8 significant bits) that changes translations:
// measured on the default model, bf16 activations into float32 GEMMs change ~4% of UI strings and ~5% of verses,
// and bf16 logits ~5x more. Here x is carried as two bf16 terms, hi = bf16(x) and lo = bf16(x − hi) (16 bits),
// each term's products with a bf16 weight are exact in float32, and the sums are float32: on the default model
// this gave the float32 path's tokens on every one of 600 held-out sentences. It costs two bf16 products per
// weight, which AMX-BF16 (TDPBF16PS: 16 × 16 × 32 per instruction) still runs several times faster than float32
// FMAs, while the weight, the memory a decoder step streams, is half float32's.
//
// The AVX512-BF16, AVX-512 and portable kernels add the same products in one order, per output element: for each
// 32-wide chunk of k, the hi term's 32 products, then the lo term's, a k pair at a time, the odd k's product first
// (exact) added to the float32 sum with rounding to nearest even, then the even k's — the order in which
// VDPBF16PS adds a pair (Intel's pseudo-code; measured on AMD Zen 4: equal to the bit on 3.2 M random pairs) — so
// they equal each other to the bit (but for swish's exp, and for a float32 subnormal product or sum, which
// VDPBF16PS flushes to zero: activations never come near 1e-38). The AMX unit sums more precisely than its
// pseudo-code (measured: 4x closer to float64), so its results differ from theirs within float32 rounding; where the CPU has AMX it
// runs at every row count (a 16-row block costs about what the register tile does at 1 row), so a sentence's
// result does not depend on its batch. bf16 subnormals (which AMX reads as zero) are flushed to zero when the
// weights are packed and the activations split.
#include "bf16_gemm.h"
#include "cpu_features.h"
#include "float_tile.h"
#include "gemm_shared.h"
#include "vec_math.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace pyengine {

namespace {

constexpr int64_t kCols = 64;    // columns per packed tile
constexpr int64_t kChunk = 32;   // k per AMX A tile row (64 bytes of bf16); K is padded to a multiple of it
constexpr int kMaxRows = 6;      // rows per AVX-512 register tile (6 × 4 accumulators)
constexpr int kAmxRows = 16;     // rows per AMX tile

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// bf16 bits of v, rounded to nearest even (c10's rule), subnormals flushed to zero (AMX reads them as zero).
uint16_t to_bf16(float v) {
  if (std::fabs(v) < std::numeric_limits<float>::min()) return 0;
  const uint16_t b = c10::BFloat16(v).x;
  return (b & 0x7F80) == 0 && (b & 0x7F) != 0 ? 0 : b;  // rounded down to a subnormal
}

float from_bf16(uint16_t b) {
  const uint32_t bits = uint32_t(b) << 16;
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}

// x's two bf16 terms for the rows a kernel reads: bf16 bits (AMX) or their float32 values (the others),
// (Mp, Kp) each, zero past K and past M; in memory the caller owns (a GEMM's: gemm::thread_scratch).
struct Split {
  int64_t Kp;
  bool bits;
  const uint16_t* hi16 = nullptr;
  const uint16_t* lo16 = nullptr;
  const float* hi32 = nullptr;
  const float* lo32 = nullptr;
};

void split_row_portable(const float* x, int64_t K, int64_t Kp, uint16_t* hi, uint16_t* lo) {
  for (int64_t k = 0; k < K; ++k) {
    hi[k] = to_bf16(x[k]);
    lo[k] = to_bf16(x[k] - from_bf16(hi[k]));
  }
  std::fill(hi + K, hi + Kp, 0), std::fill(lo + K, lo + Kp, 0);
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

// to_bf16 of 16 floats: c10's rounding (bf16_bits), and |v| < FLT_MIN to +0 (a normal v never rounds to a
// subnormal, so that is every flush to_bf16 makes).
__attribute__((target("avx512f"))) inline __m512i to_bf16_avx512(__m512 v) {
  const __m512 magnitude = _mm512_abs_ps(v);
  return _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(magnitude, _mm512_set1_ps(std::numeric_limits<float>::min()),
                                                    _CMP_NLT_UQ), bf16_bits(v));
}

// split_row_portable, 16 lanes at a time (to the bit: bf16_split's test holds both to PyTorch's rounding). As a
// scalar loop it was 15% of a bf16 batch-32 beam-4 call.
__attribute__((target("avx512f"))) void split_row_avx512(const float* x, int64_t K, int64_t Kp, uint16_t* hi,
                                                         uint16_t* lo) {
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m512 v = _mm512_loadu_ps(x + k);
    const __m512i h = to_bf16_avx512(v);
    const __m512 rest = _mm512_sub_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(h, 16)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi + k), _mm512_cvtepi32_epi16(h));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo + k), _mm512_cvtepi32_epi16(to_bf16_avx512(rest)));
  }
  split_row_portable(x + k, K - k, Kp - k, hi + k, lo + k);
}
#endif

using SplitRowFn = void (*)(const float*, int64_t, int64_t, uint16_t*, uint16_t*);

// x's rows split by `split_row` into hi and lo ((Mp, Kp) each, bf16 bits or float32 by `bits`); rows past M (read
// only by a partial AMX block, whose extra sums are never stored) are zeroed, the rest written whole.
Split split_rows(const float* x, int64_t M, int64_t Mp, int64_t K, int64_t Kp, bool bits, SplitRowFn split_row,
                 void* hi, void* lo) {
  Split s{Kp, bits};
  const int64_t item = bits ? 2 : 4;
  std::memset(static_cast<char*>(hi) + M * Kp * item, 0, (Mp - M) * Kp * item);
  std::memset(static_cast<char*>(lo) + M * Kp * item, 0, (Mp - M) * Kp * item);
  uint16_t* hi16 = bits ? static_cast<uint16_t*>(hi) : nullptr;
  uint16_t* lo16 = bits ? static_cast<uint16_t*>(lo) : nullptr;
  float* hi32 = bits ? nullptr : static_cast<float*>(hi);
  float* lo32 = bits ? nullptr : static_cast<float*>(lo);
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(K, 1));
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> h(bits ? 0 : Kp), l(bits ? 0 : Kp);
    for (int64_t m = begin; m < end; ++m) {
      uint16_t* hr = bits ? hi16 + m * Kp : h.data();
      uint16_t* lr = bits ? lo16 + m * Kp : l.data();
      split_row(x + m * K, K, Kp, hr, lr);
      if (!bits)
        for (int64_t k = 0; k < Kp; ++k) hi32[m * Kp + k] = from_bf16(hr[k]), lo32[m * Kp + k] = from_bf16(lr[k]);
    }
  });
  s.hi16 = hi16, s.lo16 = lo16, s.hi32 = hi32, s.lo32 = lo32;
  return s;
}

using float_tile::Epilogue;
using float_tile::activate;

// Scalar twin (any CPU; the reference the tests hold the others to).
void tile_portable(const Split& a, int64_t m0, int rows, const uint16_t* w, const Epilogue& e, const uint16_t*) {
  const int64_t Kp = a.Kp;
  float acc[kAmxRows * kCols] = {};
  for (int64_t c = 0; c < Kp; c += kChunk)
    for (const float* term : {a.hi32, a.lo32})
      for (int r = 0; r < rows; ++r) {
        const float* t = term + (m0 + r) * Kp;
        float* out = acc + r * kCols;
        for (int64_t k = c; k < c + kChunk; k += 2) {  // a k pair: the odd k first, as VDPBF16PS
          const uint16_t* wk = w + (k / 2) * kCols * 2;
          for (int64_t n = 0; n < kCols; ++n) {
            out[n] = out[n] + t[k + 1] * from_bf16(wk[2 * n + 1]);
            out[n] = out[n] + t[k] * from_bf16(wk[2 * n]);
          }
        }
      }
  for (int r = 0; r < rows; ++r)
    for (int64_t n = 0; n < e.width; ++n) {
      const float v = acc[r * kCols + n];
      e.y[r * e.ldy + n] = activate(e.b ? v + e.b[n] : v, e.act);
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
using float_tile::store_group;
using float_tile::store_tile;
using float_tile::zero_tile;

// The register tiles (R rows × 64 columns in R × 4 accumulators, float_tile.h) take a 32-wide chunk of k at a time;
// the FMA tile first requests the next tile's same 4 KB into L2.
PYENGINE_AVX512 void prefetch_chunk(const uint16_t* next, int64_t ch) {
  if (next == nullptr) return;
  const char* ahead = reinterpret_cast<const char*>(next + ch * kCols);
  for (int line = 0; line < 64; ++line) _mm_prefetch(ahead + 64 * line, _MM_HINT_T1);
}

// A weight vector (16 columns × a k pair) gives its even and odd k as float32 (bf16 bits shifted up, exact), each
// multiplied by a broadcast activation term in one FMA (the product is exact, so the FMA rounds as an add of it):
// the odd k first, as VDPBF16PS (CPUs without AVX512-BF16).
template <int R>
struct FmaTile {
  PYENGINE_AVX512 static void run(const Split& a, int64_t m0, const uint16_t* w, const Epilogue& e,
                                  const uint16_t* next) {
    const int64_t Kp = a.Kp;
    __m512 c[R][4];
    zero_tile<R>(c);
    const __m512i high = _mm512_set1_epi32(int(0xFFFF0000u));
    for (int64_t ch = 0; ch < Kp; ch += kChunk) {
      prefetch_chunk(next, ch);
      for (const float* term : {a.hi32, a.lo32}) {
        const float* t = term + m0 * Kp;
        for (int64_t k = ch; k < ch + kChunk; k += 2) {
          const uint16_t* wk = w + (k / 2) * kCols * 2;
#pragma GCC unroll 4
          for (int j = 0; j < 4; ++j) {
            const __m512i v = _mm512_loadu_si512(wk + 32 * j);
            const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
            const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(v, high));
#pragma GCC unroll 6
            for (int r = 0; r < R; ++r) {
              c[r][j] = _mm512_fmadd_ps(_mm512_set1_ps(t[r * Kp + k + 1]), odd, c[r][j]);
              c[r][j] = _mm512_fmadd_ps(_mm512_set1_ps(t[r * Kp + k]), even, c[r][j]);
            }
          }
        }
      }
    }
    store_tile<R>(e, c);
  }
};

// On AVX512-BF16 (AMD Zen 4, Intel Cooper Lake and later) one VDPBF16PS adds a k pair's two exact products (odd,
// then even) per accumulator, where the FMA tile takes two FMAs and two shifts of the weight: half the instructions
// per product (measured: batch 32 decoding 1.7x faster on Zen 4). The terms are read as bf16 bits, a k pair
// broadcast as one 32-bit word.
// No software prefetch of the next tile: on Zen 4 the hardware prefetchers stream the weights better alone — with the
// weights on 2 MiB pages (pages.py) a batch-1 call 1.22x faster than with the FMA tile's burst of 64 prefetches a
// k-chunk, which there made huge pages 0.86x of 4 KiB ones; as fast on 4 KiB pages (docs/performance.md).
#define PYENGINE_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))

template <int R>
struct DotTile {
  PYENGINE_AVX512_BF16 static void run(const Split& a, int64_t m0, const uint16_t* w, const Epilogue& e,
                                       const uint16_t*) {
    const int64_t Kp = a.Kp;
    __m512 c[R][4];
    zero_tile<R>(c);
    for (int64_t ch = 0; ch < Kp; ch += kChunk) {
      for (const uint16_t* term : {a.hi16, a.lo16}) {
        const uint16_t* t = term + m0 * Kp;
        for (int64_t k = ch; k < ch + kChunk; k += 2) {
          const uint16_t* wk = w + (k / 2) * kCols * 2;
          __m512i pair[R];
#pragma GCC unroll 6
          for (int r = 0; r < R; ++r) {
            int32_t bits;
            std::memcpy(&bits, t + r * Kp + k, 4);  // (k, k + 1): the even k in the low half, as the weight's
            pair[r] = _mm512_set1_epi32(bits);
          }
#pragma GCC unroll 4
          for (int j = 0; j < 4; ++j) {
            const __m512bh v = (__m512bh)_mm512_loadu_si512(wk + 32 * j);
#pragma GCC unroll 6
            for (int r = 0; r < R; ++r) c[r][j] = _mm512_dpbf16_ps(c[r][j], (__m512bh)pair[r], v);
          }
        }
      }
    }
    store_tile<R>(e, c);
  }
};

// A register tile for 1..kMaxRows rows: its R-row instantiation.
template <template <int> class Tile>
void tile_rows(const Split& a, int64_t m0, int rows, const uint16_t* w, const Epilogue& e, const uint16_t* next) {
  switch (rows) {
    case 1: return Tile<1>::run(a, m0, w, e, next);
    case 2: return Tile<2>::run(a, m0, w, e, next);
    case 3: return Tile<3>::run(a, m0, w, e, next);
    case 4: return Tile<4>::run(a, m0, w, e, next);
    case 5: return Tile<5>::run(a, m0, w, e, next);
    default: return Tile<6>::run(a, m0, w, e, next);
  }
}

// -- AMX-BF16 ---------------------------------------------------------------------------------------------------
//
// TDPBF16PS: C (16 × 16 float32) += A (16 rows × 32 bf16) · B (16 k-pair rows × 16 columns × 2 bf16). The packed
// weight is B's layout: a 16-column B tile is read at a 256-byte row stride (one k pair of the 64-column tile).
// Four C tiles (tmm0-3) hold a tile's 64 columns for a 16-row block; the hi and lo terms are tmm4 and tmm7, the
// weights alternate in tmm5/tmm6, and each B tile meets hi then lo.
#define PYENGINE_AMX_BF16 __attribute__((target("avx512f,avx512bw,amx-tile,amx-bf16")))
// (the tile configuration, per thread: gemm::amx_begin / amx_end, gemm_shared.h)

// A 16-row block's 64 columns: the float32 sums into acc (the epilogue is run_tiles_amx's, overlapped with the next
// block's multiply: between k-chunks, drain(c, chunks) finishes a share of the previous block's rows).
template <typename Drain>
PYENGINE_AMX_BF16 void multiply_amx(const Split& a, int64_t m0, const uint16_t* w, const uint16_t* next, float* acc,
                                    Drain& drain) {
  const int64_t Kp = a.Kp, lda = Kp * 2, chunks = Kp / kChunk;
  constexpr int64_t stride = kCols * 2 * 2;  // bytes from one k pair of the tile to the next
  const uint16_t* hi = a.hi16 + m0 * Kp;
  const uint16_t* lo = a.lo16 + m0 * Kp;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t k = c * kChunk;
    const uint16_t* wk = w + k * kCols;  // k/2 pairs × 64 columns × 2
    _tile_loadd(4, hi + k, lda);
    _tile_loadd(7, lo + k, lda);
    _tile_loadd(5, wk, stride);
    _tile_dpbf16ps(0, 4, 5);
    _tile_dpbf16ps(0, 7, 5);
    _tile_loadd(6, wk + 32, stride);
    _tile_dpbf16ps(1, 4, 6);
    _tile_dpbf16ps(1, 7, 6);
    _tile_loadd(5, wk + 64, stride);
    _tile_dpbf16ps(2, 4, 5);
    _tile_dpbf16ps(2, 7, 5);
    _tile_loadd(6, wk + 96, stride);
    _tile_dpbf16ps(3, 4, 6);
    _tile_dpbf16ps(3, 7, 6);
    if (next != nullptr) {  // the next tile's same 4 KB into L2 while these compute
      const char* ahead = reinterpret_cast<const char*>(next + k * kCols);
      for (int line = 0; line < 64; ++line) _mm_prefetch(ahead + 64 * line, _MM_HINT_T1);
    }
    drain(c + 1, chunks);
  }
  _tile_stored(0, acc, kCols * 4);
  _tile_stored(1, acc + 16, kCols * 4);
  _tile_stored(2, acc + 32, kCols * 4);
  _tile_stored(3, acc + 48, kCols * 4);
}

// The epilogue of rows [r0, r1) of a block from its sums (the other kernels' store_group).
PYENGINE_AMX_BF16 void epilogue_rows(const float* acc, const Epilogue& e, int r0, int r1) {
  for (int j = 0; j < 4; ++j)
    for (int r = r0; r < r1; ++r) store_group(e, r, j, _mm512_load_ps(acc + r * kCols + 16 * j));
}
#else
template <typename Drain>
void multiply_amx(const Split&, int64_t, const uint16_t*, const uint16_t*, float*, Drain&) {
  TORCH_CHECK(false, "AMX needs an x86-64 build");
}
void epilogue_rows(const float*, const Epilogue&, int, int) {}
#endif

struct Kernel {
  // a row block's tile: rows ≤ `rows`, 64 columns, epilogue included; nullptr for AMX (run_tiles_amx)
  void (*tile)(const Split&, int64_t m0, int rows, const uint16_t* w, const Epilogue&, const uint16_t* next);
  int rows;         // rows per tile call
  bool bits;        // reads the terms as bf16 bits (else as float32)
  SplitRowFn split_row;  // the activations' split into their terms (the same bits from each)
  const char* name;
};

// AMX at every row count where the CPU has it: measured, a 16-row AMX block costs about what the AVX-512 register
// tile takes for 1 row (512×1536: 36 vs 30 µs; 58101-wide output layer: 1.30 vs 1.44 ms) and less from 2 rows,
// and a sentence's result does not then depend on how many rows its batch has. An unavailable request is an
// error, never a silent change of kernel.
Kernel pick_kernel(const char* who, const std::string& kernel) {
  TORCH_CHECK(kernel == "auto" || kernel == "amx" || kernel == "avx512bf16" || kernel == "avx512" ||
                  kernel == "portable",
              who, ": kernel must be auto, amx, avx512bf16, avx512 or portable, not ", kernel);
  TORCH_CHECK(kernel != "amx" || amx_bf16_available(), who, ": the amx kernel needs a CPU (and OS) with AMX-BF16");
  TORCH_CHECK(kernel != "avx512" || avx512_available(), who, ": the avx512 kernel needs a CPU with AVX-512");
  TORCH_CHECK(kernel != "avx512bf16" || avx512_bf16_available(), who,
              ": the avx512bf16 kernel needs a CPU with AVX512-BF16");
#if defined(__x86_64__) && defined(__GNUC__)
  const bool amx = kernel == "amx" || (kernel == "auto" && amx_bf16_available());
  if (amx) return {nullptr, kAmxRows, true, split_row_avx512, "amx"};
  if (kernel == "avx512bf16" || (kernel == "auto" && avx512_bf16_available()))
    return {tile_rows<DotTile>, kMaxRows, true, split_row_avx512, "avx512bf16"};
  if (kernel != "portable" && avx512_available())
    return {tile_rows<FmaTile>, kMaxRows, false, split_row_avx512, "avx512"};
#endif
  return {tile_portable, kAmxRows, false, split_row_portable, "portable"};
}

}  // namespace

std::string bf16_kernel_name(const std::string& kernel) {
  return pick_kernel("bf16_kernel_name", kernel).name;
}

at::Tensor bf16_pack(const at::Tensor& w) {
  TORCH_CHECK(w.device().is_cpu() && (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16) &&
                  w.dim() == 2 && w.size(0) > 0 && w.size(1) > 0,
              "bf16_pack: a float32 or bfloat16 (N, K) CPU tensor");
  const auto wf = w.to(at::kFloat).contiguous();
  const int64_t N = wf.size(0), K = wf.size(1), Np = round_up(N, kCols), Kp = round_up(K, kChunk);
  // packed[tile][k pair][column (64)][2 consecutive k]: one 64-byte load = 16 columns × a k pair
  auto packed = at::zeros({Np / kCols, Kp * kCols}, wf.options().dtype(at::kBFloat16));
  const float* src = wf.data_ptr<float>();
  uint16_t* dst = reinterpret_cast<uint16_t*>(packed.data_ptr());
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      uint16_t* tile = dst + (n / kCols) * Kp * kCols + (n % kCols) * 2;
      for (int64_t k = 0; k < K; ++k) tile[(k / 2) * kCols * 2 + (k % 2)] = to_bf16(src[n * K + k]);
    }
  });
  return packed;
}

namespace {

// bf16_linear's operands, checked, with x split into its terms.
struct Operands {
  int64_t M, K, Kp, n_out, tiles, tile_elems;
  Kernel kern;
  Split a;
  const uint16_t* w;
  const float* b;
  Activation act;
};

Operands prepare(const char* who, const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                 int64_t n_out, const std::string& kernel, const std::string& activation) {
  const Activation act = gemm::activation_named(who, activation);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              who, ": x must be a contiguous float32 (M, K) CPU tensor");
  const int64_t M = x.size(0), K = x.size(1), Kp = round_up(K, kChunk);
  TORCH_CHECK(packed.scalar_type() == at::kBFloat16 && packed.dim() == 2 && packed.is_contiguous() &&
                  packed.size(1) == Kp * kCols && packed.size(0) * kCols >= n_out && n_out > 0,
              who, ": packed weight does not match K=", K, " and N=", n_out, " (use bf16_pack)");
  if (bias) TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == n_out && bias->is_contiguous(),
                        who, ": bias must be float32 (N,)");
  const Kernel kern = pick_kernel(who, kernel);
  const int64_t Mp = gemm::rows_allocated(M, kern.tile == nullptr);
  const int64_t term_bytes = round_up(Mp * Kp * (kern.bits ? 2 : 4), 64);
  uint8_t* terms = gemm::thread_scratch(2 * term_bytes);
  return {M, K, Kp, n_out, (n_out + kCols - 1) / kCols, Kp * kCols, kern,
          split_rows(x.data_ptr<float>(), M, Mp, K, Kp, kern.bits, kern.split_row, terms, terms + term_bytes),
          reinterpret_cast<const uint16_t*>(packed.data_ptr()), bias ? bias->data_ptr<float>() : nullptr, act};
}

template <typename Out, typename After>
void run_tiles_amx(const Operands& op, Claims& tiles, Out out, After after);

// One thread's tiles (Claims, parallel.h), each for every row block: the block's result goes to out(m0, n0) (a pointer
// and its row stride), then after(m0, 0, rows, n0, width) sees it (gemm_shared.h).
template <typename Out, typename After>
void run_tiles(const Operands& op, Claims& tiles, Out out, After after) {
  if (op.kern.tile == nullptr) return run_tiles_amx(op, tiles, out, after);  // AMX
  for (int64_t t; tiles.next(t);) {
    const int64_t n0 = t * kCols, width = std::min(kCols, op.n_out - n0);
    for (int64_t m0 = 0; m0 < op.M; m0 += op.kern.rows) {
      const int rows = static_cast<int>(std::min<int64_t>(op.kern.rows, op.M - m0));
      const auto [y, ldy] = out(m0, n0);
      const Epilogue e{y, ldy, op.b ? op.b + n0 : nullptr, width, op.act};
      const int64_t next = m0 == 0 ? tiles.upcoming() : -1;  // the next tile into L2 while the first block computes
      op.kern.tile(op.a, m0, rows, op.w + t * op.tile_elems, e, next >= 0 ? op.w + next * op.tile_elems : nullptr);
      after(m0, 0, rows, n0, width);
    }
  }
}

// run_tiles on AMX: each block's epilogue (and `after`) overlapped with the next block's multiply
// (gemm::overlapped_blocks).
template <typename Out, typename After>
void run_tiles_amx(const Operands& op, Claims& tiles, Out out, After after) {
  static_assert(kAmxRows == gemm::kBlockRows);
  gemm::amx_begin(op.M);
  gemm::overlapped_blocks<float>(
      tiles, op.M, op.n_out,
      [&](int64_t t, int64_t m0, int64_t next, float* acc, auto& drain) {
        const uint16_t* w = op.w + t * op.tile_elems;
        multiply_amx(op.a, m0, w, next >= 0 ? op.w + next * op.tile_elems : nullptr, acc, drain);
      },
      [&](const float* acc, int64_t, int64_t n0, int64_t width, float* y, int64_t ldy, int r0, int r1) {
        epilogue_rows(acc, Epilogue{y, ldy, op.b ? op.b + n0 : nullptr, width, op.act}, r0, r1);
      },
      out, after);
  gemm::amx_end();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> bf16_split(const at::Tensor& x, const std::string& kernel) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "bf16_split: x must be a contiguous float32 (M, K) CPU tensor");
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor hi = at::empty({M, K}, x.options().dtype(at::kBFloat16)), lo = at::empty_like(hi);
  split_rows(x.data_ptr<float>(), M, M, K, K, true, pick_kernel("bf16_split", kernel).split_row, hi.data_ptr(),
             lo.data_ptr());
  return {hi, lo};
}

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                       int64_t n_out, const c10::optional<at::Tensor>& out, const std::string& kernel,
                       const std::string& activation) {
  const Operands op = prepare("bf16_linear", x, packed, bias, n_out, kernel, activation);
  return gemm::linear_into("bf16_linear", x, op.M, n_out, op.tiles, out, [&](Claims& tiles, float* yp) {
    run_tiles(
        op, tiles, [&](int64_t m0, int64_t n0) { return std::pair<float*, int64_t>{yp + m0 * n_out + n0, n_out}; },
        [](int64_t, int, int, int64_t, int64_t) {});
  });
}

std::tuple<at::Tensor, at::Tensor> bf16_linear_log_softmax_topk(const at::Tensor& x, const at::Tensor& packed,
                                                                const c10::optional<at::Tensor>& bias, int64_t n_out,
                                                                int64_t k, const at::Tensor& banned,
                                                                const std::string& kernel) {
  constexpr const char* who = "bf16_linear_log_softmax_topk";
  const Operands op = prepare(who, x, packed, bias, n_out, kernel, "none");
  static_assert(kCols == gemm::kCols && kAmxRows <= gemm::kBlockRows);
  return gemm::linear_log_softmax_topk(
      who, x, op.M, n_out, op.tiles, k, banned, std::string(op.kern.name) != "portable",
      [&](Claims& tiles, float* block, auto after) {
        run_tiles(op, tiles, [&](int64_t, int64_t) { return std::pair<float*, int64_t>{block, kCols}; }, after);
      });
}

}  // namespace pyengine
