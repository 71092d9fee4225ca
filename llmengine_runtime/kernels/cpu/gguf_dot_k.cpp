#pragma GCC optimize("fp-contract=off")  // the float sums as written (gguf_blocks.h): same bits on every path
// GGUF's 256-element "K" types (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) times Q8_K-like activations: one weight row against up
// to 4 activation rows (a tile), on the calling thread.
//
// Every type reads as 256 unsigned values q (2..6 bits), an integer scale sc and min mn per 16 values, and an offset
// o (the layouts, and how each type reads as these integers: gguf_k_blocks.h). Per super-block and activation row, exactly in int32:
//   isum = sum_s sc_s (sum_{l in s} q_l xq_l - o sum16_s),   imin = sum_s mn_s sum16_s,
// then block_value_256(d, dmin, xd, isum, imin) into lane b % 8.
// AVX2: the 256 values are 8 vectors of 32 bytes (unpacked per type), maddubs gives u8 x s8 pair sums in int16 (at
// most 2 * 63 * 127), madd by the 16-value scales gives int32 (VNNI's vpdpwssd where present: the same exact sums);
// the sc . sum16 and mn . sum16 terms are one madd each. A group of 8 super-blocks closes with one horizontal-add
// tree and its float part 8 lanes at once; the weight rows are prefetched 2 KB ahead.
#include "gguf_k_blocks.h"

namespace llmengine_cpu::gguf {
namespace {

template <class T>
inline float block_value(const typename T::Block& blk, const int8_t* sc, const int8_t* mn, const Activations& x,
                         int64_t r) {
  const int8_t* xq = x.q.data() + r * QK_K;
  const int16_t* s16 = x.sum16.data() + r * 16;
  int32_t isum = 0, imin = 0;
  for (int s = 0; s < 16; ++s) {
    int32_t dot = 0;
    for (int l = 16 * s; l < 16 * s + 16; ++l) dot += T::value(blk, l) * xq[l];
    isum += sc[s] * (dot - T::offset * s16[s]);
    imin += mn[s] * s16[s];
  }
  return block_value_256(f16(blk.d), T::dmin(blk), x.d[r], isum, imin);
}

template <class T>
void tile_portable(const uint8_t* wp, int64_t nb, const Activations& x, int64_t i0, int mt, float* y, int64_t ldy) {
  const auto* w = reinterpret_cast<const typename T::Block*>(wp);
  for (int t = 0; t < mt; ++t) {
    float lanes[8] = {};
    for (int64_t b = 0; b < nb; ++b) {
      int8_t sc[16], mn[16];
      T::scales(w[b], sc, mn);
      lanes[b % 8] += block_value<T>(w[b], sc, mn, x, (i0 + t) * nb + b);
    }
    y[t * ldy] = lanes_total(lanes);
  }
}

#ifdef LLME_AVX2
inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 1));
  return _mm_cvtsi128_si32(s);
}

// The sums of 8 vectors of int32: lane j = the sum of v[j]'s 8 lanes.
inline __m256i sums_of_8(const __m256i* v) {
  const __m256i lo = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
  const __m256i hi = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(lo, hi, 0x20), _mm256_permute2x128_si256(lo, hi, 0x31));
}

// Super-block b against MT activation rows: per row, 8 int32 lanes whose sum is isum, and 8 whose sum is imin.
template <class T, int MT>
inline void block_ints(const typename T::Block& blk, const Activations& x, int64_t i0, int64_t nb, int64_t b,
                       __m256i* isum, __m256i* imin) {
  // scales as int16, the even ones in the low 128-bit lane and the odd ones in the high one: one in-lane byte
  // shuffle then gives chunk c's [sc_2c x 8 | sc_2c+1 x 8].
  const __m128i split = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  __m128i sc8, mn8;
  scales_simd(blk, sc8, mn8);
  const __m256i sc_split = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc8, split));
  __m256i acc[MT];
  for (int t = 0; t < MT; ++t) acc[t] = _mm256_setzero_si256();
  for (int c = 0; c < 8; ++c) {
    const __m256i q = chunk(blk, c);
    const __m256i pick = _mm256_set1_epi16(static_cast<int16_t>(0x0100 * (2 * c + 1) + 2 * c));
    const __m256i scale = _mm256_shuffle_epi8(sc_split, pick);
    for (int t = 0; t < MT; ++t) {
      const int8_t* xq = x.q.data() + ((i0 + t) * nb + b) * QK_K + 32 * c;
      const __m256i pairs = _mm256_maddubs_epi16(q, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq)));
      acc[t] = madd_add(acc[t], pairs, scale);
    }
  }
  const __m256i sc16 = _mm256_cvtepi8_epi16(sc8), mn16 = _mm256_cvtepi8_epi16(mn8);
  for (int t = 0; t < MT; ++t) {
    const auto* s16 = reinterpret_cast<const __m256i*>(x.sum16.data() + ((i0 + t) * nb + b) * 16);
    const __m256i bsums = _mm256_loadu_si256(s16);
    isum[t] = acc[t];
    if constexpr (T::offset != 0) {
      const __m256i offsets = _mm256_mullo_epi32(_mm256_madd_epi16(sc16, bsums), _mm256_set1_epi32(T::offset));
      isum[t] = _mm256_sub_epi32(acc[t], offsets);
    }
    imin[t] = T::has_min ? _mm256_madd_epi16(mn16, bsums) : _mm256_setzero_si256();
  }
}

