// The CPU kernels that other kernel files call directly (the fused decode step); layouts in each .cpp file.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <utility>

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
                            const c10::optional<at::Tensor>& alibi_slopes);

// The pieces the fused decode step (decode_step.cpp) calls on its own threads; each computes rows or tasks that do
// not depend on how the work is split, so the step's numbers are the ops' above.
void rms_norm_row(const float* x, const float* res, const float* w, float* out, float* h, int64_t hidden, float eps);
void silu_mul_row(const float* gate, const float* up, float* out, int64_t n);
void rotate_heads(const float* src, int64_t head_stride, int64_t heads, int64_t d, const float* cs, float* dst);
// x[0:n]'s first maximum: (its index, its value), or the first NaN's (as torch.argmax); (0, -inf) for n = 0.
std::pair<int64_t, float> first_max(const float* x, int64_t n);

// Paged decode attention (attention.cpp) as tasks: task(t) for t < S * Hkv * splits (each with a scratch of
// (H / Hkv) * block_size floats), then merge(sh) for sh < S * H.
struct PagedDecode {
  const float* q;
  const void *k_cache, *v_cache;  // fp32, or fp16 when half_cache
  const int32_t *block_tables, *seq_lens;
  const float* slopes;
  float *out, *part_max, *part_sum, *part_acc;  // out [S, H, d]; partials [tasks, G (, d)]
  int64_t S, H, Hkv, d, block_size, max_blocks, q_seq_stride, q_head_stride, splits;
  float scale;
  bool half_cache;
  void task(int64_t task, float* scores) const;
  void merge(int64_t sh) const;

 private:
  template <typename T>
  void task_rows(int64_t task, float* scores, const T* k_rows, const T* v_rows) const;
};
bool cache_type_ok(const at::Tensor& k_cache, const at::Tensor& v_cache);  // both fp32 or both fp16
int64_t decode_splits(const int32_t* seq_lens, int64_t S, int64_t Hkv, int64_t threads);
void check_block_tables(const int32_t* block_tables, const int32_t* seq_lens, int64_t S, int64_t max_blocks,
                        int64_t block_size, int64_t num_blocks);

}  // namespace llmengine_cpu
