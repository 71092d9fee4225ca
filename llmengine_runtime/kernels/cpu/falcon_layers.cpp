// Falcon's per-token layers on the CPU, fp32: LayerNorm with bias, and the exact (erf) GELU. The eager blocks call
// them as ops and the fused step (falcon_step.cpp) row by row, so both give the same numbers.
//
// layer_norm: x [T, hidden] (rows contiguous), weight, bias [hidden].
//             out = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias, var the biased (population) variance.
// gelu:       x [T, n] -> 0.5 x (1 + erf(x / sqrt(2))), [T, n].
// Grid: at::parallel_for over the T rows; one task computes whole rows. A row's mean and variance are summed in 8
// lanes then a fixed reduction (as rms_norm_row), so a row's result does not depend on the batch or the thread; GELU is
// elementwise (std::erf), so a value does not depend on where a caller's range starts.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_kernels.h"
#include "vec_math.h"

#include <cmath>

namespace llmengine_cpu {

void layer_norm_row(const float* x, const float* w, const float* b, float* out, int64_t hidden, float eps) {
  int64_t i = 0;
  float mean, ss;
#ifdef LLME_VEC_MATH
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= hidden; i += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(x + i));
  float sum = hsum256(acc);
  for (; i < hidden; ++i) sum += x[i];
  mean = sum / static_cast<float>(hidden);
  const __m256 mean8 = _mm256_set1_ps(mean);
  acc = _mm256_setzero_ps();
  for (i = 0; i + 8 <= hidden; i += 8) {
    const __m256 c = _mm256_sub_ps(_mm256_loadu_ps(x + i), mean8);
    acc = _mm256_fmadd_ps(c, c, acc);
  }
  ss = hsum256(acc);
  for (; i < hidden; ++i) ss += (x[i] - mean) * (x[i] - mean);
#else
  // one chain in order: in double, so that a long row's sums stay as close as the 8-lane ones
  double sum = 0.0, sq = 0.0;
  for (i = 0; i < hidden; ++i) sum += x[i];
  mean = static_cast<float>(sum / static_cast<double>(hidden));
  for (i = 0; i < hidden; ++i) sq += static_cast<double>(x[i] - mean) * (x[i] - mean);
  ss = static_cast<float>(sq);
#endif
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(hidden) + eps);
  i = 0;
#ifdef LLME_VEC_MATH
  const __m256 inv8 = _mm256_set1_ps(inv);
  for (; i + 8 <= hidden; i += 8) {
    const __m256 c = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), mean8), inv8);
    _mm256_storeu_ps(out + i, _mm256_add_ps(_mm256_mul_ps(c, _mm256_loadu_ps(w + i)), _mm256_loadu_ps(b + i)));
  }
#endif
  for (; i < hidden; ++i) out[i] = (x[i] - mean) * inv * w[i] + b[i];
}

void gelu_row(const float* x, float* out, int64_t n) {
  constexpr float rsqrt2 = 0.70710678118654752f;
  for (int64_t i = 0; i < n; ++i) out[i] = 0.5f * x[i] * (1.f + std::erf(x[i] * rsqrt2));
}

at::Tensor layer_norm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.stride(1) == 1,
              "layer_norm: x must be a CPU fp32 [rows, hidden] tensor with contiguous rows");
  const int64_t rows = x.size(0), hidden = x.size(1), xstride = x.stride(0);
  const at::Tensor w = weight.contiguous(), b = bias.contiguous();
  TORCH_CHECK(w.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && w.numel() == hidden &&
                  b.numel() == hidden,
              "layer_norm: weight and bias must be fp32 [", hidden, "]");
  auto out = at::empty({rows, hidden}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>(), *bp = b.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      layer_norm_row(xp + r * xstride, wp, bp, op + r * hidden, hidden, static_cast<float>(eps));
  });
  return out;
}

at::Tensor gelu(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.stride(1) == 1,
              "gelu: x must be a CPU fp32 [rows, n] tensor with contiguous rows");
  const int64_t rows = x.size(0), n = x.size(1), xstride = x.stride(0);
  auto out = at::empty({rows, n}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) gelu_row(xp + r * xstride, op + r * n, n);
  });
  return out;
}

}  // namespace llmengine_cpu

TORCH_LIBRARY_FRAGMENT(llmengine_cpu, lib) {
  lib.def("layer_norm(Tensor x, Tensor weight, Tensor bias, float eps) -> Tensor");
  lib.def("gelu(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmengine_cpu, CPU, lib) {
  lib.impl("layer_norm", &llmengine_cpu::layer_norm);
  lib.impl("gelu", &llmengine_cpu::gelu);
}
