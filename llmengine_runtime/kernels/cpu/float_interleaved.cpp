#pragma GCC optimize("fp-contract=off")  // the float sums exactly as written: the vector and scalar paths agree
// The product of float weights (fp32, fp16 or bf16) with eight rows interleaved: the int kernels' micro-kernel
// (q8_interleaved.cpp) for an unquantized checkpoint, so that `--dtype bfloat16` runs the C++ step too.
//
// Layout (models/float_linear.py `interleave_float`): w [N / 8, K4 / 4, 32] with [g, c, 4j + i] = W[8g + j, 4c + i]
// (K4 = K rounded up to 4, zeros past K): chunk c of group g is its 8 rows' 4 weights 4c..4c+3.
// x fp32 [M, K]: for fp32 and fp16 weights as it is; for bf16 weights rounded to bf16 (nearest even).
// Sums, per output row j of a group (fixed, so every instruction set gives the same bits):
//   fp32 / fp16 weights: four lanes i = 0..3, lane i = fma(w[4c + i], x[4c + i], lane i) over c in order;
//       y = (lane 0 + lane 1) + (lane 2 + lane 3).
//   bf16 weights: four lanes (p, e), p = 0, 1 and e = c mod 2 (even and odd chunks: two independent chains), as
//       vdpbf16ps does per chunk: lane (p, e) = fma(w[4c + 2p + 1], x[4c + 2p + 1], lane), then fma(w[4c + 2p],
//       x[4c + 2p], lane) (bf16 products are exact in fp32); y = (lane (0,0) + lane (0,1)) + (lane (1,0) + lane (1,1)).
//   Then y + bias. AVX-512 BF16 runs the bf16 chunks as one vdpbf16ps of 16 lanes (8 rows x 2 pairs) against the 4
//   activations broadcast; AVX2 widens the halves and runs the same fmas; fp32/fp16 weights are four FMAs of 8 lanes
//   (2 rows x 4 weights) a chunk. A row's numbers depend neither on M, the tile, the thread nor the rows beside it.
// Grid: `float_rows` computes the groups covering output rows n0..n1 for tiles of up to 4 activation rows on the
// calling thread (interleaved_rows.h); the op splits the groups with at::parallel_for.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "float_rows.h"
#include "interleaved_rows.h"
#include "quant_common.h"

namespace llmengine_cpu {

namespace {

constexpr int64_t GROUP = 8, CHUNK = 32;  // rows per group, weights per chunk (8 rows x 4)

inline float bf16_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// lanes[t][32]: row j's four partial sums at 4j..4j + 3, folded into y as (l0 + l1) + (l2 + l3).
template <int MT>
void fold(const float (&lanes)[MT][CHUNK], int j0, int j1, float* y, int64_t ldy) {
  for (int t = 0; t < MT; ++t)
    for (int j = j0; j < j1; ++j) {
      const float* l = lanes[t] + 4 * j;
      y[t * ldy + j - j0] = (l[0] + l[1]) + (l[2] + l[3]);
    }
}

// fp32 or fp16 weights (F16: w holds fp16 bits).
template <int MT, bool F16>
void wide_tile(const void* w, int64_t chunks, const float* x, int64_t K4, int j0, int j1, float* y, int64_t ldy) {
  float lanes[MT][CHUNK];
#ifdef LLME_AVX2
  for (int h = 0; h < 4; ++h) {  // rows 2h, 2h + 1: one register of 8 lanes
    __m256 acc[MT];
    for (int t = 0; t < MT; ++t) acc[t] = _mm256_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      __builtin_prefetch(static_cast<const char*>(w) + ((chunks + c) * CHUNK + 8 * h) * (F16 ? 2 : 4));
      __m256 wv;
      if constexpr (F16)
        wv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(
            static_cast<const uint16_t*>(w) + c * CHUNK + 8 * h)));
      else
        wv = _mm256_loadu_ps(static_cast<const float*>(w) + c * CHUNK + 8 * h);
      for (int t = 0; t < MT; ++t)
        acc[t] = _mm256_fmadd_ps(wv, _mm256_broadcast_ps(reinterpret_cast<const __m128*>(x + t * K4 + 4 * c)), acc[t]);
    }
    for (int t = 0; t < MT; ++t) _mm256_storeu_ps(lanes[t] + 8 * h, acc[t]);
  }
#else
  for (int t = 0; t < MT; ++t) std::fill(lanes[t], lanes[t] + CHUNK, 0.f);
  for (int64_t c = 0; c < chunks; ++c)
    for (int t = 0; t < MT; ++t)
      for (int l = 0; l < CHUNK; ++l) {
        const float wl = F16 ? half_to_float(static_cast<const uint16_t*>(w)[c * CHUNK + l])
                             : static_cast<const float*>(w)[c * CHUNK + l];
        lanes[t][l] = std::fma(wl, x[t * K4 + 4 * c + l % 4], lanes[t][l]);
      }
