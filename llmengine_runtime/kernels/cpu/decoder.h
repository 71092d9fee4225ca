// The fused decode step's decoder (decode_step.cpp computes a step, decoder.cpp binds it): a Llama-architecture
// model's weights and KV caches, bound once, and what a step keeps from one step to the next. Layouts in
// decode_step.cpp's header comment.
#pragma once

#include <ATen/ATen.h>
#include <torch/custom_class.h>

#include <optional>
#include <utility>
#include <vector>

#include "float_rows.h"
#include "gguf_rows.h"
#include "quant_common.h"

namespace llmengine_cpu {

constexpr int64_t PROJ_TENSORS = 4;  // qs, d, m, bias; or for a GGUF weight: spec, -, -, bias (step_projection.cpp)

// One GGUF part of a projection: output rows n0 .. n1 - 1 are `raw`'s rows 0 .. n1 - n0 - 1, of type `traits`.
struct GGUFPart {
  const gguf::TypeTraits* traits;
  const uint8_t* raw;
  int64_t row_bytes, n0, n1;
};

// A projection: quant_gemm's weight `w` (parts empty, `fw` NONE), a GGUF weight of one or more parts (then `bias`, or
// null), or a float weight `fw` (float_interleaved.cpp's; its bias inside).
struct Projection {
  QuantWeight w;
  int64_t N, K;
  bool q4;
  std::vector<GGUFPart> parts;
  const float* bias = nullptr;
  FloatWeight fw{};
};

// One step's inputs (the AttentionMetadata contract's layouts), as pointers: T tokens of S sequences, packed as
// cu_seqlens_q says (null: one token per sequence, T = S); the logits of the R token rows `logit_rows` (null: every
// row, R = T) are wanted.
struct StepInputs {
  const int64_t *input_ids, *positions, *slot_mapping;  // [T] each
  const int32_t *block_tables, *seq_lens;                // [S, max_blocks], [S]
  const int32_t* cu_seqlens_q;                           // [S + 1] or null
  const int64_t* logit_rows;                             // [R] increasing, or null
  const float* cos_sin;                                  // [cos_sin_rows, head_dim]
  int64_t S, T, R, max_blocks, cos_sin_rows;
};

struct ThreadScratch {
  std::vector<float> residual, normed, mlp_in, scores, gate_tmp, up_tmp, k_rotated, partial, head_in;
  QuantizedRows xr;
  gguf::Activations x32, x256;  // a GGUF projection's activations, per block of 32 and of 256
  FloatActivations xf;          // a float projection's
};

// What a step writes besides its output, kept from one step to the next so that a step allocates nothing else (a
// dozen allocations, each cold after the last step's weight stream): the team's shared intermediates, and every
// thread's own copies of the residual stream, the normed and quantized activations and its scratch.
struct Scratch {
  std::vector<float> x, qkv, q_rot, attn, o, act, part_max, part_sum, part_acc;
  std::vector<int64_t> row_seq, row_keys, row_task, tile_start;  // attention's rows and tasks (PagedAttention)
  std::vector<int64_t> head_arg;  // each thread's argmax of its head rows [threads, S], and its value
  std::vector<float> head_max;
  ThreadScratch team;  // the activations of a step with many rows, quantized by the whole team (StepThread::quantize)
};

// Projection `index` of `proj` (PROJ_TENSORS each) with the GGUF weights `raws` (step_projection.cpp).
Projection projection(const std::vector<at::Tensor>& proj, int64_t index, const std::vector<at::Tensor>& raws);
// x fp32 [rows, k] (k <= p.K: quant_gemm's rows are padded to whole blocks; a GGUF weight's K is k) quantized as
// p's product takes it, into the calling thread's `mine`.
void quantize_for(const Projection& p, ThreadScratch& mine, const float* x, int64_t rows, int64_t k, bool paired);
// y[i, n - n0] = x_i . w_n (+ bias) for the M rows quantized in `mine` and p's output rows n0 <= n < n1, on the
// calling thread (quant_rows, or gguf_rows per part); y points at column n0.
void project_rows(const Projection& p, const ThreadScratch& mine, int64_t M, int64_t n0, int64_t n1, float* y,
                  int64_t ldy);

// A layer's form: Llama's (RMSNorms, gated SiLU MLP, the residual stream beside the layer's output), or Falcon's
// (LayerNorms with bias, GELU MLP, the residual added in the layer): attention and MLP in parallel from one or two
// norms of the same input (falcon-7b/40b), or in sequence with a norm before each (falcon-rw).
enum class BlockForm : int64_t { LLAMA = 0, FALCON_PARALLEL = 1, FALCON_SEQUENTIAL = 2 };

struct LlamaDecoder : torch::CustomClassHolder {
  // The bound tensors (kept alive here) and the pointers a step reads.
  std::vector<at::Tensor> norms, proj, k_caches, v_caches, head_tensors, buffers;
  std::vector<at::Tensor> gguf_raws;  // the GGUF weights' raw rows, which projections' specs index
  at::Tensor embedding;               // fp32 [vocab, hidden], or a GGUF table's raw rows
  int64_t embedding_type;             // 0: fp32; else the table's ggml type
  int64_t hidden_size, vocab_size;
  int64_t num_heads, num_kv_heads, head_dim;
  double eps, scale;
  std::vector<Projection> layers;  // 4 per layer: qkv, o, gate_up (Falcon: up), down
  int64_t team_nb = 0;             // the most blocks of 32 an int4/int8 projection's input row has (Scratch::team)
  std::optional<Projection> head;
  std::vector<const float*> norm_weights;
  BlockForm form = BlockForm::LLAMA;
  std::vector<at::Tensor> norm_bias_tensors;  // Falcon: the LayerNorms' biases, one per norm weight
  std::vector<const float*> norm_biases;
  at::Tensor alibi;  // fp32 [num_heads] ALiBi slopes (times the scale), or empty: RoPE
  const float* alibi_slopes = nullptr;
  std::vector<void*> k_data, v_data;
  bool half_cache;
  int64_t handle_id;  // this decoder's number for `llme_step` (decoder.cpp)
  // bind_buffers': the step's inputs, its logits [R, vocab] and argmax [R]; `bound` their pointers and capacities
  StepInputs bound{};
  float* bound_logits = nullptr;
  int64_t* bound_tokens = nullptr;
  Scratch shared;
  std::vector<ThreadScratch> per_thread;  // (a decoder steps on one thread at a time: the engine's)

