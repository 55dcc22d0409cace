// slmops's ONNX Runtime custom operators for a GGUF's own blocks (plugins/gguf_kernel.py writes the graphs that use
// them; kernel/CMakeLists.txt builds this file into the slmops-kernel wheel, once per platform).
//   MatMulGGML(x, w): y = x @ W^T, W kept as llama.cpp keeps it (Q4_1 / Q5_1: a fp16 scale and a fp16 minimum per 32
//     weights, 4-bit / 5-bit codes; Q4_0 / Q5_0: a fp16 scale, codes centred on 8 / 16; Q8_0: a fp16 scale and 32
//     int8; and slmops's own Q6_0, 6-bit codes centred on 32), so the weights are the GGUF's exactly and each block's
//     minimum is applied inside the kernel (MatMulNBits has integer zero points only). x is quantized to int8 per
//     block of 32, one scale per block, as llama.cpp's Q8 activations; the minimum meets the sum of that block.
//   GatherGGML(ids, w): rows of W dequantized (a tied embedding reads the lm_head's blocks).
//   GroupQueryAttentionF16KV: ONNX Runtime's GroupQueryAttention with the KV cache in fp16 (below).
// Code, chosen when the library is registered: on x86-64, AVX2 kernels (compiled for AVX2, FMA and F16C alone, by a
// target pragma) where the CPU has those; on ARM64, NEON's integer dot products, SDOT where the CPU has dotprod
// (group_kernels.inc, included once per dot product); plain C++ otherwise. All compute the same integer dot products
// and the same float operations in the same order, so every CPU gets the same bits. Threads: ONNX Runtime's own intra-op pool (KernelContext_ParallelFor), so the session's thread setting covers
// the kernel, attention and everything else, and the library starts no thread of its own.
// Written against ONNX Runtime's C API by position (below): no ONNX Runtime headers needed.
#if defined(__x86_64__) || defined(_M_X64)
#define SLMOPS_X86 1
#include <immintrin.h>
#else
#define SLMOPS_X86 0
#endif
#if defined(__aarch64__)
#include <arm_neon.h>
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

// The few entries of ONNX Runtime's C API table (OrtApi) used here, by position: the table only grows and never
// reorders. All are in its first version but KernelContext_ParallelFor, which version 16 (ONNX Runtime 1.16) added.
namespace ort {
using Status = void;
typedef void* (*Fn)();
enum : int {
  kCreateStatus = 0,  // OrtStatus* CreateStatus(OrtErrorCode, const char* message)
  kCreateCustomOpDomain = 26,
  kCustomOpDomainAdd = 27,
  kAddCustomOpDomain = 28,
  kGetTensorMutableData = 51,
  kGetDimensionsCount = 61,
  kGetDimensions = 62,
  kGetTensorTypeAndShape = 65,
  kKernelInfoGetAttributeFloat = 85,
  kKernelInfoGetAttributeInt64 = 86,
  kKernelContextGetInputCount = 88,
  kKernelContextGetInput = 90,
  kKernelContextGetOutput = 91,
  kReleaseStatus = 93,
  kReleaseTensorTypeAndShapeInfo = 99,
  kGetBuildInfoString = 254,  // const char* GetBuildInfoString(): a check that the positions are read right (tests)
  kKernelContextParallelFor = 274,  // OrtStatus* (context, void (*fn)(void*, size_t), total, batches, user data)
};
constexpr uint32_t kApiVersion = 16;  // the first with KernelContext_ParallelFor
struct ApiBase {
  const Fn* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)();
};
static const Fn* api = nullptr;
template <typename F>
F get(int index) { return reinterpret_cast<F>(api[index]); }

// OrtCustomOp, its fields up to the kernel version range, all set (ONNX Runtime 1.31 queries the input and output
// characteristics whatever the version says; version 8 for the optional inputs); later fields zero.
struct CustomOp {
  uint32_t version;
  void* (*CreateKernel)(const CustomOp*, const Fn* api, const void* info);
  const char* (*GetName)(const CustomOp*);
  const char* (*GetExecutionProviderType)(const CustomOp*);
  int (*GetInputType)(const CustomOp*, size_t index);
  size_t (*GetInputTypeCount)(const CustomOp*);
  int (*GetOutputType)(const CustomOp*, size_t index);
  size_t (*GetOutputTypeCount)(const CustomOp*);
  void (*KernelCompute)(void* kernel, void* context);
  void (*KernelDestroy)(void* kernel);
  int (*GetInputCharacteristic)(const CustomOp*, size_t index);   // 0: required
  int (*GetOutputCharacteristic)(const CustomOp*, size_t index);  // 0: required
  int (*GetInputMemoryType)(const CustomOp*, size_t index);       // 0: the provider's default
  int (*GetVariadicInputMinArity)(const CustomOp*);
  int (*GetVariadicInputHomogeneity)(const CustomOp*);
  int (*GetVariadicOutputMinArity)(const CustomOp*);
  int (*GetVariadicOutputHomogeneity)(const CustomOp*);
  void* CreateKernelV2;
  void* KernelComputeV2;
  void* InferOutputShapeFn;
  int (*GetStartVersion)(const CustomOp*);
  int (*GetEndVersion)(const CustomOp*);
  void* reserved[16];  // zero: fields of later versions
};
enum { kFloat = 1, kUint8 = 2, kInt32 = 6, kInt64 = 7, kFloat16 = 10 };
}  // namespace ort

