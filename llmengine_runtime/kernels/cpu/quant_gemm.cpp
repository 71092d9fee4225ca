// Weight-only quantized products on the CPU with int8 activations: the llama.cpp-style integer dot product.
//
// Layout (one row n of W [N, K], K padded with zero weights to Kp, a multiple of 32; nb = Kp / 32 blocks):
//   q4: qs uint8 [N, Kp / 2]: block b of row n is the 16 bytes qs[n, 16b : 16b + 16], byte j holding
//       q[32b + j] in its low nibble and q[32b + 16 + j] in its high one (GGUF Q4_1's order); d, m fp16
//       [N, nb]; w = q * d + m, q in 0..15.
//   q8: qs int8 [N, Kp]; d fp16 [N, nb]; w = q * d.
// x fp32 [M, K] is quantized per block of 32 (llama.cpp's Q8_1): xd = max|x| / 127, xq = round(x / xd) in
// -127..127 (zeros past K), xs = xd * sum(xq). Then y[i, n] = sum_b d[n,b] xd[i,b] (q . xq)[b] (+ m[n,b] xs[i,b]).
// Grid: at::parallel_for over output rows n; one task holds a run of rows and, for each chunk of 64
// activation rows, computes tiles of one weight row x up to 4 activation rows with AVX2 (maddubs: u8 x s8 -> pairs
// of s16, madd -> s32; or VNNI's vpdpbusd, the same exact lanes in one instruction), fma into fp32 lanes. Without
// AVX2 a scalar loop does it. A row's sums go in the same order whatever the tile, the chunk or the thread.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "cpu_kernels.h"
#include "quant_common.h"

namespace llmengine_cpu {

constexpr int64_t M_CHUNK = 64;

#ifdef LLME_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256i q4_block(const uint8_t* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
  return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

// u8 w (0..15) . s8 x -> 8 fp32 partial sums.
inline __m256 dot_u8_s8(__m256i w, __m256i x) {
  return _mm256_cvtepi32_ps(dot_u8_s8_add(_mm256_setzero_si256(), w, x));
}

// s8 w . s8 x through |w| (as u8, so w = -128 gives 128) and x * sign(w) (x is in -127..127, so negating it
// never overflows); pair sums stay within 2 * 128 * 127 < 2^15.
inline __m256 dot_s8_s8(__m256i w, __m256i x) {
  return dot_u8_s8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
}
#endif

#ifdef LLME_AVX2
// q4, one weight row against MT activation rows, two blocks per step: one 32-byte load holds blocks b and b+1
// (16 bytes each); its low nibbles are [b: 0-15 | b+1: 0-15] and its high nibbles [b: 16-31 | b+1: 16-31], which is
// how x is stored (`paired`). The products of both halves add in int16 (|sum| <= 4 * 15 * 127), madd gives int32
// lanes 0-3 for block b and 4-7 for b+1, and one fma applies [s_b x4 | s_b+1 x4], s = d * xd, taken from 8 blocks'
// scales converted at once. The m * xs terms are one fma per 8 blocks.
template <int MT>
void q4_row_tile_paired(const uint8_t* wq, const uint16_t* wd, const uint16_t* wm, int64_t nb,
                        const QuantizedRows& xr, int64_t i0, float* y, int64_t ldy) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  __m256 acc[MT], macc[MT];
  for (int t = 0; t < MT; ++t) acc[t] = _mm256_setzero_ps(), macc[t] = _mm256_setzero_ps();
  auto pair = [&](int64_t b, const __m256 (&scale)[MT]) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + b * 16));
    const __m256i w_lo = _mm256_and_si256(raw, low), w_hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
    for (int t = 0; t < MT; ++t) {
      const int8_t* x = xr.q.data() + ((i0 + t) * nb + b) * QK;
      const __m256i x_lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
      const __m256i x_hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + QK));
      const __m256i sum32 = dot_u8_s8_add(dot_u8_s8_add(_mm256_setzero_si256(), w_lo, x_lo), w_hi, x_hi);
      acc[t] = _mm256_fmadd_ps(scale[t], _mm256_cvtepi32_ps(sum32), acc[t]);
    }
  };
  int64_t b = 0;
  for (; b + 8 <= nb; b += 8) {
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wd + b)));
    const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wm + b)));
    __m256 s8[MT];
    for (int t = 0; t < MT; ++t) {
      const int64_t r = (i0 + t) * nb + b;
      s8[t] = _mm256_mul_ps(d, _mm256_loadu_ps(xr.d.data() + r));
      macc[t] = _mm256_fmadd_ps(m, _mm256_loadu_ps(xr.s.data() + r), macc[t]);
    }
    for (int j = 0; j < 4; ++j) {
      const __m256i index = _mm256_setr_epi32(2 * j, 2 * j, 2 * j, 2 * j, 2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1);
      __m256 scale[MT];
      for (int t = 0; t < MT; ++t) scale[t] = _mm256_permutevar8x32_ps(s8[t], index);
      pair(b + 2 * j, scale);
    }
  }
  float tail[MT] = {};
  for (; b < nb; ++b) {  // the last nb % 8 blocks: pairs, then a lone block
    const float d0 = half_to_float(wd[b]), m0 = half_to_float(wm[b]);
    if (b + 1 < nb) {
      const float d1 = half_to_float(wd[b + 1]), m1 = half_to_float(wm[b + 1]);
      __m256 scale[MT];
      for (int t = 0; t < MT; ++t) {
        const int64_t r = (i0 + t) * nb + b;
        scale[t] = _mm256_set_m128(_mm_set1_ps(d1 * xr.d[r + 1]), _mm_set1_ps(d0 * xr.d[r]));
        tail[t] += m0 * xr.s[r] + m1 * xr.s[r + 1];
      }
      pair(b, scale);
      ++b;
      continue;
    }
    const __m256i w = q4_block(wq + b * 16);
    for (int t = 0; t < MT; ++t) {
      const int64_t r = (i0 + t) * nb + b;
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr.q.data() + r * QK));
      acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d0 * xr.d[r]), dot_u8_s8(w, x), acc[t]);
      tail[t] += m0 * xr.s[r];
    }
  }
  for (int t = 0; t < MT; ++t) y[t * ldy] = hsum(acc[t]) + hsum(macc[t]) + tail[t];
}
#endif

