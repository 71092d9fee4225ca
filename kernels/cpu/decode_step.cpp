// One decode step of a Llama-architecture model in a single call: every layer's RMSNorms, quantized projections,
// rotary embedding, KV-cache store and paged attention, and the final norm, through the kernels of the sibling
// files. It does what models/llama.py's blocks do for a decode batch, without a Python round trip per op
// (on this CPU each op called from Python costs ~10 us, ~11 ms per token over 30 layers).
//
// `torch.classes.llmengine_cpu.LlamaDecoder(embedding, norms, proj, k_caches, v_caches, ...)` binds the model once;
// its `step(input_ids, positions, slot_mapping, block_tables, seq_lens, cos_sin_cache)` runs one decode step.
// Layout: input_ids int64 [S] (the S sequences' new tokens; embedding fp32 [vocab, hidden]); positions, slot_mapping
// int64 [S]; block_tables int32 [S, max_blocks]; seq_lens int32 [S] (after this step); cos_sin_cache fp32 [P, d];
// k_caches, v_caches: L tensors [num_blocks, block_size, Hkv, d], all fp32 or all fp16 (kv_rows.h: keys are rotated
// in fp32, then rounded as stored); norms: 2L + 1 weights [hidden] (each layer's input and post-attention norms,
// then the final norm); proj: L * 4 projections (qkv, o, gate_up, down), each four tensors (qs, d, m, bias) of
// quant_gemm.cpp's layout, m empty for int8 and bias empty when there is none.
// Returns the final-normed hidden states [S, hidden].
// Threads: one OpenMP team for the whole step (not a fork and join per op, ~150 a token): the products split
// their weight rows, attention its (sequence, KV head, chunk) tasks, rotary and the KV store the tokens, with a
// barrier after each; every thread computes the norms and quantizes the activations itself (its own copy of
// the residual stream) rather than wait for one thread to. The gate/up product and SiLU-and-mul go together.
// Each row or task is computed by the same functions as the eager ops', so the numbers are theirs, bit for bit.
// `decode_step_profile(enable)` returns the seconds spent per part (step_profile.h) since its last call, and the
// number of steps, and turns the timers on or off for the steps that follow.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include "cpu_kernels.h"
#include "kv_rows.h"
#include "quant_common.h"
#include "step_profile.h"

#include <algorithm>
#include <utility>
#include <vector>

