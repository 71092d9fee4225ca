// The small per-token layers on the CPU, fp32: RMSNorm (optionally after the residual add), SiLU-and-multiply
// and rotary embedding. Each is one pass over its rows instead of the several torch ops of the reference.
//
// rms_norm:      x, residual (optional) [T, hidden] (rows contiguous), weight [hidden].
//                h = x + residual; out = h / sqrt(mean(h^2) + eps) * weight. Returns out, and h when residual.
// silu_and_mul:  x [T, 2I] (gate | up) -> silu(gate) * up, [T, I].
// rotary:        q [T, H, d], k [T, Hkv, d] (any token/head strides, last dim contiguous), positions int64 [T],
//                cos_sin_cache fp32 [P, d] (cos half, sin half). Pairs (i, i + d/2) rotate as
//                (x1 cos - x2 sin, x2 cos + x1 sin); new contiguous q and k are returned.
// Grid: at::parallel_for over the T rows (tokens); one task computes whole rows, 8 values per AVX2 step (vec_math.h's
// exp for SiLU).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_kernels.h"
#include "vec_math.h"

#include <algorithm>
#include <cmath>
#include <tuple>

namespace llmengine_cpu {

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, " must be a CPU fp32 tensor");
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, " must be [rows, cols] with contiguous rows");
}

// One row: out = norm(x (+ res, also stored in h)) * w. The sum of squares runs in 8 lanes then a fixed reduction,
// so a row's result does not depend on who calls it (the fused decode step calls it directly).
void rms_norm_row(const float* xr, const float* res, const float* wp, float* o, float* hr, int64_t hidden,
                  float eps) {
  const float* src = xr;
  int64_t i = 0;
  float ss = 0.f;
#ifdef LLME_VEC_MATH
  __m256 acc = _mm256_setzero_ps();
  if (hr) {
    for (; i + 8 <= hidden; i += 8) {
      const __m256 v = _mm256_add_ps(_mm256_loadu_ps(xr + i), _mm256_loadu_ps(res + i));
      _mm256_storeu_ps(hr + i, v);
      acc = _mm256_fmadd_ps(v, v, acc);
    }
    for (; i < hidden; ++i) {
      hr[i] = xr[i] + res[i];
      ss += hr[i] * hr[i];
    }
    src = hr;
  } else {
    for (; i + 8 <= hidden; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(xr + i), _mm256_loadu_ps(xr + i), acc);
    for (; i < hidden; ++i) ss += xr[i] * xr[i];
  }
  ss += hsum256(acc);
#else
  if (hr) {
    for (; i < hidden; ++i) hr[i] = xr[i] + res[i];
    src = hr;
  }
  for (i = 0; i < hidden; ++i) ss += src[i] * src[i];
#endif
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(hidden) + eps);
  i = 0;
#ifdef LLME_VEC_MATH
  const __m256 inv8 = _mm256_set1_ps(inv);
  for (; i + 8 <= hidden; i += 8)
    _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(src + i), inv8), _mm256_loadu_ps(wp + i)));
#endif
  for (; i < hidden; ++i) o[i] = src[i] * inv * wp[i];
}

std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps,
                                            const c10::optional<at::Tensor>& residual) {
  check_rows(x, "x");
  const at::Tensor w = weight.contiguous();
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.numel() == x.size(1), "weight must be fp32 [hidden]");
  const int64_t rows = x.size(0), hidden = x.size(1);
  auto out = at::empty({rows, hidden}, x.options());
  at::Tensor h;
  const float* rp = nullptr;
  int64_t rstride = 0;
  if (residual.has_value()) {
    check_rows(*residual, "residual");
    TORCH_CHECK(residual->sizes() == x.sizes(), "residual must match x");
    h = at::empty({rows, hidden}, x.options());
    rp = residual->data_ptr<float>();
    rstride = residual->stride(0);
  }
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  float* hp = h.defined() ? h.data_ptr<float>() : nullptr;
  const int64_t xstride = x.stride(0);
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      rms_norm_row(xp + r * xstride, hp ? rp + r * rstride : nullptr, wp, op + r * hidden,
                   hp ? hp + r * hidden : nullptr, hidden, static_cast<float>(eps));
  });
  return {out, h.defined() ? h : at::empty({0}, x.options())};
}

