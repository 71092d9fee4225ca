// One step of a Llama-architecture model (or a Falcon: its layer body in falcon_step.cpp) in a single call: every
// layer's RMSNorms, quantized projections, rotary embedding, KV-cache store and paged attention, the final norm and
// optionally the head, through the kernels of the sibling files. It does what models/llama.py's blocks do for any batch
// (decode rows, prompt chunks, speculative verification rows, side by side), without a Python round trip per op (on
// this CPU each op called from Python costs ~10 us, ~11 ms per step over 30 layers). StepThread (decoder.h) is one
// thread's view of the step, with the pieces both layer forms share: quantize, product, rotary + store, attention.
//
// decoder.cpp binds a LlamaDecoder (decoder.h) to the model once, and to a step's inputs (tensors passed, or
// buffers bound once: the engine's decode steps); `LlamaDecoder::run` here computes the step.
// Layout: input_ids int64 [T] (the S sequences' T new tokens, packed as cu_seqlens_q int32 [S + 1] says, or one per
// sequence; embedding fp32 [vocab, hidden], or a GGUF table's uint8 rows, each looked-up row dequantized:
// gguf_dequant.cpp); positions, slot_mapping int64 [T]; block_tables int32 [S, max_blocks];
// seq_lens int32 [S] (after this step); logit_rows int64 [R] (the token rows whose logits are wanted, increasing, or
// every row); cos_sin_cache fp32 [P, d];
// k_caches, v_caches: L tensors [num_blocks, block_size, Hkv, d], all fp32 or all fp16 (kv_rows.h: keys are rotated
// in fp32, then rounded as stored; ALiBi: keys stored as they are, cos_sin_cache [0, d]); norms: 2L + 1 weights
// [hidden] (each layer's input and post-attention norms, then the final norm; Falcon: its LayerNorms, with as many
// biases, falcon_step.cpp); proj: L * 4 projections (qkv, o, gate_up, down), each four tensors (qs, d, m, bias) of
// quant_gemm.cpp's layout, m empty for int8 and bias empty when there is none, or a GGUF weight's four
// (step_projection.cpp: parts of any types the gguf_linear op takes); the head, when bound: one more.
// It writes the final-normed hidden states [T, hidden], or with the head its logits [R, vocab] and then, when asked,
// each row's first maximum int64 [R] (as torch.argmax: sampling.cpp's first_max).
// Threads: one OpenMP team for the whole step (not a fork and join per op, ~150 a token): the products split
// their weight rows (the head's too, each thread taking the argmax of its own rows, merged in thread order),
// attention its (row, KV head, chunk of keys) tasks, or for prompt chunks its (tile of rows, KV head) tasks
// (attention.cpp: the chunks are fixed, so a row's numbers are the same in any batch, in either form and on any
// number of threads), rotary and the KV store the tokens, with a barrier after each;
// every thread computes the norms and quantizes the activations itself (its own copy of the residual stream) rather
// than wait for one thread to. The gate/up product and SiLU-and-mul go together.
// Each row or task is computed by the same functions as the eager ops', so the numbers are theirs, bit for bit.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include "cpu_kernels.h"
#include "decoder.h"
#include "kv_rows.h"
#include "quant_common.h"
#include "step_profile.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