namespace {


// ---- the kernels ----
// Weights come in groups of 8 output columns, block by block, so one activation block is read once for 8 columns
// and their scales convert 8 at a time: for each group and each block of 32 inputs,
//   Q4_1: d[8] fp16, m[8] fp16, then 16 bytes per column (q[j] in the low nibble of byte j, q[j+16] in the high):
//         w = d*q + m, 160 bytes;
//   Q5_1: as Q4_1 with the fifth bit of each code after the minimums: 4 bytes per column (bit j: code j), then the
//         nibbles: w = d*q + m, q = nibble | bit << 4, 192 bytes;
//   Q4_0, Q5_0: as Q4_1, Q5_1 without the minimums: w = d*(q - 8) or d*(q - 16), 144 and 176 bytes;
//   Q6_0 (slmops's own, no GGML type): as Q5_0 with two high bits per code, each column's fifth bits (4 bytes) then
//         its sixth bits (4 bytes): w = d*(q - 32), 208 bytes;
//   Q8_0: d[8] fp16, then 32 int8 per column: w = d*q, 272 bytes.
// The K-quants come in super-blocks of 256 inputs (8 blocks of 32), each a header then its 8 blocks:
//   Q4_K: d[8] fp16, dmin[8] fp16, then per block sc[8] and m[8] (6-bit, a byte each) and the nibbles as Q4_1:
//         w = d*sc*q - dmin*m, 32 + 8 * 144 = 1184 bytes (4.625 bits per weight; the GGUF packs sc and m in 6 bits:
//         4.5);
//   Q5_K: as Q4_K with each column's fifth bits (4 bytes) before the nibbles, 32 + 8 * 176 = 1440 bytes;
//   Q6_K: d[8] fp16, then per block sc[2][8] int8 (the block's two sub-blocks of 16), the two high-bit planes and
//         the nibbles as Q6_0: w = d*sc*(q - 32), 16 + 8 * 208 = 1680 bytes (6.5625 bits per weight, as the GGUF).
constexpr int QK = 32, COLS = 8, QK_K = 256, SUB = QK_K / QK;
constexpr int ROWS = 4;  // a prompt's rows per call of the AVX2 kernels: each weight block unpacked once for them
constexpr int kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8;  // GGML's type numbers, the ggml_type attribute
constexpr int kQ4_K = 12, kQ5_K = 13, kQ6_K = 14;
constexpr int kQ6_0 = 100;  // not a GGML type: slmops's 6-bit form of 32 with a fp16 scale (6.5 bits per weight)
constexpr bool is_k(int64_t type) { return type == kQ4_K || type == kQ5_K || type == kQ6_K; }

// Bits of each code above the low nibble: 0 (Q4), 1 (Q5), 2 (Q6), each held as 32-bit planes per column.
constexpr size_t group_block_bytes(int high_bits, bool minimum) {
  return 16 + (minimum ? 16 : 0) + COLS * 4 * high_bits + COLS * 16;
}
constexpr size_t kGroupBlockQ8_0 = 16 + COLS * 32;
constexpr bool has_minimum(int64_t type) { return type == kQ4_1 || type == kQ5_1; }
constexpr int high_bits(int64_t type) {
  return (type == kQ6_0 || type == kQ6_K) ? 2 : (type == kQ5_0 || type == kQ5_1 || type == kQ5_K) ? 1 : 0;
}

constexpr size_t block_bytes(int64_t type) {
  return type == kQ8_0 ? kGroupBlockQ8_0 : group_block_bytes(high_bits(type), has_minimum(type));
}
// A K-quant's header per super-block (d, and Q4_K/Q5_K's dmin) and one block of it (its sub-block scales first).
constexpr size_t k_head_bytes(int64_t type) { return type == kQ6_K ? 16 : 32; }
constexpr size_t k_block_bytes(int64_t type) { return 16 + COLS * 4 * high_bits(type) + COLS * 16; }
constexpr size_t k_super_bytes(int64_t type) { return k_head_bytes(type) + SUB * k_block_bytes(type); }
// The bytes of one group's row of weights over k inputs.
constexpr size_t group_row_bytes(int64_t type, int k) {
  return is_k(type) ? (k / QK_K) * k_super_bytes(type) : (k / QK) * block_bytes(type);
}

// One row of x, quantized: int8 per element, one scale per block of 32 and the block's sum (scale * sum of int8,
// plus the outlier channels' own values). The outlier channels are zero in the int8 block (an outlier would set
// its block's scale and flatten the rest) and kept in float in `outliers`, one value per channel.
struct Row { int8_t* q; float* scale; float* sum; float* outliers; };

// The outlier channels of a MatMul, sorted.
struct Channels { const int64_t* index = nullptr; int count = 0; };

// ---- the portable kernels: plain C++, the same integer dot products and the same float operations in the same
// order as the AVX2 ones lane by lane (explicit fma where they fuse, -ffp-contract=off elsewhere), so both give the
// same bits. Used on a CPU without AVX2, FMA and F16C, and on every other architecture (ARM64: the compiler's NEON).

// A fp16 field as float32 (exact; what F16C's conversion gives).
inline float half_to_float(const uint8_t* p) {
  uint16_t h;
  memcpy(&h, p, 2);
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
  uint32_t bits;
  if (exponent == 0x1F) {
    bits = sign | 0x7F800000 | (mantissa << 13);  // infinity, NaN
  } else if (exponent) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa) {  // subnormal: normalise
    int e = -1;
    uint32_t m = mantissa;
    do {
      ++e;
      m <<= 1;
    } while (!(m & 0x400));
    bits = sign | ((uint32_t)(112 - e) << 23) | ((m & 0x3FF) << 13);
  } else {
    bits = sign;
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

// Block b of x to quantize: x itself, or where outlier channels (from `next` on) fall in it, a copy in `inliers` with
// them zeroed, their values kept in r.outliers and added to outliers_sum.
inline const float* block_inliers(const float* x, int b, Row r, const Channels& channels, int& next, float* inliers,
                                  float& outliers_sum) {
  const float* v = x + b * QK;
  if (next < channels.count && channels.index[next] < (b + 1) * QK) {
    memcpy(inliers, v, sizeof(float) * QK);
    for (; next < channels.count && channels.index[next] < (b + 1) * QK; ++next) {
      const int64_t c = channels.index[next];
      r.outliers[next] = x[c];
      outliers_sum += x[c];
      inliers[c - b * QK] = 0.f;
    }
    return inliers;
  }
  return v;
}

// The 8 columns' outlier products, as outlier_products: scale_of(channel, c) the scale of column c there.
template <bool Signed, typename ScaleOf>
void add_outliers(const Row& r, const Channels& channels, const uint8_t* codes, const ScaleOf& scale_of, float* acc) {
  float o[COLS] = {};
  for (int i = 0; i < channels.count; ++i)
    for (int c = 0; c < COLS; ++c) {
      const uint8_t raw = codes[i * COLS + c];
      const float q = Signed ? (float)(int8_t)raw : (float)raw;
      o[c] = std::fma(q * scale_of(channels.index[i], c), r.outliers[i], o[c]);
    }
  for (int c = 0; c < COLS; ++c) acc[c] = acc[c] + o[c];
}


namespace portable {

void quantize_row(const float* x, int k, Row r, const Channels& channels) {
  int next = 0;  // the first outlier channel not yet passed
  for (int b = 0; b < k / QK; ++b) {
    float inliers[QK], outliers_sum = 0.f;
    const float* v = block_inliers(x, b, r, channels, next, inliers, outliers_sum);
    float amax = 0.f;
    for (int e = 0; e < QK; ++e) amax = std::max(amax, std::fabs(v[e]));
    const float id = amax > 0 ? 127.f / amax : 0.f;
    r.scale[b] = amax / 127.f;
    int total = 0;
    for (int e = 0; e < QK; ++e) {
      const int q = (int)std::nearbyint(v[e] * id);  // to nearest, ties to even: as cvtps_epi32
      total += q;
      r.q[b * QK + e] = (int8_t)std::min(127, std::max(-128, q));
    }
    r.sum[b] = r.scale[b] * (float)total + outliers_sum;
  }
}

// Code e (0..31) of column c in a block: the low nibble, then the fifth and sixth bits from their 32-bit planes.
inline int code(const uint8_t* nibbles, const uint8_t* planes, int high_bits, int e) {
  int q = e < 16 ? (nibbles[e] & 0x0F) : (nibbles[e - 16] >> 4);
  for (int h = 0; h < high_bits; ++h) {
    uint32_t plane;
    memcpy(&plane, planes + 4 * h, 4);
    q |= (int)((plane >> e) & 1) << (4 + h);
  }
  return q;
}

inline void code_dots(const uint8_t* nibbles, const uint8_t* planes, int high, const int8_t* y, int centre,
                      int halves[2]) {
  halves[0] = halves[1] = 0;
  for (int e = 0; e < QK; ++e) halves[e / 16] += (code(nibbles, planes, high, e) - centre) * y[e];
}

inline int q8_dot(const int8_t* q, const int8_t* y) {
  int dot = 0;
  for (int e = 0; e < QK; ++e) dot += q[e] * y[e];
  return dot;
}

#include "group_kernels.inc"

// Attention's float steps (GroupQueryAttention below), 8 lanes as the AVX2 ones: a dot product sums lane l of every
// 8 elements with fma, then the lanes as hsum does; softmax's exponential is one polynomial with fma.
constexpr int LANES = 8;
inline float lanes_sum(const float* a) {  // (l + l+4), then (+2), then (+1): hsum's order
  const float s0 = a[0] + a[4], s1 = a[1] + a[5], s2 = a[2] + a[6], s3 = a[3] + a[7];
  return (s0 + s2) + (s1 + s3);
}

inline float half(uint16_t h) { return half_to_float((const uint8_t*)&h); }

// float to fp16, to nearest, ties to even (what F16C's conversion gives, subnormals and NaN included)
inline uint16_t to_half(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000, e = (x >> 23) & 0xFF;
  uint32_t m = x & 0x7FFFFF;
  if (e == 0xFF) return (uint16_t)(sign | 0x7C00 | (m ? 0x200 | (m >> 13) : 0));
  const int32_t he = (int32_t)e - 112;  // the fp16 exponent
  if (he >= 0x1F) return (uint16_t)(sign | 0x7C00);
  if (he <= 0) {  // fp16 subnormal (or zero): the mantissa shifted right, rounded
    if (he < -10) return (uint16_t)sign;
    m |= 0x800000;
    const int shift = 14 - he;
    uint32_t q = m >> shift;
    const uint32_t rest = m & ((1u << shift) - 1), tie = 1u << (shift - 1);
    if (rest > tie || (rest == tie && (q & 1))) ++q;
    return (uint16_t)(sign | q);
  }
  uint32_t out = sign | ((uint32_t)he << 10) | (m >> 13);
  const uint32_t rest = m & 0x1FFF;
  if (rest > 0x1000 || (rest == 0x1000 && (out & 1))) ++out;  // a carry into the exponent is right (to inf too)
  return (uint16_t)out;
}

void to_halves(const float* x, int n, uint16_t* out) {
  for (int i = 0; i < n; ++i) out[i] = to_half(x[i]);
}

// scores[j] = scale * <q, k_j> for j < n; k_j = k + j * h, fp16; h a multiple of 8
void scores(const float* q, const uint16_t* k, int h, int n, float scale, float* out) {
  for (int j = 0; j < n; ++j) {
    float acc[LANES] = {};
    for (int d = 0; d < h; d += LANES)
      for (int l = 0; l < LANES; ++l) acc[l] = std::fma(q[d + l], half(k[j * h + d + l]), acc[l]);
    out[j] = lanes_sum(acc) * scale;
  }
}

// exp(x) for x <= 0 (Cephes' expf: x = n ln 2 + r, a degree-7 polynomial in r, times 2^n); below -87: ~1e-38
inline float exp_of(float x) {
  x = std::max(x, -87.f);
  const float n = std::nearbyint(x * 1.44269504f);
  float r = std::fma(n, -0.693359375f, x);
  r = std::fma(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = std::fma(p, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  p = std::fma(p, r * r, r) + 1.f;
  const int32_t bits = ((int32_t)n + 127) << 23;
  float two_n;
  memcpy(&two_n, &bits, 4);
  return p * two_n;
}

// s[j] = exp(s[j] - max s) for j < n, n a multiple of 8 (pad with -1e30); returns their sum (8 lanes, then hsum's
// order)
float softmax_numerators(float* s, int n) {
  float top = -INFINITY;
  for (int j = 0; j < n; ++j) top = std::max(top, s[j]);
  float acc[LANES] = {};
  for (int j = 0; j < n; j += LANES)
    for (int l = 0; l < LANES; ++l) {
      s[j + l] = exp_of(s[j + l] - top);
      acc[l] = acc[l] + s[j + l];
    }
  return lanes_sum(acc);
}

// out[d] = (sum over j < n of p[j] * v_j[d]) * inverse; v_j = v + j * h, fp16
void weighted_sum(const float* p, const uint16_t* v, int h, int n, float inverse, float* out) {
  for (int d = 0; d < h; ++d) out[d] = 0.f;
  for (int j = 0; j < n; ++j)
    for (int d = 0; d < h; ++d) out[d] = std::fma(p[j], half(v[j * h + d]), out[d]);
  for (int d = 0; d < h; ++d) out[d] = out[d] * inverse;
}
}  // namespace portable

#if defined(__aarch64__)
// ---- ARM64: the group kernels with NEON's integer dot products: plain NEON (every ARM64 CPU), and SDOT (dotprod,
// ARMv8.2 and later) where the CPU has it ----
// Bit j of 16 bits -> byte j, 0xFF where set.
inline uint8x16_t bits_as_bytes(uint32_t bits) {
  static const uint8_t kBit[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
  const uint8x16_t b = vcombine_u8(vdup_n_u8((uint8_t)(bits & 0xFF)), vdup_n_u8((uint8_t)((bits >> 8) & 0xFF)));
  return vtstq_u8(b, vld1q_u8(kBit));
}

// One column's 32 codes of a block, less centre, as int8: codes 0-15 in lo, 16-31 in hi.
inline void codes_of(const uint8_t* nibbles, const uint8_t* planes, int high, int centre, int8x16_t& lo,
                     int8x16_t& hi) {
  const uint8x16_t n = vld1q_u8(nibbles);
  uint8x16_t l = vandq_u8(n, vdupq_n_u8(0x0F)), h = vshrq_n_u8(n, 4);
  for (int b = 0; b < high; ++b) {
    uint32_t plane;
    memcpy(&plane, planes + 4 * b, 4);
    const uint8x16_t bit = vdupq_n_u8((uint8_t)(0x10 << b));
    l = vorrq_u8(l, vandq_u8(bits_as_bytes(plane & 0xFFFF), bit));
    h = vorrq_u8(h, vandq_u8(bits_as_bytes(plane >> 16), bit));
  }
  lo = vsubq_s8(vreinterpretq_s8_u8(l), vdupq_n_s8((int8_t)centre));
  hi = vsubq_s8(vreinterpretq_s8_u8(h), vdupq_n_s8((int8_t)centre));
}

namespace neon {
inline int dot16(int8x16_t a, int8x16_t b) {  // products fit int16 (at most 128 * 128), pairs summed in int32
  return vaddvq_s32(vpadalq_s16(vpaddlq_s16(vmull_s8(vget_low_s8(a), vget_low_s8(b))), vmull_high_s8(a, b)));
}
#define SLMOPS_NEON_DOTS  // code_dots and q8_dot by dot16
#include "group_kernels.inc"
#undef SLMOPS_NEON_DOTS
}  // namespace neon

#pragma GCC push_options
#pragma GCC target("arch=armv8.2-a+dotprod")
namespace neon_dotprod {
inline int dot16(int8x16_t a, int8x16_t b) { return vaddvq_s32(vdotq_s32(vdupq_n_s32(0), a, b)); }
#define SLMOPS_NEON_DOTS  // code_dots and q8_dot by dot16
#include "group_kernels.inc"
#undef SLMOPS_NEON_DOTS
}  // namespace neon_dotprod
#pragma GCC pop_options
#endif  // __aarch64__

}  // namespace

#if SLMOPS_X86
// ---- the AVX2 kernels (FMA, F16C): compiled for those instructions alone, run only where the CPU has them ----
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
namespace {
namespace avx2 {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}


void quantize_row(const float* x, int k, Row r, const Channels& channels) {
  int next = 0;  // the first outlier channel not yet passed
  for (int b = 0; b < k / QK; ++b) {
    float inliers[QK], outliers_sum = 0.f;
    const float* v = block_inliers(x, b, r, channels, next, inliers, outliers_sum);
    __m256 a0 = _mm256_loadu_ps(v), a1 = _mm256_loadu_ps(v + 8), a2 = _mm256_loadu_ps(v + 16),
           a3 = _mm256_loadu_ps(v + 24);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, a0), _mm256_andnot_ps(sign, a1)),
                              _mm256_max_ps(_mm256_andnot_ps(sign, a2), _mm256_andnot_ps(sign, a3)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    float amax = _mm_cvtss_f32(m4);
    float id = amax > 0 ? 127.f / amax : 0.f;
    r.scale[b] = amax / 127.f;
    __m256 mul = _mm256_set1_ps(id);
    __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(a0, mul)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(a1, mul)),
            i2 = _mm256_cvtps_epi32(_mm256_mul_ps(a2, mul)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(a3, mul));
    // The sum of the quantized block, not of x: the minimum then meets the same int8 x as the codes, so the rounding
    // error is weighted by the weights themselves (an exact sum weights it by the codes alone: worse, llama.cpp's Q8_1
    // keeps this one too).
    r.sum[b] = r.scale[b] * hsum(_mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3)))) +
               outliers_sum;
    i0 = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
    // the packs interleave 128-bit lanes: put the 32 bytes back in order
    i0 = _mm256_permutevar8x32_epi32(i0, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i*)(r.q + b * QK), i0);
  }
}

