/* dualbrain.cpu::Int4MatMul: the int4 linears of `export --quant int4` (LM head included), decode and
 * prefill, in place of ONNX Runtime's MatMulNBits.
 *
 * Why: MatMulNBits reads a 4-bit row at a time, which on these cores is bound by the work per block
 * (scale, convert, FMA), not by the bytes: the int4 LM head streamed 23 GB/s under the profiler, the
 * linears took ~2 ms of an ~8 ms int4 decode step (tests/benchmarks/RESULTS.md, eighth pass). Here the
 * weight is laid out at load with eight rows interleaved (quant_blocks.h, the layout Int4MoEDispatch
 * reads), so a block's scale and FMA serve eight rows; in prefill a block's nibbles are unpacked once
 * for four tokens.
 *
 * x [..., K] float32, w [N/8, K/32, 128] uint8, scales [N/8, K/32, 8] float16 or float32 -> y [..., N]: as
 * reference.py, with x rounded to int8 per block of 32 (MatMulNBits at accuracy level 4 does the same).
 * Registered by ../ort_kernels.c; built by dualbrain.runtime.backends.ort_kernels.
 */
#include <stdint.h>
#include <stdlib.h>

#include "quant_blocks.h"
#include "ort_kernel.h"

#define GROUPS_PER_ITEM 8   /* eight rows a group: 64 output rows a work item (32 KB of weights at K 1024); even,
                             * as the kernel takes groups two at a time */
#define TOKENS_PER_TILE 64  /* prefill: the tokens one item's weights are reused for while in cache */

typedef struct {
  const uint8_t *w;
  Scales s;
  const int8_t *xq;    /* the activations as int8 per block of 32, their scales and 8 x their sums */
  const float *xs;
  const int32_t *xc;
  float *y;
  int64_t m, k, n, groups_per_item;
} Linear;

static void rows(void *user, size_t item) {
  const Linear *p = user;
  int64_t groups = p->n / 8, blocks = p->k / INT4_BLOCK, g0 = (int64_t)item * p->groups_per_item;
  int64_t g1 = g0 + p->groups_per_item < groups ? g0 + p->groups_per_item : groups;
  float o[DOT_OUT_FLOATS];
  for (int64_t t0 = 0; t0 < p->m; t0 += TOKENS_PER_TILE) {
    int64_t t1 = t0 + TOKENS_PER_TILE < p->m ? t0 + TOKENS_PER_TILE : p->m;
    for (int64_t g = g0; g < g1; g += DOT_MAX_GROUPS) {
      int pair = dot_groups(g, g1);
      for (int64_t t = t0; t < t1; t += DOT_MAX_TOKENS) {
        int count = dot_tokens(t, t1);
        groups_dot_some(4, pair, p->w + g * blocks * 128, scales_from(p->s, g * blocks * 8), p->xq + t * p->k,
                        p->xs + t * blocks, p->xc + t * blocks, p->k, count, o);
        for (int j = 0; j < count; j++)
          memcpy(p->y + (t + j) * p->n + 8 * g, o + 8 * pair * j, 8 * (size_t)pair * sizeof(float));
      }
    }
  }
}

static OrtStatus *compute(void *kernel, OrtKernelContext *ctx) {
  (void)kernel;
  int64_t xd[8], wd[3], sd[3];
  size_t rank;
  Linear p = {0};
  const float *x;
  OrtStatus *st;
  if ((st = dualbrain_input_of(ctx, 0, ORT_TENSOR_FLOAT, 8, &rank, (const void **)&x, xd)) ||
      (st = dualbrain_input_of(ctx, 1, ORT_TENSOR_UINT8, 3, NULL, (const void **)&p.w, wd)) ||
      (st = dualbrain_scales_input(ctx, 2, 3, &p.s.at, &p.s.half, sd)))
    return st;
  p.n = wd[0] * 8, p.k = wd[1] * INT4_BLOCK;
  if (rank < 1 || xd[rank - 1] != p.k || wd[2] != 128 || sd[0] != wd[0] || sd[1] != wd[1] || sd[2] != 8)
    return dualbrain_error("Int4MatMul (cpu): shapes must be x [..., K], w [N/8, K/32, 128], scales [N/8, K/32, 8] "
                           "(int4_matmul.reference.interleave_linear)");
  if ((st = dualbrain_linear_output(ctx, xd, rank, p.n, &p.m, &p.y))) return st;
  if (p.m == 0 || p.n == 0) return NULL;
  int64_t xb = p.m * p.k / INT4_BLOCK;
  char *mem = malloc((sizeof(float) + sizeof(int32_t)) * (size_t)xb + (size_t)(p.m * p.k));
  if (!mem) return dualbrain_error("Int4MatMul (cpu): out of memory");
  p.xs = (float *)mem, p.xc = (int32_t *)(p.xs + xb), p.xq = (int8_t *)(p.xc + xb);
  int8_blocks(x, p.m, p.k, 8, (int8_t *)p.xq, (float *)p.xs, (int32_t *)p.xc);
  /* decode (a pass of up to eight tokens): small items, so that both cores share even a 1024-row linear evenly
   * (at batch 8, items of 256 rows split the mid-size MoE's 3104-row linears 7 to 6 between two threads; 64-row
   * ones 25 to 24: 1.03x on the 25 linears of a step, tests/benchmarks/int4_matmul_steps.c); prefill: bigger ones,
   * fewer passes */
  p.groups_per_item = p.m > DOT_MAX_TOKENS ? 4 * GROUPS_PER_ITEM : GROUPS_PER_ITEM;
  st = dualbrain_parallel(ctx, rows, (size_t)((p.n / 8 + p.groups_per_item - 1) / p.groups_per_item), &p);
  free(mem);
  return st;
}

static int input_type(const OrtCustomOp *op, size_t index) {
  (void)op;
  return index == 1 ? ORT_TENSOR_UINT8 : index == 2 ? ORT_TENSOR_UNDEFINED : ORT_TENSOR_FLOAT;  /* scales: 16 or 32 bits */
}

DUALBRAIN_CPU_OP(dualbrain_int4_matmul_op, "Int4MatMul", 3, 1, input_type, dualbrain_no_settings, compute,
                 dualbrain_no_kernel, NULL);
