// Binding the fused decode step (decode_step.cpp) to a model and to the engine: the LlamaDecoder's checks, its
// TorchScript class, the step profile, and `llme_step`, the C entry point of the engine's decode steps.
//
// `torch.classes.llmengine_cpu.LlamaDecoder(embedding, norms, proj, k_caches, v_caches, head, ..., form, norm_biases,
// alibi_slopes)` binds the model once (layouts in decode_step.cpp; form: decoder.h's BlockForm, Falcon's with its
// LayerNorms' biases, and ALiBi slopes or an empty tensor for RoPE). Its `step(input_ids, positions, slot_mapping,
// block_tables, seq_lens, cos_sin_cache)` takes a step's inputs as tensors and returns the final-normed hidden states.
// With a head bound, the engine's steps pass nothing: `bind_buffers(input_ids, positions, slot_mapping, block_tables,
// seq_lens, cu_seqlens_q, logit_rows, cos_sin_cache, logits, tokens)` binds persistent tensors once (the layouts of
// decode_step.cpp with room for Tmax tokens, Smax sequences and Rmax logits rows: input_ids, positions, slot_mapping
// int64 [Tmax]; block_tables int32 [Smax, max_blocks], seq_lens int32 [Smax], cu_seqlens_q int32 [Smax + 1];
// logit_rows int64 [Rmax]; logits fp32 [Rmax, vocab], tokens int64 [Rmax]), the caller writes a step's first S, T
// and R entries in place, and `llme_step(handle, S, T, R, argmax, error, error_size)` (through ctypes:
// runtime/executor.py) runs the step, any mix of prompt chunks, verification rows and decode rows, into the bound
// logits and, with argmax != 0, each row's first maximum into tokens. It returns 0, or 1 with the error's message in
// `error`. `handle()` is the decoder's number for it; a number whose decoder is gone gives an error, not a crash.
// Why not a method call: on this CPU a TorchScript method call costs ~13 us plus ~1.5 us per tensor passed, and
// ~130 us right after a step's weight stream has evicted the caches (the JIT's call
// path is long); a ctypes call, ~25 us cold, and a step then makes no tensor either.
// `decode_step_profile(enable)` returns the seconds spent per part (step_profile.h) since its last call, and the
// number of steps, and turns the timers on or off for the steps that follow.
#include <ATen/ATen.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include "cpu_kernels.h"
#include "decoder.h"
#include "step_profile.h"

#include <algorithm>
#include <cstring>
#include <exception>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

