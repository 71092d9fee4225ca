// Float weights (fp32, fp16, bf16) with eight rows interleaved, and the activations their product takes
// (float_interleaved.cpp has the layout and the sums).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace llmengine_cpu {

enum class FloatType : int8_t { NONE = -1, F32 = 0, F16 = 1, BF16 = 2 };

// w [N / 8, K4 / 4, 32] of `type`: [g, c, 4j + i] = W[8g + j, 4c + i], zeros past K. Or, bf16 for AMX tiles
// (`tiles`, bf16_amx.cpp): w [N / 16, K4 / 32, 512] with [t, u, 32r + 2n + h] = W[16t + n, 32u + 2r + h] (K4 = K
// rounded up to 32).
struct FloatWeight {
  FloatType type = FloatType::NONE;
  const void* data = nullptr;
  int64_t K4 = 0;
  const float* bias = nullptr;
  int64_t N = 0;
  bool tiles = false;
};

// x [M, K4] as the product reads it: fp32 (`f`, for fp32 and fp16 weights) or rounded to bf16 (`b`, bf16 weights),
// zeros past K.
struct FloatActivations {
  std::vector<float> f;
  std::vector<uint16_t> b;
  int64_t K4 = 0;
};

// x fp32 [rows, k] (rows contiguous) into `out` for a weight of `type` with K4 columns (one thread).
void prepare_float_rows(FloatActivations& out, const float* x, int64_t rows, int64_t k, int64_t K4, FloatType type);
// y[i, n - n0] = x_i . w_n (+ bias[n]) for the M rows of x and output rows n0 <= n < n1, on the calling thread;
// y points at column n0 of an output with row stride ldy.
void float_rows(const FloatActivations& x, const FloatWeight& w, int64_t M, int64_t n0, int64_t n1, float* y,
                int64_t ldy);
// bf16 weights in AMX tiles (bf16_amx.cpp): y[i, n - n0] = x_i . w_n without the bias for the M rows and output
// rows n0 <= n < n1, on the calling thread (TORCH_CHECK fails on a CPU without AMX-BF16).
void bf16_tile_rows(const FloatActivations& x, const FloatWeight& w, int64_t M, int64_t n0, int64_t n1, float* y,
                    int64_t ldy);
// Whether this build and CPU run bf16 products on AMX tiles, and AMX is on: models/float_linear.py then lays bf16
// weights out in tiles.
bool amx_bf16_tiles();
// The weight a tensor in that layout holds (TORCH_CHECK fails naming the layout otherwise).
FloatWeight float_weight(const at::Tensor& w, const float* bias);

}  // namespace llmengine_cpu
