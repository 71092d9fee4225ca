#pragma GCC optimize("fp-contract=off")  // the float sums exactly as written: the vector and scalar paths agree
// The q4 product with eight weight rows interleaved, so that one int32 lane is one output row: a GEMM micro-kernel
// whose weights are unpacked once per block and used for every activation row of the tile.
//
// Layout (quant_gemm.cpp's q4 weight, N a multiple of 8, regrouped by models/quantized_linear.py `interleave8`):
//   qs uint8 [N / 8, nb, 128]: for group g and block b, four chunks c = 0..3 of 32 bytes, chunk c holding for each
//       row j = 0..7 of the group (4 bytes at 4j) the row's block bytes 4c..4c+3. Byte 4c+i has q[4c+i] in its
//       low nibble and q[16+4c+i] in its high one (GGUF Q4_1's order), so one chunk is two steps of vpdpbusd: its low
//       nibbles against x[4c..4c+3] broadcast to every lane, its high ones against x[16+4c..16+4c+3];
//   d, m fp16 [N / 8, nb, 8]: row j's scale and min for block b at [g, b, j]; w = q * d + m.
// x fp32 [M, K]: quantized per block of 32 as quantize_x.cpp does (in order, not `paired`): xq, xd, xs = xd sum(xq).
// y[i, 8g + j] = sum over b, in order, of fma(isum, d * xd, acc) then fma(m, xs, acc), isum the exact int32 q . xq
// of the block (vpdpbusd, or AVX2's maddubs + madd: both exact). No horizontal sum anywhere, and a row's numbers
// depend neither on M, the tile, the thread nor on which other rows run beside it.
// Grid: `q4x8_rows` computes the groups covering output rows n0..n1 (writing only those rows) for tiles of up to
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

constexpr int64_t GROUP = 8, GROUP_BYTES = 128;

inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Outputs of group g (lanes j0..j1) for activation rows i0..i0+MT-1; y points at row i0, column 8g + j0 - n0.
template <int MT>
void group_tile(const uint8_t* wq, const uint16_t* wd, const uint16_t* wm, int64_t nb, const QuantizedRows& xr,
                int64_t i0, int j0, int j1, float* y, int64_t ldy) {
  float lanes[MT][GROUP];
#ifdef LLME_AVX2
  const __m256i low = _mm256_set1_epi8(0x0F);
  __m256 acc[MT];
  for (int t = 0; t < MT; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* wb = wq + b * GROUP_BYTES;
    for (int line = 0; line < GROUP_BYTES; line += 64) __builtin_prefetch(wb + nb * GROUP_BYTES + line);  // next group
    __m256i isum[MT];
    for (int t = 0; t < MT; ++t) isum[t] = _mm256_setzero_si256();
    for (int c = 0; c < 4; ++c) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 32 * c));
      const __m256i w_lo = _mm256_and_si256(raw, low), w_hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
      for (int t = 0; t < MT; ++t) {
        const int8_t* x = xr.q.data() + ((i0 + t) * nb + b) * QK;
        isum[t] = dot_u8_s8_add(isum[t], w_lo, _mm256_set1_epi32(load_i32(x + 4 * c)));
        isum[t] = dot_u8_s8_add(isum[t], w_hi, _mm256_set1_epi32(load_i32(x + 16 + 4 * c)));
      }
    }
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wd + b * GROUP)));
    const __m256 mw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wm + b * GROUP)));
    for (int t = 0; t < MT; ++t) {
      const int64_t r = (i0 + t) * nb + b;
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t]), _mm256_mul_ps(dw, _mm256_set1_ps(xr.d[r])), acc[t]);
      acc[t] = _mm256_fmadd_ps(mw, _mm256_set1_ps(xr.s[r]), acc[t]);
    }
  }
  for (int t = 0; t < MT; ++t) _mm256_storeu_ps(lanes[t], acc[t]);