namespace llmengine_cpu {

namespace {

// The live decoders by number: `llme_step` finds its decoder here, and a decoder leaves when it is freed.
std::mutex registry_mutex;
std::unordered_map<int64_t, LlamaDecoder*> registry;
int64_t next_handle = 1;

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

LlamaDecoder::LlamaDecoder(at::Tensor embedding_, std::vector<at::Tensor> norms_, std::vector<at::Tensor> proj_,
                           std::vector<at::Tensor> k_caches_, std::vector<at::Tensor> v_caches_,
                           std::vector<at::Tensor> head_tensors_, int64_t num_heads_, int64_t num_kv_heads_,
                           int64_t head_dim_, double eps_, double scale_, std::vector<at::Tensor> gguf_raws_,
                           int64_t embedding_type_, int64_t form_, std::vector<at::Tensor> norm_biases_,
                           at::Tensor alibi_slopes_)
    : norms(std::move(norms_)), proj(std::move(proj_)), k_caches(std::move(k_caches_)), v_caches(std::move(v_caches_)),
      head_tensors(std::move(head_tensors_)), gguf_raws(std::move(gguf_raws_)), embedding(std::move(embedding_)),
      embedding_type(embedding_type_), num_heads(num_heads_),
      num_kv_heads(num_kv_heads_), head_dim(head_dim_), eps(eps_), scale(scale_),
      norm_bias_tensors(std::move(norm_biases_)), alibi(std::move(alibi_slopes_)) {
  const int64_t L = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(form_ >= 0 && form_ <= 2, "LlamaDecoder: form ", form_,
              " is not one of 0 (Llama), 1 (Falcon, parallel), 2 (Falcon, sequential)");
  form = static_cast<BlockForm>(form_);
  const bool falcon = form != BlockForm::LLAMA;
  TORCH_CHECK(L > 0 && v_caches.size() == k_caches.size(), "LlamaDecoder: one v_cache per k_cache, at least one");
  TORCH_CHECK(static_cast<int64_t>(norms.size()) == 2 * L + 1, "LlamaDecoder: expected ", 2 * L + 1,
              " norm weights, got ", norms.size());
  TORCH_CHECK(static_cast<int64_t>(proj.size()) == 4 * PROJ_TENSORS * L, "LlamaDecoder: expected ",
              4 * PROJ_TENSORS * L, " projection tensors, got ", proj.size());
  TORCH_CHECK(embedding.dim() == 2 && embedding.is_contiguous() && embedding.scalar_type() ==
                  (embedding_type ? at::kByte : at::kFloat),
              "LlamaDecoder: the embedding must be contiguous fp32 [vocab, hidden], or a GGUF table's uint8 rows");
  vocab_size = embedding.size(0), hidden_size = embedding.size(1);
  if (embedding_type) {
    const gguf::TypeTraits* traits = gguf::type_traits(static_cast<int>(embedding_type));
    TORCH_CHECK(traits && gguf::dequantize_supported(static_cast<int>(embedding_type)) &&
                    hidden_size % traits->block_bytes == 0,
                "LlamaDecoder: a GGUF table of type ", embedding_type, " and rows of ", hidden_size,
                " bytes is not taken");
    hidden_size = hidden_size / traits->block_bytes * traits->block_elems;
  }
  const int64_t hidden = hidden_size, q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
  for (const at::Tensor& w : norms) {
    TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == hidden,
                "LlamaDecoder: norm weights must be contiguous fp32 [hidden]");
    norm_weights.push_back(w.data_ptr<float>());
  }
  TORCH_CHECK(norm_bias_tensors.size() == (falcon ? norms.size() : 0), "LlamaDecoder: ",
              falcon ? "Falcon's LayerNorms need one bias per weight" : "Llama's RMSNorms take no biases");
  for (const at::Tensor& b : norm_bias_tensors) {
    TORCH_CHECK(b.scalar_type() == at::kFloat && b.is_contiguous() && b.numel() == hidden,
                "LlamaDecoder: norm biases must be contiguous fp32 [hidden]");
    norm_biases.push_back(b.data_ptr<float>());
  }
  if (alibi.defined() && alibi.numel() > 0) {
    TORCH_CHECK(alibi.scalar_type() == at::kFloat && alibi.is_contiguous() && alibi.numel() == num_heads,
                "LlamaDecoder: the ALiBi slopes must be contiguous fp32 [num_heads]");
    alibi_slopes = alibi.data_ptr<float>();
  }
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor &k = k_caches[l], &v = v_caches[l];
    TORCH_CHECK(cache_type_ok(k, v) && k.scalar_type() == k_caches[0].scalar_type() && k.is_contiguous() &&
                    v.is_contiguous() && k.sizes() == v.sizes() && k.sizes() == k_caches[0].sizes() && k.dim() == 4 &&
                    k.size(2) == num_kv_heads && k.size(3) == head_dim,
                "LlamaDecoder: layer ", l, "'s caches are not contiguous [blocks, block_size, ", num_kv_heads, ", ",
                head_dim, "], all fp32 or all fp16");
    k_data.push_back(k.data_ptr());
    v_data.push_back(v.data_ptr());
  }
  half_cache = k_caches[0].scalar_type() == at::kHalf;
  for (int64_t i = 0; i < 4 * L; ++i) layers.push_back(projection(proj, i, gguf_raws));
  for (int64_t l = 0; l < L; ++l) {
    const Projection &qkv = layers[4 * l], &o = layers[4 * l + 1], &gu = layers[4 * l + 2], &dn = layers[4 * l + 3];
    // (quant_gemm's K is padded to whole blocks; a GGUF weight's is the input's own)
    auto takes = [](const Projection& p, int64_t k) {  // quant_gemm's K is padded to blocks of 32, a float one to 4
      if (p.fw.type != FloatType::NONE) return p.K >= k && p.K - k < (p.fw.tiles ? 32 : 4);  // (AMX tiles: to 32)
      return p.parts.empty() ? p.K >= k : p.K == k;
    };
    const int64_t I = falcon ? gu.N : gu.N / 2;  // (Llama's gate and up rows together)
    TORCH_CHECK(qkv.N == q_size + 2 * kv_size && o.N == hidden && (falcon || gu.N % 2 == 0) && dn.N == hidden &&
                    takes(qkv, hidden) && takes(o, q_size) && takes(gu, hidden) && takes(dn, I),
                "LlamaDecoder: layer ", l, "'s projection shapes do not fit the model");
  }
  TORCH_CHECK(head_tensors.empty() || static_cast<int64_t>(head_tensors.size()) == PROJ_TENSORS,
              "LlamaDecoder: the head is ", PROJ_TENSORS, " tensors or none, got ", head_tensors.size());
  if (!head_tensors.empty()) {
    head = projection(head_tensors, 0, gguf_raws);
    TORCH_CHECK((head->parts.empty() ? head->K >= hidden : head->K == hidden) && head->N > 0,
                "LlamaDecoder: the head's shape does not fit the model");
  }
  for (const Projection& p : layers)
    if (p.parts.empty() && p.fw.type == FloatType::NONE) team_nb = std::max(team_nb, p.w.nb);
  if (head && head->parts.empty() && head->fw.type == FloatType::NONE) team_nb = std::max(team_nb, head->w.nb);
  std::lock_guard<std::mutex> lock(registry_mutex);
  handle_id = next_handle++;
  registry[handle_id] = this;
}

