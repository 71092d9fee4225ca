// What the quantized-product files share: AVX2 detection, fp16 -> fp32, and the activations quantized per block.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LLME_AVX2 1
// VNNI's vpdpbusd does AVX2's maddubs + madd (u8 x s8, four products summed into each int32 lane) in one
// instruction: AVX-512 VNNI on 256-bit registers (with VL), or AVX-VNNI. The sums are exact either way.
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define LLME_VNNI 512
#elif defined(__AVXVNNI__)
#define LLME_VNNI 256
#endif
#endif

namespace llmengine_cpu {

constexpr int64_t QK = 32;  // values per quantization block

#ifdef LLME_AVX2
// acc + (u8 w . s8 x per int32 lane j: bytes 4j..4j+3). Exact: maddubs' pair sums stay within int16 for our
// operands (|w| <= 128 after the sign trick, |x| <= 127), so both forms give the same lanes, bit for bit.
inline __m256i dot_u8_s8_add(__m256i acc, __m256i w, __m256i x) {
#if LLME_VNNI == 512
  return _mm256_dpbusd_epi32(acc, w, x);
#elif LLME_VNNI == 256
  return _mm256_dpbusd_avx_epi32(acc, w, x);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
#endif
}

// acc + a . b per int32 lane (int16 pairs, two products summed per lane), exact: VNNI's vpdpwssd or AVX2's madd.
inline __m256i madd_add(__m256i acc, __m256i a, __m256i b) {
#if LLME_VNNI == 512
  return _mm256_dpwssd_epi32(acc, a, b);
#elif LLME_VNNI == 256
  return _mm256_dpwssd_avx_epi32(acc, a, b);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}
#endif

inline float half_to_float(uint16_t h) {
#ifdef LLME_AVX2
  return _cvtsh_ss(h);
#else
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
#endif
}

// x fp32 [rows, K] quantized per block of 32 (quantize_x.cpp): q int8 [rows, nb * 32] (zeros past K), d = max|x| /
// 127 and s = d * sum(q), fp32 [rows, nb].
struct QuantizedRows {
  std::vector<int8_t> q;
  std::vector<float> d, s;
  int64_t nb;
};

QuantizedRows quantize_rows(const at::Tensor& x, int64_t nb, bool paired);
// The same into `out` (its buffers reused when large enough), one thread: x fp32 [rows, k] with rows contiguous.
void quantize_rows_into(QuantizedRows& out, const float* x, int64_t rows, int64_t k, int64_t nb, bool paired);
// Rows [r0, r1) of x into `out`, sized already for them: one thread's share of rows quantized for the whole team.
void quantize_rows_range(QuantizedRows& out, const float* x, int64_t r0, int64_t r1, int64_t k, int64_t nb,
                         bool paired);

// One quantized weight (quant_gemm.cpp's layout): m null for int8, bias null when none.
struct QuantWeight {
  const uint8_t* qs;
  const uint16_t* d;
  const uint16_t* m;
  const float* bias;
  int64_t nb, row_bytes;
  bool interleaved = false;  // eight rows interleaved (q4_interleaved.cpp's, q8_interleaved.cpp's): x not `paired`
};

// y[i, n - n0] = x_i . w_n (+ bias[n]) for the M rows of xr and the weight rows n0 <= n < n1, on the calling
// thread; y points at column n0 of an output with row stride ldy.
void quant_rows(const QuantizedRows& xr, const QuantWeight& w, int64_t M, int64_t n0, int64_t n1, float* y,
                int64_t ldy);
// Whether the q4 product wants its activations `paired` (quantize_x.cpp).
bool q4_pairs_blocks();
// quant_rows for an interleaved q4 weight (q4_interleaved.cpp) and q8 weight (q8_interleaved.cpp).
void q4x8_rows(const QuantizedRows& xr, const QuantWeight& w, int64_t M, int64_t n0, int64_t n1, float* y,
               int64_t ldy);
void q8x8_rows(const QuantizedRows& xr, const QuantWeight& w, int64_t M, int64_t n0, int64_t n1, float* y,
               int64_t ldy);

// The block of an interleaved product that AMX tiles computed (amx_interleaved.cpp): activation rows [0, rows),
// output columns [n0, n1), without the bias; rows = 0 when none.
struct AmxSpan {
  int64_t rows, n0, n1;
};
// q4x8_rows / q8x8_rows on AMX int8 tiles for the whole tiles of 16 activation rows by 16 output columns inside
// the M x [n0, n1) output, where the CPU has them and they are on (`amx_enabled`); the rest is the caller's.
AmxSpan q4x8_amx(const QuantizedRows& xr, const QuantWeight& w, int64_t M, int64_t n0, int64_t n1, float* y,
                 int64_t ldy);
AmxSpan q8x8_amx(const QuantizedRows& xr, const QuantWeight& w, int64_t M, int64_t n0, int64_t n1, float* y,
                 int64_t ldy);
#ifdef __AMX_TILE__
// What _tile_loadconfig reads (palette 1): each tile register's rows and bytes a row (amx_interleaved.cpp,
// bf16_amx.cpp).
struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
#endif

// Whether the products use AMX: built with it, granted by the kernel, and not turned off (LLMENGINE_AMX=0).
bool amx_enabled();
// Whether the CPU grants the tiles to this process, whatever LLMENGINE_AMX or set_amx say.
bool amx_available();

}  // namespace llmengine_cpu
