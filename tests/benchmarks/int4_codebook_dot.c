/* The int4 kernels' block dot (groups_dot_tokens, one group, plugins/quant_blocks.h) against the sixteenth
 * pass's form of it with each nibble mapped through a 16-value codebook first (llama.cpp's IQ4_NL values,
 * one vpshufb a register):
 * what a codebook for the experts (tests/benchmarks/int4_codebook.py) would cost the decode. One core,
 * one token, eight rows interleaved, K = 1024. The codebook is stored +128 so vpdpbusd reads it as
 * unsigned; the activations' zero-point term is then 128 x their sum instead of 8 x.
 *
 * Measured before the kernels' next-group prefetch (tests/benchmarks/RESULTS.md, fifteenth pass), which both
 * loops now have.
 *
 * First the codebook loop against a scalar reference (max relative error), then GB/s of weights and
 * scales for both loops: GROUPS groups of eight rows (8: in L1, the compute rate; 40000: 205 MB, from
 * memory), REPS passes. Needs AVX-512 VNNI with VL.
 *
 *   cc -O3 -std=gnu11 -march=native tests/benchmarks/int4_codebook_dot.c -o /tmp/cb_dot -lm
 *   /tmp/cb_dot 8 200000 && /tmp/cb_dot 40000 4
 */
#include "../../plugins/quant_blocks.h"
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
static const int8_t NL[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
/* the sixteenth pass's group_dot_tokens(4, ...) (one group; two integer and two float sums a token) with the
 * nibbles mapped through the codebook (stored +128, unsigned) */
static inline __attribute__((always_inline)) void group_dot_nl(const uint8_t *w, const float *s8, const int8_t *x,
    const float *xs, const int32_t *xc, int64_t k, int64_t blocks, int count, float *out) {
  /* as the kernel: the next group's bytes first, so the lookup is the only difference */
  const char *next_w = (const char *)(w + 128 * blocks), *next_s = (const char *)(s8 + 8 * blocks);
  for (int64_t o = 0; o < 128 * blocks; o += 64) _mm_prefetch(next_w + o, _MM_HINT_T0);
  for (int64_t o = 0; o < 32 * blocks; o += 64) _mm_prefetch(next_s + o, _MM_HINT_T0);
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  __m128i t16 = _mm_loadu_si128((const __m128i *)NL);
  const __m256i lut = _mm256_add_epi8(_mm256_broadcastsi128_si256(t16), _mm256_set1_epi8((char)128));
  __m256 even[4], odd[4];
  for (int t = 0; t < count; t++) even[t] = odd[t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; b++) {
    const uint8_t *wb = w + 128 * b;
    __m256i lo[4], hi[4];
    for (int t = 0; t < count; t++) lo[t] = hi[t] = _mm256_setzero_si256();
    for (int c = 0; c < 4; c++) {
      __m256i v = _mm256_loadu_si256((const __m256i *)(wb + 32 * c));
      __m256i va = _mm256_shuffle_epi8(lut, _mm256_and_si256(v, low4));
      __m256i vb = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), low4));
      for (int t = 0; t < count; t++) {
        const int8_t *xt = x + t * k + INT4_BLOCK * b; int32_t x0, x1;
        memcpy(&x0, xt + 8 * c, 4), memcpy(&x1, xt + 8 * c + 4, 4);
        lo[t] = _mm256_dpbusd_epi32(lo[t], va, _mm256_set1_epi32(x0));
        hi[t] = _mm256_dpbusd_epi32(hi[t], vb, _mm256_set1_epi32(x1));
      }
    }
    __m256 sc = _mm256_loadu_ps(s8 + 8 * b);
    for (int t = 0; t < count; t++) {
      int64_t tb = t * (k / INT4_BLOCK) + b;
      __m256i sum = _mm256_add_epi32(_mm256_add_epi32(lo[t], hi[t]), _mm256_set1_epi32(xc[tb]));
      __m256 scale = _mm256_mul_ps(sc, _mm256_set1_ps(xs[tb])), f = _mm256_cvtepi32_ps(sum);
      if (b & 1) odd[t] = _mm256_fmadd_ps(scale, f, odd[t]); else even[t] = _mm256_fmadd_ps(scale, f, even[t]);
    }
  }
  for (int t = 0; t < count; t++) _mm256_storeu_ps(out + 8 * t, _mm256_add_ps(even[t], odd[t]));
}
enum { K = 1024, BLOCKS = K / 32 };
int main(int argc, char **argv) {
  size_t groups = argc > 1 ? atol(argv[1]) : 8;   /* 8 rows a group, K 1024: 4 KB + 1 KB scales */
  int reps = argc > 2 ? atoi(argv[2]) : 1000;
  uint8_t *w = aligned_alloc(64, groups * BLOCKS * 128); float *s = aligned_alloc(64, groups * BLOCKS * 8 * 4);
  for (size_t i = 0; i < groups * BLOCKS * 128; i++) w[i] = rand();
  for (size_t i = 0; i < groups * BLOCKS * 8; i++) s[i] = 0.01f * (rand() % 100);
  float xf[K]; int8_t xq[K]; float xs[BLOCKS]; int32_t xc8[BLOCKS], xc128[BLOCKS];
  for (int i = 0; i < K; i++) xf[i] = (rand() % 2001 - 1000) / 1000.0f;
  int8_blocks(xf, 1, K, 8, xq, xs, xc8); int8_blocks(xf, 1, K, 128, xq, xs, xc128);
  /* check the NL dot against a scalar reference on group 0 */
  float o[8], ref[8] = {0};
  group_dot_nl(w, s, xq, xs, xc128, K, BLOCKS, 1, o);
  for (int b = 0; b < BLOCKS; b++) for (int r = 0; r < 8; r++) { int32_t sum = 0;
    for (int j = 0; j < 32; j++) sum += NL[stored_weight(4, w, b, r, j)] * xq[32 * b + j];
    ref[r] += s[8 * b + r] * xs[b] * sum; }
  double err = 0; for (int r = 0; r < 8; r++) err = fmax(err, fabs(o[r] - ref[r]) / (fabs(ref[r]) + 1e-3));
  printf("nl vs scalar: max rel err %.2e\n", err);
  double bytes = (double)groups * BLOCKS * (128 + 32) * reps;
  volatile float sink = 0;
  for (int round = 0; round < 3; round++) {
    double t0 = now();
    for (int r = 0; r < reps; r++) for (size_t g = 0; g < groups; g++) { groups_dot_tokens(4, 1, w + g * BLOCKS * 128, (Scales){s + g * BLOCKS * 8, 0}, xq, xs, xc8, K, BLOCKS, 1, o); sink += o[g & 7]; }
    double t1 = now();
    for (int r = 0; r < reps; r++) for (size_t g = 0; g < groups; g++) { group_dot_nl(w + g * BLOCKS * 128, s + g * BLOCKS * 8, xq, xs, xc128, K, BLOCKS, 1, o); sink += o[g & 7]; }
    double t2 = now();
    printf("groups %zu (%.1f MB): uniform %.1f GB/s  codebook %.1f GB/s\n", groups, groups * BLOCKS * 160 / 1e6, bytes / (t1 - t0) / 1e9, bytes / (t2 - t1) / 1e9);
  }
  return 0;
}
