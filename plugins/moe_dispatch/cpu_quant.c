/* dualbrain.cpu::QuantMoEDispatch: the int4 / int8 experts of `export --quant int4|int8` for decode.
 *
 * Why: ONNX Runtime's com.microsoft.QMoE read the mid-size MoE's int4 experts at 5-7 GB/s effective
 * (0.8 ms per layer for one token, 2.8 ms for eight; a GEMV streams ~20 GB/s on the same machine)
 * and quantizes the activations to int8. This kernel reads each chosen expert's rows once for every
 * token routed to it, as the float kernel (cpu.c) does, with the activations in int16 (one scale per
 * token, or per pair for the second matrix): int16 x int4/int8 products go 16 to an instruction
 * (vpmaddwd), exact in int32 within a block, and then scaled by the block's scale in float.
 *
 * The weights come in QMoE's layout, so one copy serves this kernel (decode) and QMoE (prefill):
 * fc1 [E, 2I, H * bits / 8] and fc2 [E, H, I * bits / 8] uint8 with the implicit zero point 8 / 128
 * (int4: two values per byte, the first in the low nibble), scales fc1 [E, 2I, H / block] and
 * fc2 [E, H, I / block] float32. Math, as reference.py's `quant_moe_dispatch`: the float MoEDispatch
 * of the dequantized experts (routing and swiglu as cpu.c).
 * Registered by ../ort_kernels.c; built by dualbrain.runtime.backends.ort_kernels.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ort_kernel.h"
#include "route.h"

#ifdef __AVX2__
#include <immintrin.h>
#endif

#define ACT_ROWS_PER_ITEM 32  /* gate/up row pairs of fc1 per parallel work item */
#define OUT_ROWS_PER_ITEM 128 /* rows of fc2 per parallel work item */
#define GROUP 32              /* int4: the values one 16-byte load holds */

typedef struct {
  const uint8_t *q;   /* rows of k values, k * bits / 8 bytes each */
  const float *scale; /* k / block per row */
  int64_t k;
} Matrix;

typedef struct {
  Routing r;
  Matrix fc1, fc2;   /* fc1.k = H (2I rows per expert), fc2.k = I (H rows per expert) */
  int64_t h, bits, block, act_chunks;
  int16_t *xq, *aq;  /* tokens [N, H] and pairs' activations [pairs, I] as int16 */
  float *xs, *as;    /* their scales */
  float *y;
} Plan;

/* v -> int16 with one scale (max |v| / 32767). int4 rows are unpacked as the low nibbles (even
 * positions) then the high ones (odd) of each 32-value group, so the int16 copy is stored in that
 * order: no shuffle of the weights. */
static void to_int16(const float *v, int64_t k, int bits, int16_t *out, float *scale) {
  float mx = 0.0f;
  for (int64_t i = 0; i < k; i++) mx = fabsf(v[i]) > mx ? fabsf(v[i]) : mx;
  float s = mx > 0.0f ? mx / 32767.0f : 1.0f, inv = 1.0f / s;
  for (int64_t i = 0; i < k; i++) {
    int64_t at = bits == 4 ? i / GROUP * GROUP + (i % 2) * (GROUP / 2) + i % GROUP / 2 : i;
    out[at] = (int16_t)lrintf(v[i] * inv);
  }
  *scale = s;
}

/* out[r * count + t] = row (row + r) of `m` . xs[t] (int16, in to_int16's order) for `rows` (1 or 2)
 * adjacent rows and `count` (1..2 with two rows, 1..4 with one) vectors, up to the vectors' scales.
 * Two rows share each vector load. Always inlined with constant `rows`, `count` and `bits`, so the
 * sums stay in registers. The prefetch runs 1 KB ahead: rows are read in short runs of one expert,
 * too short for the hardware prefetcher to start on its own. */
