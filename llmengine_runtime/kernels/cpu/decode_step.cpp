// One decode step of a Llama-architecture model in a single call: every layer's RMSNorms, quantized projections,
// rotary embedding, KV-cache store and paged attention, the final norm and optionally the head, through the kernels
// of the sibling files. It does what models/llama.py's blocks do for a decode batch, without a Python round trip
// per op (on this CPU each op called from Python costs ~10 us, ~11 ms per token over 30 layers).
//
// decoder.cpp binds a LlamaDecoder (decoder.h) to the model once, and to a step's inputs (tensors passed, or
// buffers bound once: the engine's decode steps); `LlamaDecoder::run` here computes the step.
// Layout: input_ids int64 [S] (the S sequences' new tokens; embedding fp32 [vocab, hidden]); positions, slot_mapping
// int64 [S]; block_tables int32 [S, max_blocks]; seq_lens int32 [S] (after this step); cos_sin_cache fp32 [P, d];
// k_caches, v_caches: L tensors [num_blocks, block_size, Hkv, d], all fp32 or all fp16 (kv_rows.h: keys are rotated
// in fp32, then rounded as stored); norms: 2L + 1 weights [hidden] (each layer's input and post-attention norms,
// then the final norm); proj: L * 4 projections (qkv, o, gate_up, down), each four tensors (qs, d, m, bias) of
// quant_gemm.cpp's layout, m empty for int8 and bias empty when there is none; the head, when bound: one more.
// It writes the final-normed hidden states [S, hidden], or with the head its logits [S, vocab] and then, when asked,
// each row's first maximum int64 [S] (as torch.argmax: sampling.cpp's first_max).
// Threads: one OpenMP team for the whole step (not a fork and join per op, ~150 a token): the products split
// their weight rows (the head's too, each thread taking the argmax of its own rows, merged in thread order),
// attention its (sequence, KV head, chunk of keys) tasks (attention.cpp: the chunks are fixed, so a row's numbers
// are the same in any batch and on any number of threads), rotary and the KV store the tokens, with a barrier after each;
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

constexpr int64_t ACT_BLOCK = 64;  // gate/up rows computed together before their SiLU-and-mul

// [begin, end) of thread t's share of n items.
inline std::pair<int64_t, int64_t> share(int64_t n, int t, int nt) { return {n * t / nt, n * (t + 1) / nt}; }

// Waits for the whole team; with the profiler on, thread 0's wait counts in `part`'s time (its caller's timer).
inline void barrier() {
#pragma omp barrier
}

}  // namespace

void LlamaDecoder::run(const StepInputs& in, float* out, int64_t* tokens, bool logits) {
  PartTimer step_timer(STEP);
  const bool profiling = step_profile().enabled.load(std::memory_order_relaxed);
  if (profiling) ++step_profile().steps;
  const int64_t L = static_cast<int64_t>(k_caches.size()), S = in.S;
  const int64_t hidden = embedding.size(1), vocab = embedding.size(0), d = head_dim, H = num_heads,
                Hkv = num_kv_heads, q_size = H * d, kv_size = Hkv * d, qkv_size = q_size + 2 * kv_size;
  const int64_t *idp = in.input_ids, *pp = in.positions, *sp = in.slot_mapping;
  const int64_t block_size = k_caches[0].size(1), num_slots = k_caches[0].size(0) * block_size;
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(idp[s] >= 0 && idp[s] < vocab, "LlamaDecoder.step: token id ", idp[s], " is not in the vocabulary");
    TORCH_CHECK(pp[s] >= 0 && pp[s] < in.cos_sin_rows, "position ", pp[s], " is outside the rotary table of ",
                in.cos_sin_rows, " rows");
    TORCH_CHECK(sp[s] < num_slots, "store_kv: slot ", sp[s], " past the cache");
  }
  const int32_t *bt = in.block_tables, *lp = in.seq_lens;
  check_block_tables(bt, lp, S, in.max_blocks, block_size, k_caches[0].size(0));
  const int64_t I = layers[2].N / 2, G = H / Hkv;
  const int nt_wanted = at::get_num_threads();
  Scratch& sh = shared;  // the team's intermediates, reused from the last step (resize only grows them)
  sh.row_seq.resize(S), sh.row_keys.resize(S);
  for (int64_t s = 0; s < S; ++s) sh.row_seq[s] = s, sh.row_keys[s] = lp[s];
  // Attention's (row, KV head, chunk) tasks; the plan's other fields are the layer's (see below).
  const int64_t tasks = PagedAttention{nullptr, nullptr, nullptr, nullptr, sh.row_seq.data(), sh.row_keys.data(),
                                       nullptr, nullptr, S, H, Hkv}.plan_split(sh.row_task);
  TORCH_CHECK(!logits || head.has_value(), "LlamaDecoder: no head was bound");
  const bool argmax = logits && tokens != nullptr;
  for (auto [buffer, size] : {std::pair{&sh.x, S * hidden}, {&sh.qkv, S * qkv_size}, {&sh.q_rot, S * q_size},
                              {&sh.attn, S * q_size}, {&sh.o, S * hidden}, {&sh.act, S * I},
                              {&sh.part_max, tasks * G}, {&sh.part_sum, tasks * G}, {&sh.part_acc, tasks * G * d},
                              {&sh.head_max, argmax ? nt_wanted * S : 0}})
    buffer->resize(size);
  if (argmax) sh.head_arg.resize(nt_wanted * S);
  float *xp = sh.x.data(), *qkvp = sh.qkv.data(), *qp = sh.q_rot.data();
  float *ap = sh.attn.data(), *op = sh.o.data(), *actp = sh.act.data();
  if (static_cast<int>(per_thread.size()) < nt_wanted) per_thread.resize(nt_wanted);
  const float* ep = embedding.data_ptr<float>();
  for (int64_t s = 0; s < S; ++s) std::copy(ep + idp[s] * hidden, ep + (idp[s] + 1) * hidden, xp + s * hidden);
  const float feps = static_cast<float>(eps);
  const bool paired = q4_pairs_blocks();
  const float* csp = in.cos_sin;
  // token s's rotated key and its value, into layer l's caches at slot sp[s] (fp16: rounded as stored)
  auto store_token = [&](int64_t l, int64_t s, const float* row, float* k_rotated) {
    const int64_t at_slot = sp[s] * kv_size;
    if (half_cache) {
      rotate_heads(row + q_size, d, Hkv, d, csp + pp[s] * d, k_rotated);
      store_row(k_rotated, static_cast<Half*>(k_data[l]) + at_slot, kv_size);
      store_row(row + q_size + kv_size, static_cast<Half*>(v_data[l]) + at_slot, kv_size);
    } else {
      rotate_heads(row + q_size, d, Hkv, d, csp + pp[s] * d, static_cast<float*>(k_data[l]) + at_slot);
      store_row(row + q_size + kv_size, static_cast<float*>(v_data[l]) + at_slot, kv_size);
    }
  };