// 8 vectors of 8 int32 partial sums -> one vector of the 8 totals, column c in lane c.
inline __m256i reduce8(const __m256i p[8]) {
  __m256i s01 = _mm256_hadd_epi32(p[0], p[1]), s23 = _mm256_hadd_epi32(p[2], p[3]);
  __m256i s45 = _mm256_hadd_epi32(p[4], p[5]), s67 = _mm256_hadd_epi32(p[6], p[7]);
  __m256i lo = _mm256_hadd_epi32(s01, s23), hi = _mm256_hadd_epi32(s45, s67);
  return _mm256_add_epi32(_mm256_permute2x128_si256(lo, hi, 0x20), _mm256_permute2x128_si256(lo, hi, 0x31));
}

// The outlier channels' products in float: code x scale x value for the 8 columns, the scales read from the
// channel's block, the codes from `codes` ([channels][8], the group's own copy of those codes: 1 byte each).
// scale_of(channel): the 8 columns' scales of that input channel's block.
template <bool Signed, typename ScaleOf>
__m256 outlier_products(const Row& r, const Channels& channels, const uint8_t* codes, const ScaleOf& scale_of) {
  __m256 acc = _mm256_setzero_ps();
  for (int i = 0; i < channels.count; ++i) {
    const __m128i c8 = _mm_loadl_epi64((const __m128i*)(codes + i * COLS));
    const __m256 c = _mm256_cvtepi32_ps(Signed ? _mm256_cvtepi8_epi32(c8) : _mm256_cvtepu8_epi32(c8));
    acc = _mm256_fmadd_ps(_mm256_mul_ps(c, scale_of(channels.index[i])), _mm256_set1_ps(r.outliers[i]), acc);
  }
  return acc;
}

// The fp16 scales at the start of a block of `bytes` (the 32-blocks' types).
inline __m256 block_scales(const uint8_t* w, size_t bytes, int64_t channel) {
  return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(w + (channel / QK) * bytes)));
}

// 8 bytes (unsigned or signed) as 8 floats.
inline __m256 bytes_as_floats(const uint8_t* b, bool is_signed) {
  const __m128i v = _mm_loadl_epi64((const __m128i*)b);
  return _mm256_cvtepi32_ps(is_signed ? _mm256_cvtepi8_epi32(v) : _mm256_cvtepu8_epi32(v));
}

// 32 bits -> 32 bytes, 0xFF where the bit is set (bit j -> byte j), as llama.cpp's bytes_from_bits_32.
inline __m256i bytes_from_bits(const uint8_t* x) {
  uint32_t x32;
  memcpy(&x32, x, sizeof(x32));
  const __m256i shuffle = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
  const __m256i bytes = _mm256_or_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)x32), shuffle),
                                        _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
  return _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1));
}

// One column's 32 codes of a block as bytes (4 to 6 bits: the nibbles at `nibbles`, the high planes at `planes`).
template <int HighBits>
inline __m256i codes_of(const uint8_t* nibbles, const uint8_t* planes) {
  const __m256i low = _mm256_set1_epi8(0x0F), shift = _mm256_setr_epi64x(0, 0, 4, 4);
  __m256i both = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)nibbles));
  __m256i q = _mm256_and_si256(_mm256_srlv_epi64(both, shift), low);  // low nibbles, then high
  if (HighBits >= 1) q = _mm256_or_si256(q, _mm256_and_si256(bytes_from_bits(planes), _mm256_set1_epi8(0x10)));
  if (HighBits == 2) q = _mm256_or_si256(q, _mm256_and_si256(bytes_from_bits(planes + 4), _mm256_set1_epi8(0x20)));
  return q;
}

