#pragma GCC optimize("fp-contract=off")  // the float sums exactly as written: the same as the vector path's
// AMX int8 tiles for the interleaved int4 and int8 products (q4_interleaved.cpp, q8_interleaved.cpp), on CPUs with
// AMX (Sapphire Rapids and later; a build for any other CPU computes nothing here and the callers do it all).
//
// The numbers are the vpdpbusd path's, bit for bit: a block's int32 sum q . xq is exact however the hardware adds
// it, and the float steps after it are the same ops in the same order: acc = fma(isum, d * xd, acc), then for q4
// acc = fma(m, xs, acc), blocks in order from acc = 0, then + bias. So which rows run on tiles shows nowhere.
//
// Layout: A tile = 16 activation rows of one block, straight from the quantized rows (xq int8 [M, nb * 32], row
// stride nb * 32): 16 x 32 bytes. B tile = the block's weights for two groups of 8 output rows (16 columns), four
// consecutive k of a column in each 4 bytes: [8, 64] per block, unpacked into scratch [nb, 8, 64] by the first row
// tile. For q4 its row c (0..3) holds chunk c's low nibbles (k = 4c..4c+3) and row 4 + c the high ones
// (k = 16 + 4c..); for q8 row c holds chunk c (k = 4c..4c+3). C tile = 16 x 16 int32 (tdpbsud: signed x, unsigned
// q4; tdpbssd for q8), stored to scratch and scaled into 16 fp32 accumulators of 16 columns, one per activation row.
// Grid: one call computes, on the calling thread, every whole 16 x 16 tile of activation rows [0, 16 * (M / 16)) by
// group pairs inside [n0, n1), and the rows below them as one shorter tile when there are enough (int8 4-15, int4
// 12-15; AmxSpan); the caller computes the rest on the vector path.
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "quant_common.h"

#if defined(LLME_AVX2) && defined(__AVX512F__) && defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define LLME_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace llmengine_cpu {

namespace {

std::atomic<int> amx_state{-1};  // -1: not decided yet, 0: off, 1: on

bool amx_granted() {
#ifdef LLME_AMX
  // Linux hands out the tiles' 8 KiB register state only to a process that asks (ARCH_REQ_XCOMP_PERM, XTILEDATA).
  static const bool granted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return granted;
#else
  return false;
#endif
}

}  // namespace

bool amx_enabled() {
  int state = amx_state.load(std::memory_order_relaxed);
  if (state < 0) {
    const char* env = std::getenv("LLMENGINE_AMX");
    state = env && std::strcmp(env, "0") == 0 ? 0 : static_cast<int>(amx_granted());
    amx_state.store(state);
  }
  return state == 1;
}

bool amx_available() { return amx_granted(); }

bool set_amx(bool enable) {
  amx_state.store(enable && amx_granted() ? 1 : 0);
  return amx_enabled();
}

#ifdef LLME_AMX

namespace {

constexpr int64_t TILE = 16, GROUP = 8, B_BYTES = 512, ROW_CHUNK = 64;

// Tiles of mr activation rows (16, or the fewer left below the whole tiles).
void configure_tiles(int mr) {
  TileConfig cfg{};
  cfg.palette = 1;
  for (int even = 0; even < 2; ++even) {  // tiles 0, 1, 2 for even blocks, 3, 4, 5 for odd ones
    cfg.rows[3 * even] = mr, cfg.colsb[3 * even] = QK;  // A: mr activation rows x one block
    cfg.rows[3 * even + 1] = QK / 4, cfg.colsb[3 * even + 1] = 4 * TILE;  // B: 32 k x 16 columns, 4 k a column
    cfg.rows[3 * even + 2] = mr, cfg.colsb[3 * even + 2] = 4 * TILE;  // C: mr x 16 int32
  }
  _tile_loadconfig(&cfg);
}

struct PairScratch {
  std::vector<uint8_t> b;  // [nb, 512] B tiles
  std::vector<float> d, m;  // [nb, 16] the pair's scales and mins as fp32
  alignas(64) int32_t c[2][TILE * TILE];  // C of an even block, of an odd one
};

// Block b of groups g and g + 1 as a B tile in s.b, and their scales (and mins) widened; the same block of the next
// pair is prefetched (a step's weights arrive cold).
template <bool Q4>
__attribute__((always_inline)) inline void unpack_block(const QuantWeight& w, int64_t g, int64_t b, PairScratch& s) {
  constexpr int64_t group_bytes = Q4 ? 128 : 256;
  const int64_t nb = w.nb;
  const uint8_t *w0 = w.qs + (g * nb + b) * group_bytes, *w1 = w0 + nb * group_bytes;
  for (int64_t line = 0; line < group_bytes; line += 64) {
    __builtin_prefetch(w0 + 2 * nb * group_bytes + line);
    __builtin_prefetch(w1 + 2 * nb * group_bytes + line);
  }
  uint8_t* bt = s.b.data() + b * B_BYTES;
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int c = 0; c < group_bytes / 32; ++c) {
    const __m512i raw = _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + 32 * c))),
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w1 + 32 * c)), 1);
    if constexpr (Q4) {
      _mm512_storeu_si512(bt + 64 * c, _mm512_and_si512(raw, low));
      _mm512_storeu_si512(bt + 64 * (4 + c), _mm512_and_si512(_mm512_srli_epi16(raw, 4), low));
    } else {
      _mm512_storeu_si512(bt + 64 * c, raw);
    }
  }
  for (int half = 0; half < 2; ++half) {
    const int64_t at = ((g + half) * nb + b) * GROUP;
    _mm256_storeu_ps(s.d.data() + b * TILE + 8 * half,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.d + at))));
    if constexpr (Q4)
      _mm256_storeu_ps(s.m.data() + b * TILE + 8 * half,
                       _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.m + at))));
  }
}

