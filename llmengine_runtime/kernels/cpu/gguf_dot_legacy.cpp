#pragma GCC optimize("fp-contract=off")  // the float sums as written (gguf_blocks.h): same bits on every path
// GGUF's 32-element types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) times Q8_0-like activations: one weight row against up to 4
// activation rows (a tile), on the calling thread.
//
// Per block b and activation row i: isum = sum_j q_j xq_j - offset * sum(xq) (exact int32; q the block's unsigned
// 4/5-bit values with offset 8/16, or Q8_0's signed bytes with offset 0), then block_value_32 (with the min for
// Q4_1/Q5_1) into lane b % 8. Weight blocks are read once per tile, whatever its number of rows.
// AVX2: a block's 32 values are one 256-bit vector (u8; Q8_0 through the sign trick), dot_u8_s8_add (VNNI's vpdpbusd
// where present) gives 8 int32 partials per block and row, and horizontal adds turn 8 blocks' partials into one
// vector of their 8 exact sums, whose float part is 8 lanes at once. The last nb % 8 blocks take the scalar code,
// which computes the same integers.
#include "gguf_blocks.h"

namespace llmengine_cpu::gguf {
namespace {

struct Q4_0T {
  using Block = BlockQ4_0;
  static constexpr int offset = 8;
  static constexpr bool has_min = false, is_signed = false, five_bits = false;
  static int value(const Block& b, int j) { return j < 16 ? b.qs[j] & 15 : b.qs[j - 16] >> 4; }
};
struct Q4_1T {
  using Block = BlockQ4_1;
  static constexpr int offset = 0;
  static constexpr bool has_min = true, is_signed = false, five_bits = false;
  static int value(const Block& b, int j) { return j < 16 ? b.qs[j] & 15 : b.qs[j - 16] >> 4; }
};
inline uint32_t high_bits(const uint8_t* qh) {
  uint32_t h;
  std::memcpy(&h, qh, 4);
  return h;
}
struct Q5_0T {
  using Block = BlockQ5_0;
  static constexpr int offset = 16;
  static constexpr bool has_min = false, is_signed = false, five_bits = true;
  static int value(const Block& b, int j) {
    return (j < 16 ? b.qs[j] & 15 : b.qs[j - 16] >> 4) | (((high_bits(b.qh) >> j) & 1) << 4);
  }
};
struct Q5_1T {
  using Block = BlockQ5_1;
  static constexpr int offset = 0;
  static constexpr bool has_min = true, is_signed = false, five_bits = true;
  static int value(const Block& b, int j) {
    return (j < 16 ? b.qs[j] & 15 : b.qs[j - 16] >> 4) | (((high_bits(b.qh) >> j) & 1) << 4);
  }
};
struct Q8_0T {
  using Block = BlockQ8_0;
  static constexpr int offset = 0;
  static constexpr bool has_min = false, is_signed = true, five_bits = false;
  static int value(const Block& b, int j) { return b.qs[j]; }
};

template <class T>
inline float block_value(const typename T::Block& blk, const Activations& x, int64_t r) {
  const int8_t* xq = x.q.data() + r * 32;
  int32_t isum = 0;
  for (int j = 0; j < 32; ++j) isum += T::value(blk, j) * xq[j];
  isum -= T::offset * x.sum[r];
  if constexpr (T::has_min) return block_value_32(f16(blk.d), x.d[r], isum, f16(blk.m), x.s[r]);
  else return block_value_32(f16(blk.d), x.d[r], isum);
}

// Blocks b0 .. nb - 1 of one row against activation row i, into lanes[b % 8].
template <class T>
inline void blocks_portable(const typename T::Block* w, int64_t b0, int64_t nb, const Activations& x, int64_t i,
                            float* lanes) {
  for (int64_t b = b0; b < nb; ++b) lanes[b % 8] += block_value<T>(w[b], x, i * nb + b);
}

template <class T>
void tile_portable(const uint8_t* w, int64_t nb, const Activations& x, int64_t i0, int mt, float* y, int64_t ldy) {
  for (int t = 0; t < mt; ++t) {
    float lanes[8] = {};
    blocks_portable<T>(reinterpret_cast<const typename T::Block*>(w), 0, nb, x, i0 + t, lanes);
    y[t * ldy] = lanes_total(lanes);
  }
}

#ifdef LLME_AVX2
// The block's 32 values as bytes, in element order.
template <class T>
inline __m256i load_values(const typename T::Block& b) {
  if constexpr (T::is_signed) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.qs));
  } else {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b.qs));
    __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0F));
    if constexpr (T::five_bits) {  // bit j of qh -> 0x10 in byte j
      const __m256i spread = _mm256_shuffle_epi8(
          _mm256_set1_epi32(static_cast<int>(high_bits(b.qh))),
          _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303));
      const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));
      const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
      q = _mm256_or_si256(q, _mm256_and_si256(set, _mm256_set1_epi8(0x10)));
    }
    return q;
  }
}