#endif
  fold<MT>(lanes, j0, j1, y, ldy);
}

template <int MT>
void bf16_tile(const uint16_t* w, int64_t chunks, const uint16_t* x, int64_t K4, int j0, int j1, float* y,
               int64_t ldy) {
  float lanes[MT][CHUNK];  // row j's lane (pair p, chunk parity e) at 4j + 2p + e
#if defined(__AVX512BF16__) && defined(__AVX512F__)
  __m512 acc[2][MT];  // even and odd chunks: two independent chains a row
  for (int t = 0; t < MT; ++t) acc[0][t] = acc[1][t] = _mm512_setzero_ps();
  auto chunk = [&](int64_t c, __m512(&a)[MT]) __attribute__((always_inline)) {
    __builtin_prefetch(w + (chunks + c) * CHUNK);  // the next group's chunk: a step's weights arrive cold
    const __m512i wv = _mm512_loadu_si512(w + c * CHUNK);
    for (int t = 0; t < MT; ++t) {
      // the 4 activations broadcast straight from memory (vbroadcastsd: a load, no shuffle port)
      const __m512 x4 = _mm512_castpd_ps(_mm512_broadcastsd_pd(_mm_load_sd(reinterpret_cast<const double*>(
          x + t * K4 + 4 * c))));
      a[t] = _mm512_dpbf16_ps(a[t], (__m512bh)wv, (__m512bh)x4);
    }
  };
  int64_t c = 0;
  for (; c + 1 < chunks; c += 2) chunk(c, acc[0]), chunk(c + 1, acc[1]);
  if (c < chunks) chunk(c, acc[0]);
  // lane 2j + p of a register is row j's pair p
  for (int e = 0; e < 2; ++e)
    for (int t = 0; t < MT; ++t) {
      float packed[16];
      _mm512_storeu_ps(packed, acc[e][t]);
      for (int j = 0; j < GROUP; ++j) lanes[t][4 * j + e] = packed[2 * j], lanes[t][4 * j + 2 + e] = packed[2 * j + 1];
    }
#elif defined(LLME_AVX2)
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int h = 0; h < 2; ++h) {  // rows 4h .. 4h + 3: lane 2j' + p is row 4h + j''s pair p
    __m256 acc[2][MT];
    for (int t = 0; t < MT; ++t) acc[0][t] = acc[1][t] = _mm256_setzero_ps();
    auto chunk = [&](int64_t c, __m256(&a)[MT]) __attribute__((always_inline)) {
      __builtin_prefetch(w + (chunks + c) * CHUNK + 16 * h);
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + c * CHUNK + 16 * h));
      const __m256 w_odd = _mm256_castsi256_ps(_mm256_and_si256(wv, high));
      const __m256 w_even = _mm256_castsi256_ps(_mm256_slli_epi32(wv, 16));
      for (int t = 0; t < MT; ++t) {
        int64_t x4;
        std::memcpy(&x4, x + t * K4 + 4 * c, 8);
        const __m256i xv = _mm256_set1_epi64x(x4);
        a[t] = _mm256_fmadd_ps(w_odd, _mm256_castsi256_ps(_mm256_and_si256(xv, high)), a[t]);
        a[t] = _mm256_fmadd_ps(w_even, _mm256_castsi256_ps(_mm256_slli_epi32(xv, 16)), a[t]);
      }
    };
    int64_t c = 0;
    for (; c + 1 < chunks; c += 2) chunk(c, acc[0]), chunk(c + 1, acc[1]);
    if (c < chunks) chunk(c, acc[0]);
    for (int e = 0; e < 2; ++e)
      for (int t = 0; t < MT; ++t) {
        float packed[8];
        _mm256_storeu_ps(packed, acc[e][t]);
        for (int j = 0; j < 4; ++j)
          lanes[t][16 * h + 4 * j + e] = packed[2 * j], lanes[t][16 * h + 4 * j + 2 + e] = packed[2 * j + 1];
      }
  }
#else
  for (int t = 0; t < MT; ++t) std::fill(lanes[t], lanes[t] + CHUNK, 0.f);
  for (int64_t c = 0; c < chunks; ++c)
    for (int t = 0; t < MT; ++t)
      for (int j = 0; j < GROUP; ++j)
        for (int p = 0; p < 2; ++p) {
          const uint16_t* wp = w + c * CHUNK + 4 * j + 2 * p;
          const uint16_t* xp = x + t * K4 + 4 * c + 2 * p;
          float& lane = lanes[t][4 * j + 2 * p + (c & 1)];
          lane = std::fma(bf16_to_float(wp[1]), bf16_to_float(xp[1]), lane);
          lane = std::fma(bf16_to_float(wp[0]), bf16_to_float(xp[0]), lane);
        }
#endif
  fold<MT>(lanes, j0, j1, y, ldy);
}