static inline __attribute__((always_inline)) void qdot(const Matrix *m, int64_t row, int rows, int bits,
                                                       int64_t block, const int16_t *const *xs, int count,
                                                       float *out) {
  const int64_t row_bytes = m->k * bits / 8, blocks = m->k / block;
  const uint8_t *q = m->q + row * row_bytes;
  const float *s = m->scale + row * blocks;
#ifdef __AVX2__
  __m256 acc[2][4];
  for (int r = 0; r < rows; r++)
    for (int t = 0; t < count; t++) acc[r][t] = _mm256_setzero_ps();
  const __m128i nib = _mm_set1_epi8(0x0F), flip = _mm_set1_epi8((char)0x80);
  const __m256i eight = _mm256_set1_epi16(8);
  for (int64_t b0 = 0, j = 0; b0 < m->k; b0 += block, j++) {
    __m256i sum[2][4];
    for (int r = 0; r < rows; r++)
      for (int t = 0; t < count; t++) sum[r][t] = _mm256_setzero_si256();
    if (bits == 4)
      for (int64_t g = b0; g < b0 + block; g += GROUP) {
        __m256i lo[2], hi[2];
        for (int r = 0; r < rows; r++) {
          const uint8_t *at = q + r * row_bytes + (g >> 1);
          __m128i raw = _mm_loadu_si128((const __m128i *)at);
          _mm_prefetch((const char *)at + 1024, _MM_HINT_T0);
          lo[r] = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm_and_si128(raw, nib)), eight);
          hi[r] = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), nib)), eight);
        }
        for (int t = 0; t < count; t++) {
          __m256i x0 = _mm256_loadu_si256((const __m256i *)(xs[t] + g)), x1 = _mm256_loadu_si256((const __m256i *)(xs[t] + g + 16));
          for (int r = 0; r < rows; r++)
            sum[r][t] = _mm256_add_epi32(sum[r][t], _mm256_add_epi32(_mm256_madd_epi16(lo[r], x0), _mm256_madd_epi16(hi[r], x1)));
        }
      }
    else
      for (int64_t i = b0; i < b0 + block; i += 16) {
        __m256i w[2];
        for (int r = 0; r < rows; r++) {
          const uint8_t *at = q + r * row_bytes + i;
          w[r] = _mm256_cvtepi8_epi16(_mm_xor_si128(_mm_loadu_si128((const __m128i *)at), flip));
          _mm_prefetch((const char *)at + 1024, _MM_HINT_T0);
        }
        for (int t = 0; t < count; t++) {
          __m256i x = _mm256_loadu_si256((const __m256i *)(xs[t] + i));
          for (int r = 0; r < rows; r++) sum[r][t] = _mm256_add_epi32(sum[r][t], _mm256_madd_epi16(w[r], x));
        }
      }
    for (int r = 0; r < rows; r++) {
      __m256 sb = _mm256_set1_ps(s[r * blocks + j]);
      for (int t = 0; t < count; t++) acc[r][t] = _mm256_fmadd_ps(sb, _mm256_cvtepi32_ps(sum[r][t]), acc[r][t]);
    }
  }
  for (int r = 0; r < rows; r++)
    for (int t = 0; t < count; t++) {
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[r][t]), _mm256_extractf128_ps(acc[r][t], 1));
      h = _mm_add_ps(h, _mm_movehl_ps(h, h));
      out[r * count + t] = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
    }
#else
  for (int r = 0; r < rows; r++)
    for (int t = 0; t < count; t++) {
      const uint8_t *qr = q + r * row_bytes;
      float acc = 0.0f;
      for (int64_t b0 = 0, j = 0; b0 < m->k; b0 += block, j++) {
        int32_t sum = 0;
        for (int64_t i = b0; i < b0 + block; i++) {
          int32_t w = bits == 4 ? ((qr[i / 2] >> (4 * (i % 2))) & 0x0F) - 8 : (int32_t)qr[i] - 128;
          int64_t at = bits == 4 ? i / GROUP * GROUP + (i % 2) * (GROUP / 2) + i % GROUP / 2 : i;
          sum += w * xs[t][at];
        }
        acc += s[r * blocks + j] * (float)sum;
      }
      out[r * count + t] = acc;
    }
#endif
}

/* out[r * n + t] = rows row, row + 1 (or just row: rows = 1) of `m` . vecs[t] for the n vectors,
 * two (one row: four) at a time. */
static inline __attribute__((always_inline)) void dot_rows(const Matrix *m, int64_t row, int rows, int bits,
                                                           int64_t block, const int16_t *const *vecs, int64_t n,
                                                           float *out) {
  float d[4];
  for (int64_t t = 0; t < n;) {
    int64_t left = n - t;
    int c = rows == 2 ? (left < 2 ? 1 : 2) : (left < 4 ? (int)left : 4);
    if (rows == 2) {
      if (c == 2) qdot(m, row, 2, bits, block, vecs + t, 2, d);
      else qdot(m, row, 2, bits, block, vecs + t, 1, d);
    } else if (c == 4) qdot(m, row, 1, bits, block, vecs + t, 4, d);
    else if (c == 3) qdot(m, row, 1, bits, block, vecs + t, 3, d);
    else if (c == 2) qdot(m, row, 1, bits, block, vecs + t, 2, d);
    else qdot(m, row, 1, bits, block, vecs + t, 1, d);
    for (int r = 0; r < rows; r++)
      for (int k = 0; k < c; k++) out[r * n + t + k] = d[r * c + k];
    t += c;
  }
}

