// One Falcon layer inside the fused step (decode_step.cpp runs the step; this is the layer body for its Falcon
// forms), on one thread of the step's team. It does what models/falcon.py's FalconBlock does, with the same kernels
// in the same order, so the numbers are the eager blocks':
// - parallel (falcon-7b, one norm; falcon-40b, ln_attn and ln_mlp): x + (mlp(ln_mlp(x)) + attn(ln_attn(x)));
// - sequential (falcon-rw): h = x + attn(ln_1(x)); h + mlp(ln_2(h)).
// attn: the QKV product (+ bias), RoPE or ALiBi, the KV store, paged attention, the dense product (+ bias); mlp: the
// up product (+ bias), GELU, the down product (+ bias). Norm l's weights are the decoder's 2l (attention's) and 2l + 1
// (the MLP's; the same tensors as 2l where one norm feeds both). Layout: the residual stream x [T, hidden] is every
// thread's own copy (c.mine.residual, from the embedding at layer 0); the products' outputs are the team's (c.op,
// c.xp, c.actp), each thread writing its share of their columns and reading all of them after the barrier.
#include <algorithm>

#include "cpu_kernels.h"
#include "decoder.h"
#include "step_profile.h"

namespace llmengine_cpu {

void falcon_layer(const StepThread& c, int64_t l) {
  const LlamaDecoder& dec = c.dec;
  const int64_t T = c.T, hidden = dec.hidden_size, q_size = dec.num_heads * dec.head_dim;
  const int64_t qkv_size = q_size + 2 * dec.num_kv_heads * dec.head_dim;
  const Projection &qkv_p = dec.layers[4 * l], &o_p = dec.layers[4 * l + 1], &up_p = dec.layers[4 * l + 2],
                   &dn_p = dec.layers[4 * l + 3];
  const int64_t I = up_p.N;
  const float feps = static_cast<float>(dec.eps);
  const bool parallel = dec.form == BlockForm::FALCON_PARALLEL;
  const float *w_attn = dec.norm_weights[2 * l], *b_attn = dec.norm_biases[2 * l];
  const float *w_mlp = dec.norm_weights[2 * l + 1], *b_mlp = dec.norm_biases[2 * l + 1];
  const bool one_norm = parallel && w_mlp == w_attn && b_mlp == b_attn;
  float *x = c.mine.residual.data(), *normed = c.mine.normed.data();
  float* mlp_x = parallel && !one_norm ? c.mine.mlp_in.data() : normed;
  {
    PartTimer timer(c.timing ? NORM : NUM_PARTS);
    if (l == 0) std::copy(c.xp, c.xp + T * hidden, x);
    for (int64_t r = 0; r < T; ++r) {
      layer_norm_row(x + r * hidden, w_attn, b_attn, normed + r * hidden, hidden, feps);
      if (mlp_x != normed) layer_norm_row(x + r * hidden, w_mlp, b_mlp, mlp_x + r * hidden, hidden, feps);
    }
  }
  {
    PartTimer timer(c.timing ? PRODUCT : NUM_PARTS);
    c.product(qkv_p, c.quantize(normed, hidden, qkv_p), c.qkvp, qkv_size);
  }
  c.rotate_and_store(l);
  c.attend(l);
  {
    PartTimer timer(c.timing ? PRODUCT : NUM_PARTS);
    c.product(o_p, c.quantize(c.ap, q_size, o_p), c.op, hidden);
  }
  if (!parallel) {  // h = x + attn; the MLP's input is ln_2(h)
    PartTimer timer(c.timing ? NORM : NUM_PARTS);
    for (int64_t r = 0; r < T; ++r) {
      float* xr = x + r * hidden;
      const float* ar = c.op + r * hidden;
      for (int64_t i = 0; i < hidden; ++i) xr[i] += ar[i];
      layer_norm_row(xr, w_mlp, b_mlp, normed + r * hidden, hidden, feps);
    }
  }
  // the up product ACT_BLOCK rows at a time, each block's GELU after it: no [T, I] pre-activation
  const auto [i0, i1] = share(I, c.t, c.nt);
  const ThreadScratch* xs;
  {
    PartTimer timer(c.timing ? PRODUCT : NUM_PARTS);
    xs = &c.quantize(mlp_x, hidden, up_p);
  }
  float* up = c.mine.up_tmp.data();
  for (int64_t b0 = i0; b0 < i1; b0 += ACT_BLOCK) {
    const int64_t b1 = std::min(i1, b0 + ACT_BLOCK), n = b1 - b0;
    {
      PartTimer timer(c.timing ? PRODUCT : NUM_PARTS);
      project_rows(up_p, *xs, T, b0, b1, up, n);
    }
    PartTimer timer(c.timing ? ACTIVATION : NUM_PARTS);
    for (int64_t r = 0; r < T; ++r) gelu_row(up + r * n, c.actp + r * I + b0, n);
  }
  {
    PartTimer timer(c.timing ? PRODUCT : NUM_PARTS);
#pragma omp barrier
    c.product(dn_p, c.quantize(c.actp, I, dn_p), c.xp, hidden);
  }
  PartTimer timer(c.timing ? NORM : NUM_PARTS);
  for (int64_t r = 0; r < T; ++r) {
    float* xr = x + r * hidden;
    const float *mr = c.xp + r * hidden, *ar = c.op + r * hidden;
    if (parallel)
      for (int64_t i = 0; i < hidden; ++i) xr[i] += mr[i] + ar[i];
    else
      for (int64_t i = 0; i < hidden; ++i) xr[i] += mr[i];
  }
}

}  // namespace llmengine_cpu