  LlamaDecoder(at::Tensor embedding, std::vector<at::Tensor> norms, std::vector<at::Tensor> proj,
               std::vector<at::Tensor> k_caches, std::vector<at::Tensor> v_caches, std::vector<at::Tensor> head_tensors,
               int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps, double scale,
               std::vector<at::Tensor> gguf_raws, int64_t embedding_type, int64_t form,
               std::vector<at::Tensor> norm_biases, at::Tensor alibi_slopes);
  // Token `id`'s embedding row into out [hidden] (a GGUF table's row dequantized).
  void embed_row(int64_t id, float* out) const;
  ~LlamaDecoder() override;
  // input_ids int64 [S] -> the final-normed hidden states [S, hidden].
  at::Tensor step(const at::Tensor& input_ids, const at::Tensor& positions, const at::Tensor& slot_mapping,
                  const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& cos_sin_cache);
  void bind_buffers(at::Tensor input_ids, at::Tensor positions, at::Tensor slot_mapping, at::Tensor block_tables,
                    at::Tensor seq_lens, at::Tensor cu_seqlens_q, at::Tensor logit_rows, at::Tensor cos_sin_cache,
                    at::Tensor logits, at::Tensor tokens);
  int64_t handle() const { return handle_id; }
  // The step over the bound buffers' first S sequences, T tokens and R logits rows, into the bound logits (and
  // argmax).
  void step_bound(int64_t S, int64_t T, int64_t R, bool argmax);
  // The step itself (decode_step.cpp): the final-normed hidden states [T, hidden] into out, or with `logits` the
  // head's [R, vocab], and then, when tokens is not null, each logits row's first maximum.
  void run(const StepInputs& in, float* out, int64_t* tokens, bool logits);
};

// One thread of a step's OpenMP team (decode_step.cpp sets it up; each layer form's body runs through it): the step's
// inputs and shared intermediates, the thread's own scratch, and the pieces every form shares.
struct StepThread {
  const LlamaDecoder& dec;
  const StepInputs& in;
  Scratch& sh;
  ThreadScratch& mine;
  int t, nt;
  bool timing, paired, tiled;
  int64_t T, tiles, tasks;
  float *xp, *qkvp, *qp, *ap, *op, *actp;  // the team's [T, hidden], [T, qkv], [T, q], [T, q], [T, hidden], [T, I]

  // rows (default T) of a [rows, K] quantized as p's product takes them; returns where: this thread's own scratch,
  // or with TEAM_ROWS rows or more an int4/int8 product's, the team's, each thread quantizing its share of the rows
  // (then a barrier; the numbers are the same: each row is quantized alone)
  const ThreadScratch& quantize(const float* a, int64_t K, const Projection& p, int64_t rows = -1) const;
  // this thread's share of p's output rows for the T rows quantized in xs into y (row stride ldy), then a barrier
  void product(const Projection& p, const ThreadScratch& xs, float* y, int64_t ldy) const;
  // the rotary embedding of q (into qp; ALiBi: none) and the KV store of this thread's tokens, then a barrier
  void rotate_and_store(int64_t l) const;
  // attention of the T rows into ap, then a barrier
  void attend(int64_t l) const;
};

// Layer l of a Falcon form on thread c (falcon_step.cpp): the residual stream in c.mine.residual, from and to there.
void falcon_layer(const StepThread& c, int64_t l);
// [begin, end) of thread t's share of n items.
inline std::pair<int64_t, int64_t> share(int64_t n, int t, int nt) { return {n * t / nt, n * (t + 1) / nt}; }
constexpr int64_t ACT_BLOCK = 64;  // MLP rows computed together before their activation
// From this many rows (prompt chunks) the team shares the activations' quantization rather than each thread doing all
// (a 2048-row step of the default model spent ~50 ms of its ~1 s on every thread quantizing every row).
constexpr int64_t TEAM_ROWS = 128;

}  // namespace llmengine_cpu