// 8 int32 partial sums of w . x (w as load_values gives it; for Q8_0 already |w|, with x taking w's sign).
template <class T>
inline __m256i partial_dot(__m256i w, __m256i w_sign, const int8_t* xq) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
  if constexpr (T::is_signed) return dot_u8_s8_add(_mm256_setzero_si256(), w, _mm256_sign_epi8(x, w_sign));
  else return dot_u8_s8_add(_mm256_setzero_si256(), w, x);
}

template <class T, int MT>
void tile_avx2(const uint8_t* wp, int64_t nb, const Activations& x, int64_t i0, int, float* y, int64_t ldy) {
  using Block = typename T::Block;
  const Block* w = reinterpret_cast<const Block*>(wp);
  __m256 acc[MT];
  for (int t = 0; t < MT; ++t) acc[t] = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 8 <= nb; b += 8) {
    prefetch_ahead(&w[b], 8 * sizeof(Block));
    __m128i sums[MT][2];
    for (int h = 0; h < 2; ++h) {  // blocks b + 4h .. b + 4h + 3
      __m256i pairs[MT][2];
      for (int p = 0; p < 2; ++p) {
        const int64_t b0 = b + 4 * h + 2 * p;
        __m256i w0 = load_values<T>(w[b0]), w1 = load_values<T>(w[b0 + 1]);
        const __m256i s0 = w0, s1 = w1;
        if constexpr (T::is_signed) w0 = _mm256_sign_epi8(w0, w0), w1 = _mm256_sign_epi8(w1, w1);
        for (int t = 0; t < MT; ++t) {
          const int8_t* xq = x.q.data() + ((i0 + t) * nb + b0) * 32;
          pairs[t][p] = _mm256_hadd_epi32(partial_dot<T>(w0, s0, xq), partial_dot<T>(w1, s1, xq + 32));
        }
      }
      for (int t = 0; t < MT; ++t) {
        const __m256i quad = _mm256_hadd_epi32(pairs[t][0], pairs[t][1]);
        sums[t][h] = _mm_add_epi32(_mm256_castsi256_si128(quad), _mm256_extracti128_si256(quad, 1));
      }
    }
    const __m256 dw = _mm256_cvtph_ps(_mm_setr_epi16(w[b].d, w[b + 1].d, w[b + 2].d, w[b + 3].d, w[b + 4].d,
                                                     w[b + 5].d, w[b + 6].d, w[b + 7].d));
    __m256 mw = _mm256_setzero_ps();
    if constexpr (T::has_min)
      mw = _mm256_cvtph_ps(_mm_setr_epi16(w[b].m, w[b + 1].m, w[b + 2].m, w[b + 3].m, w[b + 4].m, w[b + 5].m,
                                          w[b + 6].m, w[b + 7].m));
    for (int t = 0; t < MT; ++t) {
      const int64_t r = (i0 + t) * nb + b;
      __m256i isum = _mm256_set_m128i(sums[t][1], sums[t][0]);
      if constexpr (T::offset != 0) {
        const __m256i xs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.sum.data() + r));
        isum = _mm256_sub_epi32(isum, _mm256_mullo_epi32(xs, _mm256_set1_epi32(T::offset)));
      }
      __m256 value = _mm256_mul_ps(_mm256_mul_ps(dw, _mm256_loadu_ps(x.d.data() + r)), _mm256_cvtepi32_ps(isum));
      if constexpr (T::has_min) value = _mm256_add_ps(value, _mm256_mul_ps(mw, _mm256_loadu_ps(x.s.data() + r)));
      acc[t] = _mm256_add_ps(acc[t], value);
    }
  }
  for (int t = 0; t < MT; ++t) {
    float lanes[8];
    _mm256_storeu_ps(lanes, acc[t]);
    blocks_portable<T>(w, b, nb, x, i0 + t, lanes);
    y[t * ldy] = lanes_total(lanes);
  }
}

template <class T>
void tile_fast(const uint8_t* w, int64_t nb, const Activations& x, int64_t i0, int mt, float* y, int64_t ldy) {
  switch (mt) {
    case 4: return tile_avx2<T, 4>(w, nb, x, i0, mt, y, ldy);
    case 3: return tile_avx2<T, 3>(w, nb, x, i0, mt, y, ldy);
    case 2: return tile_avx2<T, 2>(w, nb, x, i0, mt, y, ldy);
    default: return tile_avx2<T, 1>(w, nb, x, i0, mt, y, ldy);
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
  return {type, name, 32, sizeof(typename T::Block), &tile_fast<T>, &tile_portable<T>};
}

const TypeTraits TABLE[] = {traits<Q4_0T>(Q4_0, "Q4_0"), traits<Q4_1T>(Q4_1, "Q4_1"), traits<Q5_0T>(Q5_0, "Q5_0"),
                            traits<Q5_1T>(Q5_1, "Q5_1"), traits<Q8_0T>(Q8_0, "Q8_0")};

}  // namespace

const TypeTraits* legacy_traits(int type) {
  for (const TypeTraits& t : TABLE)
    if (t.type == type) return &t;
  return nullptr;
}

}  // namespace llmengine_cpu::gguf