void LlamaDecoder::embed_row(int64_t id, float* out) const {
  if (!embedding_type) {
    const float* row = embedding.data_ptr<float>() + id * hidden_size;
    std::copy(row, row + hidden_size, out);
  } else {
    gguf::dequantize_row(static_cast<int>(embedding_type), embedding.data_ptr<uint8_t>() + id * embedding.size(1),
                         hidden_size, out);
  }
}

LlamaDecoder::~LlamaDecoder() {
  std::lock_guard<std::mutex> lock(registry_mutex);
  registry.erase(handle_id);
}

at::Tensor LlamaDecoder::step(const at::Tensor& input_ids, const at::Tensor& positions, const at::Tensor& slot_mapping,
                              const at::Tensor& block_tables, const at::Tensor& seq_lens,
                              const at::Tensor& cos_sin_cache) {
  const at::Tensor ids = input_ids.to(at::kLong).contiguous(), pos = positions.to(at::kLong).contiguous();
  const at::Tensor slots = slot_mapping.to(at::kLong).contiguous(), cs = cos_sin_cache.to(at::kFloat).contiguous();
  const at::Tensor tables = block_tables.to(at::kInt).contiguous(), lens = seq_lens.to(at::kInt).contiguous();
  const int64_t S = ids.numel();
  TORCH_CHECK(pos.numel() == S && slots.numel() == S && lens.numel() == S && tables.dim() == 2 && tables.size(0) == S,
              "LlamaDecoder.step: one position, slot, length and block-table row per token");
  TORCH_CHECK(cs.dim() == 2 && cs.size(1) == head_dim,
              "LlamaDecoder.step: cos_sin_cache must be [positions, head_dim] (ALiBi: [0, head_dim])");
  at::Tensor out = at::empty({S, hidden_size}, cs.options());
  run({ids.data_ptr<int64_t>(), pos.data_ptr<int64_t>(), slots.data_ptr<int64_t>(), tables.data_ptr<int32_t>(),
       lens.data_ptr<int32_t>(), nullptr, nullptr, cs.data_ptr<float>(), S, S, S, tables.size(1), cs.size(0)},
      out.data_ptr<float>(), nullptr, false);
  return out;
}

