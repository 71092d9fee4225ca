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
// The same into `out` (its buffers reused when large enough), one thread: x fp32 [rows, k] with rows contiguous.
void quantize_rows_into(QuantizedRows& out, const float* x, int64_t rows, int64_t k, int64_t nb, bool paired);

// One quantized weight (quant_gemm.cpp's layout): m null for int8, bias null when none.
struct QuantWeight {
  const uint8_t* qs;
  const uint16_t* d;
  const uint16_t* m;
  const float* bias;
  int64_t nb, row_bytes;
};

// y[i, n - n0] = x_i . w_n (+ bias[n]) for the M rows of xr and the weight rows n0 <= n < n1, on the calling
// thread; y points at column n0 of an output with row stride ldy.
void quant_rows(const QuantizedRows& xr, const QuantWeight& w, int64_t M, int64_t n0, int64_t n1, float* y,
                int64_t ldy);
// Whether the q4 product wants its activations `paired` (quantize_x.cpp).
bool q4_pairs_blocks();

}  // namespace llmengine_cpu