// C = A . B of one block on tiles a, b, c (literal numbers: the intrinsics paste them into the instructions).
#define LLME_BLOCK_PRODUCT(Q4, a, b, c, xq, stride, bt) \
  do {                                                  \
    _tile_zero(c);                                      \
    _tile_loadd(a, xq, stride);                         \
    _tile_loadd(b, bt, 4 * TILE);                       \
    if constexpr (Q4) _tile_dpbsud(c, a, b);            \
    else _tile_dpbssd(c, a, b);                         \
  } while (0)

// acc[t] += block b's sums c (MR x 16 int32) scaled: the vector path's two fmas per lane, in its order. The row count
// MR is a constant here, so the accumulators stay in registers (a run-time count spilled them to the stack).
template <bool Q4, int MR>
__attribute__((always_inline)) inline void scale_block(__m512 (&acc)[MR], const int32_t* c, const float* d,
                                                       const float* m, const float* xd, const float* xs, int64_t nb) {
  const __m512 dw = _mm512_loadu_ps(d), mw = Q4 ? _mm512_loadu_ps(m) : dw;
#pragma GCC unroll 16
  for (int t = 0; t < MR; ++t) {
    const __m512 isum = _mm512_cvtepi32_ps(_mm512_load_si512(c + TILE * t));
    acc[t] = _mm512_fmadd_ps(isum, _mm512_mul_ps(dw, _mm512_set1_ps(xd[t * nb])), acc[t]);
    if constexpr (Q4) acc[t] = _mm512_fmadd_ps(mw, _mm512_set1_ps(xs[t * nb]), acc[t]);
  }
}

// y[i, 0..16) for activation rows [r0, r1) against groups g and g + 1; y points at the pair's first column. Two
// sets of tiles (0-2 for even blocks, 3-5 for odd ones) pipeline the blocks: step b starts block b + 1's product,
// stores block b's sums (its product had a step to finish) and scales block b - 1's. The first row tile unpacks
// the weights two blocks ahead of their product; the others reuse them.
template <bool Q4, int MR>
void pair_rows(const QuantWeight& w, int64_t g, PairScratch& s, const QuantizedRows& xr, int64_t r0, int64_t r1,
               float* y, int64_t ldy) {
  const int64_t nb = w.nb, stride = nb * QK;
  const uint8_t* bt = s.b.data();
  const float *d = s.d.data(), *m = s.m.data();
  for (int64_t i0 = r0; i0 < r1; i0 += TILE) {
    const bool unpack = i0 == r0;
    __m512 acc[MR];  // (MR rows: as configure_tiles was told)
    for (int t = 0; t < MR; ++t) acc[t] = _mm512_setzero_ps();
    const int8_t* xq = xr.q.data() + i0 * stride;
    const float *xd = xr.d.data() + i0 * nb, *xs = xr.s.data() + i0 * nb;
    if (unpack)
      for (int64_t b = 0; b < std::min<int64_t>(2, nb); ++b) unpack_block<Q4>(w, g, b, s);
    LLME_BLOCK_PRODUCT(Q4, 0, 1, 2, xq, stride, bt);
    for (int64_t b = 0; b <= nb; ++b) {
      if (b + 1 < nb) {
        if (b & 1) LLME_BLOCK_PRODUCT(Q4, 0, 1, 2, xq + (b + 1) * QK, stride, bt + (b + 1) * B_BYTES);
        else LLME_BLOCK_PRODUCT(Q4, 3, 4, 5, xq + (b + 1) * QK, stride, bt + (b + 1) * B_BYTES);
      }
      if (unpack && b + 2 < nb) unpack_block<Q4>(w, g, b + 2, s);
      if (b < nb) {
        if (b & 1) _tile_stored(5, s.c[1], 4 * TILE);
        else _tile_stored(2, s.c[0], 4 * TILE);
      }
      if (b > 0)
        scale_block<Q4, MR>(acc, s.c[(b - 1) & 1], d + (b - 1) * TILE, m + (b - 1) * TILE, xd + b - 1, xs + b - 1, nb);
    }
#pragma GCC unroll 16
    for (int t = 0; t < MR; ++t) _mm512_storeu_ps(y + (i0 + t) * ldy, acc[t]);
  }
}