// Q4_1 and Q5_1: unsigned codes with a scale and a minimum per block; Q4_0, Q5_0 and Q6_0: the minimum is -8,
// -16 or -32 scales, applied the same way (d*q + m meets the block's sum as the minimum does). Codes are at most 63,
// so maddubs's pairs (63 * 127 * 2) stay within int16.
template <int HighBits, bool Minimum, int R>
void group_q_1(const uint8_t* w, const Row* r, int blocks, float* out, int64_t stride, const Channels& channels,
               const uint8_t* codes) {
  constexpr size_t bytes = group_block_bytes(HighBits, Minimum);
  constexpr size_t head = Minimum ? 32 : 16;  // the scales (and the minimums)
  constexpr size_t nibbles = head + COLS * 4 * HighBits;
  const __m256 centre = _mm256_set1_ps(-(float)(8 << HighBits));
  const uint8_t* group = w;
  __m256 acc[R], offsets[R];
  for (int i = 0; i < R; ++i) acc[i] = offsets[i] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int b = 0; b < blocks; ++b, w += bytes) {
    __m256i q[COLS];  // the block's codes, unpacked once for the R rows
    for (int c = 0; c < COLS; ++c) q[c] = codes_of<HighBits>(w + nibbles + c * 16, w + head + c * 4 * HighBits);
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)w));
    const __m256 m = Minimum ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(w + 16))) : _mm256_mul_ps(d, centre);
    for (int i = 0; i < R; ++i) {
      const __m256i y = _mm256_loadu_si256((const __m256i*)(r[i].q + b * QK));
      __m256i p[COLS];
      for (int c = 0; c < COLS; ++c) p[c] = _mm256_madd_epi16(_mm256_maddubs_epi16(q[c], y), ones);
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(reduce8(p)), _mm256_mul_ps(d, _mm256_set1_ps(r[i].scale[b])), acc[i]);
      offsets[i] = _mm256_fmadd_ps(m, _mm256_set1_ps(r[i].sum[b]), offsets[i]);
    }
  }
  for (int i = 0; i < R; ++i) {
    if (channels.count)  // after the blocks: their scales are in cache now
      acc[i] = _mm256_add_ps(acc[i], outlier_products<false>(r[i], channels, codes, [&](int64_t at) {
                               return block_scales(group, bytes, at);
                             }));
    _mm256_storeu_ps(out + i * stride, _mm256_add_ps(acc[i], offsets[i]));
  }
}

// Q4_K and Q5_K: as Q4_1 and Q5_1, the scale and minimum of each block being d*sc and dmin*m: the integer dot
// product meets sc in int32 (exact: at most 31 * 127 * 32 * 63 < 2^24), and d, dmin once per super-block.
template <int HighBits, int R>
void group_k(const uint8_t* w, const Row* r, int blocks, float* out, int64_t stride, const Channels& channels,
             const uint8_t* codes) {
  constexpr int64_t type = HighBits ? kQ5_K : kQ4_K;
  constexpr size_t block = k_block_bytes(type), super = k_super_bytes(type), nibbles = 16 + COLS * 4 * HighBits;
  const uint8_t* group = w;
  __m256 acc[R], offsets[R];
  for (int i = 0; i < R; ++i) acc[i] = offsets[i] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int s = 0; s < blocks / SUB; ++s, w += super) {
    __m256 acc_s[R], offsets_s[R];
    for (int i = 0; i < R; ++i) acc_s[i] = offsets_s[i] = _mm256_setzero_ps();
    const uint8_t* wb = w + 32;
    for (int j = 0; j < SUB; ++j, wb += block) {
      const int b = s * SUB + j;
      __m256i q[COLS];
      for (int c = 0; c < COLS; ++c) q[c] = codes_of<HighBits>(wb + nibbles + c * 16, wb + 16 + c * 4 * HighBits);
      const __m256i sc = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)wb));
      const __m256 mins = bytes_as_floats(wb + 8, false);
      for (int i = 0; i < R; ++i) {
        const __m256i y = _mm256_loadu_si256((const __m256i*)(r[i].q + b * QK));
        __m256i p[COLS];
        for (int c = 0; c < COLS; ++c) p[c] = _mm256_madd_epi16(_mm256_maddubs_epi16(q[c], y), ones);
        acc_s[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_mullo_epi32(reduce8(p), sc)),
                                   _mm256_set1_ps(r[i].scale[b]), acc_s[i]);
        offsets_s[i] = _mm256_fmadd_ps(mins, _mm256_set1_ps(r[i].sum[b]), offsets_s[i]);
      }
    }
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)w));
    const __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(w + 16)));
    for (int i = 0; i < R; ++i) {
      acc[i] = _mm256_fmadd_ps(acc_s[i], d, acc[i]);
      offsets[i] = _mm256_fmadd_ps(offsets_s[i], dmin, offsets[i]);
    }
  }
  for (int i = 0; i < R; ++i) {
    if (channels.count)
      acc[i] = _mm256_add_ps(acc[i], outlier_products<false>(r[i], channels, codes, [&](int64_t at) {
                               const uint8_t* ws = group + (at / QK_K) * super;
                               return _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)ws)),
                                                    bytes_as_floats(ws + 32 + ((at % QK_K) / QK) * block, false));
                             }));
    _mm256_storeu_ps(out + i * stride, _mm256_sub_ps(acc[i], offsets[i]));
  }
}

// Q6_K: sub-blocks of 16, so each column's products are summed per half block (the lanes of madd's result hold
// codes 0-15 in their low half, 16-31 in their high), centred on 32 in int32 with the activations' own half sums,
// and met with the half's int8 scale.
template <int R>
void group_q6_k(const uint8_t* w, const Row* r, int blocks, float* out, int64_t stride, const Channels& channels,
                const uint8_t* codes) {
  constexpr size_t block = k_block_bytes(kQ6_K), super = k_super_bytes(kQ6_K), nibbles = 16 + COLS * 8;
  const uint8_t* group = w;
  __m256 acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1), ones8 = _mm256_set1_epi8(1);
  for (int s = 0; s < blocks / SUB; ++s, w += super) {
    __m256 acc_s[R];
    for (int i = 0; i < R; ++i) acc_s[i] = _mm256_setzero_ps();
    const uint8_t* wb = w + 16;
    for (int j = 0; j < SUB; ++j, wb += block) {
      const int b = s * SUB + j;
      __m256i q[COLS];
      for (int c = 0; c < COLS; ++c) q[c] = codes_of<2>(wb + nibbles + c * 16, wb + 16 + c * 8);
      const __m256i sc0 = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)wb));
      const __m256i sc1 = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(wb + 8)));
      for (int i = 0; i < R; ++i) {
        const __m256i y = _mm256_loadu_si256((const __m256i*)(r[i].q + b * QK));
        const __m256i centre = _mm256_slli_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(ones8, y), ones), 5);
        __m256i p[COLS];
        for (int c = 0; c < COLS; ++c)
          p[c] = _mm256_sub_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(q[c], y), ones), centre);
        __m256i s01 = _mm256_hadd_epi32(p[0], p[1]), s23 = _mm256_hadd_epi32(p[2], p[3]);
        __m256i s45 = _mm256_hadd_epi32(p[4], p[5]), s67 = _mm256_hadd_epi32(p[6], p[7]);
        __m256i lo = _mm256_hadd_epi32(s01, s23), hi = _mm256_hadd_epi32(s45, s67);
        const __m256i first = _mm256_permute2x128_si256(lo, hi, 0x20), second = _mm256_permute2x128_si256(lo, hi, 0x31);
        const __m256i t = _mm256_add_epi32(_mm256_mullo_epi32(first, sc0), _mm256_mullo_epi32(second, sc1));
        acc_s[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_set1_ps(r[i].scale[b]), acc_s[i]);
      }
    }
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)w));
    for (int i = 0; i < R; ++i) acc[i] = _mm256_fmadd_ps(acc_s[i], d, acc[i]);
  }
  for (int i = 0; i < R; ++i) {
    if (channels.count)
      acc[i] = _mm256_add_ps(acc[i], outlier_products<true>(r[i], channels, codes, [&](int64_t at) {
                               const uint8_t* ws = group + (at / QK_K) * super;
                               const size_t where = 16 + ((at % QK_K) / QK) * block + ((at % QK) / 16) * COLS;
                               return _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)ws)),
                                                    bytes_as_floats(ws + where, true));
                             }));
    _mm256_storeu_ps(out + i * stride, acc[i]);
  }
}

template <int R>
void group_q8_0(const uint8_t* w, const Row* r, int blocks, float* out, int64_t stride, const Channels& channels,
                const uint8_t* codes) {
  const uint8_t* group = w;
  __m256 acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int b = 0; b < blocks; ++b, w += kGroupBlockQ8_0) {
    __m256i q[COLS], magnitude[COLS];
    for (int c = 0; c < COLS; ++c) {
      q[c] = _mm256_loadu_si256((const __m256i*)(w + 16 + c * 32));
      magnitude[c] = _mm256_sign_epi8(q[c], q[c]);  // maddubs wants one unsigned operand: |q|, and y with q's sign
    }
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)w));
    for (int i = 0; i < R; ++i) {
      const __m256i y = _mm256_loadu_si256((const __m256i*)(r[i].q + b * QK));
      __m256i p[COLS];
      for (int c = 0; c < COLS; ++c)
        p[c] = _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude[c], _mm256_sign_epi8(y, q[c])), ones);
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(reduce8(p)), _mm256_mul_ps(d, _mm256_set1_ps(r[i].scale[b])), acc[i]);
    }
  }
  for (int i = 0; i < R; ++i) {
    if (channels.count)
      acc[i] = _mm256_add_ps(acc[i], outlier_products<true>(r[i], channels, codes, [&](int64_t at) {
                               return block_scales(group, kGroupBlockQ8_0, at);
                             }));
    _mm256_storeu_ps(out + i * stride, acc[i]);
  }
}

// Attention's float steps, as the portable ones lane by lane (those say what each computes).
inline __m256 halves(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }

