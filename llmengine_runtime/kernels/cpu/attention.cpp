// Paged KV cache on the CPU: store the new tokens' K/V, and attention of any query rows over it. The caches are fp32
// or fp16 (kv_rows.h: read as fp32, stored rounded to nearest even); q, k, v and the output are fp32.
//
// store_kv:          k, v [T, Hkv, d] (last dim contiguous); k_cache, v_cache [num_blocks, block_size, Hkv, d]
//                    contiguous; slot_mapping int64 [T] (block * block_size + offset; -1 = not stored).
// paged_attention:   q [T, H, d] (last dim contiguous): the new tokens of S sequences, packed as cu_seqlens_q int32
//                    [S + 1] says, their K/V already in the cache; block_tables int32 [S, max_blocks]; seq_lens
//                    int32 [S] (after this step); optional ALiBi slopes fp32 [H] (already multiplied by the scale).
//                    Row r of sequence s sits at position p = seq_lens[s] - q_len + (r - cu_seqlens_q[s]) and
//                    sees the L = p + 1 cached keys j <= p: out[r, h] = softmax_j(scale q.k_j + slope (j - p)) . v_j;
//                    with a sliding `window` W > 0 only the keys p - W < j <= p (0 or -1: no window).
// decode_attention:  the same with one row per sequence (q [S, H, d], no cu_seqlens_q).
//
// Batch invariance: a row's output depends only on its own q, its L keys and values, never on the other rows, the
// batch, the thread count or whether it came from a prompt chunk, a decode step or a speculative verification.
// Its keys are cut into chunks of CHUNK_KEYS (fixed), each chunk reduced by one function in one order (for each
// of the G = H / Hkv query heads all its scores in the chunk, their max, exp-sum and exp-weighted value sum, without
// a running rescale), and the chunks' partials merged in chunk
// order. A window leaves the chunks where they are
// (multiples of CHUNK_KEYS from key 0): a row's keys before its window are in no chunk's sums, chunks wholly before
// it are empty and weigh nothing in the merge. How the (row, KV head, chunk) pieces are
// dealt to threads changes only who computes them.
// Grid: the split form (few rows: decode steps) runs each (row, KV head, chunk) as a task, then each (row, head)'s
// merge as another; the tiled form (many rows: prompt chunks) runs each (tile of up to ROW_TILE consecutive rows of
// one sequence, KV head) as a task that takes each block of keys through all the tile's rows while it is in cache,
// keeps each row's chunk partials in its own scratch and merges them. Each row's arithmetic is the same in both.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_kernels.h"
#include "kv_heads.h"
#include "vec_math.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace llmengine_cpu {

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

int64_t num_chunks(int64_t keys) { return std::max<int64_t>(1, (keys + CHUNK_KEYS - 1) / CHUNK_KEYS); }

void PagedAttention::chunk(int64_t r0, int64_t nr, int64_t kvh, int64_t c, float* scores, float* m, float* l,
                           float* acc) const {
  if (half_cache) chunk_rows(r0, nr, kvh, c, scores, m, l, acc, static_cast<const Half*>(k_cache),
                             static_cast<const Half*>(v_cache));
  else chunk_rows(r0, nr, kvh, c, scores, m, l, acc, static_cast<const float*>(k_cache),
                  static_cast<const float*>(v_cache));
}