template <int MT>
void group_tile(const FloatActivations& x, const FloatWeight& w, int64_t g, int64_t i, int j0, int j1, float* y,
                int64_t ldy) {
  const int64_t chunks = w.K4 / 4, K4 = w.K4;
  switch (w.type) {
    case FloatType::F32:
      return wide_tile<MT, false>(static_cast<const float*>(w.data) + g * chunks * CHUNK, chunks,
                                  x.f.data() + i * K4, K4, j0, j1, y, ldy);
    case FloatType::F16:
      return wide_tile<MT, true>(static_cast<const uint16_t*>(w.data) + g * chunks * CHUNK, chunks,
                                 x.f.data() + i * K4, K4, j0, j1, y, ldy);
    default:
      return bf16_tile<MT>(static_cast<const uint16_t*>(w.data) + g * chunks * CHUNK, chunks, x.b.data() + i * K4,
                           K4, j0, j1, y, ldy);
  }
}

FloatType float_type(const at::Tensor& w) {
  switch (w.scalar_type()) {
    case at::kFloat: return FloatType::F32;
    case at::kHalf: return FloatType::F16;
    case at::kBFloat16: return FloatType::BF16;
    default: return FloatType::NONE;
  }
}

}  // namespace

void prepare_float_rows(FloatActivations& out, const float* x, int64_t rows, int64_t k, int64_t K4, FloatType type) {
  out.K4 = K4;
  if (type == FloatType::BF16) {
    out.b.assign(rows * K4, 0);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < k; ++i) out.b[r * K4 + i] = c10::BFloat16(x[r * k + i]).x;
    return;
  }
  out.f.assign(rows * K4, 0.f);
  for (int64_t r = 0; r < rows; ++r) std::copy(x + r * k, x + (r + 1) * k, out.f.data() + r * K4);
}

void float_rows(const FloatActivations& x, const FloatWeight& w, int64_t M, int64_t n0, int64_t n1, float* y,
                int64_t ldy) {
  if (w.tiles) {  // bf16 weights laid out for AMX tiles (bf16_amx.cpp)
    bf16_tile_rows(x, w, M, n0, n1, y, ldy);
    return add_bias(w.bias, 0, M, n0, n1, y, ldy);
  }
  interleaved_rows(0, M, n0, n1, w.bias, y, ldy, [&](int64_t g, int mt, int64_t i, int j0, int j1, float* yt) {
    with_tile_rows<4>(mt, [&](auto rows) { group_tile<rows>(x, w, g, i, j0, j1, yt, ldy); });
  });
}

FloatWeight float_weight(const at::Tensor& w, const float* bias) {
  const FloatType type = float_type(w);
  if (type == FloatType::BF16 && w.dim() == 3 && w.size(2) == 512 && w.is_contiguous())  // AMX tiles
    return {type, w.data_ptr(), w.size(1) * 32, bias, w.size(0) * 16, true};
  TORCH_CHECK(type != FloatType::NONE && w.dim() == 3 && w.size(2) == CHUNK && w.is_contiguous(),
              "float weights must be contiguous fp32, fp16 or bf16 [N / 8, K4 / 4, 32], or bf16 [N / 16, K32 / 32, 512] "
              "(models/float_linear.py), got ", w.scalar_type(), " ", w.sizes());
  return {type, w.data_ptr(), w.size(1) * 4, bias, w.size(0) * GROUP, false};
}

at::Tensor float_linear(const at::Tensor& x_in, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x_in.dim() == 2, "float_linear: x must be [M, K]");
  at::Tensor bc;
  FloatWeight fw = float_weight(w, nullptr);
  const int64_t N = fw.N;
  if (bias.has_value()) {
    bc = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(bc.numel() == N, "float_linear: bias must be [N=", N, "]");
    fw.bias = bc.data_ptr<float>();
  }
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K <= fw.K4 && K > fw.K4 - (fw.tiles ? 32 : 4), "float_linear: x has K=", K, " but the weight has ",
              fw.K4, " columns");
  auto y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  FloatActivations xa;
  prepare_float_rows(xa, x.data_ptr<float>(), M, K, fw.K4, fw.type);
  float* yp = y.data_ptr<float>();
  const int64_t cols = fw.tiles ? 16 : GROUP;  // whole tiles to each thread
  at::parallel_for(0, N / cols, 4, [&](int64_t begin, int64_t end) {
    float_rows(xa, fw, M, begin * cols, end * cols, yp + begin * cols, N);
  });
  return y;
}

}  // namespace llmengine_cpu

TORCH_LIBRARY_FRAGMENT(llmengine_cpu, lib) {
  lib.def("float_linear(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  lib.def("amx_bf16_tiles() -> bool");
}

TORCH_LIBRARY_IMPL(llmengine_cpu, CPU, lib) { lib.impl("float_linear", &llmengine_cpu::float_linear); }

TORCH_LIBRARY_IMPL(llmengine_cpu, CatchAll, lib) { lib.impl("amx_bf16_tiles", &llmengine_cpu::amx_bf16_tiles); }