void to_halves(const float* x, int n, uint16_t* out) {
  for (int i = 0; i < n; i += 8)
    _mm_storeu_si128((__m128i*)(out + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
}

void scores(const float* q, const uint16_t* k, int h, int n, float scale, float* out) {
  int j = 0;
  for (; j + 4 <= n; j += 4) {  // four keys at once: four independent chains, each summed as one key alone
    const uint16_t* k0 = k + j * h;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int d = 0; d < h; d += 8) {
      const __m256 x = _mm256_loadu_ps(q + d);
      a0 = _mm256_fmadd_ps(x, halves(k0 + d), a0);
      a1 = _mm256_fmadd_ps(x, halves(k0 + h + d), a1);
      a2 = _mm256_fmadd_ps(x, halves(k0 + 2 * h + d), a2);
      a3 = _mm256_fmadd_ps(x, halves(k0 + 3 * h + d), a3);
    }
    out[j] = hsum(a0) * scale;
    out[j + 1] = hsum(a1) * scale;
    out[j + 2] = hsum(a2) * scale;
    out[j + 3] = hsum(a3) * scale;
  }
  for (; j < n; ++j) {
    __m256 a = _mm256_setzero_ps();
    for (int d = 0; d < h; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), halves(k + j * h + d), a);
    out[j] = hsum(a) * scale;
  }
}

inline __m256 exp_of(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-0.693359375f), x);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

float softmax_numerators(float* s, int n) {
  __m256 top = _mm256_set1_ps(-INFINITY);
  for (int j = 0; j < n; j += 8) top = _mm256_max_ps(top, _mm256_loadu_ps(s + j));
  __m128 t = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
  t = _mm_max_ps(t, _mm_movehl_ps(t, t));
  t = _mm_max_ss(t, _mm_movehdup_ps(t));
  const __m256 most = _mm256_set1_ps(_mm_cvtss_f32(t));
  __m256 acc = _mm256_setzero_ps();
  for (int j = 0; j < n; j += 8) {
    const __m256 e = exp_of(_mm256_sub_ps(_mm256_loadu_ps(s + j), most));
    _mm256_storeu_ps(s + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  return hsum(acc);
}

void weighted_sum(const float* p, const uint16_t* v, int h, int n, float inverse, float* out) {
  if (h == 64) {  // the common head size: the output in registers
    __m256 o[8];
    for (int i = 0; i < 8; ++i) o[i] = _mm256_setzero_ps();
    for (int j = 0; j < n; ++j) {
      const __m256 w = _mm256_set1_ps(p[j]);
      for (int i = 0; i < 8; ++i) o[i] = _mm256_fmadd_ps(w, halves(v + j * 64 + 8 * i), o[i]);
    }
    for (int i = 0; i < 8; ++i) _mm256_storeu_ps(out + 8 * i, _mm256_mul_ps(o[i], _mm256_set1_ps(inverse)));
    return;
  }
  for (int d = 0; d < h; d += 8) _mm256_storeu_ps(out + d, _mm256_setzero_ps());
  for (int j = 0; j < n; ++j) {
    const __m256 w = _mm256_set1_ps(p[j]);
    for (int d = 0; d < h; d += 8)
      _mm256_storeu_ps(out + d, _mm256_fmadd_ps(w, halves(v + j * h + d), _mm256_loadu_ps(out + d)));
  }
  for (int d = 0; d < h; d += 8) _mm256_storeu_ps(out + d, _mm256_mul_ps(_mm256_loadu_ps(out + d), _mm256_set1_ps(inverse)));
}

// The AVX2 kernel of a type, over R rows of activations at once (each weight block unpacked once for them, each
// row's sums in the order it has alone): out [R rows, stride apart][8 columns].
template <int R>
void group(int64_t type, const uint8_t* wg, const Row* r, int blocks, float* out, int64_t stride,
           const Channels& channels, const uint8_t* cg) {
  if (type == kQ4_1) group_q_1<0, true, R>(wg, r, blocks, out, stride, channels, cg);
  else if (type == kQ5_1) group_q_1<1, true, R>(wg, r, blocks, out, stride, channels, cg);
  else if (type == kQ4_0) group_q_1<0, false, R>(wg, r, blocks, out, stride, channels, cg);
  else if (type == kQ5_0) group_q_1<1, false, R>(wg, r, blocks, out, stride, channels, cg);
  else if (type == kQ6_0) group_q_1<2, false, R>(wg, r, blocks, out, stride, channels, cg);
  else if (type == kQ4_K) group_k<0, R>(wg, r, blocks, out, stride, channels, cg);
  else if (type == kQ5_K) group_k<1, R>(wg, r, blocks, out, stride, channels, cg);
  else if (type == kQ6_K) group_q6_k<R>(wg, r, blocks, out, stride, channels, cg);
  else group_q8_0<R>(wg, r, blocks, out, stride, channels, cg);
}

}  // namespace avx2
}  // namespace
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // SLMOPS_X86

