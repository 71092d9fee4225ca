#pragma GCC optimize("fp-contract=off")  // the float sums as written (gguf_blocks.h): same bits on every path
// GGUF's 256-element "K" types (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) times Q8_K-like activations: one weight row against up
// to 4 activation rows (a tile), on the calling thread.
//
// Every type reads as 256 unsigned values q (2..6 bits), an integer scale sc and min mn per 16 values (a type with
// 32-value sub-blocks repeats each twice), and an offset o (Q3_K 4, Q6_K 32, else 0): w = d sc (q - o) - dmin mn.
// Where value e = 128 h + 32 j + l (h < 2, j < 4, l < 32) of a super-block lives (as gguf-py's dequantizers read it):
//   Q2_K  bits 2j.. of qs[32h + l]; scales[e / 16]: sc low nibble, mn high nibble.
//   Q3_K  the same two bits | bit (4h + j) of hmask[l] << 2; sc = 6 bits from scales[12] (low nibbles of bytes 0-7,
//         then their high ones; two more bits from bytes 8-11) - 32.
//   Q4_K  nibble (e / 32) % 2 of qs[32 (e / 64) + l]; sc, mn: 6 bits each per 32 values from scales[12].
//   Q5_K  the same | bit (e / 32) of qh[l] << 4.
//   Q6_K  nibble j / 2 of ql[64h + 32 (j % 2) + l] | bits 2j.. of qh[32h + l] << 4; sc = int8 scales[e / 16].
// Per super-block and activation row, exactly in int32:
//   isum = sum_s sc_s (sum_{l in s} q_l xq_l - o sum16_s),   imin = sum_s mn_s sum16_s,
// then block_value_256(d, dmin, xd, isum, imin) into lane b % 8.
// AVX2: the 256 values are 8 vectors of 32 bytes (unpacked per type), maddubs gives u8 x s8 pair sums in int16 (at
// most 2 * 63 * 127), madd by the 16-value scales gives int32 (VNNI's vpdpwssd where present: the same exact sums);
// the sc . sum16 and mn . sum16 terms are one madd each. A group of 8 super-blocks closes with one horizontal-add
// tree and its float part 8 lanes at once; the weight rows are prefetched 2 KB ahead.
#include "gguf_blocks.h"

