#pragma once
// What the float-activation GEMMs' register tiles share (bf16_gemm.cpp, f32_gemm.cpp): a tile's epilogue, y =
// act(acc + b) for its rows and up to 64 columns, as the scalar twins and the AVX-512 tiles write it.
#include "int8_gemm.h"  // Activation
#include "vec_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace pyengine {
namespace float_tile {

// What a tile writes: y[m, n] = act(acc[m, n] + b[n]) for its rows and `width` columns.
struct Epilogue {
  float* y;        // row m0, column n0
  int64_t ldy;
  const float* b;  // bias from n0, or nullptr
  int64_t width;   // ≤ 64
  Activation act;
};

// The scalar twins' activation (swish by std::exp: the AVX-512 tiles' silu agrees within its polynomial's error).
inline float activate(float v, Activation act) {
  if (act == Activation::kRelu) return std::max(v, 0.f);
  if (act == Activation::kSwish) return v / (1.f + std::exp(-v));
  return v;
}

#if defined(__x86_64__) && defined(__GNUC__)
#define PYENGINE_AVX512 __attribute__((target("avx512f,avx512bw")))

// Columns j·16..j·16+15 of a tile: act(acc + b), masked to the tile's width.
PYENGINE_AVX512 inline void store_group(const Epilogue& e, int r, int j, __m512 acc) {
  const int64_t left = e.width - 16 * j;
  if (left <= 0) return;
  const __mmask16 mask = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
  __m512 y = e.b ? _mm512_add_ps(acc, _mm512_maskz_loadu_ps(mask, e.b + 16 * j)) : acc;
  if (e.act == Activation::kRelu) y = _mm512_max_ps(y, _mm512_setzero_ps());
  if (e.act == Activation::kSwish) y = silu(y);
  _mm512_mask_storeu_ps(e.y + r * e.ldy + 16 * j, mask, y);
}

// A register tile's R rows × 64 columns in R × 4 accumulators: zeroed, and stored through the epilogue.
template <int R>
PYENGINE_AVX512 inline void zero_tile(__m512 (&c)[R][4]) {
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) c[r][j] = _mm512_setzero_ps();
}

template <int R>
PYENGINE_AVX512 inline void store_tile(const Epilogue& e, __m512 (&c)[R][4]) {
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j)
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) store_group(e, r, j, c[r][j]);
}
#endif

}  // namespace float_tile
}  // namespace pyengine