namespace {

// Which kernels run: on x86-64 the AVX2 ones where the CPU has AVX2, FMA and F16C; on ARM64 NEON's, with SDOT where
// the CPU has dotprod; the plain C++ ones elsewhere, and on any CPU with SLMOPS_KERNEL_CPU=baseline (tests; "neon":
// NEON without SDOT). Chosen when the library is registered or asked.
enum Code { kPortable, kAvx2, kNeon, kNeonDotprod };
Code code = kPortable;
const char* const kCodeNames[] = {"portable", "avx2", "neon", "neon-dotprod"};

void choose_code() {
  const char* pretend = std::getenv("SLMOPS_KERNEL_CPU");
  const std::string asked = pretend ? pretend : "";
  code = kPortable;
  if (asked == "baseline") return;
#if SLMOPS_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) code = kAvx2;
#elif defined(__aarch64__)
  code = (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) && asked != "neon" ? kNeonDotprod : kNeon;
#endif
}

struct Kernel {
  int64_t type;  // GGML type: kQ4_0, kQ4_1, kQ5_0, kQ5_1, kQ8_0, kQ4_K, kQ5_K or kQ6_K; or kQ6_0
};

// x quantized, per calling thread: ONNX Runtime may run one session from several threads at once.
struct Quantized {
  std::vector<int8_t> q;
  std::vector<float> scale, sum, outliers;
};
thread_local Quantized quantized;

struct Shape {
  int64_t dims[9] = {};
  size_t rank = 0;
  int64_t elements(size_t from, size_t to) const {  // the product of dims[from:to]
    int64_t n = 1;
    for (size_t i = from; i < to; ++i) n *= dims[i];
    return n;
  }
};

Shape shape_of(const void* value) {
  using namespace ort;
  Shape s;
  void* info = nullptr;
  get<void* (*)(const void*, void**)>(kGetTensorTypeAndShape)(value, &info);
  get<void* (*)(const void*, size_t*)>(kGetDimensionsCount)(info, &s.rank);
  s.rank = std::min<size_t>(s.rank, 8);
  get<void* (*)(const void*, int64_t*, size_t)>(kGetDimensions)(info, s.dims, s.rank);
  get<void (*)(void*)>(kReleaseTensorTypeAndShapeInfo)(info);
  return s;
}

void* output(void* context, const Shape& s, size_t index = 0) {
  void* value = nullptr;
  ort::get<void* (*)(void*, size_t, const int64_t*, size_t, void**)>(ort::kKernelContextGetOutput)(context, index,
                                                                                                  s.dims, s.rank, &value);
  return value;
}

const void* input(void* context, size_t index) {  // nullptr for an optional input not given
  const void* value = nullptr;
  ort::get<void* (*)(const void*, size_t, const void**)>(ort::kKernelContextGetInput)(context, index, &value);
  return value;
}

template <typename T>
T* data(const void* value) {
  T* out = nullptr;
  ort::get<void* (*)(const void*, void**)>(ort::kGetTensorMutableData)(value, (void**)&out);
  return out;
}

// job(i) for every i < total on ONNX Runtime's intra-op threads (the caller's included); one thread: in order here.
template <typename Job>
void parallel_for(void* context, int64_t total, const Job& job) {
  if (total <= 0) return;
  if (total == 1) return job(0);
  auto call = [](void* job, size_t i) { (*static_cast<const Job*>(job))(i); };
  using ParallelFor = void* (*)(const void*, void (*)(void*, size_t), size_t, size_t, void*);
  if (void* status = ort::get<ParallelFor>(ort::kKernelContextParallelFor)(context, call, (size_t)total, 0, (void*)&job)) {
    ort::get<void (*)(void*)>(ort::kReleaseStatus)(status);  // the runtime could not hand it out: run it here
    for (int64_t i = 0; i < total; ++i) job(i);
  }
}

// y [m, groups * 8] = x [m, k] @ W^T, W in the kernel's layout; parallel(total, job) runs job(i) for i < total.
template <typename Parallel>
void matmul(int64_t type, const uint8_t* w, int groups, int k, const float* x, int64_t m, const Channels& channels,
            const uint8_t* codes, float* y, Code kind, const Parallel& parallel) {
  const int n = groups * COLS, blocks = k / QK;
  Quantized& xq = quantized;
  xq.q.resize(m * k);
  xq.scale.resize(m * blocks);
  xq.sum.resize(m * blocks);
  xq.outliers.resize(m * channels.count);
  auto row = [&](int64_t i) {
    return Row{xq.q.data() + i * k, xq.scale.data() + i * blocks, xq.sum.data() + i * blocks,
               xq.outliers.data() + i * channels.count};
  };
  // Rows quantized, then groups of columns handed out a few at a time, on ONNX Runtime's intra-op threads; each
  // group's weights stay in cache while every row reads them.
  parallel(m, [&](size_t i) {
#if SLMOPS_X86
    if (kind == kAvx2) return avx2::quantize_row(x + i * k, k, row(i), channels);
#endif
    portable::quantize_row(x + i * k, k, row(i), channels);
  });
  const size_t stride = group_row_bytes(type, k);
  const int per_task = 4, tasks = (groups + per_task - 1) / per_task;
  parallel(tasks, [&](size_t task) {
    for (int g = task * per_task; g < std::min(groups, (int)(task + 1) * per_task); ++g) {
      const uint8_t* wg = w + g * stride;
      const uint8_t* cg = codes + (size_t)g * channels.count * COLS;
#if SLMOPS_X86
      if (kind == kAvx2) {  // a prompt's rows ROWS at a time, then one by one
        int64_t i = 0;
        for (; i + ROWS <= m; i += ROWS) {
          Row rows[ROWS];
          for (int j = 0; j < ROWS; ++j) rows[j] = row(i + j);
          avx2::group<ROWS>(type, wg, rows, blocks, y + i * n + g * COLS, n, channels, cg);
        }
        for (; i < m; ++i) {
          const Row one = row(i);
          avx2::group<1>(type, wg, &one, blocks, y + i * n + g * COLS, n, channels, cg);
        }
        continue;
      }
#endif
      for (int64_t i = 0; i < m; ++i) {
        float* out = y + i * n + g * COLS;
#if defined(__aarch64__)
        if (kind == kNeonDotprod) {
          neon_dotprod::group(type, wg, row(i), blocks, out, channels, cg);
          continue;
        }
        if (kind == kNeon) {
          neon::group(type, wg, row(i), blocks, out, channels, cg);
          continue;
        }
#endif
        portable::group(type, wg, row(i), blocks, out, channels, cg);
      }
    }
  });
}

void compute(Kernel* kernel, void* context) {
  using namespace ort;
  const void* x_value = input(context, 0);
  const void* w_value = input(context, 1);
  const Shape xs = shape_of(x_value), ws = shape_of(w_value);
  const int k = (int)xs.dims[xs.rank - 1], groups = (int)ws.dims[0], n = groups * COLS;
  const int64_t m = xs.elements(0, xs.rank - 1);
  Shape ys = xs;
  ys.dims[ys.rank - 1] = n;
  void* y_value = output(context, ys);
  const float* x = data<const float>(x_value);
  const uint8_t* w = data<const uint8_t>(w_value);
  float* y = data<float>(y_value);
  Channels channels;
  const uint8_t* codes = nullptr;  // the outlier channels' codes, [groups][channels][8]
  size_t inputs = 0;
  get<void* (*)(const void*, size_t*)>(kKernelContextGetInputCount)(context, &inputs);
  if (inputs >= 4 && input(context, 2) && input(context, 3)) {
    const Shape cs = shape_of(input(context, 2));
    channels.count = cs.rank ? (int)cs.dims[0] : 0;
    channels.index = data<const int64_t>(input(context, 2));
    codes = data<const uint8_t>(input(context, 3));
  }

  matmul(kernel->type, w, groups, k, x, m, channels, codes, y, code,
         [&](int64_t total, const auto& job) { parallel_for(context, total, job); });
}

// One row of a K-quant (output column n) dequantized as gguf-py does: (d*sc)*q - dmin*m, or (d*sc)*(q - 32).
void dequantize_row_k(const uint8_t* w, int64_t type, int blocks, int64_t n, float* out) {
  const int g = (int)(n / COLS), c = (int)(n % COLS);
  const size_t block = k_block_bytes(type), super = k_super_bytes(type);
  const int high_count = high_bits(type);
  const uint8_t* base = w + (size_t)g * (blocks / SUB) * super;
  for (int s = 0; s < blocks / SUB; ++s, base += super) {
    const float d = half_to_float(base + 2 * c), dmin = type != kQ6_K ? half_to_float(base + 16 + 2 * c) : 0.f;
    for (int j = 0; j < SUB; ++j, out += QK) {
      const uint8_t* wb = base + k_head_bytes(type) + j * block;
      uint32_t fifth = 0, sixth = 0;
      if (high_count >= 1) memcpy(&fifth, wb + 16 + c * 4 * high_count, 4);
      if (high_count == 2) memcpy(&sixth, wb + 16 + c * 8 + 4, 4);
      const uint8_t* qs = wb + 16 + COLS * 4 * high_count + c * 16;
      auto code = [&](int e) {
        const int low = e < 16 ? (qs[e] & 0x0F) : (qs[e - 16] >> 4);
        return low | (int)(((fifth >> e) & 1) << 4 | ((sixth >> e) & 1) << 5);
      };
      for (int e = 0; e < QK; ++e) {
        if (type == kQ6_K) {
          const float ds = d * (float)(int8_t)wb[(e / 16) * COLS + c];
          out[e] = ds * (float)(code(e) - 32);
        } else {
          const float ds = d * (float)wb[c], dm = dmin * (float)wb[8 + c];
          out[e] = ds * (float)code(e) - dm;
        }
      }
    }
  }
}

// One row of W (output column n) dequantized: what the GGUF's own dequantization gives, in the same float order.
void dequantize_row(const uint8_t* w, int64_t type, int blocks, int64_t n, float* out) {
  if (is_k(type)) return dequantize_row_k(w, type, blocks, n, out);
  const int g = (int)(n / COLS), c = (int)(n % COLS);
  const size_t bytes = block_bytes(type);
  const uint8_t* base = w + (size_t)g * blocks * bytes;
  for (int b = 0; b < blocks; ++b, base += bytes, out += QK) {
    const float d = half_to_float(base + 2 * c);
    if (type != kQ8_0) {
      const bool minimum = has_minimum(type);
      const int high_count = high_bits(type);
      const size_t head = minimum ? 32 : 16;
      float m = 0.f;
      int centre = 0;  // Q4_0 / Q5_0 / Q6_0: w = d*(q - centre), as gguf-py computes it
      if (minimum) {
        m = half_to_float(base + 16 + 2 * c);
      } else {
        centre = 8 << high_count;
      }
      uint32_t fifth = 0, sixth = 0;  // Q5's and Q6's fifth bits, Q6's sixth
      if (high_count >= 1) memcpy(&fifth, base + head + c * 4 * high_count, 4);
      if (high_count == 2) memcpy(&sixth, base + head + c * 8 + 4, 4);
      const uint8_t* qs = base + head + COLS * 4 * high_count + c * 16;
      auto high = [&](int j) { return (int)(((fifth >> j) & 1) << 4 | ((sixth >> j) & 1) << 5); };
      for (int j = 0; j < 16; ++j) {
        out[j] = d * (float)((int)(qs[j] & 0x0F) + high(j) - centre) + m;
        out[j + 16] = d * (float)((int)(qs[j] >> 4) + high(j + 16) - centre) + m;
      }
    } else {
      const int8_t* qs = (const int8_t*)(base + 16 + c * 32);
      for (int j = 0; j < QK; ++j) out[j] = d * (float)qs[j];
    }
  }
}

void gather(Kernel* kernel, void* context) {
  using namespace ort;
  const void* ids_value = input(context, 0);
  const void* w_value = input(context, 1);
  const Shape is = shape_of(ids_value), ws = shape_of(w_value);
  const int blocks = (int)ws.dims[1] * (is_k(kernel->type) ? SUB : 1), k = blocks * QK;  // K-quants: super-blocks
  const int64_t count = is.elements(0, is.rank), rows = ws.dims[0] * COLS;
  Shape ys = is;
  ys.dims[ys.rank++] = k;
  void* y_value = output(context, ys);
  const int64_t* ids = data<const int64_t>(ids_value);
  const uint8_t* w = data<const uint8_t>(w_value);
  float* y = data<float>(y_value);
  for (int64_t i = 0; i < count; ++i) {
    const int64_t id = ids[i] < 0 ? ids[i] + rows : ids[i];
    if (id < 0 || id >= rows) {
      memset(y + i * k, 0, sizeof(float) * k);  // out of range: zeros rather than a read past the table
      continue;
    }
    dequantize_row(w, kernel->type, blocks, id, y + i * k);
  }
}


// ---- GroupQueryAttention(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache,
// sin_cache): ONNX Runtime's com.microsoft operator of that name, as its CPU kernel computes it for float with the
// attributes num_heads, kv_num_heads, scale, do_rotary and rotary_interleaved (plugins/gguf_kernel.py swaps only
// such nodes): rotary embedding on q and k at each row's position, the new k and v written into present at the
// row's past length (in place where ONNX Runtime GenAI shares the past and present buffers), then for each query
// head the softmax of its scaled dot products with the keys up to its own position, times v. A decoded token reads
// the whole cache, and on a CPU that read is what a long context costs: in fp16 it is half ONNX Runtime's fp32 one.
struct Attention {
  int64_t heads = 0, kv_heads = 0, rotary = 0, interleaved = 0;
  float scale = 0.f;
};

// Rotary embedding of one head's row x at position pos into out: ONNX Runtime's RotaryEmbedding, its operations
// in its order (x * cos + (sign * x') * sin), over the first `dims` elements; the rest copied.
void rotate(const float* x, const float* cos, const float* sin, int dims, bool interleaved, int h, float* out) {
  const int half = dims / 2;
  for (int i = 0; i < dims; ++i) {
    int partner, at;
    float sign;
    if (interleaved) {
      partner = i % 2 == 0 ? i + 1 : i - 1;
      sign = i % 2 == 0 ? -1.f : 1.f;
      at = i / 2;
    } else {
      partner = (i + half) % dims;
      sign = i < half ? -1.f : 1.f;
      at = i % half;
    }
    out[i] = x[i] * cos[at] + (sign * x[partner]) * sin[at];
  }
  for (int i = dims; i < h; ++i) out[i] = x[i];
}

// x [n] as fp16 into out, with the kernels of `use`
void halves(const float* x, int n, uint16_t* out, Code use) {
#if SLMOPS_X86
  if (use == kAvx2) return avx2::to_halves(x, n, out);
#endif
  portable::to_halves(x, n, out);
}

// One query row: o [h] = softmax(scale * q k^T) v over the first `keys` fp16 rows of k and v, with the kernels of
// `use`; p: room for the keys' scores, rounded up to 8
void attend(const float* q, const uint16_t* k, const uint16_t* v, int h, int keys, float scale, float* p, float* o,
            Code use) {
  const int padded = (keys + 7) / 8 * 8;
  std::fill(p + keys, p + padded, -1e30f);  // exp gives ~1e-38: nothing against a sum of at least 1
#if SLMOPS_X86
  if (use == kAvx2) {
    avx2::scores(q, k, h, keys, scale, p);
    const float sum = avx2::softmax_numerators(p, padded);
    return avx2::weighted_sum(p, v, h, keys, 1.f / sum, o);
  }
#endif
  portable::scores(q, k, h, keys, scale, p);
  const float sum = portable::softmax_numerators(p, padded);
  portable::weighted_sum(p, v, h, keys, 1.f / sum, o);
}

struct AttentionScratch {
  std::vector<float> q, scores;  // a rotated row (q or k); a row's scores
};
thread_local AttentionScratch attention_scratch;

void attention(Attention* op, void* context) {
  using namespace ort;
  size_t count = 0;
  get<void* (*)(const void*, size_t*)>(kKernelContextGetInputCount)(context, &count);
  auto optional = [&](size_t i) { return i < count ? input(context, i) : nullptr; };
  const void* query = input(context, 0);
  const void *key = optional(1), *value = optional(2), *past_key = optional(3), *past_value = optional(4);
  const void *cos_value = optional(7), *sin_value = optional(8);
  const Shape qs = shape_of(query);
  const int64_t batch = qs.dims[0], rows = qs.dims[1], heads = op->heads, kv_heads = op->kv_heads;
  const bool packed = key == nullptr;
  // Shapes ONNX Runtime's own operator refuses (swap_attention hands over only graphs that ran on it): no output is
  // made, which ONNX Runtime reports as this node's error, rather than a read past a tensor
  if (qs.rank != 3 || heads <= 0 || kv_heads <= 0 || heads % kv_heads) return;
  const int64_t h = qs.dims[2] / (packed ? heads + 2 * kv_heads : heads);
  if (h <= 0 || h % 8 || qs.dims[2] != h * (packed ? heads + 2 * kv_heads : heads)) return;
  auto fits = [&](const void* value, std::initializer_list<int64_t> dims) {  // -1: any size
    const Shape vs = shape_of(value);
    size_t i = 0;
    for (int64_t d : dims) {
      if (i >= vs.rank || (d >= 0 && vs.dims[i] != d)) return false;
      ++i;
    }
    return vs.rank == dims.size();
  };
  if (!packed && (!value || !fits(key, {batch, rows, kv_heads * h}) || !fits(value, {batch, rows, kv_heads * h})))
    return;
  if ((past_key != nullptr) != (past_value != nullptr)) return;
  if (past_key && (!fits(past_key, {batch, kv_heads, -1, h}) || !fits(past_value, {batch, kv_heads, -1, h}))) return;
  const float *cos = nullptr, *sin = nullptr;  // RoPE's caches, over the first dims elements of a head
  int64_t cos_rows = 0, dims = 0;
  if (op->rotary && cos_value && sin_value) {
    const Shape cs = shape_of(cos_value);
    cos_rows = cs.dims[0];
    dims = 2 * cs.dims[1];
    if (cs.rank != 2 || dims > h || !fits(sin_value, {cos_rows, dims / 2})) return;
    cos = data<const float>(cos_value);
    sin = data<const float>(sin_value);
  }
  const Shape ts = shape_of(input(context, 6));
  if (!fits(input(context, 5), {batch}) || ts.elements(0, ts.rank) != 1) return;
  const int64_t past_length = past_key ? shape_of(past_key).dims[2] : 0;
  const int64_t total = *data<const int32_t>(input(context, 6));
  const int64_t length = std::max(total, past_length);  // present's rows
  const int32_t* seqlens = data<const int32_t>(input(context, 5));

  Shape os{{batch, rows, heads * h}, 3}, ps{{batch, kv_heads, length, h}, 4};
  float* out = data<float>(output(context, os, 0));
  uint16_t* present_k = data<uint16_t>(output(context, ps, 1));
  uint16_t* present_v = data<uint16_t>(output(context, ps, 2));
  const uint16_t* past_k = past_key ? data<const uint16_t>(past_key) : nullptr;
  const uint16_t* past_v = past_value ? data<const uint16_t>(past_value) : nullptr;
  const bool shared = past_k == present_k && past_v == present_v;
  const float* q_all = data<const float>(query);
  const float* k_all = packed ? nullptr : data<const float>(key);
  const float* v_all = packed ? nullptr : data<const float>(value);
  const float scale = op->scale != 0.f ? op->scale : 1.f / std::sqrt((float)h);
  const bool first = rows == total;  // the first prompt: no past, whatever seqlens says
  // Each batch row's past length; a row whose lengths do not fit present is left zero rather than read past it.
  std::vector<int64_t> past(batch);
  for (int64_t b = 0; b < batch; ++b) {
    past[b] = first ? 0 : (int64_t)seqlens[b] + 1 - rows;
    if (past[b] < 0 || past[b] + rows > length || (!shared && past[b] > past_length)) past[b] = -1;
  }
  const int64_t stride = packed ? (heads + 2 * kv_heads) * h : 0;  // a packed row: q heads, k heads, v heads
  auto q_row = [&](int64_t b, int64_t s, int64_t n) {
    return packed ? q_all + (b * rows + s) * stride + n * h : q_all + ((b * rows + s) * heads + n) * h;
  };
  auto k_row = [&](int64_t b, int64_t s, int64_t g) {
    return packed ? q_all + (b * rows + s) * stride + (heads + g) * h : k_all + ((b * rows + s) * kv_heads + g) * h;
  };
  auto v_row = [&](int64_t b, int64_t s, int64_t g) {
    return packed ? q_all + (b * rows + s) * stride + (heads + kv_heads + g) * h
                  : v_all + ((b * rows + s) * kv_heads + g) * h;
  };
  auto position = [&](int64_t b, int64_t s) { return std::min(past[b] + s, std::max<int64_t>(cos_rows - 1, 0)); };

  auto to_halves = [&](const float* x, uint16_t* y) { halves(x, (int)h, y, code); };
  // present: the past (copied unless shared), then this call's k (rotated) and v at each row's past length, in fp16
  const size_t cache = (size_t)length * h;
  auto write = [&](size_t i) {
    const int64_t b = i / kv_heads, g = i % kv_heads;
    uint16_t* pk = present_k + i * cache;
    uint16_t* pv = present_v + i * cache;
    if (!shared) {
      memset(pk, 0, sizeof(uint16_t) * cache);
      memset(pv, 0, sizeof(uint16_t) * cache);
      if (past[b] > 0) {
        memcpy(pk, past_k + i * past_length * h, sizeof(uint16_t) * past[b] * h);
        memcpy(pv, past_v + i * past_length * h, sizeof(uint16_t) * past[b] * h);
      }
    }
    if (past[b] < 0) return;
    std::vector<float>& rotated = attention_scratch.q;
    rotated.resize(h);
    for (int64_t s = 0; s < rows; ++s) {
      const float* k = k_row(b, s, g);
      if (cos) {
        const int64_t at = position(b, s) * (dims / 2);
        rotate(k, cos + at, sin + at, (int)dims, op->interleaved, (int)h, rotated.data());
        k = rotated.data();
      }
      to_halves(k, pk + (past[b] + s) * h);
      to_halves(v_row(b, s, g), pv + (past[b] + s) * h);
    }
  };
  if (shared && rows == 1) {  // a decoding step: a row per head, less work than handing it out
    for (int64_t i = 0; i < batch * kv_heads; ++i) write(i);
  } else {
    parallel_for(context, batch * kv_heads, write);
  }

  // each query head over tiles of rows: softmax(scale * q k^T) v over the keys up to the row's own position
  const int64_t tile = 16, tiles = (rows + tile - 1) / tile, group = heads / kv_heads;
  parallel_for(context, batch * heads * tiles, [&](size_t task) {
    const int64_t b = task / (heads * tiles), n = task / tiles % heads, t = task % tiles;
    const int64_t g = n / group;
    AttentionScratch& w = attention_scratch;
    w.q.resize(h);
    w.scores.resize((length + 7) / 8 * 8);
    const uint16_t* pk = present_k + (b * kv_heads + g) * cache;
    const uint16_t* pv = present_v + (b * kv_heads + g) * cache;
    for (int64_t s = t * tile; s < std::min(rows, (t + 1) * tile); ++s) {
      float* o = out + ((b * rows + s) * heads + n) * h;
      if (past[b] < 0) {
        memset(o, 0, sizeof(float) * h);
        continue;
      }
      const float* q = q_row(b, s, n);
      if (cos) {
        const int64_t at = position(b, s) * (dims / 2);
        rotate(q, cos + at, sin + at, (int)dims, op->interleaved, (int)h, w.q.data());
        q = w.q.data();
      }
      attend(q, pk, pv, (int)h, (int)(past[b] + s + 1), scale, w.scores.data(), o, code);
    }
  });
}
}  // namespace