void LlamaDecoder::bind_buffers(at::Tensor input_ids, at::Tensor positions, at::Tensor slot_mapping,
                                at::Tensor block_tables, at::Tensor seq_lens, at::Tensor cu_seqlens_q,
                                at::Tensor logit_rows, at::Tensor cos_sin_cache, at::Tensor logits, at::Tensor tokens) {
  TORCH_CHECK(head.has_value(), "LlamaDecoder.bind_buffers: no head was bound, so there are no logits to write");
  const int64_t T = input_ids.numel(), S = seq_lens.numel(), R = logit_rows.numel();
  TORCH_CHECK(input_ids.dim() == 1 && positions.dim() == 1 && slot_mapping.dim() == 1 && seq_lens.dim() == 1 &&
                  cu_seqlens_q.dim() == 1 && logit_rows.dim() == 1 && block_tables.dim() == 2 &&
                  positions.numel() == T && slot_mapping.numel() == T && block_tables.size(0) == S &&
                  cu_seqlens_q.numel() == S + 1 && tokens.numel() == R && logits.dim() == 2 && logits.size(0) == R &&
                  logits.size(1) == head->N,
              "LlamaDecoder.bind_buffers: one position and slot per token; one length, block-table row and query "
              "offset (and one more) per sequence; one logits row [", head->N, "] and token per logits row");
  TORCH_CHECK(cos_sin_cache.dim() == 2 && cos_sin_cache.size(1) == head_dim,
              "LlamaDecoder.bind_buffers: cos_sin_cache must be [positions, head_dim]");
  for (const at::Tensor* t : {&input_ids, &positions, &slot_mapping, &block_tables, &seq_lens, &cu_seqlens_q,
                              &logit_rows, &cos_sin_cache, &logits, &tokens})
    TORCH_CHECK(t->is_contiguous() && t->device().is_cpu(), "LlamaDecoder.bind_buffers: contiguous CPU tensors");
  TORCH_CHECK(input_ids.scalar_type() == at::kLong && positions.scalar_type() == at::kLong &&
                  slot_mapping.scalar_type() == at::kLong && block_tables.scalar_type() == at::kInt &&
                  seq_lens.scalar_type() == at::kInt && cu_seqlens_q.scalar_type() == at::kInt &&
                  logit_rows.scalar_type() == at::kLong && cos_sin_cache.scalar_type() == at::kFloat &&
                  logits.scalar_type() == at::kFloat && tokens.scalar_type() == at::kLong,
              "LlamaDecoder.bind_buffers: int64 ids, positions, slots, logit rows and tokens; int32 tables, lengths "
              "and query offsets; fp32 cos_sin and logits");
  buffers = {input_ids, positions, slot_mapping, block_tables, seq_lens, cu_seqlens_q, logit_rows, cos_sin_cache,
             logits, tokens};
  bound = {input_ids.data_ptr<int64_t>(), positions.data_ptr<int64_t>(), slot_mapping.data_ptr<int64_t>(),
           block_tables.data_ptr<int32_t>(), seq_lens.data_ptr<int32_t>(), cu_seqlens_q.data_ptr<int32_t>(),
           logit_rows.data_ptr<int64_t>(), cos_sin_cache.data_ptr<float>(), S, T, R, block_tables.size(1),
           cos_sin_cache.size(0)};
  bound_logits = logits.data_ptr<float>();
  bound_tokens = tokens.data_ptr<int64_t>();
}

void LlamaDecoder::step_bound(int64_t S, int64_t T, int64_t R, bool argmax) {
  TORCH_CHECK(bound_logits != nullptr, "LlamaDecoder: step_bound before bind_buffers");
  TORCH_CHECK(S >= 1 && S <= bound.S && T >= S && T <= bound.T && R >= 0 && R <= bound.R && R <= T,
              "LlamaDecoder: a step of ", S, " sequences, ", T, " tokens and ", R, " logits rows, but ", bound.S, ", ",
              bound.T, " and ", bound.R, " are bound");
  StepInputs in = bound;
  in.S = S, in.T = T, in.R = R;
  run(in, bound_logits, argmax ? bound_tokens : nullptr, true);
}

}  // namespace llmengine_cpu

extern "C" int llme_step(int64_t handle, int64_t num_seqs, int64_t num_tokens, int64_t num_logits, int32_t argmax,
                         char* error, int64_t error_size) {
  try {
    llmengine_cpu::LlamaDecoder* decoder = nullptr;
    {
      std::lock_guard<std::mutex> lock(llmengine_cpu::registry_mutex);
      const auto found = llmengine_cpu::registry.find(handle);
      TORCH_CHECK(found != llmengine_cpu::registry.end(), "llme_step: no live decoder ", handle);
      decoder = found->second;
    }
    decoder->step_bound(num_seqs, num_tokens, num_logits, argmax != 0);
    return 0;
  } catch (const std::exception& e) {
    if (error_size > 0) {
      const char* what = e.what();
      // c10::Error's what() carries a C++ backtrace after the message: keep the message
      const char* end = std::strstr(what, "\nException raised from");
      const size_t n = std::min<size_t>(end ? end - what : std::strlen(what), error_size - 1);
      std::memcpy(error, what, n);
      error[n] = '\0';
    }
    return 1;
  }
}

TORCH_LIBRARY_FRAGMENT(llmengine_cpu, lib) {
  lib.class_<llmengine_cpu::LlamaDecoder>("LlamaDecoder")
      .def(torch::init<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                       std::vector<at::Tensor>, std::vector<at::Tensor>, int64_t, int64_t, int64_t, double, double,
                       std::vector<at::Tensor>, int64_t, int64_t, std::vector<at::Tensor>, at::Tensor>())
      .def("step", &llmengine_cpu::LlamaDecoder::step)
      .def("bind_buffers", &llmengine_cpu::LlamaDecoder::bind_buffers)
      .def("handle", &llmengine_cpu::LlamaDecoder::handle);
  lib.def("decode_step_profile(bool enable) -> Tensor", &llmengine_cpu::decode_step_profile);  // no tensor in
}