namespace llmengine_cpu::gguf {
namespace {

// Q4_K / Q5_K: 8 six-bit scales and mins in 12 bytes.
inline void scale_min_k4(const uint8_t* s, int8_t* sc, int8_t* mn) {
  for (int j = 0; j < 8; ++j) {
    const int a = j < 4 ? s[j] & 63 : (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
    const int m = j < 4 ? s[j + 4] & 63 : (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    sc[2 * j] = sc[2 * j + 1] = static_cast<int8_t>(a);
    mn[2 * j] = mn[2 * j + 1] = static_cast<int8_t>(m);
  }
}

struct Q2_KT {
  using Block = BlockQ2_K;
  static constexpr int offset = 0;
  static constexpr bool has_min = true;
  static void scales(const Block& b, int8_t* sc, int8_t* mn) {
    for (int i = 0; i < 16; ++i) sc[i] = b.scales[i] & 15, mn[i] = b.scales[i] >> 4;
  }
  static int value(const Block& b, int e) { return (b.qs[32 * (e / 128) + e % 32] >> (2 * (e / 32 % 4))) & 3; }
  static float dmin(const Block& b) { return f16(b.dmin); }
};
struct Q3_KT {
  using Block = BlockQ3_K;
  static constexpr int offset = 4;
  static constexpr bool has_min = false;
  static void scales(const Block& b, int8_t* sc, int8_t* mn) {
    for (int i = 0; i < 16; ++i) {
      const int low = i < 8 ? b.scales[i] & 15 : b.scales[i - 8] >> 4;
      const int high = (b.scales[8 + i % 4] >> (2 * (i / 4))) & 3;
      sc[i] = static_cast<int8_t>((low | (high << 4)) - 32), mn[i] = 0;
    }
  }
  static int value(const Block& b, int e) {
    const int low = (b.qs[32 * (e / 128) + e % 32] >> (2 * (e / 32 % 4))) & 3;
    return low | (((b.hmask[e % 32] >> (e / 32)) & 1) << 2);
  }
  static float dmin(const Block&) { return 0.f; }
};
struct Q4_KT {
  using Block = BlockQ4_K;
  static constexpr int offset = 0;
  static constexpr bool has_min = true;
  static void scales(const Block& b, int8_t* sc, int8_t* mn) { scale_min_k4(b.scales, sc, mn); }
  static int value(const Block& b, int e) { return (b.qs[32 * (e / 64) + e % 32] >> (4 * (e / 32 % 2))) & 15; }
  static float dmin(const Block& b) { return f16(b.dmin); }
};
struct Q5_KT {
  using Block = BlockQ5_K;
  static constexpr int offset = 0;
  static constexpr bool has_min = true;
  static void scales(const Block& b, int8_t* sc, int8_t* mn) { scale_min_k4(b.scales, sc, mn); }
  static int value(const Block& b, int e) {
    const int low = (b.qs[32 * (e / 64) + e % 32] >> (4 * (e / 32 % 2))) & 15;
    return low | (((b.qh[e % 32] >> (e / 32)) & 1) << 4);
  }
  static float dmin(const Block& b) { return f16(b.dmin); }
};
struct Q6_KT {
  using Block = BlockQ6_K;
  static constexpr int offset = 32;
  static constexpr bool has_min = false;
  static void scales(const Block& b, int8_t* sc, int8_t* mn) {
    for (int i = 0; i < 16; ++i) sc[i] = b.scales[i], mn[i] = 0;
  }
  static int value(const Block& b, int e) {
    const int h = e / 128, j = e / 32 % 4, l = e % 32;
    const int low = (b.ql[64 * h + 32 * (j % 2) + l] >> (4 * (j / 2))) & 15;
    return low | (((b.qh[32 * h + l] >> (2 * j)) & 3) << 4);
  }
  static float dmin(const Block&) { return 0.f; }
};

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
inline __m256i bits_at(__m256i v, int shift, int mask) {
  return _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(shift)), _mm256_set1_epi8(static_cast<char>(mask)));
}
inline __m256i load32(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// Values 32c .. 32c + 31 of a block as bytes.
inline __m256i chunk(const BlockQ2_K& b, int c) { return bits_at(load32(b.qs + 32 * (c / 4)), 2 * (c % 4), 3); }
inline __m256i chunk(const BlockQ3_K& b, int c) {
  const __m256i low = bits_at(load32(b.qs + 32 * (c / 4)), 2 * (c % 4), 3);
  return _mm256_or_si256(low, _mm256_slli_epi16(bits_at(load32(b.hmask), c, 1), 2));
}
inline __m256i chunk(const BlockQ4_K& b, int c) { return bits_at(load32(b.qs + 32 * (c / 2)), 4 * (c % 2), 15); }
inline __m256i chunk(const BlockQ5_K& b, int c) {
  const __m256i low = bits_at(load32(b.qs + 32 * (c / 2)), 4 * (c % 2), 15);
  return _mm256_or_si256(low, _mm256_slli_epi16(bits_at(load32(b.qh), c, 1), 4));
}
inline __m256i chunk(const BlockQ6_K& b, int c) {
  const int h = c / 4, j = c % 4;
  const __m256i low = bits_at(load32(b.ql + 64 * h + 32 * (j % 2)), 4 * (j / 2), 15);
  return _mm256_or_si256(low, _mm256_slli_epi16(bits_at(load32(b.qh + 32 * h), 2 * j, 3), 4));
}

// The 16 scales and mins (one per 16 values, natural order) as int8 vectors, from 32-bit words of the packed fields
// (the same numbers as Tn::scales, which the portable path uses).
inline uint32_t word(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
inline void scales_simd(const BlockQ2_K& b, __m128i& sc, __m128i& mn) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b.scales)), low = _mm_set1_epi8(15);
  sc = _mm_and_si128(raw, low);
  mn = _mm_and_si128(_mm_srli_epi16(raw, 4), low);
}
inline void scales_simd(const BlockQ3_K& b, __m128i& sc, __m128i& mn) {
  const uint32_t a = word(b.scales), c = word(b.scales + 4), h = word(b.scales + 8);
  constexpr uint32_t L4 = 0x0f0f0f0f, L2 = 0x03030303;
  const __m128i u = _mm_setr_epi32(static_cast<int>((a & L4) | ((h & L2) << 4)),
                                   static_cast<int>((c & L4) | (((h >> 2) & L2) << 4)),
                                   static_cast<int>(((a >> 4) & L4) | (((h >> 4) & L2) << 4)),
                                   static_cast<int>(((c >> 4) & L4) | (((h >> 6) & L2) << 4)));
  sc = _mm_sub_epi8(u, _mm_set1_epi8(32));
  mn = _mm_setzero_si128();
}
// Q4_K / Q5_K: 8 scales and 8 mins per 32 values, each repeated for both halves.
inline void scales_min_k4_simd(const uint8_t* s, __m128i& sc, __m128i& mn) {
  const uint32_t a = word(s), c = word(s + 4), h = word(s + 8);
  constexpr uint32_t L6 = 0x3f3f3f3f, L4 = 0x0f0f0f0f, L2 = 0x03030303;
  const __m128i u = _mm_setr_epi32(static_cast<int>(a & L6), static_cast<int>((h & L4) | (((a >> 6) & L2) << 4)),
                                   static_cast<int>(c & L6),
                                   static_cast<int>(((h >> 4) & L4) | (((c >> 6) & L2) << 4)));
  sc = _mm_unpacklo_epi8(u, u);
  mn = _mm_unpackhi_epi8(u, u);
}
inline void scales_simd(const BlockQ4_K& b, __m128i& sc, __m128i& mn) { scales_min_k4_simd(b.scales, sc, mn); }
inline void scales_simd(const BlockQ5_K& b, __m128i& sc, __m128i& mn) { scales_min_k4_simd(b.scales, sc, mn); }
inline void scales_simd(const BlockQ6_K& b, __m128i& sc, __m128i& mn) {
  sc = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b.scales));
  mn = _mm_setzero_si128();
}

// acc + a . b per int32 lane (int16 pairs), exact.
inline __m256i madd_add(__m256i acc, __m256i a, __m256i b) {
#if LLME_VNNI == 512
  return _mm256_dpwssd_epi32(acc, a, b);
#elif LLME_VNNI == 256
  return _mm256_dpwssd_avx_epi32(acc, a, b);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}

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
