// What the fused step (decode_step.cpp) takes from the GGUF product (gguf_linear.cpp) and tables
// (gguf_dequant.cpp): the row-range product on the calling thread, the activations quantized on the calling
// thread, and a table row dequantized.
//
// Layout: w uint8 [N, row_bytes], a weight's rows as the file stores them (gguf_blocks.h); x the activations
// quantized per block of the type's `block_elems` (Activations); y fp32 with row stride ldy.
#pragma once

#include <cstdint>

#include "gguf_blocks.h"

namespace llmengine_cpu::gguf {

// y[i, n - n0] = x_i . w_n (+ bias[n]) for the M rows of x and the weight rows n0 <= n < n1, on the calling thread:
// the same tiles and sums as `gguf_linear`, so the same bits whatever M, n0 or the thread.
void gguf_rows(const TypeTraits* traits, const uint8_t* w, int64_t row_bytes, const Activations& x, int64_t M,
               int64_t n0, int64_t n1, const float* bias, float* y, int64_t ldy);

// quantize_activations on the calling thread only (every thread of the step quantizes its own copy).
void quantize_activations_here(Activations& acts, const float* x, int64_t rows, int64_t k, int64_t block);

// One table row of k values (k / block_elems blocks at `row`) as fp32 into out: models/gguf_types.py's
// dequantizers, bit for bit (the same float operations in the same order). False for a type it does not take.
bool dequantize_row(int type, const uint8_t* row, int64_t k, float* out);
bool dequantize_supported(int type);

}  // namespace llmengine_cpu::gguf
