/* dualbrain.cpu::Int8MatMul: the int8 linears of `export --quant int8` with int16 activations.
 *
 * Why: ONNX Runtime's MatMulNBits quantizes the activations to int8 (accuracy level 4); its float
 * path for 8-bit weights (level 1) took 20x longer per decode step. int8 activations cost the trained
 * pair's large model 1.2 % of top-1 agreement with fp32; the same weights with float activations
 * agree on all 256 positions, and these int16 ones on 255 (tests/benchmarks/RESULTS.md). int16 x int8
 * products go 16 to an instruction (vpmaddwd), so a decode step stays memory-bound.
 *
 * The weight comes in com.microsoft.MatMulNBits' 8-bit layout, so that one copy serves both this
 * kernel (decode) and MatMulNBits (prefill): b [N, K / block, block] uint8 with the implicit zero
 * point 128, scales [N * K / block] float32.
 * Math, as reference.py: y[..., n] = sum_k x[..., k] * (b[n, k] - 128) * scales[n * K / block + k / block].
 * Registered by ../ort_kernels.c; built by dualbrain.runtime.backends.ort_kernels.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ort_kernel.h"
#include "vector_math.h"

#define ROWS_PER_ITEM 16

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef struct {
  const float *scale;
  const uint8_t *q;
  const int16_t *xq;    /* the activations as int16, one scale per token (xs) */
  const float *xs;
  float *y;
  int64_t m, k, n, block;
} Linear;

/* x -> int16 with one scale per token (max |x| / 32767): 2^-15 of the row's largest value, where
 * MatMulNBits' int8 activations keep 2^-7 of each block's. Vectorised where AVX-512 is, to the plain loop's
 * bits (the same multiply and rounding to nearest even, the same abs_max): it
 * runs on the calling thread alone, ~4 us a token of 1024 as scalar code (quant_blocks.h's int8_blocks did the
 * same; tests/benchmarks/RESULTS.md, eighteenth pass). */
static void quantize_tokens(const float *x, int64_t m, int64_t k, int16_t *xq, float *xs) {
  for (int64_t t = 0; t < m; t++) {
    const float *r = x + t * k;
    float mx = abs_max(r, k), s = mx > 0.0f ? mx / 32767.0f : 1.0f, inv = 1.0f / s;
    int64_t i = 0;
#if defined(__AVX512F__)
    for (__m512 vi = _mm512_set1_ps(inv); i + 16 <= k; i += 16)
      _mm256_storeu_si256((__m256i *)(xq + t * k + i),
                          _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(r + i), vi))));
#endif
    for (; i < k; i++) xq[t * k + i] = (int16_t)lrintf(r[i] * inv);
    xs[t] = s;
  }
}

/* How many rows ahead of the one being read the loop asks for weights and scales, a line with each line it
 * reads (spread through the work, as quant_blocks.h does), in a row's first pass only (tokens t0 = 0 on): the
 * int4-experts export decoded 1.42x faster at batch 1 than without it, batch 8 the same; asked for in every
 * pass, batch 8 ran 0.92-0.95x (tests/benchmarks/RESULTS.md, eighteenth pass). */
#define PREFETCH_ROWS 4

/* y[t, n] for tokens t0 .. t0+count-1 (count 1..ROW_TOKENS): per block, the int32 sums of (b - 128) * xq
 * (exact), scaled by the block's scale in float; `block` is a multiple of 16. Always inlined with a
 * constant `count`, so that the per-token sums stay in registers. With AVX-512 VNNI each product pair is
 * added to its sum by one vpdpwssd (the same integers as vpmaddwd and an add), and a row's weights are
 * widened once for eight tokens (four before). With the rows' prefetch and the activations' vector rounding,
 * the int4-experts and int8/32 exports decoded 1.23-1.24x faster at batch 1 and 1.05-1.06x at batch 8, to the
 * same bits (tests/benchmarks/RESULTS.md, eighteenth pass). Each token's arithmetic is the same whatever the
 * count, so its result does not depend on the tokens beside it. */
