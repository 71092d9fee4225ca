// Sampling on the CPU without sorting the vocabulary or a torch op per row: top-k / top-p truncation and the draw.
//
// truncate_logits: logits fp32 [B, V] (rows contiguous), top_k int64 [B] (>= V: off), top_p fp32 [B] (>= 1: off) ->
//     a copy with -inf outside each row's kept set, as runtime/sampler.py's `apply_top_k_top_p` keeps it: the top_k
//     largest (ties: the lower token id first, as argmax), then the smallest prefix of those in that order whose
//     probability (softmax over the top k) reaches top_p (a token stays while the mass before it is below top_p; the
//     first always stays). Instead of sorting V logits, top-k selects with nth_element among the logits within a
//     margin of the max (1, 4, 16, ... until k of them), and top-p sorts only the
//     tokens whose probability is at least c, for the largest c in 1e-3, 1e-6, ... whose tokens hold the mass top_p
//     (the nucleus lies among them), and halves the range of ranks the boundary is in with nth_element until a few are
//     left to sort. The mass is summed in double and rounded to fp32 per token, as torch's cumsum.
// sample_logits: logits fp32 [B, V] (the final ones: penalties, temperature, truncation applied), uniforms fp64 [B]
//     in [0, 1) -> tokens int64 [B], log_probs fp32 [B]. Row b's token is the first t (in id order) whose cumulative
//     exp(x - max), summed in double, exceeds u_b times the row's total: a draw from softmax(x) by inverse CDF that
//     never picks a token of probability 0. log_probs[b] = x_t - max - log(sum exp(x - max)), NaN without
//     with_log_probs. A row without a finite logit fails with a message naming it.
// Grid: at::parallel_for over rows; each row on one thread (one pass of exps over V, a few compares per logit).
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

namespace {

constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// The row's largest logit, NaN if it has one.
float row_max(const float* x, int64_t V) {
  float mx = NEG_INF;
  bool nan = false;
  for (int64_t j = 0; j < V; ++j) mx = std::max(mx, x[j]), nan |= x[j] != x[j];
  return nan ? std::numeric_limits<float>::quiet_NaN() : mx;
}

using Ranked = std::pair<float, int32_t>;  // (logit, token)
inline bool before(const Ranked& a, const Ranked& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); }

// The kept tokens of row x (top-k, then top-p) in rank order; all of them when neither truncates (kept empty, false).
bool kept_tokens(const float* x, int64_t V, int64_t k, float p, std::vector<Ranked>& kept, std::vector<float>& e) {
  kept.clear();
  if (k >= V && p >= 1.f) return false;
  const float mx = row_max(x, V);
  if (std::isnan(mx)) return false;  // (sample_logits refuses the row)
  if (k < V) {
    // The top k lie among the logits within some margin of the max: widen it until there are k of them.
    for (float margin = 1.f;; margin *= 4.f) {
      kept.clear();
      const float floor = margin < 1e30f ? mx - margin : NEG_INF;
      for (int64_t j = 0; j < V; ++j)
        if (x[j] >= floor) kept.push_back({x[j], static_cast<int32_t>(j)});
      if (static_cast<int64_t>(kept.size()) >= k || floor == NEG_INF) break;
    }
    std::nth_element(kept.begin(), kept.begin() + (k - 1), kept.end(), before);
    kept.resize(std::max<int64_t>(k, 1));
    if (p >= 1.f) return true;
  }
  double total = 0.0;  // the probability mass of the ranks walked so far
  float total_f = 0.f;  // the softmax's denominator over the top k (all of V without top-k)
  e.resize(V);
  double denominator = 0.0;  // in double: a float sum of 49k terms in order drifts ~1e-5, enough to move the boundary
  if (k < V) {
    for (const Ranked& r : kept) denominator += (e[r.second] = std::exp(r.first - mx));
    total_f = static_cast<float>(denominator);
  } else {
    exp_shifted(x, V, mx, e.data());
    for (int64_t j = 0; j < V; ++j) denominator += e[j];
    total_f = static_cast<float>(denominator);
    // The nucleus lies among the tokens of probability >= c once those hold the mass p.
    for (float c = 1e-3f;; c *= 1e-3f) {
      kept.clear();
      double mass = 0.0;
      for (int64_t j = 0; j < V; ++j)
        if (e[j] >= c * total_f) kept.push_back({x[j], static_cast<int32_t>(j)}), mass += e[j];
      if (mass >= 1.0001 * p * total_f || c < 1e-30f) break;
    }
  }
  // The first rank whose mass before it reaches p: narrowed by nth_element halvings (the ranks below a split are
  // all kept or the boundary lies among them), then the last few sorted and walked.
  auto prob = [&](const Ranked& r) { return e[r.second] / total_f; };
  int64_t lo = 0, hi = static_cast<int64_t>(kept.size());
  while (hi - lo > 64) {
    const int64_t mid = lo + (hi - lo) / 2;
    std::nth_element(kept.begin() + lo, kept.begin() + mid, kept.begin() + hi, before);
    double left = 0.0;
    for (int64_t i = lo; i < mid; ++i) left += prob(kept[i]);
    const float pm = prob(kept[mid]);
    if (static_cast<float>(total + left + pm) - pm >= p && mid > 0) hi = mid + 1;  // the boundary is at mid or before
    else total += left, lo = mid;
  }
  std::sort(kept.begin() + lo, kept.begin() + hi, before);
  int64_t n = lo;
  for (; n < hi; ++n) {
    const float pn = prob(kept[n]);
    total += pn;
    const float mass_before = static_cast<float>(total) - pn;
    if (n > 0 && mass_before >= p) break;
  }
  kept.resize(n);
  return true;
}

}  // namespace

