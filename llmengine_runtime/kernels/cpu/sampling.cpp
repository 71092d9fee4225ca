// Greedy sampling on the CPU: each row's argmax and its log-probability, in one pass over the logits.
//
// Layout: logits fp32 [B, V] (rows contiguous) -> tokens int64 [B], log_probs fp32 [B].
// tokens[b] is the first index of row b's maximum (as torch.argmax; a NaN counts as the maximum, as there), and
// log_probs[b] = x[b, t] - logsumexp(x[b]) = -log(sum_j exp(x[b, j] - max)) (NaN when the row has a NaN or is all
// -inf, as torch's gather - logsumexp gives). With with_log_probs=false only the tokens are computed (log_probs NaN).
// Grid: at::parallel_for over rows for the first maximum (per-lane max and first index, 8 values per AVX2 step),
// then over (row, chunk of 8192 logits) for the exp-sums, so that a single row is spread over the threads too.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu_kernels.h"
#include "vec_math.h"

namespace llmengine_cpu {

// Row x's first maximum: its index and value, or the first NaN's index (then the value is NaN).
std::pair<int64_t, float> first_max(const float* x, int64_t V) {
  float mx = -std::numeric_limits<float>::infinity();
  int64_t j = 0, arg = 0;
#ifdef LLME_VEC_MATH
  // Each lane keeps the first index of its maximum; a lane that meets a NaN reports it (the earliest wins below).
  __m256 mx8 = _mm256_set1_ps(mx), nan8 = _mm256_setzero_ps();
  __m256i idx8 = _mm256_setzero_si256(), at8 = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i step8 = _mm256_set1_epi32(8);
  for (; j + 8 <= V; j += 8) {
    const __m256 v = _mm256_loadu_ps(x + j);
    const __m256 greater = _mm256_cmp_ps(v, mx8, _CMP_GT_OQ);
    mx8 = _mm256_blendv_ps(mx8, v, greater);
    idx8 = _mm256_blendv_epi8(idx8, at8, _mm256_castps_si256(greater));
    nan8 = _mm256_or_ps(nan8, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    at8 = _mm256_add_epi32(at8, step8);
  }
  if (_mm256_movemask_ps(nan8)) {
    for (int64_t t = 0;; ++t)
      if (std::isnan(x[t])) return {t, x[t]};
  }
  alignas(32) float lane_max[8];
  alignas(32) int32_t lane_idx[8];
  _mm256_store_ps(lane_max, mx8);
  _mm256_store_si256(reinterpret_cast<__m256i*>(lane_idx), idx8);
  arg = j ? lane_idx[0] : 0;
  mx = lane_max[0];
  for (int k = 1; k < 8 && j; ++k)
    if (lane_max[k] > mx || (lane_max[k] == mx && lane_idx[k] < arg)) mx = lane_max[k], arg = lane_idx[k];
  if (!j) mx = -std::numeric_limits<float>::infinity();
#endif
  for (; j < V; ++j) {
    if (std::isnan(x[j])) return {j, x[j]};
    if (x[j] > mx) mx = x[j], arg = j;
  }
  return {arg, mx};
}

namespace {

// sum_j exp(x[j] - mx) over x[0:n].
float exp_sum(const float* x, int64_t n, float mx) {
  float total = 0.f;
  int64_t j = 0;
#ifdef LLME_VEC_MATH
  const __m256 m = _mm256_set1_ps(mx);
  __m256 sum8 = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) sum8 = _mm256_add_ps(sum8, exp256(_mm256_sub_ps(_mm256_loadu_ps(x + j), m)));
  total = hsum256(sum8);
#endif
  for (; j < n; ++j) total += std::exp(x[j] - mx);
  return total;
}

constexpr int64_t VOCAB_CHUNK = 8192;  // a row's exp-sum is split over threads in chunks of this many logits

}  // namespace

std::tuple<at::Tensor, at::Tensor> greedy_sample(const at::Tensor& logits, bool with_log_probs) {
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
  std::vector<float> row_max(B);
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) std::tie(tp[b], row_max[b]) = first_max(xp + b * stride, V);
  });
  if (!with_log_probs) {  // the argmax alone: no exp pass (a third of the time)
    log_probs.fill_(std::numeric_limits<float>::quiet_NaN());
    return {tokens, log_probs};
  }
  // The exp-sums, over (row, chunk of the vocabulary) so that one row keeps every thread busy too.
  const int64_t chunks = (V + VOCAB_CHUNK - 1) / VOCAB_CHUNK;
  std::vector<float> partial(B * chunks, 0.f);
  at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, j0 = task % chunks * VOCAB_CHUNK, n = std::min(VOCAB_CHUNK, V - j0);
      const float mx = row_max[b];
      if (!std::isnan(mx) && mx != -std::numeric_limits<float>::infinity())
        partial[task] = exp_sum(xp + b * stride + j0, n, mx);
    }
  });
  for (int64_t b = 0; b < B; ++b) {
    float total = 0.f;
    for (int64_t c = 0; c < chunks; ++c) total += partial[b * chunks + c];
    const float mx = row_max[b];
    lp[b] = std::isnan(mx) || mx == -std::numeric_limits<float>::infinity() ? std::numeric_limits<float>::quiet_NaN()
                                                                            : -std::log(total);
  }
  return {tokens, log_probs};
}

}  // namespace llmengine_cpu

TORCH_LIBRARY_FRAGMENT(llmengine_cpu, lib) {
  lib.def("greedy_sample(Tensor logits, bool with_log_probs=True) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(llmengine_cpu, CPU, lib) {
  lib.impl("greedy_sample", &llmengine_cpu::greedy_sample);
}
