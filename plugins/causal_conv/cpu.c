/* dualbrain::CausalConv1d in float32 on the CPU: an ONNX Runtime custom-op kernel.
 *
 * Why: ONNX Runtime runs the function's depthwise Conv (group = C) as C tiny convolutions. At the
 * mid-size MoE's shape (C 2048, K 4), its 9 convolutions took 2.2 ms for one token and 25 ms for a
 * batch of 8 (2 cores); they are a few thousand multiply-adds per token.
 *
 * Math, as reference.py: y = silu(depthwise causal conv over the concatenation [conv_state, x] along
 * time), no bias; new_state = the last K-1 positions of that concatenation.
 * x [B, T, C], weight [C, K], conv_state [B, C, K-1] -> y [B, T, C], new_state [B, C, K-1].
 * Registered by ../ort_kernels.c; built by dualbrain.runtime.backends.ort_kernels.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ort_kernel.h"

#define POSITIONS_PER_ITEM 64

typedef struct {
  const float *x;
  float *y, *new_state;
  float *w_t;     /* weight transposed: [K, C] */
  float *head;    /* [B, K-1, C]: conv_state transposed, the first K-1 positions of the concatenation */
  int64_t b, t, c, k, chunks;
} Conv;

/* position s of row b's concatenation [conv_state, x], as a [C] row */
static inline const float *position(const Conv *p, int64_t b, int64_t s) {
  return s < p->k - 1 ? p->head + (b * (p->k - 1) + s) * p->c : p->x + (b * p->t + s - (p->k - 1)) * p->c;
}

static void conv_positions(void *user, size_t item) {  /* row b, positions t0..t1-1 */
  const Conv *p = user;
  int64_t b = (int64_t)item / p->chunks, t0 = (int64_t)item % p->chunks * POSITIONS_PER_ITEM;
  int64_t t1 = t0 + POSITIONS_PER_ITEM < p->t ? t0 + POSITIONS_PER_ITEM : p->t, c_n = p->c;
  for (int64_t t = t0; t < t1; t++) {
    float *y = p->y + (b * p->t + t) * c_n;
    memset(y, 0, sizeof(float) * (size_t)c_n);
    for (int64_t j = 0; j < p->k; j++) {  /* output t reads positions t .. t+K-1 of the concatenation */
      const float *v = position(p, b, t + j), *w = p->w_t + j * c_n;
      for (int64_t c = 0; c < c_n; c++) y[c] += w[c] * v[c];
    }
    for (int64_t c = 0; c < c_n; c++) y[c] = y[c] / (1.0f + expf(-y[c]));
  }
  if (t1 == p->t)  /* the row's last chunk writes its new state */
    for (int64_t j = 0; j < p->k - 1; j++) {
      const float *v = position(p, b, p->t + j);
      float *s = p->new_state + b * c_n * (p->k - 1) + j;
      for (int64_t c = 0; c < c_n; c++) s[c * (p->k - 1)] = v[c];
    }
}

static OrtStatus *compute(void *kernel, OrtKernelContext *ctx) {
  (void)kernel;
  int64_t xd[3], wd[2], sd[3];
  const float *w, *state;
  Conv p = {0};
  OrtStatus *st;
  if ((st = dualbrain_input(ctx, 0, 3, &p.x, xd)) || (st = dualbrain_input(ctx, 1, 2, &w, wd)) ||
      (st = dualbrain_input(ctx, 2, 3, &state, sd)))
    return st;
  p.b = xd[0], p.t = xd[1], p.c = xd[2], p.k = wd[1];
  if (wd[0] != p.c || p.k < 2 || sd[0] != p.b || sd[1] != p.c || sd[2] != p.k - 1)
    return dualbrain_error("CausalConv1d (cpu): shapes must be x [B, T, C], weight [C, K], conv_state [B, C, K-1]");
  if ((st = dualbrain_output(ctx, 0, xd, 3, &p.y)) || (st = dualbrain_output(ctx, 1, sd, 3, &p.new_state))) return st;
  if (p.b == 0 || p.c == 0) return NULL;
  size_t c_n = (size_t)p.c, k = (size_t)p.k;
  float *mem = malloc(sizeof(float) * c_n * (k + (size_t)p.b * (k - 1)));
  if (!mem) return dualbrain_error("CausalConv1d (cpu): out of memory");
  p.w_t = mem, p.head = mem + c_n * k;
  for (size_t c = 0; c < c_n; c++)
    for (size_t j = 0; j < k; j++) p.w_t[j * c_n + c] = w[c * k + j];
  for (int64_t b = 0; b < p.b; b++)
    for (size_t c = 0; c < c_n; c++)
      for (size_t j = 0; j + 1 < k; j++) p.head[((size_t)b * (k - 1) + j) * c_n + c] = state[((size_t)b * c_n + c) * (k - 1) + j];
  p.chunks = p.t ? (p.t + POSITIONS_PER_ITEM - 1) / POSITIONS_PER_ITEM : 1;
  st = dualbrain_parallel(ctx, conv_positions, (size_t)(p.b * p.chunks), &p);
  free(mem);
  return st;
}

static OrtStatus *infer(const OrtCustomOp *op, OrtShapeInferContext *ctx) {
  (void)op;
  OrtStatus *st = dualbrain_same_shape(ctx, 0, 0);
  return st ? st : dualbrain_same_shape(ctx, 2, 1);
}

DUALBRAIN_CPU_OP(dualbrain_causal_conv_op, "CausalConv1d", 3, 2, dualbrain_float, dualbrain_no_settings, compute,
                 dualbrain_no_kernel, infer);  /* `channels` is C, read from the tensors */
