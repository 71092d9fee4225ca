// GGUF's quantized weight formats on the CPU (llama.cpp's type_traits_cpu, our own code): each type's block exactly
// as the file stores it, the activation blocks it pairs with, and the per-type row kernels of gguf_dot_*.cpp.
//
// A weight row of K values is K / block_elems blocks of block_bytes, back to back (fp16 scales inside the blocks,
// little endian). The activations x fp32 [M, K] are quantized per block of 32 (the 32-element types: Q8_0-like) or
// 256 (the K types: Q8_K-like): xd = max|x| / 127, xq = round-half-even(x * (1 / xd)) in -127..127, with the
// integer sums of every 16 xq and of every block.
//
// The order of the sums, which every path (scalar, AVX2, VNNI) and every tile size keeps, so that an output's bits
// depend only on its own row and K: per block, the integer dot products and scale products are exact int32; the
// float part of block b is one fixed formula (block_value_* below) and lands in lane b % 8 of 8 fp32 accumulators;
// the row's value is lanes_total() of those 8 lanes, then + bias. The float formulas are written out with
// contraction off (no fused multiply-add), in every file that includes this header.
// ISA: AVX2 (+ VNNI's vpdpbusd / vpdpwssd where the build has them) and a scalar fallback. A 512-bit variant of the
// 32-value kernels (two blocks per register) was measured no faster (M = 1 slower, M = 4..16 within 5%), so there
// is none.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "quant_common.h"

namespace llmengine_cpu::gguf {

// gguf's GGMLQuantizationType numbers.
enum Type : int {
  Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14
};

constexpr int64_t QK_K = 256;

// The blocks, field for field as in the file. 32-value blocks: value j's nibble is the low one of qs[j] for j < 16,
// the high one of qs[j - 16] above; Q5's fifth bit is bit j of qh (little endian). w = d (q - 8) for Q4_0,
// d (q - 16) for Q5_0, d q + m for Q4_1 / Q5_1, d q for Q8_0. The K types' layouts: gguf_k_blocks.h.
#pragma pack(push, 1)
struct BlockQ4_0 { uint16_t d; uint8_t qs[16]; };
struct BlockQ4_1 { uint16_t d, m; uint8_t qs[16]; };
struct BlockQ5_0 { uint16_t d; uint8_t qh[4]; uint8_t qs[16]; };
struct BlockQ5_1 { uint16_t d, m; uint8_t qh[4]; uint8_t qs[16]; };
struct BlockQ8_0 { uint16_t d; int8_t qs[32]; };
struct BlockQ2_K { uint8_t scales[16]; uint8_t qs[64]; uint16_t d, dmin; };
struct BlockQ3_K { uint8_t hmask[32]; uint8_t qs[64]; uint8_t scales[12]; uint16_t d; };
struct BlockQ4_K { uint16_t d, dmin; uint8_t scales[12]; uint8_t qs[128]; };
struct BlockQ5_K { uint16_t d, dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; };
struct BlockQ6_K { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; uint16_t d; };
#pragma pack(pop)
static_assert(sizeof(BlockQ4_0) == 18 && sizeof(BlockQ4_1) == 20 && sizeof(BlockQ5_0) == 22);
static_assert(sizeof(BlockQ5_1) == 24 && sizeof(BlockQ8_0) == 34 && sizeof(BlockQ2_K) == 84);
static_assert(sizeof(BlockQ3_K) == 110 && sizeof(BlockQ4_K) == 144 && sizeof(BlockQ5_K) == 176);
static_assert(sizeof(BlockQ6_K) == 210);

// The activations of one call: M rows of nb blocks of `block` int8 each.
struct Activations {
  int64_t block = 0, nb = 0;
  std::vector<int8_t> q;        // [M, nb * block]
  std::vector<float> d;         // [M, nb]: xd
  std::vector<float> s;         // [M, nb]: xd * float(sum of the block's xq)
  std::vector<int32_t> sum;     // [M, nb]: sum of the block's xq
  std::vector<int16_t> sum16;   // [M, nb * block / 16]: sums of every 16 xq
};

// x fp32 [rows, k] (rows contiguous, k a multiple of block) -> acts, one thread per run of rows (gguf_linear.cpp).
void quantize_activations(Activations& acts, const float* x, int64_t rows, int64_t k, int64_t block);

// One weight row (nb blocks at w) against activation rows i0 .. i0 + mt - 1 (mt in 1..4): y[t * ldy] = row . x_i0+t.
using RowTile = void (*)(const uint8_t* w, int64_t nb, const Activations& x, int64_t i0, int mt, float* y,
                         int64_t ldy);

struct TypeTraits {
  int type;
  const char* name;
  int64_t block_elems, block_bytes;
  RowTile fast;      // the best path this build has (AVX2 / VNNI where compiled in, else == portable)
  RowTile portable;  // plain C++ loops: what a CPU without AVX2 runs; the same bits as `fast`
};

// The table, or nullptr for a type we do not multiply.
const TypeTraits* type_traits(int type);
const TypeTraits* legacy_traits(int type);  // gguf_dot_legacy.cpp: the 32-element types
const TypeTraits* k_traits(int type);       // gguf_dot_k.cpp: the 256-element types

// ---- The float part, shared by every path (see the top). ----

// 32-element block: (dw * xd) * isum, + m * xs for the types with a min.
inline float block_value_32(float dw, float xd, int32_t isum) { return (dw * xd) * static_cast<float>(isum); }
inline float block_value_32(float dw, float xd, int32_t isum, float m, float xs) {
  return (dw * xd) * static_cast<float>(isum) + m * xs;
}
// 256-element block: (d * xd) * isum - (dmin * xd) * imin.
inline float block_value_256(float d, float dmin, float xd, int32_t isum, int32_t imin) {
  return (d * xd) * static_cast<float>(isum) - (dmin * xd) * static_cast<float>(imin);
}

// The 8 lanes' total: ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)), as an AVX2 horizontal sum adds them.
inline float lanes_total(const float* l) {
  const float a0 = l[0] + l[4], a1 = l[1] + l[5], a2 = l[2] + l[6], a3 = l[3] + l[7];
  return (a0 + a2) + (a1 + a3);
}

inline float f16(uint16_t h) { return half_to_float(h); }

#ifndef LLME_GGUF_PREFETCH
#define LLME_GGUF_PREFETCH 2048
#endif
// Ask for the weight bytes [p + PREFETCH, p + PREFETCH + n) ahead of their use: the rows of one task lie back to back,
// and a row's dot product is too short for the hardware's stream prefetch alone to reach the memory's bandwidth.
inline void prefetch_ahead(const void* p, int64_t n) {
#ifdef LLME_AVX2
  const char* c = static_cast<const char*>(p) + LLME_GGUF_PREFETCH;
  for (int64_t o = 0; o < n; o += 64) _mm_prefetch(c + o, _MM_HINT_T0);
#else
  (void)p, (void)n;
#endif
}

}  // namespace llmengine_cpu::gguf