static inline void expert_inputs_bits(const Plan *p, size_t item, int bits) {  /* act = silu(gate) * up */
  int64_t u = (int64_t)item / p->act_chunks, c = (int64_t)item % p->act_chunks, i = p->r.i, h = p->h;
  int64_t e = p->r.used[u], r0 = c * ACT_ROWS_PER_ITEM, q0 = p->r.start[u], n = p->r.start[u + 1] - q0;
  int64_t r1 = r0 + ACT_ROWS_PER_ITEM < i ? r0 + ACT_ROWS_PER_ITEM : i;
  const int16_t *vecs[n];
  float d[2 * n];
  for (int64_t t = 0; t < n; t++) vecs[t] = p->xq + (int64_t)p->r.tok[q0 + t] * h;
  for (int64_t r = r0; r < r1; r++) {  /* rows 2r (gate) and 2r + 1 (up) */
    dot_rows(&p->fc1, e * 2 * i + 2 * r, 2, bits, p->block, vecs, n, d);
    for (int64_t t = 0; t < n; t++) {
      float xs = p->xs[p->r.tok[q0 + t]];
      p->r.act[(q0 + t) * i + r] = silu_mul(d[t] * xs, d[n + t] * xs);
    }
  }
}

static void expert_inputs(void *user, size_t item) {
  const Plan *p = user;
  if (p->bits == 4) expert_inputs_bits(p, item, 4);
  else expert_inputs_bits(p, item, 8);
}

static void pair_activations(void *user, size_t item) {  /* act (float) -> aq (int16) */
  const Plan *p = user;
  to_int16(p->r.act + (int64_t)item * p->r.i, p->r.i, (int)p->bits, p->aq + (int64_t)item * p->r.i, p->as + item);
}

static inline void expert_outputs_bits(const Plan *p, size_t item, int bits) {  /* y[:, rows] = sum w fc2 act */
  int64_t h0 = (int64_t)item * OUT_ROWS_PER_ITEM, h = p->h, i = p->r.i;
  int64_t h1 = h0 + OUT_ROWS_PER_ITEM < h ? h0 + OUT_ROWS_PER_ITEM : h;
  for (int64_t t = 0; t < p->r.n; t++) memset(p->y + t * h + h0, 0, (size_t)(h1 - h0) * sizeof(float));
  for (int64_t u = 0; u < p->r.n_used; u++) {
    int64_t e = p->r.used[u], q0 = p->r.start[u], n = p->r.start[u + 1] - q0;
    const int16_t *vecs[n];
    float d[2 * n], wt[n];
    for (int64_t t = 0; t < n; t++) vecs[t] = p->aq + (q0 + t) * i, wt[t] = p->r.w[q0 + t] * p->as[q0 + t];
    for (int64_t hh = h0; hh < h1; hh += 2) {
      int rows = hh + 1 < h1 ? 2 : 1;
      if (rows == 2) dot_rows(&p->fc2, e * h + hh, 2, bits, p->block, vecs, n, d);
      else dot_rows(&p->fc2, e * h + hh, 1, bits, p->block, vecs, n, d);
      for (int r = 0; r < rows; r++)
        for (int64_t t = 0; t < n; t++) p->y[(int64_t)p->r.tok[q0 + t] * h + hh + r] += wt[t] * d[r * n + t];
    }
  }
}

static void expert_outputs(void *user, size_t item) {
  const Plan *p = user;
  if (p->bits == 4) expert_outputs_bits(p, item, 4);
  else expert_outputs_bits(p, item, 8);
}

/* ---- ONNX Runtime glue ------------------------------------------------------------------------ */

typedef struct {
  int64_t top_k, normalize, bits, block;
} QuantMoeKernel;

