#pragma GCC optimize("fp-contract=off")  // the float sums as written (gguf_blocks.h): same bits on every path
// `gguf_linear(x, w, ggml_type, k, bias)`: y = x @ dequant(w).T + bias with w in one of GGUF's quantized formats,
// exactly the file's bytes, and x quantized to int8 blocks on the way in (gguf_blocks.h).
//
// Layout: x fp32 [M, K] (rows contiguous); w uint8 [N, row_bytes], row n = its K / block_elems blocks as in the file;
// y fp32 [M, N]. Grid: the activations are quantized once per call (at::parallel_for over rows), then the threads
// split the N output rows (never K), taking runs of them in turn: a run of weight rows, for each chunk of 64
// activation rows, computes tiles of one weight row x 4 activation rows (then 3, 2, 1), reading each weight block
// once per tile. Every output's sums go in one order whatever M, the tile, the chunk or the thread count.
// `gguf_linear_portable` is the same product through the scalar loops only (what a CPU without AVX2 runs): tests
// check it gives the same bits.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <string>

#include "gguf_blocks.h"
#include "gguf_rows.h"

namespace llmengine_cpu::gguf {

constexpr int64_t M_CHUNK = 64;

const TypeTraits* type_traits(int type) {
  const TypeTraits* t = legacy_traits(type);
  return t ? t : k_traits(type);
}

// One row's blocks: xd = max|x| / 127, xq = round-half-even(x * (1 / xd)), and the integer sums. The AVX2 loop and
// the scalar one give the same numbers (max is exact; both round to nearest even).
static void quantize_row(const float* x, int64_t k, int64_t block, int8_t* q, float* d, float* s, int32_t* sum,
                         int16_t* sum16) {
  for (int64_t b = 0; b < k / block; ++b) {
    const float* xb = x + b * block;
    int8_t* qb = q + b * block;
    int16_t* s16 = sum16 + b * (block / 16);
    int32_t total = 0;
#ifdef LLME_AVX2
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 vmax = _mm256_setzero_ps();
    for (int64_t j = 0; j < block; j += 8)
      vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + j)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    const float scale = amax / 127.f, inv = scale > 0.f ? 1.f / scale : 0.f;
    const __m256 vinv = _mm256_set1_ps(inv);
    for (int64_t j = 0; j < block; j += 32) {
      __m256i v[4];
      for (int u = 0; u < 4; ++u) v[u] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + j + 8 * u), vinv));
      // packs interleave 128-bit lanes; the permute puts the 32 bytes back in order.
      const __m256i p = _mm256_permutevar8x32_epi32(
          _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3])),
          _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb + j), p);
      for (int h = 0; h < 2; ++h) {
        const __m256i pair = _mm256_add_epi32(v[2 * h], v[2 * h + 1]);
        __m128i t = _mm_add_epi32(_mm256_castsi256_si128(pair), _mm256_extracti128_si256(pair, 1));
        t = _mm_add_epi32(t, _mm_unpackhi_epi64(t, t));
        const int32_t part = _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 1)));
        s16[j / 16 + h] = static_cast<int16_t>(part);
        total += part;
      }
    }
#else
    float amax = 0.f;
    for (int64_t j = 0; j < block; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float scale = amax / 127.f, inv = scale > 0.f ? 1.f / scale : 0.f;
    for (int64_t j = 0; j < block; ++j) qb[j] = static_cast<int8_t>(std::nearbyint(xb[j] * inv));
    for (int64_t g = 0; g < block / 16; ++g) {
      int32_t part = 0;
      for (int64_t j = 16 * g; j < 16 * g + 16; ++j) part += qb[j];
      s16[g] = static_cast<int16_t>(part);
      total += part;
    }
#endif
    d[b] = scale;
    sum[b] = total;
    s[b] = scale * static_cast<float>(total);
  }
}

static void quantize_span(Activations& a, const float* x, int64_t k, int64_t begin, int64_t end) {
  const int64_t nb = a.nb, block = a.block;
  for (int64_t i = begin; i < end; ++i)
    quantize_row(x + i * k, k, block, a.q.data() + i * k, a.d.data() + i * nb, a.s.data() + i * nb,
                 a.sum.data() + i * nb, a.sum16.data() + i * k / 16);
}

static void size_activations(Activations& a, int64_t rows, int64_t k, int64_t block) {
  const int64_t nb = k / block;
  a.block = block, a.nb = nb;
  a.q.resize(rows * k), a.d.resize(rows * nb), a.s.resize(rows * nb), a.sum.resize(rows * nb);
  a.sum16.resize(rows * k / 16);
}

void quantize_activations(Activations& a, const float* x, int64_t rows, int64_t k, int64_t block) {
  size_activations(a, rows, k, block);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) { quantize_span(a, x, k, begin, end); });
}

void quantize_activations_here(Activations& a, const float* x, int64_t rows, int64_t k, int64_t block) {
  size_activations(a, rows, k, block);
  quantize_span(a, x, k, 0, rows);
}

