// The CPU kernels that other kernel files call directly (the fused decode step); layouts in each .cpp file.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <tuple>
#include <utility>
#include <vector>

namespace llmengine_cpu {

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m,
                     const c10::optional<at::Tensor>& bias);
at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d,
                     const c10::optional<at::Tensor>& bias);
std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps,
                                            const c10::optional<at::Tensor>& residual);
at::Tensor silu_and_mul(const at::Tensor& x);
std::tuple<at::Tensor, at::Tensor> rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                                          const at::Tensor& cos_sin_cache);
void store_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slot_mapping);
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                            const c10::optional<at::Tensor>& alibi_slopes, int64_t window);

// The pieces the fused decode step (decode_step.cpp) calls on its own threads; each computes rows or tasks that do
// not depend on how the work is split, so the step's numbers are the ops' above.
void rms_norm_row(const float* x, const float* res, const float* w, float* out, float* h, int64_t hidden, float eps);
void silu_mul_row(const float* gate, const float* up, float* out, int64_t n);
void rotate_heads(const float* src, int64_t head_stride, int64_t heads, int64_t d, const float* cs, float* dst);
void layer_norm_row(const float* x, const float* w, const float* b, float* out, int64_t hidden, float eps);
void gelu_row(const float* x, float* out, int64_t n);
// x[0:n]'s first maximum: (its index, its value), or the first NaN's (as torch.argmax); (0, -inf) for n = 0.
std::pair<int64_t, float> first_max(const float* x, int64_t n);

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& cu_seqlens_q,
                           double scale, const c10::optional<at::Tensor>& alibi_slopes, int64_t window);

// Paged attention of T query rows (attention.cpp): row r belongs to sequence row_seq[r] (its block-table row) and
// sees that sequence's first row_keys[r] cached keys. Each row's keys are reduced in chunks of CHUNK_KEYS, whose
// partials merge in chunk order: the numbers depend on nothing but the row.
constexpr int64_t CHUNK_KEYS = 128;
constexpr int64_t ROW_TILE = 8;  // rows that share each block of keys while it is in cache (prompt chunks)
int64_t num_chunks(int64_t keys);  // a row's chunks (at least one)

struct PagedAttention {
  const float* q;
  const void *k_cache, *v_cache;  // fp32, or fp16 when half_cache
  const int32_t* block_tables;    // [S, max_blocks]
  const int64_t *row_seq, *row_keys;
  const float* slopes;
  float* out;  // [T, H, d]
  int64_t T, H, Hkv, d, block_size, max_blocks, q_row_stride, q_head_stride;
  float scale;
  bool half_cache;
  int64_t window = 0;  // sliding window: a row sees only its last `window` keys (0: all of them)

  // The first key row r sees: with a window, keys before it lie in no chunk's sums (chunks stay where they are).
  int64_t first_key(int64_t r) const { return window > 0 ? std::max<int64_t>(0, row_keys[r] - window) : 0; }

  // Chunk c of the nr rows r0.. (one sequence's), KV head kvh: each row's G = H / Hkv query heads' max, exp-sum and
  // exp-weighted value sum over its keys in the chunk, into m[nr, G], l[nr, G], acc[nr, G, d]; `scores` is scratch of
  // G * CHUNK_KEYS floats. A row's numbers are the same for any nr.
  void chunk(int64_t r0, int64_t nr, int64_t kvh, int64_t c, float* scores, float* m, float* l, float* acc) const;
  // out[r, h] from its KV head's chunk partials in chunk order: chunk c's G maxima and exp-sums at m, l + c * stride,
  // its G value sums [G, d] at acc + c * stride_acc.
  void merge(int64_t r, int64_t h, const float* m, const float* l, const float* acc, int64_t stride,
             int64_t stride_acc) const;
  // The whole attention on at::parallel_for's threads (`threads` of them), choosing `rows` or the split below.
  void run(int threads) const;
  // The tiled form: tile_start numbers the tiles of up to ROW_TILE consecutive rows of one sequence (returns their
  // count; tile_start gets a last entry T); tile(r0, nr, kvh) computes a tile's chunks into `partial` (grown as
  // needed) and writes its rows' outputs.
  int64_t plan_tiles(std::vector<int64_t>& tile_start) const;
  void tile(int64_t r0, int64_t nr, int64_t kvh, float* scores, std::vector<float>& partial) const;
  // The split form for few rows: row_task [T + 1] numbers the (row, KV head, chunk) tasks (returns their count);
  // split_task(task) writes its partials at `task` of part_max/part_sum [tasks, G] and part_acc [tasks, G, d];
  // after every task, split_merge(rh) for rh < T * H writes out.
  int64_t plan_split(std::vector<int64_t>& row_task) const;
  void split_task(int64_t task, const int64_t* row_task, float* scores, float* part_max, float* part_sum,
                  float* part_acc) const;
  void split_merge(int64_t rh, const int64_t* row_task, const float* part_max, const float* part_sum,
                   const float* part_acc) const;

 private:
  template <typename E>  // E: the caches' element type
  void chunk_rows(int64_t r0, int64_t nr, int64_t kvh, int64_t c, float* scores, float* m, float* l, float* acc,
                  const E* k_rows, const E* v_rows) const;
};
bool cache_type_ok(const at::Tensor& k_cache, const at::Tensor& v_cache);  // both fp32 or both fp16
void check_block_tables(const int32_t* block_tables, const int32_t* seq_lens, int64_t S, int64_t max_blocks,
                        int64_t block_size, int64_t num_blocks);

}  // namespace llmengine_cpu
