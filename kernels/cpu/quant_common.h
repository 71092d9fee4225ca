// What the quantized-product files share: AVX2 detection, fp16 -> fp32, and the activations quantized per block.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LLME_AVX2 1
#endif

namespace llmengine_cpu {

constexpr int64_t QK = 32;  // values per quantization block

inline float half_to_float(uint16_t h) {
#ifdef LLME_AVX2
  return _cvtsh_ss(h);
#else
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
#endif
}

// x fp32 [rows, K] quantized per block of 32 (quantize_x.cpp): q int8 [rows, nb * 32] (zeros past K), d = max|x| /
// 127 and s = d * sum(q), fp32 [rows, nb].
struct QuantizedRows {
  std::vector<int8_t> q;
  std::vector<float> d, s;
  int64_t nb;
};

QuantizedRows quantize_rows(const at::Tensor& x, int64_t nb, bool paired);

}  // namespace llmengine_cpu
