#pragma once
// The K types' blocks read as integers (gguf_dot_k.cpp's products): per type, the portable reading (Tn::value,
// Tn::scales, from the layouts below) and the AVX2 one (chunk, scales_simd), which the tests hold to the same numbers.
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
#include "gguf_blocks.h"

namespace llmengine_cpu::gguf {

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
#endif

}  // namespace llmengine_cpu::gguf
