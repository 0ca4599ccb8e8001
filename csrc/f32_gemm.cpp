// float32-weight linear layer with float32 activations: y = act(x·Wᵀ + b), each output one FMA chain over k.
//
// What float32 models ran before, oneDNN's prepacked GEMM (FloatLinear), streams a step's 4-byte weights at one row
// at ~20-30 GB/s on a 2-core Zen 4, where a register tile that reads each 64-column tile once reaches the memory's
// ~50 GB/s; at 32-128 rows the same tile (R rows × 64 columns in 24 accumulators, as the bf16 GEMM's FMA tile) runs
// at oneDNN's rate (docs/performance.md). One kernel at every row count, so a sentence's result does not depend on
// its batch, and the output layer fuses with log-softmax + top-k as the int8 and bf16 GEMMs do (gemm_shared.h).
// The AVX-512 tile and the portable loop compute the same FMAs in the same order: equal to the bit (but for swish's
// exp).
#include "f32_gemm.h"
#include "cpu_features.h"
#include "float_tile.h"
#include "gemm_shared.h"

#include <algorithm>
#include <cmath>

namespace pyengine {

namespace {

constexpr int64_t kCols = 64;  // columns per packed tile
constexpr int kMaxRows = 6;    // rows per AVX-512 register tile (6 × 4 accumulators)

using float_tile::Epilogue;
using float_tile::activate;

// rows × 64 columns of x (rows × K, row stride K) times a packed tile (K × 64), through the epilogue.
using TileFn = void (*)(const float* x, int64_t K, int rows, const float* w, const Epilogue& e);

// Scalar twin (any CPU; the reference the tests hold the AVX-512 tile to).
void tile_portable(const float* x, int64_t K, int rows, const float* w, const Epilogue& e) {
  for (int r = 0; r < rows; ++r)
    for (int64_t n = 0; n < e.width; ++n) {
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc = std::fma(x[r * K + k], w[k * kCols + n], acc);
      e.y[r * e.ldy + n] = activate(e.b ? acc + e.b[n] : acc, e.act);
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
// No software prefetch: the tiles a thread claims are consecutive in memory, which the hardware prefetchers stream
// (as the bf16 GEMM's VDPBF16PS tile).
template <int R>
PYENGINE_AVX512 void tile_avx512(const float* x, int64_t K, const float* w, const Epilogue& e) {
  __m512 c[R][4];
  float_tile::zero_tile<R>(c);
  for (int64_t k = 0; k < K; ++k) {
    const float* wk = w + k * kCols;
    const __m512 w0 = _mm512_loadu_ps(wk), w1 = _mm512_loadu_ps(wk + 16);
    const __m512 w2 = _mm512_loadu_ps(wk + 32), w3 = _mm512_loadu_ps(wk + 48);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(x[r * K + k]);
      c[r][0] = _mm512_fmadd_ps(a, w0, c[r][0]);
      c[r][1] = _mm512_fmadd_ps(a, w1, c[r][1]);
      c[r][2] = _mm512_fmadd_ps(a, w2, c[r][2]);
      c[r][3] = _mm512_fmadd_ps(a, w3, c[r][3]);
    }
  }
  float_tile::store_tile<R>(e, c);
}

void tile_avx512_rows(const float* x, int64_t K, int rows, const float* w, const Epilogue& e) {
  switch (rows) {
    case 1: return tile_avx512<1>(x, K, w, e);
    case 2: return tile_avx512<2>(x, K, w, e);
    case 3: return tile_avx512<3>(x, K, w, e);
    case 4: return tile_avx512<4>(x, K, w, e);
    case 5: return tile_avx512<5>(x, K, w, e);
    default: return tile_avx512<6>(x, K, w, e);
  }
}
#endif

struct Kernel {
  TileFn tile;
  int rows;  // rows per tile call
  const char* name;
};

// An unavailable request is an error, never a silent change of kernel.
Kernel pick_kernel(const char* who, const std::string& kernel) {
  TORCH_CHECK(kernel == "auto" || kernel == "avx512" || kernel == "portable", who,
              ": kernel must be auto, avx512 or portable, not ", kernel);
  TORCH_CHECK(kernel != "avx512" || avx512_available(), who, ": the avx512 kernel needs a CPU with AVX-512");
#if defined(__x86_64__) && defined(__GNUC__)
  if (kernel != "portable" && avx512_available()) return {tile_avx512_rows, kMaxRows, "avx512"};
#endif
  return {tile_portable, kMaxRows, "portable"};
}

// f32_linear's operands, checked.
struct Operands {
  int64_t M, K, n_out, tiles;
  const float* x;
  const float* w;
  const float* b;
  Activation act;
  Kernel kern;
};

Operands prepare(const char* who, const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                 int64_t n_out, const std::string& kernel, const std::string& activation) {
  const Activation act = gemm::activation_named(who, activation);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              who, ": x must be a contiguous float32 (M, K) CPU tensor");
  const int64_t M = x.size(0), K = x.size(1), tiles = (n_out + kCols - 1) / kCols;
  TORCH_CHECK(packed.scalar_type() == at::kFloat && packed.dim() == 2 && packed.is_contiguous() && n_out > 0 &&
                  packed.size(1) == K * kCols && packed.size(0) == tiles,
              who, ": packed weight does not match K=", K, " and N=", n_out, " (use f32_pack)");
  if (bias) TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == n_out && bias->is_contiguous(),
                        who, ": bias must be float32 (N,)");
  return {M, K, n_out, tiles, x.data_ptr<float>(), packed.data_ptr<float>(), bias ? bias->data_ptr<float>() : nullptr,
          act, pick_kernel(who, kernel)};
}

// One thread's tiles (Claims, parallel.h), each for every row block: the block's result goes to out(m0, n0) (a pointer
// and its row stride), then after(m0, 0, rows, n0, width) sees it (gemm_shared.h).
template <typename Out, typename After>
void run_tiles(const Operands& op, Claims& tiles, Out out, After after) {
  for (int64_t t; tiles.next(t);) {
    const int64_t n0 = t * kCols, width = std::min(kCols, op.n_out - n0);
    for (int64_t m0 = 0; m0 < op.M; m0 += op.kern.rows) {
      const int rows = static_cast<int>(std::min<int64_t>(op.kern.rows, op.M - m0));
      const auto [y, ldy] = out(m0, n0);
      op.kern.tile(op.x + m0 * op.K, op.K, rows, op.w + t * op.K * kCols,
                   Epilogue{y, ldy, op.b ? op.b + n0 : nullptr, width, op.act});
      after(m0, 0, rows, n0, width);
    }
  }
}

}  // namespace