#else
  for (int t = 0; t < MT; ++t) std::fill(lanes[t], lanes[t] + GROUP, 0.f);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* wb = wq + b * GROUP_BYTES;
    for (int t = 0; t < MT; ++t) {
      const int64_t r = (i0 + t) * nb + b;
      const int8_t* x = xr.q.data() + r * QK;
      for (int j = 0; j < GROUP; ++j) {
        int32_t isum = 0;
        for (int c = 0; c < 4; ++c)
          for (int i = 0; i < 4; ++i) {
            const uint8_t byte = wb[32 * c + 4 * j + i];
            isum += (byte & 15) * x[4 * c + i] + (byte >> 4) * x[16 + 4 * c + i];
          }
        const float scale = half_to_float(wd[b * GROUP + j]) * xr.d[r];
        lanes[t][j] = std::fma(static_cast<float>(isum), scale, lanes[t][j]);
        lanes[t][j] = std::fma(half_to_float(wm[b * GROUP + j]), xr.s[r], lanes[t][j]);
      }
    }
  }
#endif
  for (int t = 0; t < MT; ++t)
    for (int j = j0; j < j1; ++j) y[t * ldy + j - j0] = lanes[t][j];
}

}  // namespace

void q4x8_rows(const QuantizedRows& xr, const QuantWeight& w, int64_t M, int64_t n0, int64_t n1, float* y,
               int64_t ldy) {
  const int64_t nb = w.nb;
  const AmxSpan done = q4x8_amx(xr, w, M, n0, n1, y, ldy);
  const auto tile = [&](int64_t g, int mt, int64_t i, int j0, int j1, float* yt) {
    const uint8_t* wq = w.qs + g * nb * GROUP_BYTES;
    const uint16_t *wd = w.d + g * nb * GROUP, *wm = w.m + g * nb * GROUP;
    with_tile_rows<INT_MAX_TILE>(mt, [&](auto rows) { group_tile<rows>(wq, wd, wm, nb, xr, i, j0, j1, yt, ldy); });
  };
  interleaved_rest<INT_MAX_TILE>(done, M, n0, n1, w.bias, y, ldy, tile);
}

at::Tensor q4x8_linear(const at::Tensor& x_in, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m,
                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x_in.dim() == 2, "q4x8_linear: x must be [M, K]");
  TORCH_CHECK(qs.dim() == 3 && qs.size(2) == GROUP_BYTES && qs.scalar_type() == at::kByte,
              "q4x8_linear: qs must be uint8 [N / 8, nb, 128], got ", qs.sizes());
  const int64_t G = qs.size(0), nb = qs.size(1), N = G * GROUP, K = x_in.size(1);
  for (const at::Tensor* t : {&d, &m})
    TORCH_CHECK(t->scalar_type() == at::kHalf && t->sizes() == at::IntArrayRef({G, nb, GROUP}),
                "q4x8_linear: d and m must be fp16 [", G, ", ", nb, ", 8], got ", t->sizes());
  TORCH_CHECK(K <= nb * QK && K > (nb - 1) * QK, "q4x8_linear: x has K=", K, " but the weight has ", nb,
              " blocks of 32");
  const at::Tensor x = x_in.to(at::kFloat).contiguous(), qsc = qs.contiguous(), dc = d.contiguous(),
                   mc = m.contiguous();
  at::Tensor bc;
  if (bias.has_value()) {
    bc = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(bc.numel() == N, "q4x8_linear: bias must be [N=", N, "]");
  }
  const int64_t M = x.size(0);
  auto y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const QuantizedRows xr = quantize_rows(x, nb, false);
  const QuantWeight w{qsc.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(dc.data_ptr()),
                      reinterpret_cast<const uint16_t*>(mc.data_ptr()), bc.defined() ? bc.data_ptr<float>() : nullptr,
                      nb, nb * GROUP_BYTES, true};
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, G, 4, [&](int64_t begin, int64_t end) {
    q4x8_rows(xr, w, M, begin * GROUP, end * GROUP, yp + begin * GROUP, N);
  });
  return x_in.scalar_type() == at::kFloat ? y : y.to(x_in.scalar_type());
}

}  // namespace llmengine_cpu

TORCH_LIBRARY_FRAGMENT(llmengine_cpu, lib) {
  lib.def("q4x8_linear(Tensor x, Tensor qs, Tensor d, Tensor m, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmengine_cpu, CPU, lib) { lib.impl("q4x8_linear", &llmengine_cpu::q4x8_linear); }
