#pragma GCC optimize("fp-contract=off")  // each product and difference rounded as torch rounds it
// A GGUF table's rows as fp32, for the fused step's embedding lookup (decode_step.cpp): models/gguf_types.py's
// torch dequantizers written out per value, with the same float operations in the same order (one product, or a
// product then a sum / difference; fp16 -> fp32 and small integers -> fp32 are exact), so the same bits.
// Layout: one row of k values = k / block_elems blocks (gguf_blocks.h, gguf_k_blocks.h) -> out fp32 [k].
// Grid: none; the calling thread dequantizes the row. `gguf_embedding_rows(raw, ggml_type, k, ids)` -> fp32
// [len(ids), k] is the same lookup as an op (for the tests: the step's own lookup is LlamaDecoder::embed_row).
#include <torch/library.h>

#include "gguf_rows.h"

namespace llmengine_cpu::gguf {

namespace {

inline int nibble(const uint8_t* qs, int i) { return (qs[i % 16] >> (4 * (i / 16))) & 15; }  // 32-value blocks
inline int fifth_bit(const uint8_t* qh, int i) { return (qh[i / 8] >> (i % 8)) & 1; }

void legacy_block(int type, const uint8_t* b, float* out) {
  switch (type) {
    case Q4_0: {
      const auto* x = reinterpret_cast<const BlockQ4_0*>(b);
      for (int i = 0; i < 32; ++i) out[i] = f16(x->d) * static_cast<float>(nibble(x->qs, i) - 8);
      break;
    }
    case Q4_1: {
      const auto* x = reinterpret_cast<const BlockQ4_1*>(b);
      for (int i = 0; i < 32; ++i) out[i] = f16(x->d) * static_cast<float>(nibble(x->qs, i)) + f16(x->m);
      break;
    }
    case Q5_0: {
      const auto* x = reinterpret_cast<const BlockQ5_0*>(b);
      for (int i = 0; i < 32; ++i)
        out[i] = f16(x->d) * static_cast<float>((nibble(x->qs, i) | (fifth_bit(x->qh, i) << 4)) - 16);
      break;
    }
    case Q5_1: {
      const auto* x = reinterpret_cast<const BlockQ5_1*>(b);
      for (int i = 0; i < 32; ++i)
        out[i] = f16(x->d) * static_cast<float>(nibble(x->qs, i) | (fifth_bit(x->qh, i) << 4)) + f16(x->m);
      break;
    }
    default: {  // Q8_0
      const auto* x = reinterpret_cast<const BlockQ8_0*>(b);
      for (int i = 0; i < 32; ++i) out[i] = static_cast<float>(x->qs[i]) * f16(x->d);
    }
  }
}

// Value i of a 256-value block whose 2-bit fields sit in 64 bytes: half i / 128, shift 2 ((i % 128) / 32), byte i % 32.
inline int two_bit(const uint8_t* qs, int i) { return (qs[(i / 128) * 32 + i % 32] >> (2 * ((i % 128) / 32))) & 3; }

// Q4_K / Q5_K's 6-bit scale and min of sub-block j (of 8).
inline void scale_min(const uint8_t* p, int j, float& sc, float& mn) {
  if (j < 4) {
    sc = static_cast<float>(p[j] & 63), mn = static_cast<float>(p[4 + j] & 63);
  } else {
    sc = static_cast<float>((p[8 + j - 4] & 15) | ((p[j - 4] >> 2) & 48));
    mn = static_cast<float>((p[8 + j - 4] >> 4) | ((p[j] >> 2) & 48));
  }
}

void k_block(int type, const uint8_t* b, float* out) {
  switch (type) {
    case Q2_K: {
      const auto* x = reinterpret_cast<const BlockQ2_K*>(b);
      for (int i = 0; i < 256; ++i) {
        const uint8_t sc = x->scales[i / 16];
        const float dl = f16(x->d) * static_cast<float>(sc & 15), ml = f16(x->dmin) * static_cast<float>(sc >> 4);
        out[i] = dl * static_cast<float>(two_bit(x->qs, i)) - ml;
      }
      break;
    }
    case Q3_K: {
      const auto* x = reinterpret_cast<const BlockQ3_K*>(b);
      for (int i = 0; i < 256; ++i) {
        const int j = i / 16;
        const int low = j < 8 ? x->scales[j] & 15 : x->scales[j - 8] >> 4;
        const int high = (x->scales[8 + j % 4] >> (2 * (j / 4))) & 3;
        const float dl = f16(x->d) * static_cast<float>((low | (high << 4)) - 32);
        const int upper = (x->hmask[i % 32] >> (i / 32)) & 1;
        out[i] = dl * static_cast<float>(two_bit(x->qs, i) - 4 * (1 - upper));
      }
      break;
    }
    case Q4_K:
    case Q5_K: {
      const bool five = type == Q5_K;
      const auto* x4 = reinterpret_cast<const BlockQ4_K*>(b);
      const auto* x5 = reinterpret_cast<const BlockQ5_K*>(b);
      const uint8_t* qs = five ? x5->qs : x4->qs;
      for (int i = 0; i < 256; ++i) {
        const int j = i / 32;  // sub-block: 2c + (high nibble), c = i / 64
        float sc, mn;
        scale_min(x4->scales, j, sc, mn);
        const float dl = f16(x4->d) * sc, ml = f16(x4->dmin) * mn;
        int q = (qs[(i / 64) * 32 + i % 32] >> (4 * (j % 2))) & 15;
        if (five) q |= ((x5->qh[i % 32] >> j) & 1) << 4;
        out[i] = dl * static_cast<float>(q) - ml;
      }
      break;
    }
    default: {  // Q6_K
      const auto* x = reinterpret_cast<const BlockQ6_K*>(b);
      for (int i = 0; i < 256; ++i) {
        const int h = i / 128, r = i % 128;
        const int low = (x->ql[h * 64 + r % 64] >> (4 * (r / 64))) & 15;
        const int high = (x->qh[h * 32 + r % 32] >> (2 * (r / 32))) & 3;
        const float dl = f16(x->d) * static_cast<float>(x->scales[i / 16]);
        out[i] = dl * static_cast<float>((low | (high << 4)) - 32);
      }
    }
  }
}

}  // namespace

bool dequantize_supported(int type) { return type_traits(type) != nullptr; }

bool dequantize_row(int type, const uint8_t* row, int64_t k, float* out) {
  const TypeTraits* traits = type_traits(type);
  if (!traits) return false;
  const int64_t blocks = k / traits->block_elems;
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* block = row + b * traits->block_bytes;
    float* o = out + b * traits->block_elems;
    if (traits->block_elems == 32)
      legacy_block(type, block, o);
    else
      k_block(type, block, o);
  }
  return true;
}

}  // namespace llmengine_cpu::gguf

