// Activations for the quantized products: x fp32 [rows, K] -> int8 per block of 32 (llama.cpp's Q8_1): xd = max|x| /
// 127, xq = round-half-even(x / xd) in -127..127 (zeros past K), xs = xd * sum(xq). Layout of q per row: the blocks
// in order, or, `paired` (for the q4 kernel), two blocks interleaved by halves (see half_offset).
// Grid: at::parallel_for over rows; one task quantizes whole rows, 32 values per AVX2 step.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "quant_common.h"

namespace llmengine_cpu {

// One activation row (len k) -> nb blocks of 32 int8 + xd, xs.
// The q4 kernel reads two blocks per 32-byte weight load (one block's low nibbles beside the next one's), so with
// `paired` the int8 x of blocks 2p and 2p + 1 are stored as [2p: 0-15 | 2p+1: 0-15 | 2p: 16-31 | 2p+1: 16-31]
// (an odd last block stays in order). Only the AVX2 kernel pairs blocks.
inline int64_t half_offset(int64_t b, int64_t nb, bool paired, bool high) {
  if (!paired || (b == nb - 1 && nb % 2)) return b * QK + (high ? 16 : 0);
  return (b / 2) * 2 * QK + (b % 2) * 16 + (high ? QK : 0);
}

#ifdef LLME_AVX2
inline void store_block(int8_t* q, int64_t b, int64_t nb, bool paired, __m128i lo, __m128i hi) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + half_offset(b, nb, paired, false)), lo);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + half_offset(b, nb, paired, true)), hi);
}
#endif

void quantize_row(const float* x, int64_t k, int64_t nb, int8_t* q, float* d, float* s, bool paired) {
  float buf[QK];
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t lo = b * QK, n = std::min<int64_t>(QK, k - lo);
    const float* xb = x + lo;
    if (n < QK) {
      std::fill(buf, buf + QK, 0.f);
      std::copy(xb, xb + n, buf);
      xb = buf;
    }
#ifdef LLME_AVX2
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8);
    __m256 v2 = _mm256_loadu_ps(xb + 16), v3 = _mm256_loadu_ps(xb + 24);
    __m256 amax = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float scale = _mm_cvtss_f32(m4) / 127.f;
    const __m256 inv = _mm256_set1_ps(scale > 0.f ? 1.f / scale : 0.f);
    __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, inv)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, inv));
    __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, inv)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, inv));
    __m256i sum = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    s4 = _mm_hadd_epi32(s4, s4);
    s4 = _mm_hadd_epi32(s4, s4);
    // packs interleave 128-bit lanes; the permute puts the 32 bytes back in order.
    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
    p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    store_block(q, b, nb, paired, _mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1));
    d[b] = scale;
    s[b] = scale * static_cast<float>(_mm_cvtsi128_si32(s4));
#else
    float amax = 0.f;
    for (int j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float scale = amax / 127.f, inv = scale > 0.f ? 1.f / scale : 0.f;
    int sum = 0;
    for (int j = 0; j < QK; ++j) {
      const int v = static_cast<int>(std::nearbyint(xb[j] * inv));
      q[lo + j] = static_cast<int8_t>(v);
      sum += v;
    }
    d[b] = scale;
    s[b] = scale * static_cast<float>(sum);
#endif
  }
}


void quantize_rows_into(QuantizedRows& out, const float* x, int64_t rows, int64_t k, int64_t nb, bool paired) {
  if (static_cast<int64_t>(out.q.size()) < rows * nb * QK) out.q.resize(rows * nb * QK);
  if (static_cast<int64_t>(out.d.size()) < rows * nb) out.d.resize(rows * nb), out.s.resize(rows * nb);
  out.nb = nb;
  for (int64_t i = 0; i < rows; ++i)
    quantize_row(x + i * k, k, nb, out.q.data() + i * nb * QK, out.d.data() + i * nb, out.s.data() + i * nb, paired);
}

void quantize_rows_range(QuantizedRows& out, const float* x, int64_t r0, int64_t r1, int64_t k, int64_t nb,
                         bool paired) {
  for (int64_t i = r0; i < r1; ++i)
    quantize_row(x + i * k, k, nb, out.q.data() + i * nb * QK, out.d.data() + i * nb, out.s.data() + i * nb, paired);
}

QuantizedRows quantize_rows(const at::Tensor& x, int64_t nb, bool paired) {
  const int64_t rows = x.size(0), k = x.size(1);
  QuantizedRows out{std::vector<int8_t>(rows * nb * QK), std::vector<float>(rows * nb),
                    std::vector<float>(rows * nb), nb};
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      quantize_row(xp + i * k, k, nb, out.q.data() + i * nb * QK, out.d.data() + i * nb, out.s.data() + i * nb,
                   paired);
  });
  return out;
}

}  // namespace llmengine_cpu
