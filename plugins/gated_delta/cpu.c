/* dualbrain::GatedDeltaRule and GatedDeltaRuleWindow in float32 on the CPU: ONNX Runtime custom-op kernels.
 *
 * Why: the function's body is com.microsoft.LinearAttention (GatedDeltaRuleWindow's a standard-ops
 * Loop). On the mid-size MoE (9 GDN layers of 16 value heads, dk = dv = 64) LinearAttention took 3.4 ms
 * of a batch-1 decode step and 33-37 ms of a batch-8 one (2 cores, tests/benchmarks/RESULTS.md), where
 * the work is reading and writing a 16 KB state per head. Here each (row, value head) pair is one
 * parallel item that keeps its state in cache across the call's positions.
 *
 * Math, as reference.py, per row b and value head h (q/k head h / (Hv / Hk)), per position t, with
 * S [dk, dv]: S <- exp(g) S;  delta = beta (v - S^T k);  S <- S + k delta^T;  o = S^T q.
 * q, k [B, T, Hk, dk], v [B, T, Hv, dv], g, beta [B, T, Hv], state [B, Hv, dk, dv]
 *   -> o [B, T, Hv, dv], new_state [B, Hv, dk, dv] (and, for the window op, states [B, T, Hv, dk, dv]:
 *   the state after each position, what speculative decoding rolls back to).
 * Registered by ../ort_kernels.c; built by dualbrain.runtime.backends.ort_kernels.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ort_kernel.h"

typedef struct {
  const float *q, *k, *v, *g, *beta, *state;
  float *o, *new_state, *states;  /* states: NULL but for the window op */
  int64_t b, t, hk, hv, dk, dv;
} Rule;

/* One row's value head over every position. S lives in new_state; dv is the contiguous axis, so each
 * update is a row-wise axpy the compiler vectorises. */
static void head_positions(void *user, size_t item) {
  const Rule *p = user;
  int64_t b = (int64_t)item / p->hv, h = (int64_t)item % p->hv, hq = h / (p->hv / p->hk);
  int64_t dk = p->dk, dv = p->dv;
  float *restrict s = p->new_state + (b * p->hv + h) * dk * dv;
  float kv[dv], delta[dv];
  memcpy(s, p->state + (b * p->hv + h) * dk * dv, sizeof(float) * (size_t)(dk * dv));
  for (int64_t t = 0; t < p->t; t++) {
    int64_t bt = b * p->t + t;
    const float *restrict q = p->q + (bt * p->hk + hq) * dk, *restrict k = p->k + (bt * p->hk + hq) * dk;
    const float *restrict v = p->v + (bt * p->hv + h) * dv;
    float *restrict o = p->o + (bt * p->hv + h) * dv;
    float decay = expf(p->g[bt * p->hv + h]), beta = p->beta[bt * p->hv + h];
    memset(kv, 0, sizeof kv);
    for (int64_t i = 0; i < dk; i++)  /* kv = S^T k, before the decay */
      for (int64_t j = 0; j < dv; j++) kv[j] += s[i * dv + j] * k[i];
    for (int64_t j = 0; j < dv; j++) delta[j] = beta * (v[j] - decay * kv[j]), o[j] = 0.0f;
    for (int64_t i = 0; i < dk; i++) {  /* S = decay S + k delta^T, and o = S^T q with the new S */
      float ki = k[i], qi = q[i];
      for (int64_t j = 0; j < dv; j++) {
        float x = decay * s[i * dv + j] + ki * delta[j];
        s[i * dv + j] = x;
        o[j] += x * qi;
      }
    }
    if (p->states) memcpy(p->states + (bt * p->hv + h) * dk * dv, s, sizeof(float) * (size_t)(dk * dv));
  }
}

typedef struct {
  int window;
} RuleKernel;

static OrtStatus *compute(void *kernel, OrtKernelContext *ctx) {
  const RuleKernel *kn = kernel;
  int64_t qd[4], kd[4], vd[4], gd[3], bd[3], sd[4];
  Rule p = {0};
  OrtStatus *st;
  if ((st = dualbrain_input(ctx, 0, 4, &p.q, qd)) || (st = dualbrain_input(ctx, 1, 4, &p.k, kd)) ||
      (st = dualbrain_input(ctx, 2, 4, &p.v, vd)) || (st = dualbrain_input(ctx, 3, 3, &p.g, gd)) ||
      (st = dualbrain_input(ctx, 4, 3, &p.beta, bd)) || (st = dualbrain_input(ctx, 5, 4, &p.state, sd)))
    return st;
  p.b = kd[0], p.t = kd[1], p.hk = kd[2], p.dk = kd[3], p.hv = vd[2], p.dv = vd[3];
  int same = 1;
  for (int i = 0; i < 4; i++) same &= qd[i] == kd[i];
  if (!same || vd[0] != p.b || vd[1] != p.t || p.hk < 1 || p.hv % p.hk || gd[0] != p.b || gd[1] != p.t ||
      gd[2] != p.hv || bd[0] != p.b || bd[1] != p.t || bd[2] != p.hv || sd[0] != p.b || sd[1] != p.hv ||
      sd[2] != p.dk || sd[3] != p.dv)
    return dualbrain_error("GatedDeltaRule (cpu): shapes must be q, k [B, T, Hk, dk], v [B, T, Hv, dv], "
                           "g, beta [B, T, Hv], state [B, Hv, dk, dv], Hv a multiple of Hk");
  if ((st = dualbrain_output(ctx, 0, vd, 4, &p.o)) || (st = dualbrain_output(ctx, 1, sd, 4, &p.new_state))) return st;
  if (kn->window) {
    int64_t wd[5] = {p.b, p.t, p.hv, p.dk, p.dv};
    if ((st = dualbrain_output(ctx, 2, wd, 5, &p.states))) return st;
  }
  if (p.b == 0 || p.hv == 0) return NULL;
  return dualbrain_parallel(ctx, head_positions, (size_t)(p.b * p.hv), &p);
}

static OrtStatus *create_kernel(const OrtKernelInfo *info, int window, void **out) {
  RuleKernel *k = malloc(sizeof *k);
  if (!k) return dualbrain_error("GatedDeltaRule (cpu): out of memory");
  (void)info;  /* num_k_heads / num_v_heads are read from the tensors' shapes */
  k->window = window;
  *out = k;
  return NULL;
}

static OrtStatus *create(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **out) {
  (void)op, (void)api;
  return create_kernel(info, 0, out);
}

static OrtStatus *create_window(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **out) {
  (void)op, (void)api;
  return create_kernel(info, 1, out);
}

/* o is shaped like v, new_state like state; the window op's states is left to ONNX Runtime */
static OrtStatus *infer(const OrtCustomOp *op, OrtShapeInferContext *ctx) {
  (void)op;
  OrtStatus *st = dualbrain_same_shape(ctx, 2, 0);
  return st ? st : dualbrain_same_shape(ctx, 5, 1);
}

DUALBRAIN_CPU_OP(dualbrain_gated_delta_op, "GatedDeltaRule", 6, 2, dualbrain_float, create, compute, free, infer);
DUALBRAIN_CPU_OP(dualbrain_gated_delta_window_op, "GatedDeltaRuleWindow", 6, 3, dualbrain_float, create_window,
                 compute, free, infer);