std::string f32_kernel_name(const std::string& kernel) {
  return pick_kernel("f32_kernel_name", kernel).name;
}

at::Tensor f32_pack(const at::Tensor& w) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.dim() == 2 && w.size(0) > 0 && w.size(1) > 0,
              "f32_pack: a float32 (N, K) CPU tensor");
  const auto wc = w.contiguous();
  const int64_t N = wc.size(0), K = wc.size(1), tiles = (N + kCols - 1) / kCols;
  // (tile, K, 64) ← (N, K): pad N to whole tiles, then each tile's columns become the last dimension
  auto padded = at::constant_pad_nd(wc, {0, 0, 0, tiles * kCols - N});
  return padded.view({tiles, kCols, K}).transpose(1, 2).contiguous().view({tiles, K * kCols});
}

at::Tensor f32_linear(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                      int64_t n_out, const c10::optional<at::Tensor>& out, const std::string& kernel,
                      const std::string& activation) {
  const Operands op = prepare("f32_linear", x, packed, bias, n_out, kernel, activation);
  return gemm::linear_into("f32_linear", x, op.M, n_out, op.tiles, out, [&](Claims& tiles, float* yp) {
    run_tiles(
        op, tiles, [&](int64_t m0, int64_t n0) { return std::pair<float*, int64_t>{yp + m0 * n_out + n0, n_out}; },
        [](int64_t, int, int, int64_t, int64_t) {});
  });
}

std::tuple<at::Tensor, at::Tensor> f32_linear_log_softmax_topk(const at::Tensor& x, const at::Tensor& packed,
                                                               const c10::optional<at::Tensor>& bias, int64_t n_out,
                                                               int64_t k, const at::Tensor& banned,
                                                               const std::string& kernel) {
  constexpr const char* who = "f32_linear_log_softmax_topk";
  const Operands op = prepare(who, x, packed, bias, n_out, kernel, "none");
  static_assert(kCols == gemm::kCols && kMaxRows <= gemm::kBlockRows);
  return gemm::linear_log_softmax_topk(
      who, x, op.M, n_out, op.tiles, k, banned, std::string(op.kern.name) != "portable",
      [&](Claims& tiles, float* block, auto after) {
        run_tiles(op, tiles, [&](int64_t, int64_t) { return std::pair<float*, int64_t>{block, kCols}; }, after);
      });
}

}  // namespace pyengine