namespace llmengine_cpu {

namespace {

constexpr int64_t PROJ_TENSORS = 4;  // qs, d, m, bias
constexpr int64_t ACT_BLOCK = 64;    // gate/up rows computed together before their SiLU-and-mul

// [begin, end) of thread t's share of n items.
inline std::pair<int64_t, int64_t> share(int64_t n, int t, int nt) { return {n * t / nt, n * (t + 1) / nt}; }

struct Projection {
  QuantWeight w;
  int64_t N, K;
  bool q4;
};

Projection projection(const std::vector<at::Tensor>& proj, int64_t index) {
  const at::Tensor& qs = proj[PROJ_TENSORS * index];
  const at::Tensor& d = proj[PROJ_TENSORS * index + 1];
  const at::Tensor& m = proj[PROJ_TENSORS * index + 2];
  const at::Tensor& bias = proj[PROJ_TENSORS * index + 3];
  TORCH_CHECK(qs.is_contiguous() && d.is_contiguous() && d.scalar_type() == at::kHalf && (!m.numel() || m.is_contiguous()),
              "LlamaDecoder: projection ", index, " is not in quant_gemm.cpp's layout");
  TORCH_CHECK(!bias.numel() || (bias.scalar_type() == at::kFloat && bias.is_contiguous()),
              "LlamaDecoder: biases must be contiguous fp32");
  const bool q4 = m.numel() > 0;
  const QuantWeight w{reinterpret_cast<const uint8_t*>(qs.data_ptr()), reinterpret_cast<const uint16_t*>(d.data_ptr()),
                      q4 ? reinterpret_cast<const uint16_t*>(m.data_ptr()) : nullptr,
                      bias.numel() ? bias.data_ptr<float>() : nullptr, d.size(1), qs.size(1)};
  return {w, qs.size(0), d.size(1) * QK, q4};
}

// Waits for the whole team; with the profiler on, thread 0's wait counts in `part`'s time (its caller's timer).
inline void barrier() {
#pragma omp barrier
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
// What a step writes besides its output, kept from one step to the next so that a step allocates nothing else (a
// dozen allocations, each cold after the last step's weight stream): the team's shared intermediates, and every
// thread's own copies of the residual stream, the normed and quantized activations and its scratch.
struct Scratch {
  std::vector<float> x, qkv, q_rot, attn, o, act, part_max, part_sum, part_acc;
};
struct ThreadScratch {
  std::vector<float> residual, normed, scores, gate_tmp, up_tmp, k_rotated;
  QuantizedRows xr;
};

struct LlamaDecoder : torch::CustomClassHolder {
  std::vector<at::Tensor> norms, proj, k_caches, v_caches;
  Scratch shared;
  std::vector<ThreadScratch> per_thread;  // (a decoder steps on one thread at a time: the engine's)
  at::Tensor embedding;
  int64_t num_heads, num_kv_heads, head_dim;
  double eps, scale;
  std::vector<Projection> layers;  // 4 per layer: qkv, o, gate_up, down

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
    TORCH_CHECK(this->embedding.dim() == 2 && this->embedding.scalar_type() == at::kFloat &&
                    this->embedding.is_contiguous(), "LlamaDecoder: the embedding must be contiguous fp32 [vocab, hidden]");
    const int64_t hidden = this->embedding.size(1), q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
    for (const at::Tensor& w : this->norms)
      TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == hidden,
                  "LlamaDecoder: norm weights must be contiguous fp32 [hidden]");
    for (int64_t l = 0; l < L; ++l) {
      const at::Tensor& k = this->k_caches[l];
      TORCH_CHECK(cache_type_ok(k, this->v_caches[l]) && k.scalar_type() == this->k_caches[0].scalar_type() &&
                      k.is_contiguous() && this->v_caches[l].is_contiguous() && k.sizes() == this->v_caches[l].sizes() &&
                      k.dim() == 4 && k.size(2) == num_kv_heads && k.size(3) == head_dim,
                  "LlamaDecoder: layer ", l, "'s caches are not contiguous [blocks, block_size, ", num_kv_heads, ", ",
                  head_dim, "], all fp32 or all fp16");
    }
    for (int64_t i = 0; i < 4 * L; ++i) layers.push_back(projection(this->proj, i));
    for (int64_t l = 0; l < L; ++l) {
      const Projection &qkv = layers[4 * l], &o = layers[4 * l + 1], &gu = layers[4 * l + 2], &dn = layers[4 * l + 3];
      TORCH_CHECK(qkv.N == q_size + 2 * kv_size && o.N == hidden && gu.N % 2 == 0 && dn.N == hidden &&
                      qkv.K >= hidden && o.K >= q_size && gu.K >= hidden && dn.K >= gu.N / 2,
                  "LlamaDecoder: layer ", l, "'s projection shapes do not fit the model");
    }
  }