namespace {
ort::CustomOp make_op(bool matmul) {
  using namespace ort;
  CustomOp op;
  memset(&op, 0, sizeof(op));
  op.version = 8;  // the first version whose optional inputs ONNX Runtime honours
  op.CreateKernel = [](const CustomOp*, const Fn*, const void* info) -> void* {
    auto* kernel = new Kernel();
    kernel->type = kQ4_1;
    get<void* (*)(const void*, const char*, int64_t*)>(kKernelInfoGetAttributeInt64)(info, "ggml_type",
                                                                                    &kernel->type);
    return kernel;
  };
  op.GetName = matmul ? [](const CustomOp*) { return "MatMulGGML"; } : [](const CustomOp*) { return "GatherGGML"; };
  op.GetExecutionProviderType = [](const CustomOp*) -> const char* { return "CPUExecutionProvider"; };
  // MatMulGGML(x, w, [outlier channels, their codes]); GatherGGML(ids, w)
  op.GetInputType = matmul ? [](const CustomOp*, size_t i) { return i == 0 ? (int)kFloat : i == 2 ? (int)kInt64 : (int)kUint8; }
                           : [](const CustomOp*, size_t i) { return i == 0 ? (int)kInt64 : (int)kUint8; };
  op.GetInputTypeCount = matmul ? [](const CustomOp*) -> size_t { return 4; } : [](const CustomOp*) -> size_t { return 2; };
  op.GetOutputType = [](const CustomOp*, size_t) { return (int)kFloat; };
  op.GetOutputTypeCount = [](const CustomOp*) -> size_t { return 1; };
  op.KernelCompute = matmul ? [](void* kernel, void* context) { compute((Kernel*)kernel, context); }
                            : [](void* kernel, void* context) { gather((Kernel*)kernel, context); };
  op.KernelDestroy = [](void* kernel) { delete (Kernel*)kernel; };
  op.GetInputCharacteristic = [](const CustomOp*, size_t i) { return i < 2 ? 0 : 1; };  // 0: required, 1: optional
  op.GetOutputCharacteristic = [](const CustomOp*, size_t) { return 0; };
  op.GetInputMemoryType = [](const CustomOp*, size_t) { return 0; };
  op.GetVariadicInputMinArity = [](const CustomOp*) { return 1; };
  op.GetVariadicInputHomogeneity = [](const CustomOp*) { return 1; };
  op.GetVariadicOutputMinArity = [](const CustomOp*) { return 1; };
  op.GetVariadicOutputHomogeneity = [](const CustomOp*) { return 1; };
  op.GetStartVersion = [](const CustomOp*) { return 1; };
  op.GetEndVersion = [](const CustomOp*) { return 2147483647; };
  return op;
}

// GroupQueryAttentionF16KV (above): inputs 0-2 and 7-8 float, 3-4 fp16, 5-6 int32; key, value, the past and the
// caches optional; outputs float, then the fp16 present key and value
ort::CustomOp make_attention_op() {
  using namespace ort;
  CustomOp op = make_op(true);
  op.CreateKernel = [](const CustomOp*, const Fn*, const void* info) -> void* {
    auto* kernel = new Attention();
    auto int_of = [&](const char* name, int64_t* value) {
      if (void* status = get<void* (*)(const void*, const char*, int64_t*)>(kKernelInfoGetAttributeInt64)(info, name, value))
        get<void (*)(void*)>(kReleaseStatus)(status);  // absent: the default stays
    };
    int_of("num_heads", &kernel->heads);
    int_of("kv_num_heads", &kernel->kv_heads);
    int_of("do_rotary", &kernel->rotary);
    int_of("rotary_interleaved", &kernel->interleaved);
    if (void* status = get<void* (*)(const void*, const char*, float*)>(kKernelInfoGetAttributeFloat)(info, "scale",
                                                                                                     &kernel->scale))
      get<void (*)(void*)>(kReleaseStatus)(status);
    return kernel;
  };
  op.GetName = [](const CustomOp*) { return "GroupQueryAttentionF16KV"; };
  op.GetInputType = [](const CustomOp*, size_t i) {
    return i == 5 || i == 6 ? (int)kInt32 : i == 3 || i == 4 ? (int)kFloat16 : (int)kFloat;
  };
  op.GetOutputType = [](const CustomOp*, size_t i) { return i == 0 ? (int)kFloat : (int)kFloat16; };
  op.GetInputTypeCount = [](const CustomOp*) -> size_t { return 9; };
  op.GetOutputTypeCount = [](const CustomOp*) -> size_t { return 3; };
  op.KernelCompute = [](void* kernel, void* context) { attention((Attention*)kernel, context); };
  op.KernelDestroy = [](void* kernel) { delete (Attention*)kernel; };
  op.GetInputCharacteristic = [](const CustomOp*, size_t i) { return i == 0 || i == 5 || i == 6 ? 0 : 1; };
  return op;
}

ort::CustomOp matmul_op = make_op(true), gather_op = make_op(false), attention_op = make_attention_op();

}  // namespace