// pair_rows for tiles of mr rows (1..16), each row count its own instance.
template <bool Q4, int MR = TILE>
void pair_rows_of(int mr, const QuantWeight& w, int64_t g, PairScratch& s, const QuantizedRows& xr, int64_t r0,
                  int64_t r1, float* y, int64_t ldy) {
  if constexpr (MR > 1)
    if (mr < MR) return pair_rows_of<Q4, MR - 1>(mr, w, g, s, xr, r0, r1, y, ldy);
  pair_rows<Q4, MR>(w, g, s, xr, r0, r1, y, ldy);
}

template <bool Q4>
AmxSpan amx_block(const QuantizedRows& xr, const QuantWeight& w, int64_t M, int64_t n0, int64_t n1, float* y,
                  int64_t ldy) {
  // Whole tiles, then the rows left below them in one shorter tile when there are MIN_ROWS of them
  // (benchmarks.products, 2 threads, the model's 120 matrices cold: int8 from 4 rows, 6.9 against 8.9 ms at 4, 7.9
  // against 10.0 at 5; int4 from 12, 8.1 against 8.9 ms, where its B unpacking, a cost per weight whatever the rows,
  // is paid back).
  constexpr int64_t MIN_ROWS = Q4 ? 12 : 4;
  const int64_t whole = M / TILE * TILE, rows = M - whole >= MIN_ROWS ? M : whole;
  const int64_t g0 = (n0 + GROUP - 1) / GROUP, pairs = std::max<int64_t>(0, (n1 / GROUP - g0) / 2);
  if (rows == 0 || pairs == 0 || !amx_enabled()) return {0, n0, n0};
  PairScratch scratch;  // per call, not thread_local: TLS lookups in the loop would clobber the accumulators
  scratch.b.resize(w.nb * B_BYTES), scratch.d.resize(w.nb * TILE), scratch.m.resize(w.nb * TILE);
  // per call: other libraries (oneDNN) configure the same threads' tiles their own way
  for (const auto [first, last] : {std::pair{int64_t{0}, whole}, std::pair{whole, rows}}) {
    if (first == last) continue;
    configure_tiles(static_cast<int>(std::min<int64_t>(TILE, last - first)));
    // Chunks of activation rows stay in L1 across the pairs (the pairs are unpacked once per chunk).
    for (int64_t r0 = first; r0 < last; r0 += ROW_CHUNK)
      for (int64_t p = 0; p < pairs; ++p) {
        const int64_t g = g0 + 2 * p;
        const int64_t r1 = std::min(last, r0 + ROW_CHUNK);
        pair_rows_of<Q4>(static_cast<int>(std::min<int64_t>(TILE, last - first)), w, g, scratch, xr, r0, r1,
                         y + (g * GROUP - n0), ldy);
      }
  }
  _tile_release();
  return {rows, g0 * GROUP, (g0 + 2 * pairs) * GROUP};  // (the caller adds the bias: interleaved_rest)
}

}  // namespace

AmxSpan q4x8_amx(const QuantizedRows& xr, const QuantWeight& w, int64_t M, int64_t n0, int64_t n1, float* y,
                 int64_t ldy) {
  return amx_block<true>(xr, w, M, n0, n1, y, ldy);
}

AmxSpan q8x8_amx(const QuantizedRows& xr, const QuantWeight& w, int64_t M, int64_t n0, int64_t n1, float* y,
                 int64_t ldy) {
  return amx_block<false>(xr, w, M, n0, n1, y, ldy);
}

#else

AmxSpan q4x8_amx(const QuantizedRows&, const QuantWeight&, int64_t, int64_t n0, int64_t, float*, int64_t) {
  return {0, n0, n0};
}

AmxSpan q8x8_amx(const QuantizedRows&, const QuantWeight&, int64_t, int64_t n0, int64_t, float*, int64_t) {
  return {0, n0, n0};
}

#endif

}  // namespace llmengine_cpu

TORCH_LIBRARY_FRAGMENT(llmengine_cpu, lib) {
  lib.def("amx_enabled() -> bool");
  lib.def("set_amx(bool enable) -> bool");
}

TORCH_LIBRARY_IMPL(llmengine_cpu, CatchAll, lib) {
  lib.impl("amx_enabled", &llmengine_cpu::amx_enabled);
  lib.impl("set_amx", &llmengine_cpu::set_amx);
}
