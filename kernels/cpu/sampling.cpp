// Greedy sampling on the CPU: each row's argmax and its log-probability, in one pass over the logits.
//
// Layout: logits fp32 [B, V] (rows contiguous) -> tokens int64 [B], log_probs fp32 [B].
// tokens[b] is the first index of row b's maximum (as torch.argmax; a NaN counts as the maximum, as there), and
// log_probs[b] = x[b, t] - logsumexp(x[b]) = -log(sum_j exp(x[b, j] - max)) (NaN when the row has a NaN or is all
// -inf, as torch's gather - logsumexp gives).
// Grid: at::parallel_for over rows; one task reads its rows twice (max, then the exp-sum), 8 values per AVX2 step.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "vec_math.h"

namespace llmengine_cpu {

namespace {

void greedy_row(const float* x, int64_t V, int64_t* token, float* log_prob) {
  float mx = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
  bool has_nan = false;
#ifdef LLME_VEC_MATH
  __m256 mx8 = _mm256_set1_ps(mx), nan8 = _mm256_setzero_ps();
  for (; j + 8 <= V; j += 8) {
    const __m256 v = _mm256_loadu_ps(x + j);
    mx8 = _mm256_max_ps(mx8, v);
    nan8 = _mm256_or_ps(nan8, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  mx = hmax256(mx8);
  has_nan = _mm256_movemask_ps(nan8) != 0;
#endif
  for (; j < V; ++j) {
    has_nan |= std::isnan(x[j]);
    mx = std::max(mx, x[j]);
  }
  int64_t t = 0;
  if (has_nan) {
    while (!std::isnan(x[t])) ++t;
    *token = t;
    *log_prob = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  while (x[t] != mx) ++t;
  *token = t;
  if (mx == -std::numeric_limits<float>::infinity()) {
    *log_prob = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  float total = 0.f;
  j = 0;
#ifdef LLME_VEC_MATH
  const __m256 m = _mm256_set1_ps(mx);
  __m256 sum8 = _mm256_setzero_ps();
  for (; j + 8 <= V; j += 8) sum8 = _mm256_add_ps(sum8, exp256(_mm256_sub_ps(_mm256_loadu_ps(x + j), m)));
  total = hsum256(sum8);
#endif
  for (; j < V; ++j) total += std::exp(x[j] - mx);
  *log_prob = -std::log(total);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> greedy_sample(const at::Tensor& logits) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == at::kFloat && logits.dim() == 2 &&
                  logits.stride(1) == 1, "greedy_sample: logits must be CPU fp32 [B, V] with contiguous rows");
  const int64_t B = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V > 0, "greedy_sample: empty vocabulary");
  auto tokens = at::empty({B}, logits.options().dtype(at::kLong));
  auto log_probs = at::empty({B}, logits.options());
  const float* xp = logits.data_ptr<float>();
  int64_t* tp = tokens.data_ptr<int64_t>();
  float* lp = log_probs.data_ptr<float>();
  const int64_t stride = logits.stride(0);
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) greedy_row(xp + b * stride, V, tp + b, lp + b);
  });
  return {tokens, log_probs};
}

}  // namespace llmengine_cpu

TORCH_LIBRARY_FRAGMENT(llmengine_cpu, lib) {
  lib.def("greedy_sample(Tensor logits) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(llmengine_cpu, CPU, lib) {
  lib.impl("greedy_sample", &llmengine_cpu::greedy_sample);
}