// Whole groups of 8 super-blocks take their float part 8 lanes at once (block b in lane b % 8, as the portable
// path adds them); the last nb % 8 blocks one by one.
template <class T, int MT>
void tile_avx2(const uint8_t* wp, int64_t nb, const Activations& x, int64_t i0, float* y, int64_t ldy) {
  const auto* w = reinterpret_cast<const typename T::Block*>(wp);
  __m256 acc[MT];
  for (int t = 0; t < MT; ++t) acc[t] = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 8 <= nb; b += 8) {
    __m256i isum[MT][8], imin[MT][8];
    for (int j = 0; j < 8; ++j) {
      prefetch_ahead(&w[b + j], sizeof(w[b]));
      __m256i is[MT], im[MT];
      block_ints<T, MT>(w[b + j], x, i0, nb, b + j, is, im);
      for (int t = 0; t < MT; ++t) isum[t][j] = is[t], imin[t][j] = im[t];
    }
    const __m256 d = _mm256_cvtph_ps(_mm_setr_epi16(w[b].d, w[b + 1].d, w[b + 2].d, w[b + 3].d, w[b + 4].d,
                                                    w[b + 5].d, w[b + 6].d, w[b + 7].d));
    __m256 dmin = _mm256_setzero_ps();
    if constexpr (T::has_min)
      dmin = _mm256_cvtph_ps(_mm_setr_epi16(w[b].dmin, w[b + 1].dmin, w[b + 2].dmin, w[b + 3].dmin, w[b + 4].dmin,
                                            w[b + 5].dmin, w[b + 6].dmin, w[b + 7].dmin));
    for (int t = 0; t < MT; ++t) {
      const __m256 xd = _mm256_loadu_ps(x.d.data() + (i0 + t) * nb + b);
      const __m256 ints = _mm256_cvtepi32_ps(sums_of_8(isum[t])), mins = _mm256_cvtepi32_ps(sums_of_8(imin[t]));
      const __m256 value = _mm256_sub_ps(_mm256_mul_ps(_mm256_mul_ps(d, xd), ints),
                                         _mm256_mul_ps(_mm256_mul_ps(dmin, xd), mins));
      acc[t] = _mm256_add_ps(acc[t], value);
    }
  }
  float lanes[MT][8];
  for (int t = 0; t < MT; ++t) _mm256_storeu_ps(lanes[t], acc[t]);
  for (; b < nb; ++b) {
    __m256i is[MT], im[MT];
    block_ints<T, MT>(w[b], x, i0, nb, b, is, im);
    for (int t = 0; t < MT; ++t) {
      const int64_t r = (i0 + t) * nb + b;
      lanes[t][b % 8] += block_value_256(f16(w[b].d), T::dmin(w[b]), x.d[r], hsum_i32(is[t]), hsum_i32(im[t]));
    }
  }
  for (int t = 0; t < MT; ++t) y[t * ldy] = lanes_total(lanes[t]);
}

template <class T>
void tile_fast(const uint8_t* w, int64_t nb, const Activations& x, int64_t i0, int mt, float* y, int64_t ldy) {
  switch (mt) {
    case 4: return tile_avx2<T, 4>(w, nb, x, i0, y, ldy);
    case 3: return tile_avx2<T, 3>(w, nb, x, i0, y, ldy);
    case 2: return tile_avx2<T, 2>(w, nb, x, i0, y, ldy);
    default: return tile_avx2<T, 1>(w, nb, x, i0, y, ldy);
  }
}
#else
template <class T>
void tile_fast(const uint8_t* w, int64_t nb, const Activations& x, int64_t i0, int mt, float* y, int64_t ldy) {
  tile_portable<T>(w, nb, x, i0, mt, y, ldy);
}
#endif

template <class T>
constexpr TypeTraits traits(int type, const char* name) {
  return {type, name, QK_K, sizeof(typename T::Block), &tile_fast<T>, &tile_portable<T>};
}

const TypeTraits TABLE[] = {traits<Q2_KT>(Q2_K, "Q2_K"), traits<Q3_KT>(Q3_K, "Q3_K"), traits<Q4_KT>(Q4_K, "Q4_K"),
                            traits<Q5_KT>(Q5_K, "Q5_K"), traits<Q6_KT>(Q6_K, "Q6_K")};

}  // namespace

const TypeTraits* k_traits(int type) {
  for (const TypeTraits& t : TABLE)
    if (t.type == type) return &t;
  return nullptr;
}

}  // namespace llmengine_cpu::gguf
