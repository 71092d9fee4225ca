// AMX bf16 tiles (tdpbf16ps) for bf16 weights, on CPUs with AMX-BF16 (Sapphire Rapids and later).
//
// When this build and CPU have them and AMX is on (`amx_bf16_tiles`), models/float_linear.py lays bf16 weights out as
// the tiles' B operand, and every product of those weights runs here whatever M: a row's numbers depend neither on
// M, nor on the rows beside it, nor on the thread. y[i, n] is the tile unit's fp32 sum of x[i, k] w[n, k] over k in
// tiles of 32, tile after tile in order into one accumulator from 0, then + bias (float_rows). Those are not the
// vector path's bits (tdpbf16ps adds its products in its own order): a CPU with AMX-BF16 and one without give
// slightly different bf16 numbers, each the same for any batch.
//
// Layout: w [N / 16, K32 / 32, 512] bf16, [t, u, 32r + 2n + h] = W[16t + n, 32u + 2r + h]: one B tile per 16 output
// rows and 32 k (16 rows of k pairs x 16 columns), 1 KiB, contiguous. A tile = up to 16 activation rows x 32 k of
// the prepared bf16 rows (prepare_float_rows, zeros to K32). C tile = up to 16 rows x 16 fp32, stored straight into y.
// Grid: one call computes rows [0, M) x columns [n0, n1) on the calling thread: chunks of ROW_CHUNK rows; in each the
// column tiles; in each, pairs of 16-row tiles that share every B tile load (one C tile each), then a last single
// tile, and the 1-15 rows below the whole tiles in a second pass with tiles configured to that many rows. A column
// tile cut by n0 or n1 (a thread's share of the step's output rows) is computed whole into scratch and copied.
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "float_rows.h"
#include "quant_common.h"

#if defined(LLME_AVX2) && defined(__AVX512F__) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define LLME_AMX_BF16 1
#include <immintrin.h>
#endif

