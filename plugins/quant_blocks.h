/* The block dot products that dualbrain's quantized CPU kernels share (Int4MoEDispatch and
 * Int8MoEDispatch in moe_dispatch/cpu.c, Int4MatMul in int4_matmul/cpu.c), on weights with eight rows
 * interleaved in blocks of 32 and the mid zero point (8 / 128): the layouts of
 * moe_dispatch.reference.interleave_int4_rows and interleave_int8_rows.
 *
 * Why interleaved: one row at a time, a 4-bit row is bound by the work per block (scale, convert, FMA),
 * not by its bytes. With each 32-bit lane one row, a block's scale, convert and FMA serve eight rows
 * (tests/benchmarks/int4_row_layouts.c: 53 against 19 GB/s a core). The activations are int8 per block
 * of 32, as in ONNX Runtime's QMoE / MatMulNBits at accuracy level 4 and llama.cpp's Q4_0 x Q8_0.
 */
#ifndef DUALBRAIN_QUANT_BLOCKS_H
#define DUALBRAIN_QUANT_BLOCKS_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "vector_math.h"  /* abs_max; immintrin.h where AVX-512 is */

#define INT4_BLOCK 32
#define DOT_MAX_GROUPS 2   /* groups of eight rows a groups_dot_tokens call takes */
#define DOT_MAX_TOKENS 8   /* tokens a call takes */
#define DOT_OUT_FLOATS (8 * DOT_MAX_GROUPS * DOT_MAX_TOKENS)  /* its output, at most */

/* A layout's scales (moe_dispatch.reference.interleave_scales): float16 where the export's are (it stores one per
 * 32 weights, as llama.cpp's Q4_0 and Q8_0 do), else float32. Either way each is widened to float32 exactly, so
 * the products are the same; float16 ones make a 4-bit layout a tenth smaller (144 bytes a block of eight rows
 * against 160), which a batch-8 decode step, reading its experts from memory, reads a tenth less of. */
typedef struct {
  const void *at;
  int half;   /* float16 (else float32) */
} Scales;

static inline Scales scales_from(Scales s, int64_t i) {  /* s from its i-th scale on */
  s.at = (const char *)s.at + i * (s.half ? 2 : 4);
  return s;
}

/* a float16's bits -> float32, exactly (subnormals, infinities and NaNs included), in plain C */
static inline float float16_value(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu, bits;
  if (exponent == 0x1F) bits = sign | 0x7F800000u | mantissa << 13;
  else if (exponent) bits = sign | (exponent + 112) << 23 | mantissa << 13;   /* rebias 15 -> 127 */
  else {
    float f = (float)mantissa * 0x1p-24f;                                       /* zero or subnormal */
    memcpy(&bits, &f, 4);
    bits |= sign;
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

static inline float scale_value(Scales s, int64_t i) {
  return s.half ? float16_value(((const uint16_t *)s.at)[i]) : ((const float *)s.at)[i];
}

/* x [m, k] -> int8 per block of 32 (max |x| / 127), the scales and -zero_point x the sums: what each block's
 * integer dot product starts from, taking off the weights' mid zero point's share (8 for 4-bit weights, 128 for
 * 8-bit). Why negated: groups_dot_tokens starts its sums there by a broadcast from memory, which costs none of
 * the two vector ports that its eight-token loop is bound by (an integer subtraction a token and block did).
 *
 * Vectorised where AVX-512 is, to the same bits as the plain loop (the same abs_max, multiply and rounding to
 * nearest even): it runs on the calling thread alone while the other threads wait, and as scalar code it took
 * ~37 us for eight tokens of 1024, about 2 ms of a batch-8 int4 decode step of the mid-size MoE over its ~25
 * linears and 12 MoE layers (tests/benchmarks/RESULTS.md, eighteenth pass). */
static inline void int8_blocks(const float *x, int64_t m, int64_t k, int32_t zero_point, int8_t *q, float *s, int32_t *c) {
  for (int64_t b = 0; b < m * k / INT4_BLOCK; b++) {
    const float *r = x + b * INT4_BLOCK;
    float mx = abs_max(r, INT4_BLOCK), sc = mx > 0.0f ? mx / 127.0f : 1.0f, inv = 1.0f / sc;
#if defined(__AVX512F__)
    __m512 vi = _mm512_set1_ps(inv);
    __m128i q0 = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(r), vi)));
    __m128i q1 = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(r + 16), vi)));
    _mm_storeu_si128((__m128i *)(q + b * INT4_BLOCK), q0);
    _mm_storeu_si128((__m128i *)(q + b * INT4_BLOCK + 16), q1);
    int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_cvtepi8_epi32(q0), _mm512_cvtepi8_epi32(q1)));
#else
    int32_t sum = 0;
    for (int i = 0; i < INT4_BLOCK; i++) sum += q[b * INT4_BLOCK + i] = (int8_t)lrintf(r[i] * inv);
#endif
    s[b] = sc, c[b] = -zero_point * sum;
  }
}

