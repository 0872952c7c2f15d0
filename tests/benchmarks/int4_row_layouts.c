/* How fast one core dots 4-bit weight rows (blocks of 32, one float scale a block) with one token's
 * activations, in cache, for three ways of laying out the work. A decode step's int4 GEMVs are bound by
 * this work when it is slower than memory (~30 GB/s on the 2-core Zen 4 these notes were taken on).
 *
 *   int16 rows   one row at a time, int16 activations (vpmaddwd): the eighth pass's QuantMoEDispatch
 *   int8 rows    one row at a time, int8 activations per block (VNNI vpdpbusd): llama.cpp's Q4_0 x Q8_0
 *   int8 x8      eight rows interleaved, int8 activations (vpdpbusd): each i32 lane is one row, so the
 *                per-block scale, convert and FMA serve eight rows at once (llama.cpp's Q4_0x8 repack).
 *                This is the int4 kernels' own row loop (groups_dot_some, one group, from plugins/quant_blocks.h).
 *
 * Each variant reads the same bytes per row (K/2 of nibbles, K/32 float scales) from a few rows kept in
 * L1, so the figure is the compute rate, not the memory's. Needs AVX-512 VNNI with VL (Zen 4, Ice Lake+).
 *
 *   cc -O3 -std=gnu11 -march=native tests/benchmarks/int4_row_layouts.c -o /tmp/int4_rows -lm && /tmp/int4_rows
 */
#include "../../plugins/quant_blocks.h"

#include <immintrin.h>
#include <stdio.h>
#include <time.h>

#if !defined(__AVX512VNNI__) || !defined(__AVX512VL__)
#error "needs AVX-512 VNNI with VL (build with -march=native on such a CPU)"
#endif

enum { K = 1024, BLOCKS = K / 32, ROWS = 8, CALLS = 2000000 };

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

static float hsum256(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

/* row q (K/2 bytes, value 2j in the low nibble of byte j), int16 x with each 32 reordered evens|odds */
static float row_int16(const uint8_t *q, const float *s, const int16_t *x) {
  const __m256i low4 = _mm256_set1_epi16(0x0F), mid = _mm256_set1_epi16(8);
  __m256 even = _mm256_setzero_ps(), odd = _mm256_setzero_ps();
  for (int b = 0; b < BLOCKS; b++) {
    __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(q + 16 * b)));
    __m256i lo = _mm256_sub_epi16(_mm256_and_si256(w, low4), mid), hi = _mm256_sub_epi16(_mm256_srli_epi16(w, 4), mid);
    __m256i sum = _mm256_add_epi32(_mm256_madd_epi16(lo, _mm256_loadu_si256((const __m256i *)(x + 32 * b))),
                                   _mm256_madd_epi16(hi, _mm256_loadu_si256((const __m256i *)(x + 32 * b + 16))));
    __m256 f = _mm256_mul_ps(_mm256_set1_ps(s[b]), _mm256_cvtepi32_ps(sum));
    if (b & 1) odd = _mm256_add_ps(odd, f); else even = _mm256_add_ps(even, f);
  }
  return hsum256(_mm256_add_ps(even, odd));
}

/* row q as above; int8 x (evens|odds per 32), xs a scale per block, xc = 8 * sum(x) per block */
static float row_int8(const uint8_t *q, const float *s, const int8_t *x, const float *xs, const int32_t *xc) {
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  __m256 even = _mm256_setzero_ps(), odd = _mm256_setzero_ps();
  for (int b = 0; b < BLOCKS; b++) {
    __m128i raw = _mm_loadu_si128((const __m128i *)(q + 16 * b));
    __m256i w = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), m4);
    __m256i sum = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, _mm256_loadu_si256((const __m256i *)(x + 32 * b)));
    sum = _mm256_sub_epi32(sum, _mm256_setr_epi32(xc[b], 0, 0, 0, 0, 0, 0, 0));
    __m256 f = _mm256_mul_ps(_mm256_set1_ps(s[b] * xs[b]), _mm256_cvtepi32_ps(sum));
    if (b & 1) odd = _mm256_add_ps(odd, f); else even = _mm256_add_ps(even, f);
  }
  return hsum256(_mm256_add_ps(even, odd));
}

int main(void) {
  static uint8_t q[ROWS * K / 2];
  static float s[ROWS * BLOCKS], xs[BLOCKS];
  static int16_t x16[K];
  static int8_t x8[K];
  static int32_t xc[BLOCKS];
  srand(1);
  for (int i = 0; i < ROWS * K / 2; i++) q[i] = (uint8_t)rand();
  for (int i = 0; i < ROWS * BLOCKS; i++) s[i] = 1e-3f * (1 + i % 7);
  for (int i = 0; i < K; i++) x16[i] = (int16_t)(rand() % 20001 - 10000), x8[i] = (int8_t)(rand() % 255 - 127);
  for (int b = 0; b < BLOCKS; b++) xs[b] = 0.01f, xc[b] = 8 * 100;
  double bytes = (double)CALLS * (K / 2 + 4 * BLOCKS);   /* per row: nibbles and scales */
  volatile float sink = 0;
  printf("one core, K = %d, blocks of 32, in cache; GB/s of weights and scales per core\n", K);
  for (int rep = 0; rep < 3; rep++) {
    double t = now();
    for (int i = 0; i < CALLS; i++) sink += row_int16(q + (i % ROWS) * K / 2, s + (i % ROWS) * BLOCKS, x16);
    double a = now() - t;
    t = now();
    for (int i = 0; i < CALLS; i++) sink += row_int8(q + (i % ROWS) * K / 2, s + (i % ROWS) * BLOCKS, x8, xs, xc);
    double b = now() - t;
    float out[8];
    t = now();
    for (int i = 0; i < CALLS / 8; i++) groups_dot_some(4, 1, q, (Scales){s, 0}, x8, xs, xc, INT4_BLOCK * BLOCKS, 1, out), sink += out[i % 8];
    double c = now() - t;
    printf("int16 rows %5.1f   int8 rows %5.1f   int8 x8 %5.1f\n", bytes / a / 1e9, bytes / b / 1e9, bytes / c / 1e9);
  }
  return sink == 12345.0f;
}
