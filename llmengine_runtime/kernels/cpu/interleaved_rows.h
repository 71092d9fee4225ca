// The output-row loop of the interleaved kernels (q4_interleaved.cpp, q8_interleaved.cpp): the groups of 8 weight
// rows that cover output rows n0..n1, for each chunk of 64 activation rows, in tiles of up to 4 activation rows;
// `tile(g, mt, i, j0, j1, y_tile)` writes group g's lanes j0..j1 for activation rows i..i+mt-1 at y_tile (row i,
// column 8g + j0 - n0 of y). Then the bias. y points at column n0 of an output with row stride ldy.
#pragma once

#include <algorithm>
#include <cstdint>

namespace llmengine_cpu {

template <class Tile>
void interleaved_rows(int64_t M, int64_t n0, int64_t n1, const float* bias, float* y, int64_t ldy, const Tile& tile) {
  constexpr int64_t GROUP = 8, M_CHUNK = 64;
  const int64_t g0 = n0 / GROUP, g1 = (n1 + GROUP - 1) / GROUP;
  for (int64_t c0 = 0; c0 < M; c0 += M_CHUNK) {
    const int64_t c1 = std::min(M, c0 + M_CHUNK);
    for (int64_t g = g0; g < g1; ++g) {
      const int j0 = static_cast<int>(std::max<int64_t>(0, n0 - g * GROUP));
      const int j1 = static_cast<int>(std::min<int64_t>(GROUP, n1 - g * GROUP));
      float* yg = y + (g * GROUP + j0 - n0);
      for (int64_t i = c0; i < c1; i += 4)
        tile(g, static_cast<int>(std::min<int64_t>(4, c1 - i)), i, j0, j1, yg + i * ldy);
    }
  }
  if (bias)
    for (int64_t i = 0; i < M; ++i)
      for (int64_t n = n0; n < n1; ++n) y[i * ldy + n - n0] += bias[n];
}

}  // namespace llmengine_cpu
