// The G query heads that share one KV head, against a block of cached rows at once: each key and value row is
// widened from the cache once for all G heads instead of once a head (F16C's vcvtph2ps costs as much as the FMA it
// feeds). Each (head, key) score and each (head, lane) value sum is computed by the same instructions in the same
// order as kv_rows.h's dot_rows and accumulate_values do for one head, so the bits are theirs:
// - scores: keys in the block's groups of four go two at a time, each key's two FMA chains (even and odd 8-lane
//   chunks of d), then the same hadd tree as dot_rows' group of four gives each key; the rest go through `dot`;
// - values: each lane's chain alpha a + p[0] v_0 + p[1] v_1 + ... in key order, lanes in registers NV * 8 at a time.
// Heads go HEADS = 4 at a time, so that their accumulators fit AVX-512's 32 vector registers. AVX2 builds (16
// registers) take one head at a time, as before: sharing two heads' rows measured no faster there.
#pragma once

#include "kv_rows.h"

namespace llmengine_cpu {

#if defined(LLME_KV_VEC) && defined(__AVX512VL__)
#define LLME_KV_HEADS 1
constexpr int HEADS = 4, NV = 4;

// out[g * out_stride + t] = q_g . k_t for GH heads q_g = q + g * q_stride, over the keys t of [t0, t1) (an even count).
template <int GH, typename T>
inline void dot_pairs(const float* q, int64_t q_stride, const T* k, int64_t stride, int64_t t0, int64_t t1,
                      int64_t d, float* out, int64_t out_stride) {
  for (int64_t t = t0; t < t1; t += 2) {
    const T *k0 = k + t * stride, *k1 = k0 + stride;
    __m256 a[GH][4];  // per head: key 0 even, key 0 odd, key 1 even, key 1 odd
    for (int g = 0; g < GH; ++g)
      for (int c = 0; c < 4; ++c) a[g][c] = _mm256_setzero_ps();
    for (int64_t i = 0; i < d; i += 16) {
      const __m256 k00 = load8(k0 + i), k01 = load8(k0 + i + 8), k10 = load8(k1 + i), k11 = load8(k1 + i + 8);
      for (int g = 0; g < GH; ++g) {
        const __m256 q0 = _mm256_loadu_ps(q + g * q_stride + i), q1 = _mm256_loadu_ps(q + g * q_stride + i + 8);
        a[g][0] = _mm256_fmadd_ps(q0, k00, a[g][0]);
        a[g][1] = _mm256_fmadd_ps(q1, k01, a[g][1]);
        a[g][2] = _mm256_fmadd_ps(q0, k10, a[g][2]);
        a[g][3] = _mm256_fmadd_ps(q1, k11, a[g][3]);
      }
    }
    for (int g = 0; g < GH; ++g) {  // dot_rows' tree: lane 0 (key 0) and lane 1 (key 1) of low + high
      const __m256 h = _mm256_hadd_ps(_mm256_add_ps(a[g][0], a[g][1]), _mm256_add_ps(a[g][2], a[g][3]));
      const __m256 s = _mm256_hadd_ps(h, h);
      const __m128 r = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
      out[g * out_stride + t] = _mm_cvtss_f32(r);
      out[g * out_stride + t + 1] = _mm_cvtss_f32(_mm_shuffle_ps(r, r, 1));
    }
  }
}

// a_g[i0:i1] = alpha a_g + sum_t p_g[t] v_t for GH heads (a_g = a + g * a_stride, p_g = p + g * p_stride), lanes
// [i0, i1) a multiple of NV * 8 wide.
template <int GH, typename T>
inline void accumulate_heads(float* a, int64_t a_stride, float alpha, const float* p, int64_t p_stride, const T* v,
                             int64_t stride, int64_t take, int64_t i0, int64_t i1) {
  const __m256 alpha8 = _mm256_set1_ps(alpha);
  for (int64_t i = i0; i < i1; i += 8 * NV) {
    __m256 r[GH][NV];
    for (int g = 0; g < GH; ++g)
      for (int c = 0; c < NV; ++c) r[g][c] = _mm256_mul_ps(alpha8, _mm256_loadu_ps(a + g * a_stride + i + 8 * c));
    for (int64_t t = 0; t < take; ++t) {
      const T* row = v + t * stride + i;
      __m256 vt[NV];
      for (int c = 0; c < NV; ++c) vt[c] = load8(row + 8 * c);
      for (int g = 0; g < GH; ++g) {
        const __m256 pt = _mm256_set1_ps(p[g * p_stride + t]);
        for (int c = 0; c < NV; ++c) r[g][c] = _mm256_fmadd_ps(pt, vt[c], r[g][c]);
      }
    }
    for (int g = 0; g < GH; ++g)
      for (int c = 0; c < NV; ++c) _mm256_storeu_ps(a + g * a_stride + i + 8 * c, r[g][c]);
  }
}

// f.template operator()<GH>(g0) over heads [0, G): groups of HEADS from g0 = 0, then one group of the rest.
template <typename F>
inline void for_head_groups(int64_t G, F&& f) {
  int64_t g0 = 0;
  for (; G - g0 >= HEADS; g0 += HEADS) f.template operator()<HEADS>(g0);
  if (G - g0 == 3) f.template operator()<3>(g0);
  else if (G - g0 == 2) f.template operator()<2>(g0);
  else if (G - g0 == 1) f.template operator()<1>(g0);
}
#endif

// scores[g * score_stride + t] = q_g . k_t for the G heads q_g = q + g * q_stride and `take` key rows k_t = k + t *
// stride: dot_rows' numbers for each head.
template <typename T>
inline void dot_rows_heads(const float* q, int64_t q_stride, int64_t G, const T* k, int64_t stride, int64_t take,
                           int64_t d, float* scores, int64_t score_stride) {
#ifdef LLME_KV_HEADS
  if (d % 16 == 0) {
    const int64_t grouped = take - take % 4;  // dot_rows' groups of four keys; the rest one by one
    for_head_groups(G, [&]<int GH>(int64_t g0) {
      dot_pairs<GH>(q + g0 * q_stride, q_stride, k, stride, 0, grouped, d, scores + g0 * score_stride, score_stride);
    });
    for (int64_t g = 0; g < G; ++g)
      for (int64_t t = grouped; t < take; ++t) scores[g * score_stride + t] = dot(q + g * q_stride, k + t * stride, d);
    return;
  }
#endif
  for (int64_t g = 0; g < G; ++g) dot_rows(q + g * q_stride, k, stride, take, d, scores + g * score_stride);
}

// a_g = alpha a_g + sum_t p_g[t] v_t for the G heads a_g = a + g * d, p_g = p + g * p_stride, over `take` value rows
// v_t = v + t * stride: accumulate_values' numbers for each head.
template <typename T>
inline void accumulate_values_heads(float* a, int64_t G, float alpha, const float* p, int64_t p_stride, const T* v,
                                    int64_t stride, int64_t take, int64_t d) {
  int64_t done = 0;
#ifdef LLME_KV_HEADS
  done = d - d % (8 * NV);
  for_head_groups(G, [&]<int GH>(int64_t g0) {
    accumulate_heads<GH>(a + g0 * d, d, alpha, p + g0 * p_stride, p_stride, v, stride, take, 0, done);
  });
#endif
  if (done < d)
    for (int64_t g = 0; g < G; ++g)
      accumulate_values(a + g * d + done, alpha, p + g * p_stride, v + done, stride, take, d - done);
}

}  // namespace llmengine_cpu
