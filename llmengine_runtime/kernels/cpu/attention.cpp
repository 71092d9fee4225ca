// Paged KV cache on the CPU: store the new tokens' K/V, and decode attention (one query per sequence). The caches
// are fp32 or fp16 (kv_rows.h: read as fp32, stored rounded to nearest even); q, k, v and the output are fp32.
//
// store_kv:          k, v [T, Hkv, d] (last dim contiguous); k_cache, v_cache [num_blocks, block_size, Hkv, d]
//                    contiguous; slot_mapping int64 [T] (block * block_size + offset; -1 = not stored).
// decode_attention:  q [S, H, d] (last dim contiguous), the caches as above, block_tables int32 [S, max_blocks],
//                    seq_lens int32 [S], optional ALiBi slopes fp32 [H] (already multiplied by the scale).
//                    out[s, h] = softmax_j(scale q.k_j + slope (j - (L - 1))) . v_j over the L = seq_lens[s]
//                    cached positions of sequence s, keys read through its block table. Returns [S, H, d].
// Grid: at::parallel_for over (sequence, KV head, chunk of keys): one task computes, for the H / Hkv query heads
// that share the KV head, the max, exp-sum and exp-weighted sum of the values over its chunk's keys, a cache block
// at a time with an online softmax (each key and value row read once for the whole group); then at::parallel_for
// over (sequence, query head) merges the chunks (flash-decoding's split-K). The chunk count (decode_splits) is the
// one that leaves the busiest thread the fewest keys, with at least 16 keys a chunk and at most 16 chunks.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_kernels.h"
#include "kv_rows.h"
#include "vec_math.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace llmengine_cpu {

constexpr int64_t SPLIT_KEYS = 16;  // keys per chunk at least
constexpr int64_t MAX_SPLITS = 16;
constexpr int64_t TASK_KEYS = 4;  // what a task costs beyond its keys (setup, its share of the merge), in keys

bool cache_type_ok(const at::Tensor& k_cache, const at::Tensor& v_cache) {
  return (k_cache.scalar_type() == at::kFloat || k_cache.scalar_type() == at::kHalf) &&
         v_cache.scalar_type() == k_cache.scalar_type();
}

void store_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slot_mapping) {
  TORCH_CHECK(k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat && cache_type_ok(k_cache, v_cache),
              "store_kv: k, v fp32 and the caches both fp32 or both fp16");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes(),
              "store_kv: caches must be contiguous and alike");
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && k.stride(2) == 1 && v.stride(2) == 1,
              "store_kv: k, v must be [T, Hkv, d] with a contiguous last dim");
  const int64_t T = k.size(0), Hkv = k.size(1), d = k.size(2);
  TORCH_CHECK(k_cache.size(2) == Hkv && k_cache.size(3) == d, "store_kv: cache heads/dim differ from k's");
  const at::Tensor slots = slot_mapping.to(at::kLong).contiguous();
  TORCH_CHECK(slots.numel() == T, "store_kv: slot_mapping must be [T]");
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(sp[t] < num_slots, "store_kv: slot ", sp[t], " past the cache");
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  auto store = [&](auto* kc, auto* vc) {
    for (int64_t t = 0; t < T; ++t) {
      if (sp[t] < 0) continue;
      for (int64_t h = 0; h < Hkv; ++h) {
        const int64_t dst = (sp[t] * Hkv + h) * d;
        store_row(kp + t * k.stride(0) + h * k.stride(1), kc + dst, d);
        store_row(vp + t * v.stride(0) + h * v.stride(1), vc + dst, d);
      }
    }
  };
  if (k_cache.scalar_type() == at::kHalf) store(k_cache.data_ptr<Half>(), v_cache.data_ptr<Half>());
  else store(k_cache.data_ptr<float>(), v_cache.data_ptr<float>());
}