template <typename E>
void PagedAttention::chunk_rows(int64_t r0, int64_t nr, int64_t kvh, int64_t c, float* scores, float* m_all,
                                float* l_all, float* acc_all, const E* k_rows, const E* v_rows) const {
  const int64_t G = H / Hkv, row_stride = Hkv * d, s = row_seq[r0], j0 = c * CHUNK_KEYS;
  int64_t j_begin = j0 + CHUNK_KEYS, j_end = j0;  // the first and furthest keys any row of the tile sees here
  for (int64_t i = 0; i < nr; ++i) {
    j_begin = std::min(j_begin, std::max(j0, first_key(r0 + i)));
    j_end = std::max(j_end, std::min(row_keys[r0 + i], j0 + CHUNK_KEYS));
  }
  std::fill(m_all, m_all + nr * G, -std::numeric_limits<float>::infinity());
  std::fill(l_all, l_all + nr * G, 0.f);  // (l stays 0 for an empty chunk)
  std::fill(acc_all, acc_all + nr * G * d, 0.f);
  // Each row in three passes over its keys in the chunk, read in place a cache block at a time: the G query heads'
  // scores (scores [G, CHUNK_KEYS]); each head's max, then its exps and their sum; the exp-weighted value sums (one
  // FMA chain a lane over the chunk's keys in order: no running rescale). A row's numbers are the same whatever the
  // tile.
  for (int64_t i = 0; i < nr; ++i) {
    const int64_t L = row_keys[r0 + i], j1 = std::min(L, j0 + CHUNK_KEYS);
    const int64_t ja = std::max(j0, first_key(r0 + i));  // this row's first key in the chunk
    if (ja >= j1) continue;
    const int64_t take = j1 - ja;
    const float* q_group = q + (r0 + i) * q_row_stride + kvh * G * q_head_stride;
    float *m_row = m_all + i * G, *l_row = l_all + i * G, *acc = acc_all + i * G * d;
    // key j's row of this KV head in the cache, and the keys of its block from j on (to the row's last one)
    auto row_of = [&](int64_t j) {
      return ((block_tables[s * max_blocks + j / block_size] * block_size + j % block_size) * Hkv + kvh) * d;
    };
    auto in_block = [&](int64_t j) { return std::min(block_size - j % block_size, j1 - j); };
    auto blocks = [&](auto&& each) {  // each(first row of the block's keys in the cache, key offset, count)
      for (int64_t j = ja; j < j1; j += in_block(j)) each(row_of(j), j - ja, in_block(j));
    };
    // The keys and values come from a cache that the step's weight stream has just evicted, scattered by block: each
    // block fetches its values and the next block's keys ahead of use (a prefetch changes no number).
    auto prefetch_rows = [&](const E* rows, int64_t first, int64_t n) {
      const char* p = reinterpret_cast<const char*>(rows + first);
      for (int64_t t = 0; t < n; ++t)
        for (int64_t b = 0; b < static_cast<int64_t>(d * sizeof(E)); b += 64)
          __builtin_prefetch(p + t * row_stride * sizeof(E) + b);
    };
    prefetch_rows(k_rows, row_of(ja), in_block(ja));  // (ja < j1 here)
    blocks([&](int64_t first, int64_t at, int64_t n) {
      if (const int64_t next = ja + at + n; next < j1) prefetch_rows(k_rows, row_of(next), in_block(next));
      prefetch_rows(v_rows, first, n);
      dot_rows_heads(q_group, q_head_stride, G, k_rows + first, row_stride, n, d, scores + at, CHUNK_KEYS);
    });
    for (int64_t g = 0; g < G; ++g) {
      float* sc = scores + g * CHUNK_KEYS;
      const float slope = slopes ? slopes[kvh * G + g] : 0.f;
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t t = 0; t < take; ++t) {
        sc[t] = sc[t] * scale + (slopes ? slope * static_cast<float>(ja + t - (L - 1)) : 0.f);
        mx = std::max(mx, sc[t]);
      }
      l_row[g] = exp_shifted(sc, take, mx, sc);  // (vec_math.h)
      m_row[g] = mx;
    }
    blocks([&](int64_t first, int64_t at, int64_t n) {  // 1 * a is exact: the chain goes on across blocks
      accumulate_values_heads(acc, G, 1.f, scores + at, CHUNK_KEYS, v_rows + first, row_stride, n, d);
    });
  }
}

void PagedAttention::merge(int64_t r, int64_t h, const float* m, const float* l, const float* acc, int64_t stride,
                           int64_t stride_acc) const {
  const int64_t G = H / Hkv, g = h % G, chunks = num_chunks(row_keys[r]);
  float* o = out + (r * H + h) * d;
  std::fill(o, o + d, 0.f);
  float mx = -std::numeric_limits<float>::infinity(), total = 0.f;
  for (int64_t c = 0; c < chunks; ++c)
    if (l[c * stride + g] > 0.f) mx = std::max(mx, m[c * stride + g]);
  for (int64_t c = 0; c < chunks; ++c) {
    const float lc = l[c * stride + g];
    if (lc <= 0.f) continue;
    const float w = std::exp(m[c * stride + g] - mx);
    total += w * lc;
    const float* a = acc + c * stride_acc + g * d;
    #pragma omp simd
    for (int64_t i = 0; i < d; ++i) o[i] += w * a[i];
  }
  if (total > 0.f) {
    const float inv = 1.f / total;
    for (int64_t i = 0; i < d; ++i) o[i] *= inv;
  }
}

int64_t PagedAttention::plan_split(std::vector<int64_t>& row_task) const {
  row_task.resize(T + 1);
  row_task[0] = 0;
  for (int64_t r = 0; r < T; ++r) row_task[r + 1] = row_task[r] + Hkv * num_chunks(row_keys[r]);
  return row_task[T];
}

