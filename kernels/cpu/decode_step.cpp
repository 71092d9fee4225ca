// One decode step of a Llama-architecture model in a single call: every layer's RMSNorms, quantized projections,
// rotary embedding, KV-cache store and paged attention, and the final norm, through the kernels of the sibling
// files. It does what models/llama.py's blocks do for a decode batch, without a Python round trip per op
// (on this CPU each op called from Python costs ~10 us, ~11 ms per token over 30 layers).
//
// `torch.classes.llmengine_cpu.LlamaDecoder(embedding, norms, proj, k_caches, v_caches, ...)` binds the model once;
// its `step(input_ids, positions, slot_mapping, block_tables, seq_lens, cos_sin_cache)` runs one decode step.
// Layout: input_ids int64 [S] (the S sequences' new tokens; embedding fp32 [vocab, hidden]); positions, slot_mapping
// int64 [S]; block_tables int32 [S, max_blocks]; seq_lens int32 [S] (after this step); cos_sin_cache fp32 [P, d];
// k_caches, v_caches: L tensors [num_blocks, block_size, Hkv, d]; norms: 2L + 1 weights [hidden] (each layer's
// input and post-attention norms, then the final norm); proj: L * 4 projections (qkv, o, gate_up, down), each
// four tensors (qs, d, m, bias) of quant_gemm.cpp's layout, m empty for int8 and bias empty when there is none.
// Returns the final-normed hidden states [S, hidden]. Parallelism is inside each kernel (at::parallel_for).
// `decode_step_profile(enable)` returns the seconds spent per part (step_profile.h) since its last call, and the
// number of steps, and turns the timers on or off for the steps that follow.
#include <ATen/ATen.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include "cpu_kernels.h"
#include "step_profile.h"

namespace llmengine_cpu {

namespace {

constexpr int64_t PROJ_TENSORS = 4;  // qs, d, m, bias

at::Tensor project(const at::Tensor& x, at::TensorList proj, int64_t index) {
  const at::Tensor& qs = proj[PROJ_TENSORS * index];
  const at::Tensor& d = proj[PROJ_TENSORS * index + 1];
  const at::Tensor& m = proj[PROJ_TENSORS * index + 2];
  const at::Tensor& bias = proj[PROJ_TENSORS * index + 3];
  const c10::optional<at::Tensor> b = bias.numel() ? c10::optional<at::Tensor>(bias) : c10::nullopt;
  PartTimer timer(PRODUCT);
  return m.numel() ? q4_linear(x, qs, d, m, b) : q8_linear(x, qs, d, b);
}

std::tuple<at::Tensor, at::Tensor> timed_rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps,
                                                  const c10::optional<at::Tensor>& residual) {
  PartTimer timer(NORM);
  return rms_norm(x, weight, eps, residual);
}

}  // namespace

StepProfile& step_profile() {
  static StepProfile profile;
  return profile;
}

at::Tensor decode_step_profile(bool enable) {
  StepProfile& profile = step_profile();
  at::Tensor out = at::empty({NUM_PARTS + 1}, at::kDouble);
  for (int i = 0; i < NUM_PARTS; ++i) out[i] = profile.seconds[i];
  out[NUM_PARTS] = static_cast<double>(profile.steps);
  profile.seconds.fill(0.0);
  profile.steps = 0;
  profile.enabled.store(enable);
  return out;
}

// The model's weights and KV caches, bound once (models/fused_decode.py builds it at the first decode step), so
// that a step passes only its own small inputs: marshalling ~660 tensors from Python lists cost ~0.5 ms a step.
struct LlamaDecoder : torch::CustomClassHolder {
  std::vector<at::Tensor> norms, proj, k_caches, v_caches;
  at::Tensor embedding;
  int64_t num_heads, num_kv_heads, head_dim;
  double eps, scale;