namespace llmengine_cpu {

#ifdef LLME_AMX_BF16

namespace {

constexpr int64_t TILE = 16, KT = 32, TILE_ELEMS = 512, ROW_CHUNK = 128;

// Tiles 0, 1: C of two row tiles, mr x 16 fp32; 2, 3: their A, mr x 32 bf16; 4: B, 16 k pairs x 16 columns.
void configure_tiles(int mr) {
  TileConfig cfg{};
  cfg.palette = 1;
  for (int t = 0; t < 4; ++t) cfg.rows[t] = mr, cfg.colsb[t] = 64;
  cfg.rows[4] = TILE, cfg.colsb[4] = 64;
  _tile_loadconfig(&cfg);
}

struct Product {
  const uint16_t* x;  // bf16 activation rows, K32 apart
  const uint16_t* w;  // the tiles
  int64_t ktiles;
};

// y[i, 16 * (t - t_begin) + n] for rows [r_first, r_last) in tiles of mr rows (mr divides the count, or is the
// count) and column tiles [t_begin, t_end); y has row stride ldy.
void rows_pass(const Product& p, int64_t r_first, int64_t r_last, int mr, int64_t t_begin, int64_t t_end, float* y,
               int64_t ldy) {
  configure_tiles(mr);  // per call: other libraries (oneDNN) configure the same threads' tiles their own way
  const int64_t lda = p.ktiles * KT * 2, ldc = ldy * 4;  // bytes
  for (int64_t r0 = r_first; r0 < r_last; r0 += ROW_CHUNK) {
    const int64_t r1 = std::min(r_last, r0 + ROW_CHUNK);
    for (int64_t t = t_begin; t < t_end; ++t) {
      const uint16_t* b = p.w + t * p.ktiles * TILE_ELEMS;
      float* yt = y + (t - t_begin) * TILE;
      int64_t i = r0;
      for (; i + 2 * mr <= r1; i += 2 * mr) {  // two row tiles against each B tile
        const uint16_t *a0 = p.x + i * p.ktiles * KT, *a1 = a0 + mr * p.ktiles * KT;
        _tile_zero(0);
        _tile_zero(1);
        for (int64_t u = 0; u < p.ktiles; ++u) {
          _tile_loadd(4, b + u * TILE_ELEMS, 64);
          _tile_loadd(2, a0 + u * KT, lda);
          _tile_loadd(3, a1 + u * KT, lda);
          _tile_dpbf16ps(0, 2, 4);
          _tile_dpbf16ps(1, 3, 4);
        }
        _tile_stored(0, yt + i * ldy, ldc);
        _tile_stored(1, yt + (i + mr) * ldy, ldc);
      }
      if (i < r1) {
        const uint16_t* a0 = p.x + i * p.ktiles * KT;
        // (few rows: the weights stream from memory, so each B tile fetches the next column tile's one ahead)
        const char* next = reinterpret_cast<const char*>(b + p.ktiles * TILE_ELEMS);
        _tile_zero(0);
        for (int64_t u = 0; u < p.ktiles; ++u) {
          if (t + 1 < t_end)
            for (int line = 0; line < 16; ++line) _mm_prefetch(next + u * 1024 + 64 * line, _MM_HINT_T0);
          _tile_loadd(4, b + u * TILE_ELEMS, 64);
          _tile_loadd(2, a0 + u * KT, lda);
          _tile_dpbf16ps(0, 2, 4);
        }
        _tile_stored(0, yt + i * ldy, ldc);
      }
    }
  }
}

void tile_columns(const Product& p, int64_t M, int64_t t_begin, int64_t t_end, float* y, int64_t ldy) {
  const int64_t whole = M / TILE * TILE;
  if (whole) rows_pass(p, 0, whole, TILE, t_begin, t_end, y, ldy);
  if (M > whole) rows_pass(p, whole, M, static_cast<int>(M - whole), t_begin, t_end, y, ldy);
}

}  // namespace

bool amx_bf16_tiles() { return amx_enabled(); }

void bf16_tile_rows(const FloatActivations& x, const FloatWeight& w, int64_t M, int64_t n0, int64_t n1, float* y,
                    int64_t ldy) {
  TORCH_CHECK(w.tiles && x.K4 == w.K4 && static_cast<int64_t>(x.b.size()) >= M * x.K4,
              "bf16 tiles: activations prepared for another weight");
  TORCH_CHECK(amx_available(), "bf16 weights laid out for AMX tiles need a CPU with AMX-BF16");
  if (M <= 0 || n1 <= n0) return;
  const Product p{x.b.data(), static_cast<const uint16_t*>(w.data), w.K4 / KT};
  const int64_t t_first = (n0 + TILE - 1) / TILE, t_last = n1 / TILE;  // the column tiles wholly inside [n0, n1)
  if (t_first < t_last) tile_columns(p, M, t_first, t_last, y + (t_first * TILE - n0), ldy);
  std::vector<int64_t> cut;
  if (n0 % TILE) cut.push_back(n0 / TILE);
  if (n1 % TILE && (cut.empty() || cut[0] != (n1 - 1) / TILE)) cut.push_back((n1 - 1) / TILE);
  std::vector<float> part(cut.empty() ? 0 : M * TILE);
  for (const int64_t t : cut) {
    const int64_t c0 = std::max(n0, t * TILE), c1 = std::min(n1, (t + 1) * TILE);
    tile_columns(p, M, t, t + 1, part.data(), TILE);
    for (int64_t i = 0; i < M; ++i)
      std::copy(&part[i * TILE + c0 - t * TILE], &part[i * TILE + c1 - t * TILE], y + i * ldy + (c0 - n0));
  }
  _tile_release();
}

#else

bool amx_bf16_tiles() { return false; }

void bf16_tile_rows(const FloatActivations&, const FloatWeight&, int64_t, int64_t, int64_t, float*, int64_t) {
  TORCH_CHECK(false, "bf16 weights laid out for AMX tiles need a build with AMX-BF16 (this one is for ",
              "another CPU): load them with LLMENGINE_AMX=0 or on this machine");
}

#endif

}  // namespace llmengine_cpu