// out[i] = silu(gate[i]) * up[i]; every element through the same 8-lane code (the tail padded), so a value does
// not depend on where a caller's range starts.
void silu_mul_row(const float* gate, const float* up, float* o, int64_t n) {
#ifdef LLME_VEC_MATH
  const __m256 one = _mm256_set1_ps(1.f), sign = _mm256_set1_ps(-0.f);
  auto eight = [&](const float* g8, const float* u8, float* o8) {
    const __m256 g = _mm256_loadu_ps(g8);
    const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, exp256(_mm256_xor_ps(g, sign))));
    _mm256_storeu_ps(o8, _mm256_mul_ps(silu, _mm256_loadu_ps(u8)));
  };
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) eight(gate + i, up + i, o + i);
  if (i < n) {
    float g[8] = {}, u[8] = {}, r[8];
    std::copy(gate + i, gate + n, g);
    std::copy(up + i, up + n, u);
    eight(g, u, r);
    std::copy(r, r + (n - i), o + i);
  }
#else
  for (int64_t i = 0; i < n; ++i) o[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
#endif
}

at::Tensor silu_and_mul(const at::Tensor& x) {
  check_rows(x, "x");
  TORCH_CHECK(x.size(1) % 2 == 0, "x must hold gate and up halves");
  const int64_t rows = x.size(0), inter = x.size(1) / 2, xstride = x.stride(0);
  auto out = at::empty({rows, inter}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* gate = xp + r * xstride;
      const float* up = gate + inter;
      float* o = op + r * inter;
      silu_mul_row(gate, up, o, inter);
    }
  });
  return out;
}

void rotate_heads(const float* src, int64_t head_stride, int64_t heads, int64_t d, const float* cs, float* dst) {
  const int64_t half = d / 2;
  for (int64_t h = 0; h < heads; ++h) {
    const float* x = src + h * head_stride;
    float* y = dst + h * d;
    for (int64_t i = 0; i < half; ++i) {
      const float c = cs[i], s = cs[half + i], x1 = x[i], x2 = x[half + i];
      y[i] = x1 * c - x2 * s;
      y[half + i] = x2 * c + x1 * s;
    }
  }
}

std::tuple<at::Tensor, at::Tensor> rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                                          const at::Tensor& cos_sin_cache) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.stride(2) == 1 && k.stride(2) == 1,
              "q, k must be [T, heads, d] with a contiguous last dim");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat, "q, k must be fp32");
  const int64_t T = q.size(0), H = q.size(1), Hkv = k.size(1), d = q.size(2);
  TORCH_CHECK(k.size(0) == T && k.size(2) == d && d % 2 == 0, "k must be [T, Hkv, d] like q, d even");
  const at::Tensor cache = cos_sin_cache.to(at::kFloat).contiguous();
  TORCH_CHECK(cache.dim() == 2 && cache.size(1) == d, "cos_sin_cache must be [positions, head_dim]");
  const at::Tensor pos = positions.to(at::kLong).contiguous();
  TORCH_CHECK(pos.numel() == T, "positions must be [T]");
  auto q_out = at::empty({T, H, d}, q.options());
  auto k_out = at::empty({T, Hkv, d}, k.options());
  const int64_t* pp = pos.data_ptr<int64_t>();
  const int64_t P = cache.size(0);
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(pp[t] >= 0 && pp[t] < P, "position ", pp[t], " is outside the rotary table of ", P, " rows");
  const float* cp = cache.data_ptr<float>();
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  float* qo = q_out.data_ptr<float>();
  float* ko = k_out.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* cs = cp + pp[t] * d;
      rotate_heads(qp + t * q.stride(0), q.stride(1), H, d, cs, qo + t * H * d);
      rotate_heads(kp + t * k.stride(0), k.stride(1), Hkv, d, cs, ko + t * Hkv * d);
    }
  });
  return {q_out, k_out};
}

}  // namespace llmengine_cpu

TORCH_LIBRARY_FRAGMENT(llmengine_cpu, lib) {
  lib.def("rms_norm(Tensor x, Tensor weight, float eps, Tensor? residual) -> (Tensor, Tensor)");
  lib.def("silu_and_mul(Tensor x) -> Tensor");
  lib.def("rotary(Tensor q, Tensor k, Tensor positions, Tensor cos_sin_cache) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(llmengine_cpu, CPU, lib) {
  lib.impl("rms_norm", &llmengine_cpu::rms_norm);
  lib.impl("silu_and_mul", &llmengine_cpu::silu_and_mul);
  lib.impl("rotary", &llmengine_cpu::rotary);
}