static OrtStatus *compute(void *kernel, OrtKernelContext *ctx) {
  const QuantMoeKernel *kn = kernel;
  int64_t xd[2], ld[2], q1d[3], s1d[3], q2d[3], s2d[3];
  Plan p = {0};
  const float *x, *logits;
  OrtStatus *st;
  if ((st = dualbrain_input(ctx, 0, 2, &x, xd)) || (st = dualbrain_input(ctx, 1, 2, &logits, ld)) ||
      (st = dualbrain_input_of(ctx, 2, ORT_TENSOR_UINT8, 3, NULL, (const void **)&p.fc1.q, q1d)) ||
      (st = dualbrain_input(ctx, 3, 3, &p.fc1.scale, s1d)) ||
      (st = dualbrain_input_of(ctx, 4, ORT_TENSOR_UINT8, 3, NULL, (const void **)&p.fc2.q, q2d)) ||
      (st = dualbrain_input(ctx, 5, 3, &p.fc2.scale, s2d)))
    return st;
  p.bits = kn->bits, p.block = kn->block, p.r.n = xd[0], p.h = xd[1], p.r.i = q1d[1] / 2;
  int64_t e_count = ld[1], per_byte = 8 / (p.bits > 0 ? p.bits : 8);
  p.fc1.k = p.h, p.fc2.k = p.r.i;
  if ((p.bits != 4 && p.bits != 8) || p.block < GROUP || p.block % GROUP)
    return dualbrain_error("QuantMoEDispatch (cpu): bits must be 4 or 8 and block_size a multiple of 32");
  if (ld[0] != p.r.n || q1d[0] != e_count || q2d[0] != e_count || s1d[0] != e_count || s2d[0] != e_count ||
      q1d[1] != 2 * p.r.i || q1d[2] * per_byte != p.h || s1d[1] != 2 * p.r.i || s1d[2] * p.block != p.h ||
      q2d[1] != p.h || q2d[2] * per_byte != p.r.i || s2d[1] != p.h || s2d[2] * p.block != p.r.i)
    return dualbrain_error("QuantMoEDispatch (cpu): shapes must be x [N, H], router_logits [N, E], "
                           "fc1 [E, 2I, H * bits / 8], fc1_scales [E, 2I, H / block], fc2 [E, H, I * bits / 8], "
                           "fc2_scales [E, H, I / block]");
  if (kn->top_k < 1 || kn->top_k > e_count) return dualbrain_error("QuantMoEDispatch (cpu): top_k must be in 1..E");
  if ((st = dualbrain_output(ctx, 0, xd, 2, &p.y))) return st;
  if (p.r.n == 0) return NULL;
  void *mem;
  moe_route(&p.r, logits, e_count, kn->top_k, (int)kn->normalize, &mem);
  if (!mem) return dualbrain_error("QuantMoEDispatch (cpu): out of memory");
  size_t pairs = (size_t)(p.r.n * kn->top_k);
  char *scratch = malloc(sizeof(int16_t) * ((size_t)(p.r.n * p.h) + pairs * (size_t)p.r.i) +
                         sizeof(float) * ((size_t)p.r.n + pairs));
  if (!scratch) {
    free(mem);
    return dualbrain_error("QuantMoEDispatch (cpu): out of memory");
  }
  p.xq = (int16_t *)scratch, p.aq = p.xq + p.r.n * p.h;
  p.xs = (float *)(p.aq + pairs * (size_t)p.r.i), p.as = p.xs + p.r.n;
  for (int64_t t = 0; t < p.r.n; t++) to_int16(x + t * p.h, p.h, (int)p.bits, p.xq + t * p.h, p.xs + t);
  p.act_chunks = (p.r.i + ACT_ROWS_PER_ITEM - 1) / ACT_ROWS_PER_ITEM;
  st = dualbrain_parallel(ctx, expert_inputs, (size_t)(p.r.n_used * p.act_chunks), &p);
  if (!st) st = dualbrain_parallel(ctx, pair_activations, pairs, &p);
  if (!st) st = dualbrain_parallel(ctx, expert_outputs, (size_t)((p.h + OUT_ROWS_PER_ITEM - 1) / OUT_ROWS_PER_ITEM), &p);
  free(scratch);
  free(mem);
  return st;
}

static OrtStatus *create(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **out) {
  (void)op, (void)api;
  QuantMoeKernel *k = malloc(sizeof *k);
  if (!k) return dualbrain_error("QuantMoEDispatch (cpu): out of memory");
  k->top_k = dualbrain_attr_int(info, "top_k", -1);
  k->normalize = dualbrain_attr_int(info, "normalize", 1);
  k->bits = dualbrain_attr_int(info, "bits", -1);
  k->block = dualbrain_attr_int(info, "block_size", -1);
  *out = k;
  return NULL;
}

static int input_type(const OrtCustomOp *op, size_t index) {
  (void)op;
  return index == 2 || index == 4 ? ORT_TENSOR_UINT8 : ORT_TENSOR_FLOAT;
}

static OrtStatus *infer(const OrtCustomOp *op, OrtShapeInferContext *ctx) { (void)op; return dualbrain_same_shape(ctx, 0, 0); }

DUALBRAIN_CPU_OP(dualbrain_quant_moe_dispatch_op, "QuantMoEDispatch", 6, 1, input_type, create, compute, free, infer);