// One weight row against MT activation rows.
template <bool Q4, int MT>
void row_tile(const uint8_t* wq, const uint16_t* wd, const uint16_t* wm, int64_t nb, const QuantizedRows& xr,
              int64_t i0, float* y, int64_t ldy) {
#ifdef LLME_AVX2
  __m256 acc[MT];
  float macc[MT];
  for (int t = 0; t < MT; ++t) acc[t] = _mm256_setzero_ps(), macc[t] = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    const __m256i w = Q4 ? q4_block(wq + b * 16)
                         : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + b * QK));
    const float dw = half_to_float(wd[b]);
    const float mw = Q4 ? half_to_float(wm[b]) : 0.f;
    for (int t = 0; t < MT; ++t) {
      const int64_t r = (i0 + t) * nb + b;
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr.q.data() + r * QK));
      const __m256 p = Q4 ? dot_u8_s8(w, x) : dot_s8_s8(w, x);
      acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(dw * xr.d[r]), p, acc[t]);
      if (Q4) macc[t] += mw * xr.s[r];
    }
  }
  for (int t = 0; t < MT; ++t) y[t * ldy] = hsum(acc[t]) + macc[t];
#else
  for (int t = 0; t < MT; ++t) {
    float total = 0.f;
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t r = (i0 + t) * nb + b;
      const int8_t* x = xr.q.data() + r * QK;
      int dot = 0;
      for (int j = 0; j < QK; ++j) {
        int w;
        if (Q4) {
          const uint8_t byte = wq[b * 16 + (j & 15)];
          w = j < 16 ? (byte & 15) : (byte >> 4);
        } else {
          w = reinterpret_cast<const int8_t*>(wq)[b * QK + j];
        }
        dot += w * x[j];
      }
      total += half_to_float(wd[b]) * xr.d[r] * dot + (Q4 ? half_to_float(wm[b]) * xr.s[r] : 0.f);
    }
    y[t * ldy] = total;
  }
#endif
}

constexpr bool PAIRED_Q4 =
#ifdef LLME_AVX2
    true;
#else
    false;
#endif

template <bool Q4, int MT>
inline void tile(const uint8_t* wq, const uint16_t* wd, const uint16_t* wm, int64_t nb, const QuantizedRows& xr,
                 int64_t i0, float* y, int64_t ldy) {
#ifdef LLME_AVX2
  if constexpr (Q4) {
    q4_row_tile_paired<MT>(wq, wd, wm, nb, xr, i0, y, ldy);
    return;
  }
#endif
  row_tile<Q4, MT>(wq, wd, wm, nb, xr, i0, y, ldy);
}

