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
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
  for (; i < n; ++i) dst[i] = Half(src[i]);
}

// dst[0:n] = src[0:n] widened to fp32 (exact).
inline void widen_row(const Half* src, float* dst, int64_t n) {
  int64_t i = 0;
#ifdef LLME_KV_VEC
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load8(src + i));
#endif
  for (; i < n; ++i) dst[i] = widen(src[i]);
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

// out[t] = q . k_t over `take` key rows k_t = k + t * stride: four rows at a time (two FMA chains a row, q loaded once
// for the four, their sums reduced together: more loads in flight when the rows come from memory), the rest one by one.
template <typename T>
inline void dot_rows(const float* q, const T* k, int64_t stride, int64_t take, int64_t d, float* out) {
  int64_t t = 0;
#ifdef LLME_KV_VEC
  if (d % 16 == 0) {
    for (; t + 4 <= take; t += 4) {
      const T* k0 = k + t * stride;
      __m256 a[8];  // two chains a row: even and odd 8-lane chunks
      for (int c = 0; c < 8; ++c) a[c] = _mm256_setzero_ps();
      for (int64_t i = 0; i < d; i += 16) {
        const __m256 q0 = _mm256_loadu_ps(q + i), q1 = _mm256_loadu_ps(q + i + 8);
        for (int r = 0; r < 4; ++r) {
          a[2 * r] = _mm256_fmadd_ps(q0, load8(k0 + r * stride + i), a[2 * r]);
          a[2 * r + 1] = _mm256_fmadd_ps(q1, load8(k0 + r * stride + i + 8), a[2 * r + 1]);
        }
      }
      const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])),
                                      _mm256_hadd_ps(_mm256_add_ps(a[4], a[5]), _mm256_add_ps(a[6], a[7])));
      _mm_storeu_ps(out + t, _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)));
    }
  }
#endif
  for (; t < take; ++t) out[t] = dot(q, k + t * stride, d);
}

#ifdef LLME_KV_VEC
// N * 8 lanes of a, kept in N registers over the rows: N independent FMA chains (one chain waited ~4 cycles per
// row on the one before it). Each lane computes alpha a + p[0] v_0 + p[1] v_1 + ... in that order, whatever N.
template <int N, typename T>
inline void accumulate_lanes(float* a, __m256 alpha8, const float* p, const T* v, int64_t stride, int64_t take) {
  __m256 r[N];
  for (int c = 0; c < N; ++c) r[c] = _mm256_mul_ps(alpha8, _mm256_loadu_ps(a + 8 * c));
  for (int64_t t = 0; t < take; ++t) {
    const __m256 pt = _mm256_set1_ps(p[t]);
    const T* row = v + t * stride;
    for (int c = 0; c < N; ++c) r[c] = _mm256_fmadd_ps(pt, load8(row + 8 * c), r[c]);
  }
  for (int c = 0; c < N; ++c) _mm256_storeu_ps(a + 8 * c, r[c]);
}
#endif

// a = alpha a + sum_t p[t] v_t over `take` value rows v_t = v + t * stride.
template <typename T>
inline void accumulate_values(float* a, float alpha, const float* p, const T* v, int64_t stride, int64_t take,
                              int64_t d) {
  int64_t i = 0;
#ifdef LLME_KV_VEC
  const __m256 alpha8 = _mm256_set1_ps(alpha);
  for (; i + 64 <= d; i += 64) accumulate_lanes<8>(a + i, alpha8, p, v + i, stride, take);
  if (i + 32 <= d) accumulate_lanes<4>(a + i, alpha8, p, v + i, stride, take), i += 32;
  for (; i + 8 <= d; i += 8) accumulate_lanes<1>(a + i, alpha8, p, v + i, stride, take);
#endif
  for (; i < d; ++i) {
    float r = alpha * a[i];
    for (int64_t t = 0; t < take; ++t) r += p[t] * widen(v[t * stride + i]);
    a[i] = r;
  }
}

}  // namespace llmengine_cpu