namespace llmengine_cpu {

namespace {

// Waits for the whole team; with the profiler on, thread 0's wait counts in `part`'s time (its caller's timer).
inline void barrier() {
#pragma omp barrier
}

}  // namespace

const ThreadScratch& StepThread::quantize(const float* a, int64_t K, const Projection& p, int64_t rows) const {
  rows = rows < 0 ? T : rows;
  if (rows < TEAM_ROWS || nt == 1 || p.fw.type != FloatType::NONE || !p.parts.empty()) {
    quantize_for(p, mine, a, rows, K, paired);
    return mine;
  }
  // The team's buffers are sized for the step (run); the last reader of their previous rows passed a barrier since.
  QuantizedRows& xr = sh.team.xr;
  if (t == 0) xr.nb = p.w.nb;
  const auto [r0, r1] = share(rows, t, nt);
  quantize_rows_range(xr, a, r0, r1, K, p.w.nb, p.q4 && paired && !p.w.interleaved);
  barrier();
  return sh.team;
}

void StepThread::product(const Projection& p, const ThreadScratch& xs, float* y, int64_t ldy) const {
  const auto [n0, n1] = share(p.N, t, nt);
  project_rows(p, xs, T, n0, n1, y + n0, ldy);
  barrier();
}

void StepThread::rotate_and_store(int64_t l) const {
  const int64_t d = dec.head_dim, H = dec.num_heads, Hkv = dec.num_kv_heads, q_size = H * d, kv_size = Hkv * d,
                qkv_size = q_size + 2 * kv_size;
  const int64_t *pp = in.positions, *sp = in.slot_mapping;
  const float* csp = in.cos_sin;
  const bool rope = dec.alibi_slopes == nullptr;
  const auto [s0, s1] = share(T, t, nt);
  if (rope) {
    PartTimer timer(timing ? ROTARY : NUM_PARTS);
    for (int64_t s = s0; s < s1; ++s) rotate_heads(qkvp + s * qkv_size, d, H, d, csp + pp[s] * d, qp + s * q_size);
  }
  PartTimer timer(timing ? STORE_KV : NUM_PARTS);
  // token s's (rotated) key and its value, into layer l's caches at slot sp[s] (fp16: rounded as stored)
  float* k_rotated = mine.k_rotated.data();
  for (int64_t s = s0; s < s1; ++s) {
    if (sp[s] < 0) continue;
    const float* row = qkvp + s * qkv_size;
    const int64_t at_slot = sp[s] * kv_size;
    if (dec.half_cache) {
      const float* key = row + q_size;
      if (rope) rotate_heads(key, d, Hkv, d, csp + pp[s] * d, k_rotated), key = k_rotated;
      store_row(key, static_cast<Half*>(dec.k_data[l]) + at_slot, kv_size);
      store_row(row + q_size + kv_size, static_cast<Half*>(dec.v_data[l]) + at_slot, kv_size);
    } else {
      float* k_out = static_cast<float*>(dec.k_data[l]) + at_slot;
      if (rope) rotate_heads(row + q_size, d, Hkv, d, csp + pp[s] * d, k_out);
      else store_row(row + q_size, k_out, kv_size);
      store_row(row + q_size + kv_size, static_cast<float*>(dec.v_data[l]) + at_slot, kv_size);
    }
  }
  barrier();
}

void StepThread::attend(int64_t l) const {
  PartTimer timer(timing ? ATTENTION : NUM_PARTS);
  const int64_t d = dec.head_dim, H = dec.num_heads, Hkv = dec.num_kv_heads, q_size = H * d,
                qkv_size = q_size + 2 * Hkv * d;
  const int64_t block_size = dec.k_caches[0].size(1);
  // (ALiBi: the queries unrotated, straight from the QKV product's rows)
  const bool rope = dec.alibi_slopes == nullptr;
  const PagedAttention plan{rope ? qp : qkvp, dec.k_data[l], dec.v_data[l], in.block_tables, sh.row_seq.data(),
                            sh.row_keys.data(), dec.alibi_slopes, ap, T, H, Hkv, d, block_size, in.max_blocks,
                            rope ? q_size : qkv_size, d, static_cast<float>(dec.scale), dec.half_cache};
  if (tiled) {
    const int64_t* tile_start = sh.tile_start.data();
    const auto [t0, t1] = share(tiles * Hkv, t, nt);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t tile = task / Hkv;
      plan.tile(tile_start[tile], tile_start[tile + 1] - tile_start[tile], task % Hkv, mine.scores.data(),
                mine.partial);
    }
  } else {
    const int64_t* row_task = sh.row_task.data();
    const auto [t0, t1] = share(tasks, t, nt);
    for (int64_t task = t0; task < t1; ++task)
      plan.split_task(task, row_task, mine.scores.data(), sh.part_max.data(), sh.part_sum.data(), sh.part_acc.data());
    barrier();
    const auto [m0, m1] = share(T * H, t, nt);
    for (int64_t rh = m0; rh < m1; ++rh)
      plan.split_merge(rh, row_task, sh.part_max.data(), sh.part_sum.data(), sh.part_acc.data());
  }
  barrier();
}

