// One decode step of a Llama-architecture model in a single call: every layer's RMSNorms, quantized projections,
// rotary embedding, KV-cache store and paged attention, and the final norm, through the kernels of the sibling
// files. It does what models/llama.py's blocks do for a decode batch, without a Python round trip per op
// (on this CPU each op called from Python costs ~10 us, ~11 ms per token over 30 layers).
//
// Layout: hidden [S, hidden] fp32 (the embeddings of the S sequences' new tokens); positions, slot_mapping int64
// [S]; block_tables int32 [S, max_blocks]; seq_lens int32 [S] (after this step); cos_sin_cache fp32 [P, d];
// k_caches, v_caches: L tensors [num_blocks, block_size, Hkv, d]; norms: 2L + 1 weights [hidden] (each layer's
// input and post-attention norms, then the final norm); proj: L * 4 projections (qkv, o, gate_up, down), each
// four tensors (qs, d, m, bias) of quant_gemm.cpp's layout, m empty for int8 and bias empty when there is none.
// Returns the final-normed hidden states [S, hidden]. Parallelism is inside each kernel (at::parallel_for).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu_kernels.h"

namespace llmengine_cpu {

namespace {

constexpr int64_t PROJ_TENSORS = 4;  // qs, d, m, bias

at::Tensor project(const at::Tensor& x, at::TensorList proj, int64_t index) {
  const at::Tensor& qs = proj[PROJ_TENSORS * index];
  const at::Tensor& d = proj[PROJ_TENSORS * index + 1];
  const at::Tensor& m = proj[PROJ_TENSORS * index + 2];
  const at::Tensor& bias = proj[PROJ_TENSORS * index + 3];
  const c10::optional<at::Tensor> b = bias.numel() ? c10::optional<at::Tensor>(bias) : c10::nullopt;
  return m.numel() ? q4_linear(x, qs, d, m, b) : q8_linear(x, qs, d, b);
}

}  // namespace

at::Tensor llama_decode_step(const at::Tensor& hidden, const at::Tensor& positions, const at::Tensor& slot_mapping,
                             const at::Tensor& block_tables, const at::Tensor& seq_lens,
                             const at::Tensor& cos_sin_cache, at::TensorList k_caches, at::TensorList v_caches,
                             at::TensorList norms, at::TensorList proj, int64_t num_heads, int64_t num_kv_heads,
                             int64_t head_dim, double eps, double scale) {
  const int64_t L = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(v_caches.size() == k_caches.size(), "llama_decode_step: one v_cache per k_cache");
  TORCH_CHECK(static_cast<int64_t>(norms.size()) == 2 * L + 1, "llama_decode_step: expected ", 2 * L + 1,
              " norm weights, got ", norms.size());
  TORCH_CHECK(static_cast<int64_t>(proj.size()) == 4 * PROJ_TENSORS * L, "llama_decode_step: expected ",
              4 * PROJ_TENSORS * L, " projection tensors, got ", proj.size());
  const int64_t S = hidden.size(0), q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
  at::Tensor x = hidden, residual, normed;
  for (int64_t l = 0; l < L; ++l) {
    if (!residual.defined()) {
      normed = std::get<0>(rms_norm(x, norms[2 * l], eps, c10::nullopt));
      residual = x;
    } else {
      std::tie(normed, residual) = rms_norm(x, norms[2 * l], eps, residual);
    }
    const at::Tensor qkv = project(normed, proj, 4 * l);
    const at::Tensor q = qkv.narrow(1, 0, q_size).view({S, num_heads, head_dim});
    const at::Tensor k = qkv.narrow(1, q_size, kv_size).view({S, num_kv_heads, head_dim});
    const at::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({S, num_kv_heads, head_dim});
    auto [q_rot, k_rot] = rotary(q, k, positions, cos_sin_cache);
    at::Tensor k_cache = k_caches[l], v_cache = v_caches[l];
    store_kv(k_rot, v, k_cache, v_cache, slot_mapping);
    const at::Tensor attn = decode_attention(q_rot, k_cache, v_cache, block_tables, seq_lens, scale, c10::nullopt);
    const at::Tensor o = project(attn.view({S, q_size}), proj, 4 * l + 1);
    std::tie(normed, residual) = rms_norm(o, norms[2 * l + 1], eps, residual);
    x = project(silu_and_mul(project(normed, proj, 4 * l + 2)), proj, 4 * l + 3);
  }
  if (!residual.defined()) return std::get<0>(rms_norm(x, norms[2 * L], eps, c10::nullopt));
  return std::get<0>(rms_norm(x, norms[2 * L], eps, residual));
}

}  // namespace llmengine_cpu

TORCH_LIBRARY_FRAGMENT(llmengine_cpu, lib) {
  lib.def("llama_decode_step(Tensor hidden, Tensor positions, Tensor slot_mapping, Tensor block_tables, "
          "Tensor seq_lens, Tensor cos_sin_cache, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor[] norms, "
          "Tensor[] proj, int num_heads, int num_kv_heads, int head_dim, float eps, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmengine_cpu, CPU, lib) {
  lib.impl("llama_decode_step", &llmengine_cpu::llama_decode_step);
}