template <bool Q4>
void quant_rows(const QuantizedRows& xr, const QuantWeight& w, int64_t M, int64_t n0, int64_t n1, float* y,
                int64_t ldy) {
  for (int64_t c0 = 0; c0 < M; c0 += M_CHUNK) {
    const int64_t c1 = std::min(M, c0 + M_CHUNK);
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* rq = w.qs + n * w.row_bytes;
      const uint16_t* rd = w.d + n * w.nb;
      const uint16_t* rm = Q4 ? w.m + n * w.nb : nullptr;
      int64_t i = c0;
      float* yn = y + (n - n0);
      for (; i + 4 <= c1; i += 4) tile<Q4, 4>(rq, rd, rm, w.nb, xr, i, yn + i * ldy, ldy);
      switch (c1 - i) {
        case 3: tile<Q4, 3>(rq, rd, rm, w.nb, xr, i, yn + i * ldy, ldy); break;
        case 2: tile<Q4, 2>(rq, rd, rm, w.nb, xr, i, yn + i * ldy, ldy); break;
        case 1: tile<Q4, 1>(rq, rd, rm, w.nb, xr, i, yn + i * ldy, ldy); break;
        default: break;
      }
    }
  }
  if (w.bias)
    for (int64_t i = 0; i < M; ++i)
      for (int64_t n = n0; n < n1; ++n) y[i * ldy + n - n0] += w.bias[n];
}

void quant_rows(const QuantizedRows& xr, const QuantWeight& w, int64_t M, int64_t n0, int64_t n1, float* y,
                int64_t ldy) {
  if (w.interleaved && w.m) q4x8_rows(xr, w, M, n0, n1, y, ldy);
  else if (w.interleaved) q8x8_rows(xr, w, M, n0, n1, y, ldy);
  else if (w.m) quant_rows<true>(xr, w, M, n0, n1, y, ldy);
  else quant_rows<false>(xr, w, M, n0, n1, y, ldy);
}

bool q4_pairs_blocks() { return PAIRED_Q4; }

template <bool Q4>
at::Tensor quant_linear(const at::Tensor& x_in, const at::Tensor& qs, const at::Tensor& d, const c10::optional<at::Tensor>& m,
                        const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x_in.dim() == 2, "x must be [M, K]");
  TORCH_CHECK(qs.dim() == 2 && d.dim() == 2 && qs.size(0) == d.size(0), "qs [N, ...] and d [N, nb] must agree");
  TORCH_CHECK(d.scalar_type() == at::kHalf, "d must be fp16");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = qs.size(0), nb = d.size(1);
  TORCH_CHECK(qs.size(1) == (Q4 ? nb * QK / 2 : nb * QK), "qs holds ", qs.size(1), " bytes per row, not ",
              Q4 ? nb * QK / 2 : nb * QK, " (nb = ", nb, ")");
  TORCH_CHECK(K <= nb * QK && K > (nb - 1) * QK, "x has K=", K, " but the weight has ", nb, " blocks of 32");
  const at::Tensor qsc = qs.contiguous(), dc = d.contiguous();
  at::Tensor mc, bc;
  if (Q4) {
    TORCH_CHECK(m.has_value() && m->sizes() == d.sizes() && m->scalar_type() == at::kHalf, "q4 needs m like d");
    mc = m->contiguous();
  }
  if (bias.has_value()) {
    bc = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(bc.numel() == N, "bias must be [N]");
  }
  auto y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const QuantizedRows xr = quantize_rows(x, nb, Q4 && PAIRED_Q4);
  const QuantWeight w{reinterpret_cast<const uint8_t*>(qsc.data_ptr()), reinterpret_cast<const uint16_t*>(dc.data_ptr()),
                      Q4 ? reinterpret_cast<const uint16_t*>(mc.data_ptr()) : nullptr,
                      bc.defined() ? bc.data_ptr<float>() : nullptr, nb, qs.size(1)};
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 8, [&](int64_t begin, int64_t end) { quant_rows<Q4>(xr, w, M, begin, end, yp + begin, N); });
  return x_in.scalar_type() == at::kFloat ? y : y.to(x_in.scalar_type());
}

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m,
                     const c10::optional<at::Tensor>& bias) {
  return quant_linear<true>(x, qs, d, m, bias);
}

at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d,
                     const c10::optional<at::Tensor>& bias) {
  return quant_linear<false>(x, qs, d, c10::nullopt, bias);
}

}  // namespace llmengine_cpu

TORCH_LIBRARY_FRAGMENT(llmengine_cpu, lib) {
  lib.def("q4_linear(Tensor x, Tensor qs, Tensor d, Tensor m, Tensor? bias) -> Tensor");
  lib.def("q8_linear(Tensor x, Tensor qs, Tensor d, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmengine_cpu, CPU, lib) {
  lib.impl("q4_linear", &llmengine_cpu::q4_linear);
  lib.impl("q8_linear", &llmengine_cpu::q8_linear);
}