  LlamaDecoder(at::Tensor embedding, std::vector<at::Tensor> norms, std::vector<at::Tensor> proj,
               std::vector<at::Tensor> k_caches, std::vector<at::Tensor> v_caches, int64_t num_heads,
               int64_t num_kv_heads, int64_t head_dim, double eps, double scale)
      : norms(std::move(norms)), proj(std::move(proj)), k_caches(std::move(k_caches)),
        v_caches(std::move(v_caches)), embedding(std::move(embedding)), num_heads(num_heads),
        num_kv_heads(num_kv_heads), head_dim(head_dim), eps(eps), scale(scale) {
    const int64_t L = static_cast<int64_t>(this->k_caches.size());
    TORCH_CHECK(this->v_caches.size() == this->k_caches.size(), "LlamaDecoder: one v_cache per k_cache");
    TORCH_CHECK(static_cast<int64_t>(this->norms.size()) == 2 * L + 1, "LlamaDecoder: expected ", 2 * L + 1,
                " norm weights, got ", this->norms.size());
    TORCH_CHECK(static_cast<int64_t>(this->proj.size()) == 4 * PROJ_TENSORS * L, "LlamaDecoder: expected ",
                4 * PROJ_TENSORS * L, " projection tensors, got ", this->proj.size());
    TORCH_CHECK(this->embedding.dim() == 2 && this->embedding.scalar_type() == at::kFloat,
                "LlamaDecoder: the embedding must be fp32 [vocab, hidden]");
  }

  // input_ids int64 [S] -> the final-normed hidden states [S, hidden].
  at::Tensor step(const at::Tensor& input_ids, const at::Tensor& positions, const at::Tensor& slot_mapping,
                  const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& cos_sin_cache) {
    PartTimer step_timer(STEP);
    if (step_profile().enabled.load(std::memory_order_relaxed)) ++step_profile().steps;
    const int64_t L = static_cast<int64_t>(k_caches.size());
    const at::Tensor x0 = at::embedding(embedding, input_ids);
    const int64_t S = x0.size(0), q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
    const at::TensorList p(proj);
    at::Tensor x = x0, residual, normed;
    for (int64_t l = 0; l < L; ++l) {
      if (!residual.defined()) {
        normed = std::get<0>(timed_rms_norm(x, norms[2 * l], eps, c10::nullopt));
        residual = x;
      } else {
        std::tie(normed, residual) = timed_rms_norm(x, norms[2 * l], eps, residual);
      }
      const at::Tensor qkv = project(normed, p, 4 * l);
      const at::Tensor q = qkv.narrow(1, 0, q_size).view({S, num_heads, head_dim});
      const at::Tensor k = qkv.narrow(1, q_size, kv_size).view({S, num_kv_heads, head_dim});
      const at::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({S, num_kv_heads, head_dim});
      at::Tensor q_rot, k_rot, attn;
      {
        PartTimer timer(ROTARY);
        std::tie(q_rot, k_rot) = rotary(q, k, positions, cos_sin_cache);
      }
      {
        PartTimer timer(STORE_KV);
        store_kv(k_rot, v, k_caches[l], v_caches[l], slot_mapping);
      }
      {
        PartTimer timer(ATTENTION);
        attn = decode_attention(q_rot, k_caches[l], v_caches[l], block_tables, seq_lens, scale, c10::nullopt);
      }
      const at::Tensor o = project(attn.view({S, q_size}), p, 4 * l + 1);
      std::tie(normed, residual) = timed_rms_norm(o, norms[2 * l + 1], eps, residual);
      const at::Tensor gate_up = project(normed, p, 4 * l + 2);
      at::Tensor act;
      {
        PartTimer timer(ACTIVATION);
        act = silu_and_mul(gate_up);
      }
      x = project(act, p, 4 * l + 3);
    }
    if (!residual.defined()) return std::get<0>(timed_rms_norm(x, norms[2 * L], eps, c10::nullopt));
    return std::get<0>(timed_rms_norm(x, norms[2 * L], eps, residual));
  }
};

}  // namespace llmengine_cpu

TORCH_LIBRARY_FRAGMENT(llmengine_cpu, lib) {
  lib.class_<llmengine_cpu::LlamaDecoder>("LlamaDecoder")
      .def(torch::init<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                       std::vector<at::Tensor>, int64_t, int64_t, int64_t, double, double>())
      .def("step", &llmengine_cpu::LlamaDecoder::step);
  lib.def("decode_step_profile(bool enable) -> Tensor", &llmengine_cpu::decode_step_profile);  // no tensor in
}