/* Weight j (0..31) of row r in block b of a group, as stored (zero point included): 4-bit, byte 32c + 4r + i
 * of the block's 128 holds values 8c + i (low nibble) and 8c + 4 + i (high); 8-bit, byte 32c + 4r + i of
 * its 256 holds value 4c + i. */
static inline int32_t stored_weight(int bits, const uint8_t *w, int64_t b, int r, int j) {
  if (bits == 8) return w[256 * b + 32 * (j / 4) + 4 * r + j % 4];
  uint8_t v = w[128 * b + 32 * (j / 8) + 4 * r + j % 4];
  return j % 8 < 4 ? v & 0x0F : v >> 4;
}

/* out[8 G t + r] = row r (0 .. 8 G - 1) of G consecutive groups of eight (G 1 or 2; group 1's blocks follow group
 * 0's, as in every layout that calls this) . token t (t < count, count 1..8; token t's values at x + t k, its
 * scales and zero-point shares at xs / xc + t k / 32, as int8_blocks makes them), over `blocks` blocks of the
 * groups' `bits`-bit weights w (32 x bits bytes a block) and scales s8 (8 a block). Always inlined with constant
 * `bits`, `groups` and `count`: a block's weights are loaded (and unpacked) once for all `count` tokens, which is
 * what makes batches and prefill compute-bound rather than unpack-bound.
 *
 * Two groups fill a 512-bit register (one group its low half), so each activation broadcast and each
 * dot-product instruction serves sixteen rows, and eight tokens a pass unpack each block once for a batch of
 * eight: on one core the LM head's weights (32000 x 1024) dotted with eight tokens ran 1.3-1.9x faster than
 * with one group and four tokens a pass, and one token's, in cache, 45 GB/s against 35; from memory one
 * token's ran as fast as before (tests/benchmarks/RESULTS.md, seventeenth pass). Each lane's arithmetic is the
 * same whatever G and count (one integer sum a block, one float sum a token, in block order), so a token's
 * result does not depend on the tokens or rows computed beside it. */
static inline __attribute__((always_inline)) void groups_dot_tokens(int bits, int groups, const uint8_t *w,
                                                                    Scales s8, const int8_t *x, const float *xs,
                                                                    const int32_t *xc, int64_t k, int64_t blocks,
                                                                    int count, float *out) {
  const int64_t group_w = 32 * bits * blocks, group_s = 8 * blocks;
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  /* The next groups' weights and scales (they follow these in every layout that calls this) are asked for
   * while this call works, block b of theirs with block b of ours: from memory, one core streamed the loop at
   * 11.0 GB/s without asking and 15.0 asking for all of them at the call's start (Intel, AVX-512 VNNI;
   * tests/benchmarks/RESULTS.md, fifteenth pass), and spread out so, 13.4-15.5 GB/s at eight tokens against
   * 8.3-9.4 all at the start, whose ~160 prefetches waited on the core's few line-fill buffers and held up the
   * call's own loads behind them (eighteenth pass). A prefetch never faults, so the last groups' reaching past
   * the end is harmless. */
  const int scale_bytes = s8.half ? 2 : 4;
  const char *next_w = (const char *)(w + groups * group_w), *next_s = (const char *)s8.at + groups * group_s * scale_bytes;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  /* 32 bytes of group 0 at a (+ group 1's at the same offset in the high half) */
#define LOAD_ROWS(a) (groups == 2 ? _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(a))), \
                                                       _mm256_loadu_si256((const __m256i *)((a) + group_w)), 1)        \
                                  : _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)(a))))
  __m512 acc[DOT_MAX_TOKENS];
  for (int t = 0; t < count; t++) acc[t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; b++) {
    const uint8_t *wb = w + 32 * bits * b;
    for (int g = 0; g < groups; g++) {
      for (int o = 0; o < 32 * bits; o += 64) _mm_prefetch(next_w + g * group_w + 32 * bits * b + o, _MM_HINT_T0);
      _mm_prefetch(next_s + scale_bytes * (g * group_s + 8 * b), _MM_HINT_T0);
    }
    __m512i sum[DOT_MAX_TOKENS];  /* from xc, without the zero point's share (int8_blocks) */
    for (int t = 0; t < count; t++) sum[t] = _mm512_set1_epi32(xc[t * (k / INT4_BLOCK) + b]);
    for (int c = 0; c < 4; c++) {
      /* two sets of four values a lane (row): where they are, and where their activations start */
      __m512i va, vb;
      int xa, xb;
      if (bits == 4) {  /* one load: values 8c..8c+3 in the low nibbles, 8c+4..8c+7 in the high */
        __m512i v = LOAD_ROWS(wb + 32 * c);
        va = _mm512_and_si512(v, low4), vb = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        xa = 8 * c, xb = 8 * c + 4;
      } else {          /* two loads: values 4c..4c+3 and 4c+16..4c+19 */
        va = LOAD_ROWS(wb + 32 * c), vb = LOAD_ROWS(wb + 32 * (c + 4));
        xa = 4 * c, xb = 4 * c + 16;
      }
      for (int t = 0; t < count; t++) {
        const int8_t *xt = x + t * k + INT4_BLOCK * b;
        int32_t x0, x1;
        memcpy(&x0, xt + xa, 4), memcpy(&x1, xt + xb, 4);
        sum[t] = _mm512_dpbusd_epi32(sum[t], va, _mm512_set1_epi32(x0));
        sum[t] = _mm512_dpbusd_epi32(sum[t], vb, _mm512_set1_epi32(x1));
      }
    }
#undef LOAD_ROWS
    __m512 sc;  /* the block's scales: group 0's in the low half, group 1's in the high */
    if (s8.half) {
      const uint16_t *h = (const uint16_t *)s8.at + 8 * b;
      __m128i h0 = _mm_loadu_si128((const __m128i *)h);
      sc = _mm512_cvtph_ps(groups == 2 ? _mm256_inserti128_si256(_mm256_castsi128_si256(h0),
                                                                 _mm_loadu_si128((const __m128i *)(h + group_s)), 1)
                                       : _mm256_zextsi128_si256(h0));
    } else {
      const float *f = (const float *)s8.at + 8 * b;
      sc = groups == 2 ? _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(f)), _mm256_loadu_ps(f + group_s), 1)
                       : _mm512_castps256_ps512(_mm256_loadu_ps(f));
    }
    for (int t = 0; t < count; t++) {
      int64_t tb = t * (k / INT4_BLOCK) + b;
      /* one FMA, written out: left to the compiler, whether the multiply and add fused depended on how many
       * tokens were inlined, and the results of one token's dot then differed in the last bits by count */
      __m512 scale = _mm512_mul_ps(sc, _mm512_set1_ps(xs[tb]));
      __m512 f = _mm512_cvtepi32_ps(sum[t]);
      acc[t] = _mm512_fmadd_ps(scale, f, acc[t]);
    }
  }
  for (int t = 0; t < count; t++) {
    if (groups == 2) _mm512_storeu_ps(out + 16 * t, acc[t]);
    else _mm256_storeu_ps(out + 8 * t, _mm512_castps512_ps256(acc[t]));
  }