void PagedAttention::split_task(int64_t task, const int64_t* row_task, float* scores, float* part_max,
                                float* part_sum, float* part_acc) const {
  const int64_t G = H / Hkv;
  const int64_t r = std::upper_bound(row_task, row_task + T + 1, task) - row_task - 1;
  const int64_t chunks = num_chunks(row_keys[r]), kvh = (task - row_task[r]) / chunks,
                c = (task - row_task[r]) % chunks;
  chunk(r, 1, kvh, c, scores, part_max + task * G, part_sum + task * G, part_acc + task * G * d);
}

void PagedAttention::split_merge(int64_t rh, const int64_t* row_task, const float* part_max, const float* part_sum,
                                 const float* part_acc) const {
  const int64_t G = H / Hkv, r = rh / H, h = rh % H;
  const int64_t first = row_task[r] + (h / G) * num_chunks(row_keys[r]);  // the row's KV head's chunk 0
  merge(r, h, part_max + first * G, part_sum + first * G, part_acc + first * G * d, G, G * d);
}

int64_t PagedAttention::plan_tiles(std::vector<int64_t>& tile_start) const {
  tile_start.clear();
  for (int64_t r = 0; r < T; ++r)
    if (r == 0 || row_seq[r] != row_seq[r - 1] || r - tile_start.back() == ROW_TILE) tile_start.push_back(r);
  const int64_t tiles = static_cast<int64_t>(tile_start.size());
  tile_start.push_back(T);
  return tiles;
}

void PagedAttention::tile(int64_t r0, int64_t nr, int64_t kvh, float* scores, std::vector<float>& partial) const {
  const int64_t G = H / Hkv;
  int64_t chunks = 1;
  for (int64_t i = 0; i < nr; ++i) chunks = std::max(chunks, num_chunks(row_keys[r0 + i]));
  const int64_t per_chunk = nr * G * (d + 2);
  partial.resize(chunks * per_chunk);
  for (int64_t c = 0; c < chunks; ++c) {
    float* m = partial.data() + c * per_chunk;
    chunk(r0, nr, kvh, c, scores, m, m + nr * G, m + 2 * nr * G);
  }
  // Row i's chunk-c partials sit in chunk c's block, at row i: merge reads them a chunk block apart.
  const float* m = partial.data();
  for (int64_t i = 0; i < nr; ++i)
    for (int64_t g = 0; g < G; ++g)
      merge(r0 + i, kvh * G + g, m + i * G, m + nr * G + i * G, m + 2 * nr * G + i * G * d, per_chunk,
            per_chunk);
}

void PagedAttention::run(int threads) const {
  const int64_t G = H / Hkv;
  std::vector<int64_t> tile_start;
  const int64_t tiles = plan_tiles(tile_start);
  if (tiles * Hkv >= 4 * threads) {  // enough (tile of rows, KV head) tasks to share out whole: prompt chunks
    at::parallel_for(0, tiles * Hkv, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores(G * CHUNK_KEYS), partial;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t t = task / Hkv;
        tile(tile_start[t], tile_start[t + 1] - tile_start[t], task % Hkv, scores.data(), partial);
      }
    });
    return;
  }
  std::vector<int64_t> row_task;
  const int64_t tasks = plan_split(row_task);
  std::vector<float> part_max(tasks * G), part_sum(tasks * G), part_acc(tasks * G * d);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(G * CHUNK_KEYS);
    for (int64_t task = begin; task < end; ++task)
      split_task(task, row_task.data(), scores.data(), part_max.data(), part_sum.data(), part_acc.data());
  });
  at::parallel_for(0, T * H, 16, [&](int64_t begin, int64_t end) {
    for (int64_t rh = begin; rh < end; ++rh)
      split_merge(rh, row_task.data(), part_max.data(), part_sum.data(), part_acc.data());
  });
}

namespace {

struct CheckedCaches {
  int64_t H, d, block_size, Hkv;
};

// Checks shared by the two ops; returns the heads/dims. `what` names the op in messages.
CheckedCaches check_attention_inputs(const char* what, const at::Tensor& q, const at::Tensor& k_cache,
                                     const at::Tensor& v_cache) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && cache_type_ok(k_cache, v_cache), what,
              ": q fp32 and the caches both fp32 or both fp16");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, what, ": q must be [T, H, d], last dim contiguous");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes(), what,
              ": caches must be contiguous and alike");
  const int64_t H = q.size(1), d = q.size(2), block_size = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == d && H % Hkv == 0, what, ": heads/dim of q and the cache disagree");
  return {H, d, block_size, Hkv};
}