extern "C" __attribute__((visibility("default"))) void* RegisterCustomOps(void* options, const ort::ApiBase* base) {
  using namespace ort;
  api = base->GetApi(kApiVersion);
  if (!api) {  // an ONNX Runtime older than 1.16: only its first table is sure to be there, to say why
    api = base->GetApi(1);
    return get<void* (*)(int, const char*)>(kCreateStatus)(
        1 /* ORT_FAIL */, "slmops GGUF kernel: needs ONNX Runtime 1.16 or later (KernelContext_ParallelFor); upgrade "
                          "onnxruntime, or rebuild the model on this machine for the portable MatMulNBits graph");
  }
  choose_code();
  void* domain = nullptr;
  if (void* status = get<void* (*)(const char*, void**)>(kCreateCustomOpDomain)("ai.slmops", &domain)) return status;
  for (const CustomOp* op : {&matmul_op, &gather_op, &attention_op})
    if (void* status = get<void* (*)(void*, const CustomOp*)>(kCustomOpDomainAdd)(domain, op)) return status;
  return get<void* (*)(void*, void*)>(kAddCustomOpDomain)(options, domain);
}

// For tests, without ONNX Runtime: which kernels this CPU runs ("avx2", "neon", "neon-dotprod" or "portable"), and one
// product y [m, groups * 8] = x [m, k] @ W^T on this thread (SlmopsMatMulGGML; portable != 0: the portable kernels).
extern "C" __attribute__((visibility("default"))) const char* SlmopsKernelCode() {
  choose_code();
  return kCodeNames[code];
}

extern "C" __attribute__((visibility("default"))) void SlmopsMatMulGGML(int64_t type, const uint8_t* w, int64_t groups,
                                                                      int64_t k, const float* x, int64_t m,
                                                                      const int64_t* channels, int64_t count,
                                                                      const uint8_t* codes, float* y, int portable) {
  choose_code();
  const Channels c{channels, (int)count};
  matmul(type, w, (int)groups, (int)k, x, m, c, codes, y, portable ? kPortable : code, [](int64_t total, const auto& job) {
    for (int64_t i = 0; i < total; ++i) job(i);
  });
}

// One query row of GroupQueryAttentionF16KV as the op computes it: q [h] and the keys k [n, h] rotated at positions
// n - 1 and 0..n-1 of the cos/sin caches (dims 0: no rotary), the keys and values v [n, h] held in fp16, then
// out [h] = softmax(scale * q k^T) v (SlmopsAttentionRow; portable != 0: the portable kernels).
extern "C" __attribute__((visibility("default"))) void SlmopsAttentionRow(const float* q, const float* k, const float* v,
                                                                        int64_t h, int64_t n, const float* cos,
                                                                        const float* sin, int64_t dims, int interleaved,
                                                                        float scale, float* out, int portable) {
  choose_code();
  const Code use = portable ? kPortable : code;
  std::vector<uint16_t> k16(n * h), v16(n * h);
  std::vector<float> rotated(h), scores((n + 7) / 8 * 8);
  for (int64_t i = 0; i < n; ++i) {
    const float* row = k + i * h;
    if (dims) {
      rotate(row, cos + i * (dims / 2), sin + i * (dims / 2), (int)dims, interleaved, (int)h, rotated.data());
      row = rotated.data();
    }
    halves(row, (int)h, k16.data() + i * h, use);
    halves(v + i * h, (int)h, v16.data() + i * h, use);
  }
  if (dims) {
    rotate(q, cos + (n - 1) * (dims / 2), sin + (n - 1) * (dims / 2), (int)dims, interleaved, (int)h, rotated.data());
    q = rotated.data();
  }
  attend(q, k16.data(), v16.data(), (int)h, (int)n, scale, scores.data(), out, use);
}