#define ROW_TOKENS 8
static inline __attribute__((always_inline)) void row_tokens(const Linear *p, int64_t n, int64_t t0, int count) {
  const uint8_t *q = p->q + n * p->k;
  const float *s = p->scale + n * (p->k / p->block);
  float out[ROW_TOKENS];
#ifdef __AVX2__
  const __m128i flip = _mm_set1_epi8((char)0x80);
  __m256 acc[ROW_TOKENS];
  for (int t = 0; t < count; t++) acc[t] = _mm256_setzero_ps();
  for (int64_t b0 = 0, j = 0; b0 < p->k; b0 += p->block, j++) {
    __m256i sum[ROW_TOKENS];
    for (int t = 0; t < count; t++) sum[t] = _mm256_setzero_si256();
    if (t0 == 0) {
      for (int64_t o = 0; o < p->block; o += 64) _mm_prefetch((const char *)(q + PREFETCH_ROWS * p->k + b0 + o), _MM_HINT_T0);
      if (j % 16 == 0) _mm_prefetch((const char *)(s + PREFETCH_ROWS * (p->k / p->block) + j), _MM_HINT_T0);
    }
    for (int64_t k = b0; k < b0 + p->block; k += 16) {
      __m256i w = _mm256_cvtepi8_epi16(_mm_xor_si128(_mm_loadu_si128((const __m128i *)(q + k)), flip));
      for (int t = 0; t < count; t++) {
        __m256i x = _mm256_loadu_si256((const __m256i *)(p->xq + (t0 + t) * p->k + k));
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
        sum[t] = _mm256_dpwssd_epi32(sum[t], w, x);
#else
        sum[t] = _mm256_add_epi32(sum[t], _mm256_madd_epi16(w, x));
#endif
      }
    }
    __m256 sb = _mm256_set1_ps(s[j]);
    for (int t = 0; t < count; t++) acc[t] = _mm256_fmadd_ps(sb, _mm256_cvtepi32_ps(sum[t]), acc[t]);
  }
  for (int t = 0; t < count; t++) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[t]), _mm256_extractf128_ps(acc[t], 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    out[t] = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
  }
#else
  for (int t = 0; t < count; t++) {
    const int16_t *x = p->xq + (t0 + t) * p->k;
    float acc = 0.0f;
    for (int64_t b0 = 0, j = 0; b0 < p->k; b0 += p->block, j++) {
      int32_t sum = 0;
      for (int64_t k = b0; k < b0 + p->block; k++) sum += ((int32_t)q[k] - 128) * x[k];
      acc += s[j] * (float)sum;
    }
    out[t] = acc;
  }
#endif
  for (int t = 0; t < count; t++) p->y[(t0 + t) * p->n + n] = p->xs[t0 + t] * out[t];
}

static void rows(void *user, size_t item) {
  const Linear *p = user;
  int64_t n0 = (int64_t)item * ROWS_PER_ITEM, n1 = n0 + ROWS_PER_ITEM < p->n ? n0 + ROWS_PER_ITEM : p->n;
  for (int64_t n = n0; n < n1; n++) {
    int64_t t = 0;
    for (; t + ROW_TOKENS <= p->m; t += ROW_TOKENS) row_tokens(p, n, t, ROW_TOKENS);
    if (p->m - t >= 4) row_tokens(p, n, t, 4), t += 4;  /* 5-7 left: four, then the rest */
    switch (p->m - t) {
      case 3: row_tokens(p, n, t, 3); break;
      case 2: row_tokens(p, n, t, 2); break;
      case 1: row_tokens(p, n, t, 1); break;
      default: break;
    }
  }
}

typedef struct {
  int64_t block;
} Int8Kernel;

static OrtStatus *compute(void *kernel, OrtKernelContext *ctx) {
  const Int8Kernel *kn = kernel;
  int64_t xd[8], bd[3], sd[1];
  size_t rank;
  Linear p = {0};
  const float *x;
  OrtStatus *st;
  if ((st = dualbrain_input_of(ctx, 0, ORT_TENSOR_FLOAT, 8, &rank, (const void **)&x, xd)) ||
      (st = dualbrain_input_of(ctx, 1, ORT_TENSOR_UINT8, 3, NULL, (const void **)&p.q, bd)) ||
      (st = dualbrain_input(ctx, 2, 1, &p.scale, sd)))
    return st;
  p.block = bd[2], p.n = bd[0], p.k = bd[1] * bd[2];
  if (rank < 1 || xd[rank - 1] != p.k || p.block != kn->block || p.block < 16 || p.block % 16 || sd[0] != p.n * bd[1])
    return dualbrain_error("Int8MatMul (cpu): shapes must be x [..., K], b [N, K / block, block], scales [N * K / block], "
                           "block a multiple of 16");
  if ((st = dualbrain_linear_output(ctx, xd, rank, p.n, &p.m, &p.y))) return st;
  if (p.m == 0 || p.n == 0) return NULL;
  void *mem = malloc((sizeof(int16_t) * (size_t)p.k + sizeof(float)) * (size_t)p.m);
  if (!mem) return dualbrain_error("Int8MatMul (cpu): out of memory");
  p.xs = mem, p.xq = (int16_t *)((float *)mem + p.m);
  quantize_tokens(x, p.m, p.k, (int16_t *)p.xq, (float *)p.xs);
  st = dualbrain_parallel(ctx, rows, (size_t)((p.n + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM), &p);
  free(mem);
  return st;
}

static OrtStatus *create(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **out) {
  (void)op, (void)api;
  Int8Kernel *k = malloc(sizeof *k);
  if (!k) return dualbrain_error("Int8MatMul (cpu): out of memory");
  k->block = dualbrain_attr_int(info, "block_size", -1);
  *out = k;
  return NULL;
}

static int input_type(const OrtCustomOp *op, size_t index) { (void)op; return index == 1 ? ORT_TENSOR_UINT8 : ORT_TENSOR_FLOAT; }

DUALBRAIN_CPU_OP(dualbrain_int8_matmul_op, "Int8MatMul", 3, 1, input_type, create, compute, free, NULL);
