// Each logits row's N most likely tokens with their log-probs, and the chosen token's own log-prob, without a
// [B, V] log-softmax (the sampler's rows that ask for top-N: OpenAI's `logprobs`, LLM Engine's `top_log_probs`).
//
// Layout: logits fp32 [B, V] (rows contiguous), tokens int64 [B] (each row's chosen token), k >= 1 ->
//   token_log_probs fp32 [B], top_values fp32 [B, k], top_ids int64 [B, k].
// log_prob(j) = x_j - max - log(sum_i exp(x_i - max)) (vec_math.h's exp_shifted, the sum in double), the same number
// for a token in the list and as the chosen one. The list runs from the most likely, a tie to the lower id; entries
// past the row's tokens of nonzero probability are -inf (id -1), as are all of a row with no distribution (a NaN,
// +inf or only -inf: its token log-prob is NaN).
// Grid: at::parallel_for over rows; one task one row: the max, the exp-sum, then one pass keeping the k best (8 logits
// a compare against the k-th best so far; only those above it are inserted).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <tuple>
#include <vector>

#include "cpu_kernels.h"
#include "vec_math.h"

namespace llmengine_cpu {

namespace {

using Entry = std::pair<float, int64_t>;  // (logit, id)

// best = row x's k largest finite logits, largest first, a tie to the lower id (a later equal one is not taken).
void k_best(const float* x, int64_t V, int64_t k, std::vector<Entry>& best) {
  best.clear();
  constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
  float kth = NEG_INF;  // what a logit must beat to enter: the k-th best once there are k
  auto offer = [&](int64_t j) {
    const float v = x[j];
    if (!(v > kth)) return;
    best.insert(std::upper_bound(best.begin(), best.end(), v, [](float a, const Entry& e) { return a > e.first; }),
                {v, j});
    if (static_cast<int64_t>(best.size()) > k) best.pop_back();
    if (static_cast<int64_t>(best.size()) == k) kth = best.back().first;
  };
  int64_t j = 0;
#ifdef LLME_VEC_MATH
  for (; j + 8 <= V; j += 8) {
    int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + j), _mm256_set1_ps(kth), _CMP_GT_OQ));
    for (; mask; mask &= mask - 1) offer(j + __builtin_ctz(mask));
  }
#endif
  for (; j < V; ++j) offer(j);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> top_log_probs(const at::Tensor& logits, const at::Tensor& tokens,
                                                             int64_t k) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == at::kFloat && logits.dim() == 2 &&
                  logits.stride(1) == 1,
              "top_log_probs: logits must be CPU fp32 [B, V] with contiguous rows");
  const int64_t B = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V > 0 && k >= 1, "top_log_probs: an empty vocabulary or k = ", k, " (accepted: k >= 1)");
  const at::Tensor chosen = tokens.to(at::kLong).contiguous();
  TORCH_CHECK(chosen.numel() == B, "top_log_probs: one token per row, got ", chosen.numel(), " for ", B, " rows");
  const int64_t* cp = chosen.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(cp[b] >= 0 && cp[b] < V, "top_log_probs: row ", b, "'s token ", cp[b], " is not in [0, ", V, ")");
  const int64_t kk = std::min(k, V);
  auto token_lp = at::empty({B}, logits.options());
  auto values = at::full({B, k}, -std::numeric_limits<float>::infinity(), logits.options());
  auto ids = at::full({B, k}, -1, logits.options().dtype(at::kLong));
  const float* xp = logits.data_ptr<float>();
  float *tlp = token_lp.data_ptr<float>(), *vp = values.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  const int64_t stride = logits.stride(0);
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> e(V);
    std::vector<Entry> best;
    for (int64_t b = begin; b < end; ++b) {
      const float* x = xp + b * stride;
      const float mx = first_max(x, V).second;
      if (std::isnan(mx) || std::isinf(mx)) {  // NaN, +inf, or all -inf: no distribution
        tlp[b] = std::numeric_limits<float>::quiet_NaN();
        continue;
      }
      exp_shifted(x, V, mx, e.data());
      double total = 0.0;
      for (int64_t j = 0; j < V; ++j) total += e[j];
      const float log_total = static_cast<float>(std::log(total));
      auto log_prob = [&](int64_t j) { return x[j] - mx - log_total; };
      tlp[b] = log_prob(cp[b]);
      k_best(x, V, kk, best);
      for (size_t i = 0; i < best.size(); ++i) vp[b * k + i] = log_prob(best[i].second), ip[b * k + i] = best[i].second;
    }
  });
  return {token_lp, values, ids};
}

}  // namespace llmengine_cpu

TORCH_LIBRARY_FRAGMENT(llmengine_cpu, lib) {
  lib.def("top_log_probs(Tensor logits, Tensor tokens, int k) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(llmengine_cpu, CPU, lib) {
  lib.impl("top_log_probs", &llmengine_cpu::top_log_probs);
}