int64_t decode_splits(const int32_t* seq_lens, int64_t S, int64_t Hkv, int64_t threads) {
  // Each (sequence, KV head) splits its keys into `splits` chunks, and the tasks are dealt to the threads in
  // equal runs: choose the count that gives the busiest thread the fewest keys (the longest sequence's, plus a
  // task's fixed cost), the fewer chunks on a tie. A batch-1 step of 3 KV heads on 2 threads takes 2 or 4 chunks
  // (6 or 12 tasks, 3 or 6 each) rather than 1 or 3 (3 or 9 tasks: one thread does 2 of 3, or 5 of 9).
  int64_t max_len = 0;
  for (int64_t s = 0; s < S; ++s) max_len = std::max<int64_t>(max_len, seq_lens[s]);
  const int64_t most = std::max<int64_t>(1, std::min(MAX_SPLITS, max_len / SPLIT_KEYS));
  int64_t best = 1, best_cost = std::numeric_limits<int64_t>::max();
  for (int64_t splits = 1; splits <= most; ++splits) {
    const int64_t tasks_per_thread = (S * Hkv * splits + threads - 1) / threads;
    const int64_t cost = tasks_per_thread * ((max_len + splits - 1) / splits + TASK_KEYS);
    if (cost < best_cost) best = splits, best_cost = cost;
  }
  return best;
}

void check_block_tables(const int32_t* bt, const int32_t* lp, int64_t S, int64_t max_blocks, int64_t block_size,
                        int64_t num_blocks) {
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(lp[s] >= 0 && lp[s] <= max_blocks * block_size, "decode_attention: seq_len ", lp[s],
                " does not fit the block table");
    for (int64_t b = 0; b < (lp[s] + block_size - 1) / block_size; ++b)
      TORCH_CHECK(bt[s * max_blocks + b] >= 0 && bt[s * max_blocks + b] < num_blocks,
                  "decode_attention: block ", bt[s * max_blocks + b], " is not in the cache");
  }
}

void PagedDecode::task(int64_t task, float* scores) const {
  if (half_cache) task_rows(task, scores, static_cast<const Half*>(k_cache), static_cast<const Half*>(v_cache));
  else task_rows(task, scores, static_cast<const float*>(k_cache), static_cast<const float*>(v_cache));
}

template <typename T>
void PagedDecode::task_rows(int64_t task, float* scores, const T* k_rows, const T* v_rows) const {
  const int64_t G = H / Hkv, row_stride = Hkv * d;
  const int64_t split = task % splits, s = task / splits / Hkv, kvh = task / splits % Hkv, L = seq_lens[s];
  const int64_t chunk = (L + splits - 1) / splits, j0 = std::min(L, split * chunk), j1 = std::min(L, j0 + chunk);
  float* m_run = part_max + task * G;  // running max, exp-sum and sum of p v per query head
  float* l_run = part_sum + task * G;  // (l stays 0 for an empty chunk)
  float* acc = part_acc + task * G * d;
  std::fill(m_run, m_run + G, -std::numeric_limits<float>::infinity());
  std::fill(l_run, l_run + G, 0.f);
  std::fill(acc, acc + G * d, 0.f);
  const float* q_group = q + s * q_seq_stride + kvh * G * q_head_stride;
  // One block of keys at a time (one block-table lookup each): the G heads' scores, then an online-softmax
  // update of each head's state, its value sum kept in registers over the block's keys.
  for (int64_t j = j0; j < j1;) {
    const int64_t off = j % block_size, take = std::min(block_size - off, j1 - j);
    const int64_t block = block_tables[s * max_blocks + j / block_size];
    const int64_t first = ((block * block_size + off) * Hkv + kvh) * d;
    const T* kb = k_rows + first;
    const T* vb = v_rows + first;
    for (int64_t g = 0; g < G; ++g) {
      float* sc = scores + g * block_size;
      const float* qg = q_group + g * q_head_stride;
      const float slope = slopes ? slopes[kvh * G + g] : 0.f;
      float block_max = -std::numeric_limits<float>::infinity();
      dot_rows(qg, kb, row_stride, take, d, sc);
      for (int64_t t = 0; t < take; ++t) {
        sc[t] = sc[t] * scale + (slopes ? slope * static_cast<float>(j + t - (L - 1)) : 0.f);
        block_max = std::max(block_max, sc[t]);
      }
      const float m_new = std::max(m_run[g], block_max), alpha = std::exp(m_run[g] - m_new);
      int64_t t = 0;
      float block_sum = 0.f;
#ifdef LLME_VEC_MATH
      const __m256 m8 = _mm256_set1_ps(m_new);
      __m256 sum8 = _mm256_setzero_ps();
      for (; t + 8 <= take; t += 8) {
        const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(sc + t), m8));
        _mm256_storeu_ps(sc + t, e);
        sum8 = _mm256_add_ps(sum8, e);
      }
      block_sum = hsum256(sum8);
#endif
      for (; t < take; ++t) block_sum += (sc[t] = std::exp(sc[t] - m_new));
      l_run[g] = l_run[g] * alpha + block_sum;
      m_run[g] = m_new;
      accumulate_values(acc + g * d, alpha, sc, vb, row_stride, take, d);
    }
    j += take;
  }
}