#else
  for (int t = 0; t < count; t++) {
    const int8_t *xt = x + t * k;
    float *o = out + 8 * groups * t;
    for (int r = 0; r < 8 * groups; r++) o[r] = 0.0f;
    for (int64_t b = 0; b < blocks; b++) {
      int64_t tb = t * (k / INT4_BLOCK) + b;
      for (int r = 0; r < 8 * groups; r++) {
        const uint8_t *wg = w + r / 8 * group_w;
        int32_t sum = xc[tb];
        for (int j = 0; j < INT4_BLOCK; j++) sum += stored_weight(bits, wg, b, r % 8, j) * xt[INT4_BLOCK * b + j];
        o[r] += scale_value(s8, r / 8 * group_s + 8 * b + r % 8) * xs[tb] * (float)sum;
      }
    }
  }
#endif
}

/* The groups (two, or one at an odd end) and tokens (up to eight) of a call starting at group g and token t,
 * where the caller's ranges end at g1 and t1 */
static inline int dot_groups(int64_t g, int64_t g1) { return g + 1 < g1 ? DOT_MAX_GROUPS : 1; }
static inline int dot_tokens(int64_t t, int64_t t1) { return t1 - t < DOT_MAX_TOKENS ? (int)(t1 - t) : DOT_MAX_TOKENS; }

/* groups_dot_tokens with `bits` (4 or 8), `groups` (1 or 2) and `count` (1..8) known only at run time: counts
 * 1-4 and 8 inlined once for each bits and groups, 5-7 as four and the rest. Tokens t at x + t k (an expert's
 * tokens side by side, in the MoE kernels); out as groups_dot_tokens'. */
static inline void groups_dot_some(int bits, int groups, const uint8_t *w, Scales s8, const int8_t *x,
                                   const float *xs, const int32_t *xc, int64_t k, int count, float *out) {
  int64_t blocks = k / INT4_BLOCK;
  if (count > 4 && count < 8) {
    groups_dot_some(bits, groups, w, s8, x, xs, xc, k, 4, out);
    groups_dot_some(bits, groups, w, s8, x + 4 * k, xs + 4 * blocks, xc + 4 * blocks, k, count - 4,
                    out + 32 * groups);
    return;
  }
#define DOT(B, G, C) groups_dot_tokens(B, G, w, s8, x, xs, xc, k, blocks, C, out)
#define COUNTS(B, G)                                                                                 \
  switch (count) {                                                                                   \
    case 8: DOT(B, G, 8); break;                                                                     \
    case 4: DOT(B, G, 4); break;                                                                     \
    case 3: DOT(B, G, 3); break;                                                                     \
    case 2: DOT(B, G, 2); break;                                                                     \
    default: DOT(B, G, 1); break;                                                                    \
  }
  if (bits == 8) {
    if (groups == 2) COUNTS(8, 2) else COUNTS(8, 1)
  } else {
    if (groups == 2) COUNTS(4, 2) else COUNTS(4, 1)
  }
#undef COUNTS
#undef DOT
}

#endif
