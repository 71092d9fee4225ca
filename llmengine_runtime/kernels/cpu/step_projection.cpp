// The fused step's projections (decoder.h's Projection): bound from the tensors the model passes, their activations
// quantized, and their products over a range of output rows, for quant_gemm.cpp's weights and for GGUF weights.
//
// Layout of one projection in `proj` (PROJ_TENSORS tensors): quant_gemm's (qs, d fp16, m fp16 or empty for int8,
// bias fp32 or empty); a float weight's (w fp32/fp16/bf16 [N / 8, K4 / 4, 32] or bf16 tiles [N / 16, K32 / 32, 512]: float_rows.h, -, -,
// bias); or a GGUF weight's (spec int64 [P, 2], empty, empty, bias fp32 [N] or empty), where part p
// of the spec is (ggml type, index into `raws`), raws[index] uint8 [N_p, row_bytes] (the file's rows), and the
// parts' rows follow one another in the output (a fused q|k|v or gate|up whose parts have different types).
// Grid: none here; the step's threads call project_rows for their own output rows. A GGUF product quantizes the
// activations once per block size its parts use (gguf_linear's activation quantizer), and each part's rows are
// gguf_linear's row kernels, its bias added after: the eager GGUFLinear / GGUFRowParts numbers, bit for bit.
#include "decoder.h"

#include <algorithm>