at::Tensor truncate_logits(const at::Tensor& logits, const at::Tensor& top_k, const at::Tensor& top_p) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == at::kFloat && logits.dim() == 2 &&
                  logits.stride(1) == 1, "truncate_logits: logits must be CPU fp32 [B, V] with contiguous rows");
  const int64_t B = logits.size(0), V = logits.size(1);
  const at::Tensor k = top_k.to(at::kLong).contiguous(), p = top_p.to(at::kFloat).contiguous();
  TORCH_CHECK(k.numel() == B && p.numel() == B, "truncate_logits: top_k and top_p must be [B=", B, "]");
  const int64_t* kp = k.data_ptr<int64_t>();
  const float* pp = p.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(kp[b] >= 1 && pp[b] > 0.f, "truncate_logits: row ", b, " has top_k ", kp[b], " and top_p ", pp[b],
                ": accepted top_k >= 1, top_p in (0, 1]");
  at::Tensor out = logits.clone(at::MemoryFormat::Contiguous);
  const float* xp = logits.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t stride = logits.stride(0);
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<Ranked> kept;
    std::vector<float> e;
    for (int64_t b = begin; b < end; ++b) {
      const float* x = xp + b * stride;
      if (!kept_tokens(x, V, kp[b], pp[b], kept, e)) continue;
      float* o = op + b * V;
      std::fill(o, o + V, NEG_INF);
      for (const Ranked& r : kept) o[r.second] = x[r.second];
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sample_logits(const at::Tensor& logits, const at::Tensor& uniforms,
                                                 bool with_log_probs) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == at::kFloat && logits.dim() == 2 &&
                  logits.stride(1) == 1, "sample_logits: logits must be CPU fp32 [B, V] with contiguous rows");
  const int64_t B = logits.size(0), V = logits.size(1);
  const at::Tensor u = uniforms.to(at::kDouble).contiguous();
  TORCH_CHECK(u.numel() == B, "sample_logits: uniforms must be [B=", B, "]");
  auto tokens = at::empty({B}, logits.options().dtype(at::kLong));
  auto log_probs = at::empty({B}, logits.options());
  const float* xp = logits.data_ptr<float>();
  const double* up = u.data_ptr<double>();
  int64_t* tp = tokens.data_ptr<int64_t>();
  float* lp = log_probs.data_ptr<float>();
  const int64_t stride = logits.stride(0);
  std::vector<int64_t> bad(B, 0);
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> e(V);
    for (int64_t b = begin; b < end; ++b) {
      const float* x = xp + b * stride;
      const float mx = row_max(x, V);
      if (!(mx > NEG_INF) || std::isnan(mx) || std::isinf(mx)) {  // all -inf, a NaN, or +inf: no distribution
        bad[b] = 1;
        continue;
      }
      const float total_f = exp_shifted(x, V, mx, e.data());
      double total = 0.0;
      for (int64_t j = 0; j < V; ++j) total += e[j];
      const double target = up[b] * total;
      double mass = 0.0;
      int64_t t = -1, last = 0;
      for (int64_t j = 0; j < V; ++j) {
        if (e[j] <= 0.f) continue;
        last = j;
        mass += e[j];
        if (mass > target) {
          t = j;
          break;
        }
      }
      tp[b] = t >= 0 ? t : last;  // (rounding put the point past the total: the last token that can be drawn)
      lp[b] = with_log_probs ? x[tp[b]] - mx - std::log(total_f) : std::numeric_limits<float>::quiet_NaN();
    }
  });
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(!bad[b], "sample_logits: row ", b, " has no finite logit to sample from (NaN, +inf or all -inf)");
  return {tokens, log_probs};
}

}  // namespace llmengine_cpu

TORCH_LIBRARY_FRAGMENT(llmengine_cpu, lib) {
  lib.def("truncate_logits(Tensor logits, Tensor top_k, Tensor top_p) -> Tensor");
  lib.def("sample_logits(Tensor logits, Tensor uniforms, bool with_log_probs=True) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(llmengine_cpu, CPU, lib) {
  lib.impl("truncate_logits", &llmengine_cpu::truncate_logits);
  lib.impl("sample_logits", &llmengine_cpu::sample_logits);
}
