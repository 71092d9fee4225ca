// The CPU kernels that other kernel files call directly (the fused decode step); layouts in each .cpp file.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

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

}  // namespace llmengine_cpu
