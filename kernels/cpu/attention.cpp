// Paged KV cache on the CPU, fp32: store the new tokens' K/V, and decode attention (one query per sequence).
//
// store_kv:          k, v [T, Hkv, d] (last dim contiguous); k_cache, v_cache [num_blocks, block_size, Hkv, d]
//                    contiguous; slot_mapping int64 [T] (block * block_size + offset; -1 = not stored).
// decode_attention:  q [S, H, d] (last dim contiguous), the caches as above, block_tables int32 [S, max_blocks],
//                    seq_lens int32 [S], optional ALiBi slopes fp32 [H] (already multiplied by the scale).
//                    out[s, h] = softmax_j(scale q.k_j + slope (j - (L - 1))) . v_j over the L = seq_lens[s]
//                    cached positions of sequence s, keys read through its block table. Returns [S, H, d].
// Grid: at::parallel_for over (sequence, KV head); one task computes the H / Hkv query heads that share the
// KV head: all scores into a buffer, their max and exp-sum, then the weighted sum of the values, each key
// and value row read once for the whole group.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_kernels.h"

#include <cmath>
#include <limits>
#include <vector>

namespace llmengine_cpu {

void store_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slot_mapping) {
  TORCH_CHECK(k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat &&
                  k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat,
              "store_kv: fp32 only");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes(),
              "store_kv: caches must be contiguous and alike");
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && k.stride(2) == 1 && v.stride(2) == 1,
              "store_kv: k, v must be [T, Hkv, d] with a contiguous last dim");
  const int64_t T = k.size(0), Hkv = k.size(1), d = k.size(2);
  TORCH_CHECK(k_cache.size(2) == Hkv && k_cache.size(3) == d, "store_kv: cache heads/dim differ from k's");
  const at::Tensor slots = slot_mapping.to(at::kLong).contiguous();
  TORCH_CHECK(slots.numel() == T, "store_kv: slot_mapping must be [T]");
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(sp[t] < num_slots, "store_kv: slot ", sp[t], " past the cache");
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    if (sp[t] < 0) continue;
    for (int64_t h = 0; h < Hkv; ++h) {
      const int64_t dst = (sp[t] * Hkv + h) * d;
      std::copy(kp + t * k.stride(0) + h * k.stride(1), kp + t * k.stride(0) + h * k.stride(1) + d, kc + dst);
      std::copy(vp + t * v.stride(0) + h * v.stride(1), vp + t * v.stride(0) + h * v.stride(1) + d, vc + dst);
    }
  }
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                            const c10::optional<at::Tensor>& alibi_slopes) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat &&
                  v_cache.scalar_type() == at::kFloat, "decode_attention: fp32 only");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "decode_attention: q must be [S, H, d], last dim contiguous");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes(),
              "decode_attention: caches must be contiguous and alike");
  const int64_t S = q.size(0), H = q.size(1), d = q.size(2);
  const int64_t block_size = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == d && H % Hkv == 0, "decode_attention: heads/dim of q and the cache disagree");
  const at::Tensor tables = block_tables.to(at::kInt).contiguous();
  const at::Tensor lens = seq_lens.to(at::kInt).contiguous();
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == S && lens.numel() == S,
              "decode_attention: block_tables [S, max_blocks] and seq_lens [S]");
  const int64_t max_blocks = tables.size(1), num_blocks = k_cache.size(0);
  const int32_t* bt = tables.data_ptr<int32_t>();
  const int32_t* lp = lens.data_ptr<int32_t>();
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(lp[s] >= 0 && lp[s] <= max_blocks * block_size, "decode_attention: seq_len ", lp[s],
                " does not fit the block table");
    for (int64_t b = 0; b < (lp[s] + block_size - 1) / block_size; ++b)
      TORCH_CHECK(bt[s * max_blocks + b] >= 0 && bt[s * max_blocks + b] < num_blocks,
                  "decode_attention: block ", bt[s * max_blocks + b], " is not in the cache");
  }
  at::Tensor slopes;
  if (alibi_slopes.has_value()) {
    slopes = alibi_slopes->to(at::kFloat).contiguous();
    TORCH_CHECK(slopes.numel() == H, "decode_attention: one ALiBi slope per head");
  }
  const float* sl = slopes.defined() ? slopes.data_ptr<float>() : nullptr;
  auto out = at::empty({S, H, d}, q.options());
  const int64_t G = H / Hkv;
  const float* qp = q.data_ptr<float>();
  const float* kc = k_cache.data_ptr<float>();
  const float* vc = v_cache.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  at::parallel_for(0, S * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / Hkv, kvh = task % Hkv, L = lp[s];
      scores.assign(G * L, 0.f);
      for (int64_t j = 0; j < L; ++j) {
        const int64_t slot = static_cast<int64_t>(bt[s * max_blocks + j / block_size]) * block_size + j % block_size;
        const float* kr = kc + (slot * Hkv + kvh) * d;
        for (int64_t g = 0; g < G; ++g) {
          const float* qr = qp + s * q.stride(0) + (kvh * G + g) * q.stride(1);
          float dot = 0.f;
          #pragma omp simd reduction(+ : dot)
          for (int64_t i = 0; i < d; ++i) dot += qr[i] * kr[i];
          scores[g * L + j] = dot * fscale + (sl ? sl[kvh * G + g] * static_cast<float>(j - (L - 1)) : 0.f);
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* o = op + (s * H + kvh * G + g) * d;
        std::fill(o, o + d, 0.f);
        if (L == 0) continue;
        float* sc = scores.data() + g * L;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < L; ++j) mx = std::max(mx, sc[j]);
        float total = 0.f;
        for (int64_t j = 0; j < L; ++j) total += (sc[j] = std::exp(sc[j] - mx));
        const float inv = 1.f / total;
        for (int64_t j = 0; j < L; ++j) sc[j] *= inv;
      }
      for (int64_t j = 0; j < L; ++j) {
        const int64_t slot = static_cast<int64_t>(bt[s * max_blocks + j / block_size]) * block_size + j % block_size;
        const float* vr = vc + (slot * Hkv + kvh) * d;
        for (int64_t g = 0; g < G; ++g) {
          float* o = op + (s * H + kvh * G + g) * d;
          const float p = scores[g * L + j];
          for (int64_t i = 0; i < d; ++i) o[i] += p * vr[i];
        }
      }
    }
  });
  return out;
}

}  // namespace llmengine_cpu

TORCH_LIBRARY_FRAGMENT(llmengine_cpu, lib) {
  lib.def("store_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
  lib.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
          "float scale, Tensor? alibi_slopes) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmengine_cpu, CPU, lib) {
  lib.impl("store_kv", &llmengine_cpu::store_kv);
  lib.impl("decode_attention", &llmengine_cpu::decode_attention);
}
