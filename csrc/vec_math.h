#pragma once
// Vector math shared by the CPU kernels (AVX-512 where the compiler targets x86-64).
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

namespace pyengine {

// float32 → bfloat16 bits (in the low half of each lane) as c10 rounds: (u + 0x7FFF + lsb) >> 16, to nearest even,
// NaN as c10 makes it (0x7FC0).
__attribute__((target("avx512f"))) inline __m512i bf16_bits(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb)), 16);
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
}

// exp(x) for x <= 0: Cephes' expf polynomial (relative error ~2e-7), 16 lanes, no table, no branch.
__attribute__((target("avx512f"))) inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 magic = _mm512_set1_ps(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), magic);
  const __m512 n = _mm512_sub_ps(t, magic);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  // 2^n from n's integer bits inside t
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(127 - 0x4B400000)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

// exp(x) for x <= 0 in 11 operations where exp_nonpositive takes 16, for the fused output layer's log-sum-exp (every
// logit of a 58k vocabulary, each step): the same range reduction, a degree-5 polynomial (fitted here for relative
// error on [-ln2/2, ln2/2]: ≤ 1.9e-7 in float32, as Cephes' ~2e-7) and 2^n by vscalefps instead of building the exponent bits.
__attribute__((target("avx512f"))) inline __m512 exp_nonpositive_short(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(0.008297637104988098f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.04191537946462631f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.16667574644088745f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.49998894333839417f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.9999997019767761f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0000001192092896f));
  return _mm512_scalef_ps(p, n);
}

// x·sigmoid(x) (swish / SiLU), with exp only of −|x| ≤ 0: sigmoid(x) = 1/(1+e) for x ≥ 0, e/(1+e) below. 1/(1+e)
// by vrcp14ps and one Newton step (relative error ~1e-8, below float32's rounding) rather than vdivps, whose
// throughput (one per 16 cycles) made an FFN's first GEMM with swish take ~1.8x its time without (A/B below);
// exp by the short polynomial (≤ 1.9e-7, as Cephes').
__attribute__((target("avx512f"))) inline __m512 silu(__m512 x) {
  const __m512 e = exp_nonpositive_short(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x)));
  const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.0f), e);
  const __m512 r0 = _mm512_rcp14_ps(d);
  const __m512 inv = _mm512_fmadd_ps(r0, _mm512_fnmadd_ps(d, r0, _mm512_set1_ps(1.0f)), r0);
  const __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
  return _mm512_mul_ps(x, _mm512_mask_mul_ps(inv, negative, inv, e));
}

}  // namespace pyengine
#endif