#pragma omp parallel num_threads(nt_wanted)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const bool timing = profiling && t == 0;
    // Every thread keeps its own copy of the residual stream and of each quantized activation: computing them
    // redundantly (a few microseconds) saves a barrier each, and the copies are equal bit for bit.
    ThreadScratch& mine = per_thread[t];
    std::vector<float>&residual = mine.residual, &normed = mine.normed, &scores = mine.scores;
    std::vector<float>&gate_tmp = mine.gate_tmp, &up_tmp = mine.up_tmp, &k_rotated = mine.k_rotated;
    QuantizedRows& xr = mine.xr;
    for (auto [buffer, size] : {std::pair{&residual, S * hidden}, {&normed, S * hidden}, {&scores, G * block_size},
                                {&gate_tmp, S * ACT_BLOCK}, {&up_tmp, S * ACT_BLOCK}, {&k_rotated, kv_size}})
      buffer->resize(size);
    auto quantize = [&](const float* a, int64_t K, const Projection& p) {
      quantize_rows_into(xr, a, S, K, p.w.nb, p.q4 && paired);
    };
    auto product = [&](const Projection& p, float* y, int64_t ldy) {
      const auto [n0, n1] = share(p.N, t, nt);
      quant_rows(xr, p.w, S, n0, n1, y + n0, ldy);
      barrier();
    };
    for (int64_t l = 0; l < L; ++l) {
      const Projection &qkv_p = layers[4 * l], &o_p = layers[4 * l + 1], &gu_p = layers[4 * l + 2],
                       &dn_p = layers[4 * l + 3];
      {
        PartTimer timer(timing ? NORM : NUM_PARTS);
        for (int64_t s = 0; s < S; ++s)
          rms_norm_row(xp + s * hidden, l ? residual.data() + s * hidden : nullptr, norm_weights[2 * l],
                       normed.data() + s * hidden, l ? residual.data() + s * hidden : nullptr, hidden, feps);
        if (!l) std::copy(xp, xp + S * hidden, residual.data());
      }
      {
        PartTimer timer(timing ? PRODUCT : NUM_PARTS);
        quantize(normed.data(), hidden, qkv_p);
        product(qkv_p, qkvp, qkv_size);
      }
      {
        const auto [s0, s1] = share(S, t, nt);
        {
          PartTimer timer(timing ? ROTARY : NUM_PARTS);
          for (int64_t s = s0; s < s1; ++s) rotate_heads(qkvp + s * qkv_size, d, H, d, csp + pp[s] * d, qp + s * q_size);
        }
        PartTimer timer(timing ? STORE_KV : NUM_PARTS);
        for (int64_t s = s0; s < s1; ++s)
          if (sp[s] >= 0) store_token(l, s, qkvp + s * qkv_size, k_rotated.data());
        barrier();
      }
      {
        PartTimer timer(timing ? ATTENTION : NUM_PARTS);
        const PagedAttention plan{qp, k_data[l], v_data[l], bt, sh.row_seq.data(), sh.row_keys.data(), nullptr,
                                  ap, S, H, Hkv, d, block_size, in.max_blocks, q_size, d, static_cast<float>(scale),
                                  half_cache};
        const int64_t* row_task = sh.row_task.data();
        const auto [t0, t1] = share(tasks, t, nt);
        for (int64_t task = t0; task < t1; ++task)
          plan.split_task(task, row_task, scores.data(), sh.part_max.data(), sh.part_sum.data(), sh.part_acc.data());
        barrier();
        const auto [m0, m1] = share(S * H, t, nt);
        for (int64_t rh = m0; rh < m1; ++rh)
          plan.split_merge(rh, row_task, sh.part_max.data(), sh.part_sum.data(), sh.part_acc.data());
        barrier();
      }
      {
        PartTimer timer(timing ? PRODUCT : NUM_PARTS);
        quantize(ap, q_size, o_p);
        product(o_p, op, hidden);
      }
      {
        PartTimer timer(timing ? NORM : NUM_PARTS);
        for (int64_t s = 0; s < S; ++s)
          rms_norm_row(op + s * hidden, residual.data() + s * hidden, norm_weights[2 * l + 1],
                       normed.data() + s * hidden, residual.data() + s * hidden, hidden, feps);
      }
      // gate rows i and up rows I + i together, then their SiLU-and-mul: no [S, 2I] intermediate.
      const auto [i0, i1] = share(I, t, nt);
      {
        PartTimer timer(timing ? PRODUCT : NUM_PARTS);
        quantize(normed.data(), hidden, gu_p);
      }
      for (int64_t b0 = i0; b0 < i1; b0 += ACT_BLOCK) {
        const int64_t b1 = std::min(i1, b0 + ACT_BLOCK), n = b1 - b0;
        {
          PartTimer timer(timing ? PRODUCT : NUM_PARTS);
          quant_rows(xr, gu_p.w, S, b0, b1, gate_tmp.data(), n);
          quant_rows(xr, gu_p.w, S, I + b0, I + b1, up_tmp.data(), n);
        }
        PartTimer timer(timing ? ACTIVATION : NUM_PARTS);
        for (int64_t s = 0; s < S; ++s)
          silu_mul_row(gate_tmp.data() + s * n, up_tmp.data() + s * n, actp + s * I + b0, n);
      }
      {
        PartTimer timer(timing ? PRODUCT : NUM_PARTS);
        barrier();
        quantize(actp, I, dn_p);
        product(dn_p, xp, hidden);
      }
    }
    float* outp = out;
    if (!logits) {
      if (t == 0) {
        PartTimer timer(timing ? NORM : NUM_PARTS);
        for (int64_t s = 0; s < S; ++s)
          rms_norm_row(xp + s * hidden, L ? residual.data() + s * hidden : nullptr, norm_weights[2 * L],
                       outp + s * hidden, L ? residual.data() + s * hidden : nullptr, hidden, feps);
      }
    } else {  // every thread norms its own residual copy, then computes its share of the head's rows
      {
        PartTimer timer(timing ? NORM : NUM_PARTS);
        for (int64_t s = 0; s < S; ++s)
          rms_norm_row(xp + s * hidden, L ? residual.data() + s * hidden : nullptr, norm_weights[2 * L],
                       normed.data() + s * hidden, L ? residual.data() + s * hidden : nullptr, hidden, feps);
      }
      PartTimer timer(timing ? HEAD : NUM_PARTS);
      quantize(normed.data(), hidden, *head);
      const int64_t V = head->N;
      const auto [n0, n1] = share(V, t, nt);
      quant_rows(xr, head->w, S, n0, n1, outp + n0, V);
      if (argmax)
        for (int64_t s = 0; s < S; ++s) {
          const auto [index, value] = first_max(outp + s * V + n0, n1 - n0);
          sh.head_arg[t * S + s] = n0 + index;
          sh.head_max[t * S + s] = n1 > n0 ? value : -std::numeric_limits<float>::infinity();
        }
      barrier();
      if (argmax && t == 0) {
        // In thread order, so the lowest index wins a tie; a NaN, the first one, wins over every number.
        for (int64_t s = 0; s < S; ++s) {
          int64_t best = sh.head_arg[s];
          float best_value = sh.head_max[s];
          for (int u = 1; u < nt; ++u) {
            const float value = sh.head_max[u * S + s];
            if (!std::isnan(best_value) && (std::isnan(value) || value > best_value))
              best = sh.head_arg[u * S + s], best_value = value;
          }
          tokens[s] = best;
        }
      }
    }
  }
}

}  // namespace llmengine_cpu