void LlamaDecoder::run(const StepInputs& in, float* out, int64_t* tokens, bool logits) {
  PartTimer step_timer(STEP);
  const bool profiling = step_profile().enabled.load(std::memory_order_relaxed);
  if (profiling) ++step_profile().steps;
  const int64_t L = static_cast<int64_t>(k_caches.size()), S = in.S, T = in.cu_seqlens_q ? in.T : in.S;
  const int64_t R = in.logit_rows ? in.R : T;
  const int nt_wanted = at::get_num_threads();
  const int64_t hidden = hidden_size, vocab = vocab_size, d = head_dim, H = num_heads,
                Hkv = num_kv_heads, q_size = H * d, kv_size = Hkv * d, qkv_size = q_size + 2 * kv_size;
  const int64_t *idp = in.input_ids, *pp = in.positions, *sp = in.slot_mapping;
  const int64_t block_size = k_caches[0].size(1), num_slots = k_caches[0].size(0) * block_size;
  for (int64_t r = 0; r < T; ++r) {
    TORCH_CHECK(idp[r] >= 0 && idp[r] < vocab, "LlamaDecoder.step: token id ", idp[r], " is not in the vocabulary");
    TORCH_CHECK(pp[r] >= 0 && (alibi_slopes || pp[r] < in.cos_sin_rows), "position ", pp[r],
                " is outside the rotary table of ", in.cos_sin_rows, " rows");
    TORCH_CHECK(sp[r] < num_slots, "store_kv: slot ", sp[r], " past the cache");
  }
  const int32_t *bt = in.block_tables, *lp = in.seq_lens, *cu = in.cu_seqlens_q;
  check_block_tables(bt, lp, S, in.max_blocks, block_size, k_caches[0].size(0));
  const int64_t* lr = in.logit_rows;
  for (int64_t i = 0; lr && i < R; ++i)
    TORCH_CHECK(lr[i] >= (i ? lr[i - 1] + 1 : 0) && lr[i] < T, "LlamaDecoder.step: logit rows must increase within ",
                "the ", T, " tokens");
  const int64_t I = form == BlockForm::LLAMA ? layers[2].N / 2 : layers[2].N, G = H / Hkv;
  Scratch& sh = shared;  // the team's intermediates, reused from the last step (resize only grows them)
  // Row r of sequence s sits at position seq_lens[s] - q_len + (r - cu[s]) and sees the keys up to it.
  sh.row_seq.resize(T), sh.row_keys.resize(T);
  TORCH_CHECK(!cu || (cu[0] == 0 && cu[S] == T), "LlamaDecoder.step: cu_seqlens_q must run from 0 to ", T);
  for (int64_t s = 0; s < S; ++s) {
    const int64_t r0 = cu ? cu[s] : s, r1 = cu ? cu[s + 1] : s + 1;
    TORCH_CHECK(r1 > r0 && r1 - r0 <= lp[s], "LlamaDecoder.step: sequence ", s, " has ", r1 - r0,
                " new tokens and ", lp[s], " in all");
    for (int64_t r = r0; r < r1; ++r) sh.row_seq[r] = s, sh.row_keys[r] = lp[s] - (r1 - 1 - r);
  }
  // Attention's tasks: (tile of rows, KV head) when there are enough of them to share out whole (prompt chunks), else
  // (row, KV head, chunk); the plan's other fields are the layer's (see below).
  const PagedAttention rows_plan{nullptr, nullptr, nullptr, nullptr, sh.row_seq.data(), sh.row_keys.data(),
                                 nullptr, nullptr, T, H, Hkv};
  const int64_t tiles = rows_plan.plan_tiles(sh.tile_start);
  const bool tiled = tiles * Hkv >= 4 * nt_wanted;
  const int64_t tasks = tiled ? 0 : rows_plan.plan_split(sh.row_task);
  TORCH_CHECK(!logits || head.has_value(), "LlamaDecoder: no head was bound");
  const bool argmax = logits && tokens != nullptr;
  for (auto [buffer, size] : {std::pair{&sh.x, T * hidden}, {&sh.qkv, T * qkv_size}, {&sh.q_rot, T * q_size},
                              {&sh.attn, T * q_size}, {&sh.o, T * hidden}, {&sh.act, T * I},
                              {&sh.part_max, tasks * G}, {&sh.part_sum, tasks * G}, {&sh.part_acc, tasks * G * d},
                              {&sh.head_max, argmax ? nt_wanted * R : 0}})
    buffer->resize(size);
  if (argmax) sh.head_arg.resize(nt_wanted * R);
  if (std::max(T, R) >= TEAM_ROWS) {  // (StepThread::quantize's team buffers: its threads write their rows in place)
    const int64_t rows = std::max(T, R);
    QuantizedRows& team = sh.team.xr;
    if (static_cast<int64_t>(team.q.size()) < rows * team_nb * QK) team.q.resize(rows * team_nb * QK);
    if (static_cast<int64_t>(team.d.size()) < rows * team_nb)
      team.d.resize(rows * team_nb), team.s.resize(rows * team_nb);
  }
  float *xp = sh.x.data(), *qkvp = sh.qkv.data(), *qp = sh.q_rot.data();
  float *ap = sh.attn.data(), *op = sh.o.data(), *actp = sh.act.data();
  if (static_cast<int>(per_thread.size()) < nt_wanted) per_thread.resize(nt_wanted);
  for (int64_t r = 0; r < T; ++r) embed_row(idp[r], xp + r * hidden);
  const float feps = static_cast<float>(eps);
  const bool paired = q4_pairs_blocks();

#pragma omp parallel num_threads(nt_wanted)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const bool timing = profiling && t == 0;
    // Every thread keeps its own copy of the residual stream and of each quantized activation: computing them
    // redundantly (a few microseconds) saves a barrier each, and the copies are equal bit for bit.
    ThreadScratch& mine = per_thread[t];
    std::vector<float>&residual = mine.residual, &normed = mine.normed;
    std::vector<float>&gate_tmp = mine.gate_tmp, &up_tmp = mine.up_tmp;
    const bool two_mlp_inputs = form == BlockForm::FALCON_PARALLEL;
    for (auto [buffer, size] : {std::pair{&residual, T * hidden}, {&normed, T * hidden},
                                {&mine.mlp_in, two_mlp_inputs ? T * hidden : 0}, {&mine.scores, G * CHUNK_KEYS},
                                {&gate_tmp, T * ACT_BLOCK}, {&up_tmp, T * ACT_BLOCK}, {&mine.k_rotated, kv_size}})
      buffer->resize(size);
    const StepThread c{*this, in, sh, mine, t, nt, timing, paired, tiled, T, tiles, tasks,
                       xp, qkvp, qp, ap, op, actp};
    for (int64_t l = 0; l < L; ++l) {
      if (form != BlockForm::LLAMA) {
        falcon_layer(c, l);
        continue;
      }
      const Projection &qkv_p = layers[4 * l], &o_p = layers[4 * l + 1], &gu_p = layers[4 * l + 2],
                       &dn_p = layers[4 * l + 3];
      {
        PartTimer timer(timing ? NORM : NUM_PARTS);
        for (int64_t r = 0; r < T; ++r)
          rms_norm_row(xp + r * hidden, l ? residual.data() + r * hidden : nullptr, norm_weights[2 * l],
                       normed.data() + r * hidden, l ? residual.data() + r * hidden : nullptr, hidden, feps);
        if (!l) std::copy(xp, xp + T * hidden, residual.data());
      }
      {
        PartTimer timer(timing ? PRODUCT : NUM_PARTS);
        c.product(qkv_p, c.quantize(normed.data(), hidden, qkv_p), qkvp, qkv_size);
      }
      c.rotate_and_store(l);
      c.attend(l);
      {
        PartTimer timer(timing ? PRODUCT : NUM_PARTS);
        c.product(o_p, c.quantize(ap, q_size, o_p), op, hidden);
      }
      {
        PartTimer timer(timing ? NORM : NUM_PARTS);
        for (int64_t r = 0; r < T; ++r)
          rms_norm_row(op + r * hidden, residual.data() + r * hidden, norm_weights[2 * l + 1],
                       normed.data() + r * hidden, residual.data() + r * hidden, hidden, feps);
      }
      // gate rows i and up rows I + i together, then their SiLU-and-mul: no [S, 2I] intermediate.
      const auto [i0, i1] = share(I, t, nt);
      const ThreadScratch* xs;
      {
        PartTimer timer(timing ? PRODUCT : NUM_PARTS);
        xs = &c.quantize(normed.data(), hidden, gu_p);
      }
      for (int64_t b0 = i0; b0 < i1; b0 += ACT_BLOCK) {
        const int64_t b1 = std::min(i1, b0 + ACT_BLOCK), n = b1 - b0;
        {
          PartTimer timer(timing ? PRODUCT : NUM_PARTS);
          project_rows(gu_p, *xs, T, b0, b1, gate_tmp.data(), n);
          project_rows(gu_p, *xs, T, I + b0, I + b1, up_tmp.data(), n);
        }
        PartTimer timer(timing ? ACTIVATION : NUM_PARTS);
        for (int64_t r = 0; r < T; ++r)
          silu_mul_row(gate_tmp.data() + r * n, up_tmp.data() + r * n, actp + r * I + b0, n);
      }
      {
        PartTimer timer(timing ? PRODUCT : NUM_PARTS);
        barrier();
        c.product(dn_p, c.quantize(actp, I, dn_p), xp, hidden);
      }
    }
    // row r's final norm into o: Llama's of its last output plus the residual stream, Falcon's of the stream
    auto final_norm = [&](int64_t r, float* o) {
      if (form == BlockForm::LLAMA)
        rms_norm_row(xp + r * hidden, L ? residual.data() + r * hidden : nullptr, norm_weights[2 * L], o,
                     L ? residual.data() + r * hidden : nullptr, hidden, feps);
      else
        layer_norm_row(residual.data() + r * hidden, norm_weights[2 * L], norm_biases[2 * L], o, hidden, feps);
    };
    float* outp = out;
    if (!logits) {
      if (t == 0) {
        PartTimer timer(timing ? NORM : NUM_PARTS);
        for (int64_t r = 0; r < T; ++r) final_norm(r, outp + r * hidden);
      }
    } else if (R > 0) {  // every thread norms its own copy of the logit rows' residuals, then its share of the head
      std::vector<float>& head_in = mine.head_in;
      head_in.resize(R * hidden);
      {
        PartTimer timer(timing ? NORM : NUM_PARTS);
        for (int64_t i = 0; i < R; ++i) final_norm(lr ? lr[i] : i, head_in.data() + i * hidden);
      }
      PartTimer timer(timing ? HEAD : NUM_PARTS);
      const ThreadScratch& xs = c.quantize(head_in.data(), hidden, *head, R);
      const int64_t V = head->N;
      const auto [n0, n1] = share(V, t, nt);
      project_rows(*head, xs, R, n0, n1, outp + n0, V);
      if (argmax)
        for (int64_t i = 0; i < R; ++i) {
          const auto [index, value] = first_max(outp + i * V + n0, n1 - n0);
          sh.head_arg[t * R + i] = n0 + index;
          sh.head_max[t * R + i] = n1 > n0 ? value : -std::numeric_limits<float>::infinity();
        }
      barrier();
      if (argmax && t == 0) {
        // In thread order, so the lowest index wins a tie; a NaN, the first one, wins over every number.
        for (int64_t i = 0; i < R; ++i) {
          int64_t best = sh.head_arg[i];
          float best_value = sh.head_max[i];
          for (int u = 1; u < nt; ++u) {
            const float value = sh.head_max[u * R + i];
            if (!std::isnan(best_value) && (std::isnan(value) || value > best_value))
              best = sh.head_arg[u * R + i], best_value = value;
          }
          tokens[i] = best;
        }
      }
    }
  }
}

}  // namespace llmengine_cpu
