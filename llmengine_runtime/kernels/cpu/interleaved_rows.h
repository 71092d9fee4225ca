// The output-row loop of the interleaved kernels (q4_interleaved.cpp, q8_interleaved.cpp): the groups of 8 weight
// rows that cover output rows n0..n1, for each chunk of 64 activation rows from m0 to M, in tiles of up to 4
// activation rows; `tile(g, mt, i, j0, j1, y_tile)` writes group g's lanes j0..j1 for activation rows i..i+mt-1 at
// y_tile (row i, column 8g + j0 - n0 of y). Then the bias. y points at row 0, column n0 of an output with row
// stride ldy.
#pragma once

#include <algorithm>
#include <cstdint>

#include "quant_common.h"

namespace llmengine_cpu {

template <class Tile>
void interleaved_rows(int64_t m0, int64_t M, int64_t n0, int64_t n1, const float* bias, float* y, int64_t ldy,
                      const Tile& tile) {
  constexpr int64_t GROUP = 8, M_CHUNK = 64;
  if (m0 >= M || n0 >= n1) return;
  const int64_t g0 = n0 / GROUP, g1 = (n1 + GROUP - 1) / GROUP;
  for (int64_t c0 = m0; c0 < M; c0 += M_CHUNK) {
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
    for (int64_t i = m0; i < M; ++i)
      for (int64_t n = n0; n < n1; ++n) y[i * ldy + n - n0] += bias[n];
}

// What the AMX tiles (amx_interleaved.cpp) left of the M x [n0, n1) output: the columns beside their block and the
// rows below it. Same bits either way, so the split does not show in the numbers.
template <class Tile>
void interleaved_rest(const AmxSpan& done, int64_t M, int64_t n0, int64_t n1, const float* bias, float* y,
                      int64_t ldy, const Tile& tile) {
  if (done.rows == 0 || done.n0 >= done.n1) return interleaved_rows(0, M, n0, n1, bias, y, ldy, tile);
  interleaved_rows(0, done.rows, n0, done.n0, bias, y, ldy, tile);
  interleaved_rows(0, done.rows, done.n1, n1, bias, y + (done.n1 - n0), ldy, tile);
  interleaved_rows(done.rows, M, n0, n1, bias, y, ldy, tile);
}

}  // namespace llmengine_cpu