void PagedDecode::merge(int64_t sh) const {
  const int64_t G = H / Hkv;
  const int64_t s = sh / H, h = sh % H, kvh = h / G, g = h % G;
  float* o = out + sh * d;
  std::fill(o, o + d, 0.f);
  float mx = -std::numeric_limits<float>::infinity(), total = 0.f;
  for (int64_t split = 0; split < splits; ++split) {
    const int64_t task = (s * Hkv + kvh) * splits + split;
    if (part_sum[task * G + g] > 0.f) mx = std::max(mx, part_max[task * G + g]);
  }
  for (int64_t split = 0; split < splits; ++split) {
    const int64_t task = (s * Hkv + kvh) * splits + split;
    const float l = part_sum[task * G + g];
    if (l <= 0.f) continue;
    const float w = std::exp(part_max[task * G + g] - mx);
    total += w * l;
    const float* a = part_acc + (task * G + g) * d;
    #pragma omp simd
    for (int64_t i = 0; i < d; ++i) o[i] += w * a[i];
  }
  if (total > 0.f) {
    const float inv = 1.f / total;
    for (int64_t i = 0; i < d; ++i) o[i] *= inv;
  }
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                            const c10::optional<at::Tensor>& alibi_slopes) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && cache_type_ok(k_cache, v_cache),
              "decode_attention: q fp32 and the caches both fp32 or both fp16");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "decode_attention: q must be [S, H, d], last dim contiguous");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes(),
              "decode_attention: caches must be contiguous and alike");
  const int64_t S = q.size(0), H = q.size(1), d = q.size(2);
  const int64_t block_size = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == d && H % Hkv == 0, "decode_attention: heads/dim of q and the cache disagree");
  const at::Tensor tables = block_tables.to(at::kInt).contiguous();
  const at::Tensor lens = seq_lens.to(at::kInt).contiguous();
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == S && lens.numel() == S,
              "decode_attention: block_tables [S, max_blocks] and seq_lens [S]");
  const int64_t max_blocks = tables.size(1);
  const int32_t* bt = tables.data_ptr<int32_t>();
  const int32_t* lp = lens.data_ptr<int32_t>();
  check_block_tables(bt, lp, S, max_blocks, block_size, k_cache.size(0));
  at::Tensor slopes;
  if (alibi_slopes.has_value()) {
    slopes = alibi_slopes->to(at::kFloat).contiguous();
    TORCH_CHECK(slopes.numel() == H, "decode_attention: one ALiBi slope per head");
  }
  auto out = at::empty({S, H, d}, q.options());
  const int64_t G = H / Hkv, splits = decode_splits(lp, S, Hkv, at::get_num_threads());
  const int64_t tasks = S * Hkv * splits;
  std::vector<float> part_max(tasks * G), part_sum(tasks * G), part_acc(tasks * G * d);
  const PagedDecode plan{q.data_ptr<float>(), k_cache.data_ptr(), v_cache.data_ptr(), bt, lp,
                         slopes.defined() ? slopes.data_ptr<float>() : nullptr, out.data_ptr<float>(),
                         part_max.data(), part_sum.data(), part_acc.data(), S, H, Hkv, d, block_size, max_blocks,
                         q.stride(0), q.stride(1), splits, static_cast<float>(scale),
                         k_cache.scalar_type() == at::kHalf};
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(G * block_size);
    for (int64_t task = begin; task < end; ++task) plan.task(task, scores.data());
  });
  at::parallel_for(0, S * H, 16, [&](int64_t begin, int64_t end) {
    for (int64_t sh = begin; sh < end; ++sh) plan.merge(sh);
  });
  return out;
}

}  // namespace llmengine_cpu

TORCH_LIBRARY_FRAGMENT(llmengine_cpu, lib) {
  lib.def("store_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
  lib.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
          "float scale, Tensor? alibi_slopes) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmengine_cpu, CPU, lib) {
  lib.impl("store_kv", &llmengine_cpu::store_kv);
  lib.impl("decode_attention", &llmengine_cpu::decode_attention);
}
