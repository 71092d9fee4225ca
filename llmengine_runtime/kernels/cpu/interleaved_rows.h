// The output-row loop of the interleaved kernels (q4_interleaved.cpp, q8_interleaved.cpp, float_interleaved.cpp): the
// groups of 8 weight rows that cover output rows n0..n1, for each chunk of 64 activation rows from m0 to M, in tiles
// of up to MAX_TILE activation rows, as even as they come (5 rows with MAX_TILE 4: 3 + 2; with 8: one tile, so a
// 5-row verification step reads and unpacks the weights once); `tile(g, mt, i, j0, j1, y_tile)` writes group g's
// lanes j0..j1 for activation rows i..i+mt-1 at y_tile (row i, column 8g + j0 - n0 of y). Then the bias. y points at
// row 0, column n0 of an output with row stride ldy. A row's numbers do not depend on its tile.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "quant_common.h"

namespace llmengine_cpu {

// y[i, n - n0] += bias[n] for rows [m0, M) and columns [n0, n1) (y at row 0, column n0); nothing without a bias.
inline void add_bias(const float* bias, int64_t m0, int64_t M, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  if (bias)
    for (int64_t i = m0; i < M; ++i)
      for (int64_t n = n0; n < n1; ++n) y[i * ldy + n - n0] += bias[n];
}

template <int MAX_TILE = 4, class Tile>
void interleaved_rows(int64_t m0, int64_t M, int64_t n0, int64_t n1, const float* bias, float* y, int64_t ldy,
                      const Tile& tile) {
  constexpr int64_t GROUP = 8, M_CHUNK = 64;
  if (m0 >= M || n0 >= n1) return;
  const int64_t g0 = n0 / GROUP, g1 = (n1 + GROUP - 1) / GROUP;
  for (int64_t c0 = m0; c0 < M; c0 += M_CHUNK) {
    const int64_t c1 = std::min(M, c0 + M_CHUNK), tiles = (c1 - c0 + MAX_TILE - 1) / MAX_TILE;
    const int64_t base = (c1 - c0) / tiles, longer = (c1 - c0) % tiles;  // the first `longer` tiles: base + 1 rows
    for (int64_t g = g0; g < g1; ++g) {
      const int j0 = static_cast<int>(std::max<int64_t>(0, n0 - g * GROUP));
      const int j1 = static_cast<int>(std::min<int64_t>(GROUP, n1 - g * GROUP));
      float* yg = y + (g * GROUP + j0 - n0);
      for (int64_t t = 0, i = c0; t < tiles; ++t) {
        const int mt = static_cast<int>(base + (t < longer));
        tile(g, mt, i, j0, j1, yg + i * ldy);
        i += mt;
      }
    }
  }
  add_bias(bias, m0, M, n0, n1, y, ldy);
}

// What the AMX tiles (amx_interleaved.cpp) left of the M x [n0, n1) output: the columns beside their block and the
// rows below it; then the bias over the whole output, once. Same bits either way, so the split does not show.
template <int MAX_TILE, class Tile>
void interleaved_rest(const AmxSpan& done, int64_t M, int64_t n0, int64_t n1, const float* bias, float* y,
                      int64_t ldy, const Tile& tile) {
  if (done.rows == 0 || done.n0 >= done.n1) return interleaved_rows<MAX_TILE>(0, M, n0, n1, bias, y, ldy, tile);
  interleaved_rows<MAX_TILE>(0, done.rows, n0, done.n0, nullptr, y, ldy, tile);
  interleaved_rows<MAX_TILE>(0, done.rows, done.n1, n1, nullptr, y + (done.n1 - n0), ldy, tile);
  interleaved_rows<MAX_TILE>(done.rows, M, n0, n1, nullptr, y, ldy, tile);
  add_bias(bias, 0, M, n0, n1, y, ldy);
}

// f(std::integral_constant<int, mt>{}) for a tile of mt <= MAX_TILE rows: a kernel's tile templated on its rows.
template <int MAX_TILE, class F>
void with_tile_rows(int mt, const F& f) {
  if constexpr (MAX_TILE > 1)
    if (mt < MAX_TILE) return with_tile_rows<MAX_TILE - 1>(mt, f);
  f(std::integral_constant<int, MAX_TILE>{});
}

// The widest tile of the int4/int8 kernels: 8 rows where AVX-512 gives 32 vector registers (a tile holds two per
// row), else 4.
#ifdef __AVX512VL__
constexpr int INT_MAX_TILE = 8;
#else
constexpr int INT_MAX_TILE = 4;
#endif

}  // namespace llmengine_cpu
