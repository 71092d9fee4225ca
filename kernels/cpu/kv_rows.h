// Rows of the paged KV cache on the CPU, in either of its element types: fp32, or fp16 (half the bytes each
// decode step reads per cached key and value; llama.cpp's default cache type). Rows are widened to fp32 as they
// are read (F16C's vcvtph2ps: exact) and rounded to the nearest fp16, ties to even, as they are stored (as
// torch's `.to(torch.float16)`), so every sum in attention stays fp32.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LLME_KV_VEC 1
#endif

namespace llmengine_cpu {

using Half = at::Half;

inline float widen(float x) { return x; }
inline float widen(Half x) { return static_cast<float>(x); }

#ifdef LLME_KV_VEC
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
#endif

// dst[0:n] = src[0:n] in the cache's type.
inline void store_row(const float* src, float* dst, int64_t n) { std::copy(src, src + n, dst); }
inline void store_row(const float* src, Half* dst, int64_t n) {
  int64_t i = 0;
#ifdef LLME_KV_VEC
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
  for (; i < n; ++i) dst[i] = Half(src[i]);
}

// a . b over d values (b a cached key).
template <typename T>
inline float dot(const float* a, const T* b, int64_t d) {
  int64_t i = 0;
  float total = 0.f;
#ifdef LLME_KV_VEC
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= d; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), load8(b + i + 8), acc1);
  }
  for (; i + 8 <= d; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc0);
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(_mm256_add_ps(acc0, acc1)),
                         _mm256_extractf128_ps(_mm256_add_ps(acc0, acc1), 1));
  s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  total = _mm_cvtss_f32(_mm_add_ss(s4, _mm_movehdup_ps(s4)));
#endif
  for (; i < d; ++i) total += a[i] * widen(b[i]);
  return total;
}

// a = alpha a + sum_t p[t] v_t over `take` value rows v_t = v + t * stride (8 lanes of a kept in a register over the
// rows, rather than a load and store of a per row).
template <typename T>
inline void accumulate_values(float* a, float alpha, const float* p, const T* v, int64_t stride, int64_t take,
                              int64_t d) {
  int64_t i = 0;
#ifdef LLME_KV_VEC
  const __m256 alpha8 = _mm256_set1_ps(alpha);
  for (; i + 8 <= d; i += 8) {
    __m256 r = _mm256_mul_ps(alpha8, _mm256_loadu_ps(a + i));
    for (int64_t t = 0; t < take; ++t) r = _mm256_fmadd_ps(_mm256_set1_ps(p[t]), load8(v + t * stride + i), r);
    _mm256_storeu_ps(a + i, r);
  }
#endif
  for (; i < d; ++i) {
    float r = alpha * a[i];
    for (int64_t t = 0; t < take; ++t) r += p[t] * widen(v[t * stride + i]);
    a[i] = r;
  }
}

}  // namespace llmengine_cpu
