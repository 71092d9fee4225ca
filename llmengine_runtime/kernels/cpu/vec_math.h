// AVX2 helpers the small kernels share: exp of 8 floats, horizontal sum and max.
// exp: Cephes' expf (range reduction by ln 2, degree-5 polynomial), within 2 ulp of std::exp on [-87, 88];
// inputs below -87.3 (and -inf) give exactly 0, inputs above 88 give exp(88) (2^n must stay below 2^128).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

namespace llmengine_cpu {

inline __m256 exp256(__m256 x) {
  const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_GE_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(e)), tiny);
}

inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline float hmax256(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

}  // namespace llmengine_cpu
#define LLME_VEC_MATH 1
#endif

namespace llmengine_cpu {

// e[j] = exp(x[j] - mx) for j < n (e may be x itself); returns their fp32 sum: 8 lanes at a time (exp256, one sum
// register, hsum256), then the tail in order with std::exp.
inline float exp_shifted(const float* x, int64_t n, float mx, float* e) {
  float total = 0.f;
  int64_t j = 0;
#ifdef LLME_VEC_MATH
  const __m256 m = _mm256_set1_ps(mx);
  __m256 sum8 = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    const __m256 v = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + j), m));
    _mm256_storeu_ps(e + j, v);
    sum8 = _mm256_add_ps(sum8, v);
  }
  total = hsum256(sum8);
#endif
  for (; j < n; ++j) total += (e[j] = std::exp(x[j] - mx));
  return total;
}

}  // namespace llmengine_cpu