namespace llmengine_cpu {

Projection projection(const std::vector<at::Tensor>& proj, int64_t index, const std::vector<at::Tensor>& raws) {
  const at::Tensor& qs = proj[PROJ_TENSORS * index];
  const at::Tensor& d = proj[PROJ_TENSORS * index + 1];
  const at::Tensor& m = proj[PROJ_TENSORS * index + 2];
  const at::Tensor& bias = proj[PROJ_TENSORS * index + 3];
  TORCH_CHECK(!bias.numel() || (bias.scalar_type() == at::kFloat && bias.is_contiguous()),
              "LlamaDecoder: biases must be contiguous fp32");
  const float* bias_data = bias.numel() ? bias.data_ptr<float>() : nullptr;
  if (qs.scalar_type() == at::kFloat || qs.scalar_type() == at::kHalf || qs.scalar_type() == at::kBFloat16) {
    const FloatWeight fw = float_weight(qs, bias_data);
    Projection p{QuantWeight{nullptr, nullptr, nullptr, nullptr, 0, 0}, fw.N, 0, false, {}, nullptr, fw};
    p.K = p.fw.K4;
    TORCH_CHECK(!bias_data || bias.numel() == p.N, "LlamaDecoder: projection ", index, "'s bias is not [", p.N, "]");
    return p;
  }
  if (qs.scalar_type() == at::kLong) {  // a GGUF weight
    TORCH_CHECK(qs.dim() == 2 && qs.size(1) == 2 && qs.size(0) > 0 && qs.is_contiguous(),
                "LlamaDecoder: projection ", index, "'s GGUF spec must be int64 [parts, 2]");
    Projection p{QuantWeight{nullptr, nullptr, nullptr, nullptr, 0, 0}, 0, 0, false, {}, bias_data};
    const int64_t* spec = qs.data_ptr<int64_t>();
    for (int64_t part = 0; part < qs.size(0); ++part) {
      const gguf::TypeTraits* traits = gguf::type_traits(static_cast<int>(spec[2 * part]));
      const int64_t at = spec[2 * part + 1];
      TORCH_CHECK(traits && at >= 0 && at < static_cast<int64_t>(raws.size()), "LlamaDecoder: projection ", index,
                  " has a GGUF part of type ", spec[2 * part], " or raw index ", at, " that the step does not take");
      const at::Tensor& raw = raws[at];
      TORCH_CHECK(raw.scalar_type() == at::kByte && raw.dim() == 2 && raw.is_contiguous() &&
                      raw.size(1) % traits->block_bytes == 0,
                  "LlamaDecoder: GGUF rows must be contiguous uint8 [N, whole ", traits->name, " blocks]");
      const int64_t K = raw.size(1) / traits->block_bytes * traits->block_elems;
      TORCH_CHECK(part == 0 || K == p.K, "LlamaDecoder: projection ", index, "'s GGUF parts differ in K");
      p.K = K;
      p.parts.push_back({traits, raw.data_ptr<uint8_t>(), raw.size(1), p.N, p.N + raw.size(0)});
      p.N += raw.size(0);
    }
    TORCH_CHECK(!bias_data || bias.numel() == p.N, "LlamaDecoder: projection ", index, "'s bias is not [", p.N, "]");
    return p;
  }
  TORCH_CHECK(qs.is_contiguous() && d.is_contiguous() && d.scalar_type() == at::kHalf && (!m.numel() || m.is_contiguous()),
              "LlamaDecoder: projection ", index, " is not in quant_gemm.cpp's layout");
  const bool q4 = m.numel() > 0;
  if (qs.dim() == 3) {  // eight rows interleaved: q4 (q4_interleaved.cpp) qs [N / 8, nb, 128], d, m [N / 8, nb, 8];
                       // q8 (q8_interleaved.cpp) qs [N / 8, nb, 256], d [N / 8, nb, 8], m empty
    TORCH_CHECK(qs.size(2) == (q4 ? 128 : 256) && d.dim() == 3 && d.size(0) == qs.size(0) && d.size(1) == qs.size(1) &&
                    d.size(2) == 8 && (!q4 || d.sizes() == m.sizes()),
                "LlamaDecoder: projection ", index, " is not in an interleaved layout (q4_interleaved.cpp)");
    const QuantWeight w{reinterpret_cast<const uint8_t*>(qs.data_ptr()), reinterpret_cast<const uint16_t*>(d.data_ptr()),
                        q4 ? reinterpret_cast<const uint16_t*>(m.data_ptr()) : nullptr, bias_data, qs.size(1),
                        qs.size(1) * qs.size(2), true};
    return {w, qs.size(0) * 8, qs.size(1) * QK, q4, {}, nullptr};
  }
  const QuantWeight w{reinterpret_cast<const uint8_t*>(qs.data_ptr()), reinterpret_cast<const uint16_t*>(d.data_ptr()),
                      q4 ? reinterpret_cast<const uint16_t*>(m.data_ptr()) : nullptr, bias_data, d.size(1),
                      qs.size(1)};
  return {w, qs.size(0), d.size(1) * QK, q4, {}, nullptr};
}

void quantize_for(const Projection& p, ThreadScratch& mine, const float* x, int64_t rows, int64_t k, bool paired) {
  if (p.fw.type != FloatType::NONE) {
    prepare_float_rows(mine.xf, x, rows, k, p.fw.K4, p.fw.type);
    return;
  }
  if (p.parts.empty()) {
    quantize_rows_into(mine.xr, x, rows, k, p.w.nb, p.q4 && paired && !p.w.interleaved);
    return;
  }
  bool wants32 = false, wants256 = false;
  for (const GGUFPart& part : p.parts) (part.traits->block_elems == 32 ? wants32 : wants256) = true;
  if (wants32) gguf::quantize_activations_here(mine.x32, x, rows, p.K, 32);
  if (wants256) gguf::quantize_activations_here(mine.x256, x, rows, p.K, gguf::QK_K);
}

void project_rows(const Projection& p, const ThreadScratch& mine, int64_t M, int64_t n0, int64_t n1, float* y,
                  int64_t ldy) {
  if (p.fw.type != FloatType::NONE) {
    float_rows(mine.xf, p.fw, M, n0, n1, y, ldy);
    return;
  }
  if (p.parts.empty()) {
    quant_rows(mine.xr, p.w, M, n0, n1, y, ldy);
    return;
  }
  for (const GGUFPart& part : p.parts) {
    const int64_t a = std::max(n0, part.n0), b = std::min(n1, part.n1);
    if (a >= b) continue;
    const gguf::Activations& x = part.traits->block_elems == 32 ? mine.x32 : mine.x256;
    gguf::gguf_rows(part.traits, part.raw, part.row_bytes, x, M, a - part.n0, b - part.n0,
                    p.bias ? p.bias + part.n0 : nullptr, y + (a - n0), ldy);
  }
}

}  // namespace llmengine_cpu