  // input_ids int64 [S] -> the final-normed hidden states [S, hidden].
  at::Tensor step(const at::Tensor& input_ids, const at::Tensor& positions, const at::Tensor& slot_mapping,
                  const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& cos_sin_cache) {
    PartTimer step_timer(STEP);
    const bool profiling = step_profile().enabled.load(std::memory_order_relaxed);
    if (profiling) ++step_profile().steps;
    const int64_t L = static_cast<int64_t>(k_caches.size()), S = input_ids.numel();
    const int64_t hidden = embedding.size(1), vocab = embedding.size(0), d = head_dim, H = num_heads,
                  Hkv = num_kv_heads, q_size = H * d, kv_size = Hkv * d, qkv_size = q_size + 2 * kv_size;
    const at::Tensor ids = input_ids.to(at::kLong).contiguous(), pos = positions.to(at::kLong).contiguous();
    const at::Tensor slots = slot_mapping.to(at::kLong).contiguous(), cs = cos_sin_cache.to(at::kFloat).contiguous();
    const at::Tensor tables = block_tables.to(at::kInt).contiguous(), lens = seq_lens.to(at::kInt).contiguous();
    TORCH_CHECK(pos.numel() == S && slots.numel() == S && lens.numel() == S && tables.dim() == 2 &&
                    tables.size(0) == S, "LlamaDecoder.step: one position, slot, length and block-table row per token");
    TORCH_CHECK(cs.dim() == 2 && cs.size(1) == d, "LlamaDecoder.step: cos_sin_cache must be [positions, head_dim]");
    const int64_t* idp = ids.data_ptr<int64_t>();
    const int64_t* pp = pos.data_ptr<int64_t>();
    const int64_t* sp = slots.data_ptr<int64_t>();
    const int64_t block_size = k_caches[0].size(1), num_slots = k_caches[0].size(0) * block_size;
    for (int64_t s = 0; s < S; ++s) {
      TORCH_CHECK(idp[s] >= 0 && idp[s] < vocab, "LlamaDecoder.step: token id ", idp[s], " is not in the vocabulary");
      TORCH_CHECK(pp[s] >= 0 && pp[s] < cs.size(0), "position ", pp[s], " is outside the rotary table of ",
                  cs.size(0), " rows");
      TORCH_CHECK(sp[s] < num_slots, "store_kv: slot ", sp[s], " past the cache");
    }
    const int32_t* bt = tables.data_ptr<int32_t>();
    const int32_t* lp = lens.data_ptr<int32_t>();
    check_block_tables(bt, lp, S, tables.size(1), block_size, k_caches[0].size(0));
    const int64_t I = layers[2].N / 2, G = H / Hkv;
    const int nt_wanted = at::get_num_threads();
    const int64_t splits = decode_splits(lp, S, Hkv, nt_wanted), tasks = S * Hkv * splits;
    at::Tensor out = at::empty({S, hidden}, embedding.options());
    Scratch& sh = shared;  // the team's intermediates, reused from the last step (resize only grows them)
    for (auto [buffer, size] : {std::pair{&sh.x, S * hidden}, {&sh.qkv, S * qkv_size}, {&sh.q_rot, S * q_size},
                                {&sh.attn, S * q_size}, {&sh.o, S * hidden}, {&sh.act, S * I},
                                {&sh.part_max, tasks * G}, {&sh.part_sum, tasks * G}, {&sh.part_acc, tasks * G * d}})
      buffer->resize(size);
    float *xp = sh.x.data(), *qkvp = sh.qkv.data(), *qp = sh.q_rot.data();
    float *ap = sh.attn.data(), *op = sh.o.data(), *actp = sh.act.data();
    if (static_cast<int>(per_thread.size()) < nt_wanted) per_thread.resize(nt_wanted);
    const float* ep = embedding.data_ptr<float>();
    for (int64_t s = 0; s < S; ++s) std::copy(ep + idp[s] * hidden, ep + (idp[s] + 1) * hidden, xp + s * hidden);
    const float feps = static_cast<float>(eps);
    const bool paired = q4_pairs_blocks();
    const float* csp = cs.data_ptr<float>();
    const bool half_cache = k_caches[0].scalar_type() == at::kHalf;
    // token s's rotated key and its value, into layer l's caches at slot sp[s] (fp16: rounded as stored)
    auto store_token = [&](int64_t l, int64_t s, const float* row, float* k_rotated) {
      const int64_t at_slot = sp[s] * kv_size;
      if (half_cache) {
        rotate_heads(row + q_size, d, Hkv, d, csp + pp[s] * d, k_rotated);
        store_row(k_rotated, k_caches[l].data_ptr<Half>() + at_slot, kv_size);
        store_row(row + q_size + kv_size, v_caches[l].data_ptr<Half>() + at_slot, kv_size);
      } else {
        rotate_heads(row + q_size, d, Hkv, d, csp + pp[s] * d, k_caches[l].data_ptr<float>() + at_slot);
        store_row(row + q_size + kv_size, v_caches[l].data_ptr<float>() + at_slot, kv_size);
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
            rms_norm_row(xp + s * hidden, l ? residual.data() + s * hidden : nullptr, norms[2 * l].data_ptr<float>(),
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
          const PagedDecode plan{qp, k_caches[l].data_ptr(), v_caches[l].data_ptr(), bt, lp, nullptr, ap,
                                 sh.part_max.data(), sh.part_sum.data(), sh.part_acc.data(), S, H, Hkv, d, block_size,
                                 tables.size(1), q_size, d, splits, static_cast<float>(scale), half_cache};
          const auto [t0, t1] = share(tasks, t, nt);
          for (int64_t task = t0; task < t1; ++task) plan.task(task, scores.data());
          barrier();
          const auto [m0, m1] = share(S * H, t, nt);
          for (int64_t sh = m0; sh < m1; ++sh) plan.merge(sh);
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
            rms_norm_row(op + s * hidden, residual.data() + s * hidden, norms[2 * l + 1].data_ptr<float>(),
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
      if (t == 0) {
        PartTimer timer(timing ? NORM : NUM_PARTS);
        float* outp = out.data_ptr<float>();
        for (int64_t s = 0; s < S; ++s)
          rms_norm_row(xp + s * hidden, L ? residual.data() + s * hidden : nullptr, norms[2 * L].data_ptr<float>(),
                       outp + s * hidden, L ? residual.data() + s * hidden : nullptr, hidden, feps);
      }
    }
    return out;
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
