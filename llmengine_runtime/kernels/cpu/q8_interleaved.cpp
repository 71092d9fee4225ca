#pragma GCC optimize("fp-contract=off")  // the float sums exactly as written: the vector and scalar paths agree
// The q8 product with eight weight rows interleaved, one int32 lane per output row: q4_interleaved.cpp's GEMM
// micro-kernel for int8 weights (the default model's head, and --quantize int8).
//
// Layout (models/row_interleave.py `interleave8_q8`, N a multiple of 8):
//   qs int8 [N / 8, nb, 256]: for group g and block b, eight chunks c = 0..7 of 32 bytes, chunk c holding for each
//       row j = 0..7 of the group (4 bytes at 4j) the row's weights 4c..4c+3 of the block;
//   d fp16 [N / 8, nb, 8]: row j's scale for block b at [g, b, j]; w = q * d.
// x fp32 [M, K]: quantized per block of 32 as quantize_x.cpp does (in order): xq, xd.
// y[i, 8g + j] = sum over b, in order, of fma(isum, d * xd, acc), isum the exact int32 q . xq of the block: one
// chunk is one vpdpbusd of |w| (u8) against xq[4c..4c+3] broadcast to every lane and given w's sign (the sign
// trick: pair sums stay within 2 * 128 * 127, so AVX2's maddubs is exact too). A row's numbers depend neither on
// M, the tile, the thread nor on the other rows beside it.
// Grid: `q8x8_rows` computes the groups covering output rows n0..n1 (writing only those) for tiles of up to
// INT_MAX_TILE activation rows (8 with AVX-512, else 4), on the calling thread (interleaved_rows.h), after AMX tiles
// took what they take (amx_interleaved.cpp); the op splits the groups with at::parallel_for.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu_kernels.h"
#include "interleaved_rows.h"
#include "quant_common.h"

namespace llmengine_cpu {

namespace {

constexpr int64_t GROUP = 8, GROUP_BYTES = 256;

template <int MT>
void group_tile(const int8_t* wq, const uint16_t* wd, int64_t nb, const QuantizedRows& xr, int64_t i0, int j0,
                int j1, float* y, int64_t ldy) {
  float lanes[MT][GROUP];
#ifdef LLME_AVX2
  __m256 acc[MT];
  for (int t = 0; t < MT; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const int8_t* wb = wq + b * GROUP_BYTES;
    for (int line = 0; line < GROUP_BYTES; line += 64) __builtin_prefetch(wb + nb * GROUP_BYTES + line);  // the next group's
                                                            // block: a step's weights arrive cold
    __m256i isum[MT];
    for (int t = 0; t < MT; ++t) isum[t] = _mm256_setzero_si256();
    for (int c = 0; c < 8; ++c) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 32 * c));
      const __m256i w_abs = _mm256_sign_epi8(w, w);
      for (int t = 0; t < MT; ++t) {
        int32_t x4;
        std::memcpy(&x4, xr.q.data() + ((i0 + t) * nb + b) * QK + 4 * c, 4);
        isum[t] = dot_u8_s8_add(isum[t], w_abs, _mm256_sign_epi8(_mm256_set1_epi32(x4), w));
      }
    }
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wd + b * GROUP)));
    for (int t = 0; t < MT; ++t) {
      const int64_t r = (i0 + t) * nb + b;
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t]), _mm256_mul_ps(dw, _mm256_set1_ps(xr.d[r])), acc[t]);
    }
  }
  for (int t = 0; t < MT; ++t) _mm256_storeu_ps(lanes[t], acc[t]);
