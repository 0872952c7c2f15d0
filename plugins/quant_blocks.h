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

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#include <immintrin.h>
#endif

#define INT4_BLOCK 32

/* x [m, k] -> int8 per block of 32 (max |x| / 127), the scales and zero_point x the sums (the weights' mid
 * zero point's share of each block's dot product: 8 for 4-bit weights, 128 for 8-bit) */
static inline void int8_blocks(const float *x, int64_t m, int64_t k, int32_t zero_point, int8_t *q, float *s, int32_t *c) {
  for (int64_t b = 0; b < m * k / INT4_BLOCK; b++) {
    const float *r = x + b * INT4_BLOCK;
    float mx = 0.0f;
    for (int i = 0; i < INT4_BLOCK; i++) mx = fabsf(r[i]) > mx ? fabsf(r[i]) : mx;
    float sc = mx > 0.0f ? mx / 127.0f : 1.0f, inv = 1.0f / sc;
    int32_t sum = 0;
    for (int i = 0; i < INT4_BLOCK; i++) sum += q[b * INT4_BLOCK + i] = (int8_t)lrintf(r[i] * inv);
    s[b] = sc, c[b] = zero_point * sum;
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

/* out[8 t + r] = row r of one group of eight . token t (t < count, count 1..4; token t's values at x + t k,
 * its scales and sums at xs / xc + t k / 32), over `blocks` blocks of the group's `bits`-bit weights w
 * (32 x bits bytes a block) and scales s8 (8 a block). Always inlined with constant `bits` and `count`: a
 * block's weights are loaded (and unpacked) once for all `count` tokens, which is what makes prefill
 * compute-bound rather than unpack-bound. */
static inline __attribute__((always_inline)) void group_dot_tokens(int bits, const uint8_t *w, const float *s8,
                                                                   const int8_t *x, const float *xs,
                                                                   const int32_t *xc, int64_t k, int64_t blocks,
                                                                   int count, float *out) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  /* The next group's weights and scales (they follow this group's in every layout that calls this), asked for
   * before this group's work: from memory, one core streamed the loop at 11.0 GB/s without and 15.0 with
   * (Intel, AVX-512 VNNI; tests/benchmarks/RESULTS.md, fifteenth pass). A prefetch never faults, so the last
   * group's reaching past the end is harmless. */
  const char *next_w = (const char *)(w + 32 * bits * blocks), *next_s = (const char *)(s8 + 8 * blocks);
  for (int64_t o = 0; o < 32 * bits * blocks; o += 64) _mm_prefetch(next_w + o, _MM_HINT_T0);
  for (int64_t o = 0; o < 32 * blocks; o += 64) _mm_prefetch(next_s + o, _MM_HINT_T0);
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  __m256 even[4], odd[4];  /* two sums a token: no add waits on the last */
  for (int t = 0; t < count; t++) even[t] = odd[t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; b++) {
    const uint8_t *wb = w + 32 * bits * b;
    __m256i lo[4], hi[4];
    for (int t = 0; t < count; t++) lo[t] = hi[t] = _mm256_setzero_si256();
    for (int c = 0; c < 4; c++) {
      /* two sets of four values a lane (row): where they are, and where their activations start */
      __m256i va, vb;
      int xa, xb;
      if (bits == 4) {  /* one load: values 8c..8c+3 in the low nibbles, 8c+4..8c+7 in the high */
        __m256i v = _mm256_loadu_si256((const __m256i *)(wb + 32 * c));
        va = _mm256_and_si256(v, low4), vb = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
        xa = 8 * c, xb = 8 * c + 4;
      } else {          /* two loads: values 4c..4c+3 and 4c+16..4c+19 */
        va = _mm256_loadu_si256((const __m256i *)(wb + 32 * c));
        vb = _mm256_loadu_si256((const __m256i *)(wb + 32 * (c + 4)));
        xa = 4 * c, xb = 4 * c + 16;
      }
      for (int t = 0; t < count; t++) {
        const int8_t *xt = x + t * k + INT4_BLOCK * b;
        int32_t x0, x1;
        memcpy(&x0, xt + xa, 4), memcpy(&x1, xt + xb, 4);
        lo[t] = _mm256_dpbusd_epi32(lo[t], va, _mm256_set1_epi32(x0));
        hi[t] = _mm256_dpbusd_epi32(hi[t], vb, _mm256_set1_epi32(x1));
      }
    }
    __m256 sc = _mm256_loadu_ps(s8 + 8 * b);
    for (int t = 0; t < count; t++) {
      int64_t tb = t * (k / INT4_BLOCK) + b;
      __m256i sum = _mm256_sub_epi32(_mm256_add_epi32(lo[t], hi[t]), _mm256_set1_epi32(xc[tb]));
      /* one FMA, written out: left to the compiler, whether the multiply and add fused depended on how many
       * tokens were inlined, and the results of one token's dot then differed in the last bits by count */
      __m256 scale = _mm256_mul_ps(sc, _mm256_set1_ps(xs[tb])), f = _mm256_cvtepi32_ps(sum);
      if (b & 1) odd[t] = _mm256_fmadd_ps(scale, f, odd[t]);
      else even[t] = _mm256_fmadd_ps(scale, f, even[t]);
    }
  }
  for (int t = 0; t < count; t++) _mm256_storeu_ps(out + 8 * t, _mm256_add_ps(even[t], odd[t]));
#else
  for (int t = 0; t < count; t++) {
    const int8_t *xt = x + t * k;
    float *o = out + 8 * t;
    for (int r = 0; r < 8; r++) o[r] = 0.0f;
    for (int64_t b = 0; b < blocks; b++) {
      int64_t tb = t * (k / INT4_BLOCK) + b;
      for (int r = 0; r < 8; r++) {
        int32_t sum = 0;
        for (int j = 0; j < INT4_BLOCK; j++) sum += stored_weight(bits, w, b, r, j) * xt[INT4_BLOCK * b + j];
        o[r] += s8[8 * b + r] * xs[tb] * (float)(sum - xc[tb]);
      }
    }
  }
#endif
}

/* group_dot_tokens with `bits` (4 or 8) and `count` (1..4) known only at run time: each pair of constants
 * inlined once. Tokens t at x + t k (an expert's tokens side by side, in the MoE kernels). */
static inline void group_dot_some(int bits, const uint8_t *w, const float *s8, const int8_t *x, const float *xs,
                                  const int32_t *xc, int64_t k, int count, float *out) {
#define DOT(B, C) group_dot_tokens(B, w, s8, x, xs, xc, k, k / INT4_BLOCK, C, out)
  if (bits == 8) {
    if (count == 4) DOT(8, 4); else if (count == 3) DOT(8, 3); else if (count == 2) DOT(8, 2); else DOT(8, 1);
  } else {
    if (count == 4) DOT(4, 4); else if (count == 3) DOT(4, 3); else if (count == 2) DOT(4, 2); else DOT(4, 1);
  }
#undef DOT
}

#endif