// The attention of q's rows, row r of sequence row_seq[r] seeing row_keys[r] keys.
at::Tensor attend_rows(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& tables, const std::vector<int64_t>& row_seq,
                       const std::vector<int64_t>& row_keys, double scale,
                       const c10::optional<at::Tensor>& alibi_slopes, int64_t window, const CheckedCaches& c) {
  at::Tensor slopes;
  if (alibi_slopes.has_value()) {
    slopes = alibi_slopes->to(at::kFloat).contiguous();
    TORCH_CHECK(slopes.numel() == c.H, "attention: one ALiBi slope per head");
  }
  const int64_t T = q.size(0);
  auto out = at::empty({T, c.H, c.d}, q.options());
  if (T == 0) return out;
  const PagedAttention plan{q.data_ptr<float>(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr<int32_t>(),
                            row_seq.data(), row_keys.data(), slopes.defined() ? slopes.data_ptr<float>() : nullptr,
                            out.data_ptr<float>(), T, c.H, c.Hkv, c.d, c.block_size, tables.size(1), q.stride(0),
                            q.stride(1), static_cast<float>(scale), k_cache.scalar_type() == at::kHalf,
                            std::max<int64_t>(window, 0)};
  plan.run(at::get_num_threads());
  return out;
}

}  // namespace

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& cu_seqlens_q,
                           double scale, const c10::optional<at::Tensor>& alibi_slopes, int64_t window) {
  const CheckedCaches c = check_attention_inputs("paged_attention", q, k_cache, v_cache);
  const at::Tensor tables = block_tables.to(at::kInt).contiguous();
  const at::Tensor lens = seq_lens.to(at::kInt).contiguous(), cu = cu_seqlens_q.to(at::kInt).contiguous();
  const int64_t S = lens.numel(), T = q.size(0);
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == S && cu.numel() == S + 1,
              "paged_attention: block_tables [S, max_blocks], seq_lens [S] and cu_seqlens_q [S + 1]");
  const int32_t *lp = lens.data_ptr<int32_t>(), *cp = cu.data_ptr<int32_t>();
  TORCH_CHECK(cp[0] == 0 && cp[S] == T, "paged_attention: cu_seqlens_q must run from 0 to the ", T, " rows of q");
  check_block_tables(tables.data_ptr<int32_t>(), lp, S, tables.size(1), c.block_size, k_cache.size(0));
  std::vector<int64_t> row_seq(T), row_keys(T);
  for (int64_t s = 0; s < S; ++s) {
    const int64_t q_len = cp[s + 1] - cp[s];
    TORCH_CHECK(q_len >= 0 && q_len <= lp[s], "paged_attention: sequence ", s, " has ", q_len,
                " new tokens but ", lp[s], " in all");
    for (int64_t i = 0; i < q_len; ++i) row_seq[cp[s] + i] = s, row_keys[cp[s] + i] = lp[s] - q_len + i + 1;
  }
  return attend_rows(q, k_cache, v_cache, tables, row_seq, row_keys, scale, alibi_slopes, window, c);
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                            const c10::optional<at::Tensor>& alibi_slopes, int64_t window) {
  const CheckedCaches c = check_attention_inputs("decode_attention", q, k_cache, v_cache);
  const at::Tensor tables = block_tables.to(at::kInt).contiguous();
  const at::Tensor lens = seq_lens.to(at::kInt).contiguous();
  const int64_t S = q.size(0);
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == S && lens.numel() == S,
              "decode_attention: block_tables [S, max_blocks] and seq_lens [S]");
  const int32_t* lp = lens.data_ptr<int32_t>();
  check_block_tables(tables.data_ptr<int32_t>(), lp, S, tables.size(1), c.block_size, k_cache.size(0));
  std::vector<int64_t> row_seq(S), row_keys(S);
  for (int64_t s = 0; s < S; ++s) row_seq[s] = s, row_keys[s] = lp[s];
  return attend_rows(q, k_cache, v_cache, tables, row_seq, row_keys, scale, alibi_slopes, window, c);
}

}  // namespace llmengine_cpu

TORCH_LIBRARY_FRAGMENT(llmengine_cpu, lib) {
  lib.def("store_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
  lib.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
          "float scale, Tensor? alibi_slopes, int window=0) -> Tensor");
  lib.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
          "Tensor cu_seqlens_q, float scale, Tensor? alibi_slopes, int window=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmengine_cpu, CPU, lib) {
  lib.impl("store_kv", &llmengine_cpu::store_kv);
  lib.impl("decode_attention", &llmengine_cpu::decode_attention);
  lib.impl("paged_attention", &llmengine_cpu::paged_attention);
}