// Weight rows n0 .. n1 - 1 against all M activation rows; y points at column n0 of [M, N].
static void weight_rows(RowTile tile, const uint8_t* w, int64_t row_bytes, int64_t nb, const Activations& x,
                        int64_t M, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  for (int64_t c0 = 0; c0 < M; c0 += M_CHUNK) {
    const int64_t c1 = std::min(M, c0 + M_CHUNK);
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t i = c0; i < c1; i += 4)
        tile(w + n * row_bytes, nb, x, i, static_cast<int>(std::min<int64_t>(4, c1 - i)), y + i * ldy + (n - n0),
             ldy);
  }
}

void gguf_rows(const TypeTraits* traits, const uint8_t* w, int64_t row_bytes, const Activations& x, int64_t M,
               int64_t n0, int64_t n1, const float* bias, float* y, int64_t ldy) {
  weight_rows(traits->fast, w, row_bytes, x.nb, x, M, n0, n1, y, ldy);
  if (bias)
    for (int64_t i = 0; i < M; ++i)
      for (int64_t n = n0; n < n1; ++n) y[i * ldy + n - n0] += bias[n];
}

static std::string supported_names() {
  std::string names;
  for (int t : {Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K})
    names += (names.empty() ? "" : ", ") + std::string(type_traits(t)->name) + " (" + std::to_string(t) + ")";
  return names;
}

static at::Tensor linear(const at::Tensor& x_in, const at::Tensor& w_in, int64_t ggml_type, int64_t k,
                         const c10::optional<at::Tensor>& bias, bool portable) {
  const TypeTraits* traits = type_traits(static_cast<int>(ggml_type));
  TORCH_CHECK(traits, "gguf_linear: ggml type ", ggml_type, " is not supported; supported: ", supported_names());
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == k, "gguf_linear: x must be [M, K=", k, "], got ", x_in.sizes());
  TORCH_CHECK(x_in.device().is_cpu() && w_in.device().is_cpu(), "gguf_linear: x and w must be CPU tensors");
  TORCH_CHECK(k > 0 && k % traits->block_elems == 0, "gguf_linear: K=", k, " is not a multiple of ", traits->name,
              "'s block of ", traits->block_elems);
  const int64_t nb = k / traits->block_elems, row_bytes = nb * traits->block_bytes;
  TORCH_CHECK(w_in.scalar_type() == at::kByte && w_in.dim() == 2 && w_in.size(1) == row_bytes, "gguf_linear: w must be "
              "uint8 [N, ", row_bytes, "] (", nb, " ", traits->name, " blocks of ", traits->block_bytes,
              " bytes per row), got ", w_in.scalar_type(), " ", w_in.sizes());
  const at::Tensor x = x_in.to(at::kFloat).contiguous(), w = w_in.contiguous();
  const int64_t M = x.size(0), N = w.size(0);
  at::Tensor b;
  if (bias.has_value()) {
    b = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(b.dim() == 1 && b.size(0) == N, "gguf_linear: bias must be [N=", N, "], got ", bias->sizes());
  }
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  Activations acts;
  quantize_activations(acts, x.data_ptr<float>(), M, k, traits->block_elems);
  const RowTile tile = portable ? traits->portable : traits->fast;
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  // Runs of weight rows handed out in turn (about 8 per thread, at least 16 rows each), so that a thread the OS
  // holds up leaves its share to the others instead of keeping them at the barrier.
  const int64_t threads = at::get_num_threads(), run = std::max<int64_t>(16, N / (8 * threads) + 1);
  const int64_t runs = (N + run - 1) / run;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, runs), 1, [&](int64_t, int64_t) {
    for (int64_t r = next++; r < runs; r = next++) {
      const int64_t n0 = r * run, n1 = std::min(N, n0 + run);
      weight_rows(tile, wp, row_bytes, nb, acts, M, n0, n1, yp + n0, N);
      if (bp)
        for (int64_t i = 0; i < M; ++i)
          for (int64_t n = n0; n < n1; ++n) yp[i * N + n] += bp[n];
    }
  });
  return y;
}

at::Tensor gguf_linear(const at::Tensor& x, const at::Tensor& w, int64_t ggml_type, int64_t k,
                       const c10::optional<at::Tensor>& bias) {
  return linear(x, w, ggml_type, k, bias, false);
}

at::Tensor gguf_linear_portable(const at::Tensor& x, const at::Tensor& w, int64_t ggml_type, int64_t k,
                                const c10::optional<at::Tensor>& bias) {
  return linear(x, w, ggml_type, k, bias, true);
}

bool gguf_linear_supported(int64_t ggml_type) { return type_traits(static_cast<int>(ggml_type)) != nullptr; }

}  // namespace llmengine_cpu::gguf

TORCH_LIBRARY_FRAGMENT(llmengine_cpu, lib) {
  lib.def("gguf_linear(Tensor x, Tensor w, int ggml_type, int k, Tensor? bias) -> Tensor");
  lib.def("gguf_linear_portable(Tensor x, Tensor w, int ggml_type, int k, Tensor? bias) -> Tensor");
  // no tensor argument, so a catch-all kernel
  lib.def("gguf_linear_supported(int ggml_type) -> bool", &llmengine_cpu::gguf::gguf_linear_supported);
}

TORCH_LIBRARY_IMPL(llmengine_cpu, CPU, lib) {
  lib.impl("gguf_linear", &llmengine_cpu::gguf::gguf_linear);
  lib.impl("gguf_linear_portable", &llmengine_cpu::gguf::gguf_linear_portable);
}