static at::Tensor gguf_embedding_rows(const at::Tensor& raw_in, int64_t ggml_type, int64_t k, const at::Tensor& ids_in) {
  using namespace llmengine_cpu::gguf;
  const TypeTraits* traits = type_traits(static_cast<int>(ggml_type));
  TORCH_CHECK(traits && k % traits->block_elems == 0, "gguf_embedding_rows: type ", ggml_type, " or K=", k,
              " is not taken");
  const at::Tensor raw = raw_in.contiguous(), ids = ids_in.to(at::kLong).contiguous();
  TORCH_CHECK(raw.scalar_type() == at::kByte && raw.dim() == 2 &&
                  raw.size(1) == k / traits->block_elems * traits->block_bytes,
              "gguf_embedding_rows: raw must be uint8 [N, row_bytes]");
  at::Tensor out = at::empty({ids.numel(), k}, at::kFloat);
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < ids.numel(); ++i) {
    TORCH_CHECK(id[i] >= 0 && id[i] < raw.size(0), "gguf_embedding_rows: id ", id[i], " is not a row");
    dequantize_row(static_cast<int>(ggml_type), raw.data_ptr<uint8_t>() + id[i] * raw.size(1), k,
                   out.data_ptr<float>() + i * k);
  }
  return out;
}

TORCH_LIBRARY_FRAGMENT(llmengine_cpu, lib) {
  lib.def("gguf_embedding_rows(Tensor raw, int ggml_type, int k, Tensor ids) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmengine_cpu, CPU, lib) { lib.impl("gguf_embedding_rows", &gguf_embedding_rows); }