#else
  for (int t = 0; t < MT; ++t) std::fill(lanes[t], lanes[t] + GROUP, 0.f);
  for (int64_t b = 0; b < nb; ++b) {
    const int8_t* wb = wq + b * GROUP_BYTES;
    for (int t = 0; t < MT; ++t) {
      const int64_t r = (i0 + t) * nb + b;
      const int8_t* x = xr.q.data() + r * QK;
      for (int j = 0; j < GROUP; ++j) {
        int32_t isum = 0;
        for (int c = 0; c < 8; ++c)
          for (int i = 0; i < 4; ++i) isum += wb[32 * c + 4 * j + i] * x[4 * c + i];
        lanes[t][j] = std::fma(static_cast<float>(isum), half_to_float(wd[b * GROUP + j]) * xr.d[r], lanes[t][j]);
      }
    }
  }
#endif
  for (int t = 0; t < MT; ++t)
    for (int j = j0; j < j1; ++j) y[t * ldy + j - j0] = lanes[t][j];
}

}  // namespace

void q8x8_rows(const QuantizedRows& xr, const QuantWeight& w, int64_t M, int64_t n0, int64_t n1, float* y,
               int64_t ldy) {
  const int64_t nb = w.nb;
  const AmxSpan done = q8x8_amx(xr, w, M, n0, n1, y, ldy);
  const auto tile = [&](int64_t g, int mt, int64_t i, int j0, int j1, float* yt) {
    const int8_t* wq = reinterpret_cast<const int8_t*>(w.qs) + g * nb * GROUP_BYTES;
    const uint16_t* wd = w.d + g * nb * GROUP;
    with_tile_rows<INT_MAX_TILE>(mt, [&](auto rows) { group_tile<rows>(wq, wd, nb, xr, i, j0, j1, yt, ldy); });
  };
  interleaved_rest<INT_MAX_TILE>(done, M, n0, n1, w.bias, y, ldy, tile);
}

at::Tensor q8x8_linear(const at::Tensor& x_in, const at::Tensor& qs, const at::Tensor& d,
                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x_in.dim() == 2, "q8x8_linear: x must be [M, K]");
  TORCH_CHECK(qs.dim() == 3 && qs.size(2) == GROUP_BYTES && qs.scalar_type() == at::kChar,
              "q8x8_linear: qs must be int8 [N / 8, nb, 256], got ", qs.scalar_type(), " ", qs.sizes());
  const int64_t G = qs.size(0), nb = qs.size(1), N = G * GROUP, K = x_in.size(1);
  TORCH_CHECK(d.scalar_type() == at::kHalf && d.sizes() == at::IntArrayRef({G, nb, GROUP}),
              "q8x8_linear: d must be fp16 [", G, ", ", nb, ", 8], got ", d.scalar_type(), " ", d.sizes());
  TORCH_CHECK(K <= nb * QK && K > (nb - 1) * QK, "q8x8_linear: x has K=", K, " but the weight has ", nb,
              " blocks of 32");
  const at::Tensor x = x_in.to(at::kFloat).contiguous(), qsc = qs.contiguous(), dc = d.contiguous();
  at::Tensor bc;
  if (bias.has_value()) {
    bc = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(bc.numel() == N, "q8x8_linear: bias must be [N=", N, "]");
  }
  const int64_t M = x.size(0);
  auto y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const QuantizedRows xr = quantize_rows(x, nb, false);
  const QuantWeight w{reinterpret_cast<const uint8_t*>(qsc.data_ptr()), reinterpret_cast<const uint16_t*>(dc.data_ptr()),
                      nullptr, bc.defined() ? bc.data_ptr<float>() : nullptr, nb, nb * GROUP_BYTES, true};
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, G, 4, [&](int64_t begin, int64_t end) {
    q8x8_rows(xr, w, M, begin * GROUP, end * GROUP, yp + begin * GROUP, N);
  });
  return x_in.scalar_type() == at::kFloat ? y : y.to(x_in.scalar_type());
}

}  // namespace llmengine_cpu

TORCH_LIBRARY_FRAGMENT(llmengine_cpu, lib) {
  lib.def("q8x8_linear(Tensor x, Tensor qs, Tensor d, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmengine_cpu, CPU, lib) { lib.impl("q8x8_linear", &llmengine_cpu::q8x8_linear); }
