/* dualbrain::GatedDeltaRule and GatedDeltaRuleWindow in float32 on the CPU: ONNX Runtime custom-op kernels;
 * and dualbrain.cpu::GatedDeltaMixer (below), the rule with the rest of a GDN layer's mixer around it.
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
#include "vector_math.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef struct {
  const float *q, *k, *v, *g, *beta, *state;
  float *o, *new_state, *states;  /* states: NULL but for the window op */
  int64_t b, t, hk, hv, dk, dv;
} Rule;

/* One position of one head: S' = exp(g) S + k delta^T with delta = beta (v - exp(g) S^T k); o = S'^T q.
 * S is [dk, dv] with dv the contiguous axis, so each update is a row-wise axpy. S is read from `from` and S'
 * written to `to`, which may be the same buffer (each element is read before it is written); `ahead`, when
 * given, is the next head's state, asked for while this one works: a line of each 256 bytes, a row at a time
 * (the hardware fetches the lines between; asking for every one measured no faster, tests/benchmarks/RESULTS.md,
 * nineteenth pass).
 *
 * Why `from` and `to` apart: a decode step reads S where the op's input holds it and writes S' straight to
 * the op's new_state, with no copy between: the copy of each 16 KB state into a buffer of the thread's own was
 * a third of a head's time at batch 8 (perf, tests/benchmarks/RESULTS.md, eighteenth pass). new_state is only
 * ever written, with streaming stores where it is aligned (`stream`): at batch 8 a layer's states (2 MB) are
 * out of cache, and an ordinary store first reads each line of new_state in; streaming made a batch-8 decode
 * step of the mid-size MoE's int4 export 1.09x faster (seventeenth pass). Every position takes the same arithmetic
 * wherever its S is read from and written to, so a prompt fed at once and token by token agree to the bit. */
#if defined(__AVX512F__)
/* rule_step for dv = 16 nc (nc <= 8, a constant where inlined): S^T k and S'^T q summed in registers, one row
 * after another as the plain loop does; summed in arrays, each row's sums went through a store and a load. */
static inline __attribute__((always_inline)) void rule_rows(const float *from, float *to, int stream,
                                                            const float *ahead, const float *restrict q,
                                                            const float *restrict k, const float *restrict v,
                                                            float decay, float beta, float *restrict o, int64_t dk,
                                                            int nc) {
  __m512 acc[8], delta[8];
  for (int c = 0; c < nc; c++) acc[c] = _mm512_setzero_ps();
  for (int64_t i = 0; i < dk; i++) {  /* kv = S^T k, before the decay */
    __m512 ki = _mm512_set1_ps(k[i]);
    if (ahead)
      for (int c = 0; c < nc; c += 4) _mm_prefetch((const char *)(ahead + i * 16 * nc + 16 * c), _MM_HINT_T0);
    for (int c = 0; c < nc; c++) acc[c] = _mm512_fmadd_ps(_mm512_loadu_ps(from + i * 16 * nc + 16 * c), ki, acc[c]);
  }
  __m512 dc = _mm512_set1_ps(decay), bt = _mm512_set1_ps(beta);
  for (int c = 0; c < nc; c++)  /* delta = beta (v - decay kv) */
    delta[c] = _mm512_mul_ps(bt, _mm512_fnmadd_ps(dc, acc[c], _mm512_loadu_ps(v + 16 * c))), acc[c] = _mm512_setzero_ps();
  stream = stream && ((uintptr_t)to & 63) == 0;
  for (int64_t i = 0; i < dk; i++) {  /* S' = decay S + k delta^T, and o = S'^T q */
    __m512 ki = _mm512_set1_ps(k[i]), qi = _mm512_set1_ps(q[i]);
    for (int c = 0; c < nc; c++) {
      const int64_t at = i * 16 * nc + 16 * c;
      __m512 x = _mm512_fmadd_ps(ki, delta[c], _mm512_mul_ps(dc, _mm512_loadu_ps(from + at)));
      if (stream) _mm512_stream_ps(to + at, x);
      else _mm512_storeu_ps(to + at, x);
      acc[c] = _mm512_fmadd_ps(x, qi, acc[c]);
    }
  }
  for (int c = 0; c < nc; c++) _mm512_storeu_ps(o + 16 * c, acc[c]);
  if (stream) _mm_sfence();
}
#endif

static inline void rule_step(const float *from, float *to, int stream, const float *ahead, const float *restrict q,
                             const float *restrict k, const float *restrict v, float decay, float beta,
                             float *restrict o, int64_t dk, int64_t dv) {
#if defined(__AVX512F__)
  switch (dv) {  /* the published models' 128 and the mid-size test model's 64 inlined */
    case 128: rule_rows(from, to, stream, ahead, q, k, v, decay, beta, o, dk, 8); return;
    case 64: rule_rows(from, to, stream, ahead, q, k, v, decay, beta, o, dk, 4); return;
    default:
      if (dv % 16 == 0 && dv <= 128) {
        rule_rows(from, to, stream, ahead, q, k, v, decay, beta, o, dk, (int)dv / 16);
        return;
      }
  }
#endif
  (void)stream, (void)ahead;
  float kv[dv], delta[dv];
  memset(kv, 0, sizeof kv);
  for (int64_t i = 0; i < dk; i++)  /* kv = S^T k, before the decay */
    for (int64_t j = 0; j < dv; j++) kv[j] += from[i * dv + j] * k[i];
  for (int64_t j = 0; j < dv; j++) delta[j] = beta * (v[j] - decay * kv[j]), o[j] = 0.0f;
  for (int64_t i = 0; i < dk; i++) {  /* S' = decay S + k delta^T, and o = S'^T q */
    float ki = k[i], qi = q[i];
    for (int64_t j = 0; j < dv; j++) {
      float x = decay * from[i * dv + j] + ki * delta[j];
      to[i * dv + j] = x;
      o[j] += x * qi;
    }
  }
}

/* Where position t of T reads S and writes S' (rule_step): the first reads the op's input state; the last
 * writes the op's new_state (streamed), unless every position's state is kept (the window op), when all write
 * the thread's buffer `s`, which the caller copies out; the others use `s`. */
static inline const float *state_from(const float *state, float *s, int64_t t) { return t == 0 ? state : s; }
static inline float *state_to(float *new_state, float *s, int64_t t, int64_t positions, int keep) {
  return t == positions - 1 && !keep ? new_state : s;
}

/* The state the item after `item` starts from, asked for while this one works (ONNX Runtime hands a thread
 * consecutive items), or NULL after the last */
static inline const float *next_state(const float *state, size_t item, int64_t items, int64_t size) {
  return (int64_t)item + 1 < items ? state + ((int64_t)item + 1) * size : NULL;
}

/* One row's value head over every position. With the window op's per-position states, S' is copied out after
 * each position, and to new_state at the end. */
static void head_positions(void *user, size_t item) {
  const Rule *p = user;
  int64_t b = (int64_t)item / p->hv, h = (int64_t)item % p->hv, hq = h / (p->hv / p->hk);
  int64_t dk = p->dk, dv = p->dv;
  float s[dk * dv] __attribute__((aligned(64)));
  const float *state = p->state + (b * p->hv + h) * dk * dv;
  float *new_state = p->new_state + (b * p->hv + h) * dk * dv;
  int keep = p->states != NULL;
  for (int64_t t = 0; t < p->t; t++) {
    int64_t bt = b * p->t + t;
    const float *restrict q = p->q + (bt * p->hk + hq) * dk, *restrict k = p->k + (bt * p->hk + hq) * dk;
    const float *restrict v = p->v + (bt * p->hv + h) * dv;
    float *restrict o = p->o + (bt * p->hv + h) * dv;
    float *to = state_to(new_state, s, t, p->t, keep);
    rule_step(state_from(state, s, t), to, to == new_state,
              t == 0 ? next_state(p->state, item, p->b * p->hv, dk * dv) : NULL, q, k, v,
              expf(p->g[bt * p->hv + h]), p->beta[bt * p->hv + h], o, dk, dv);
    if (keep) memcpy(p->states + (bt * p->hv + h) * dk * dv, s, sizeof(float) * (size_t)(dk * dv));
  }
  if (p->t == 0) memcpy(new_state, state, sizeof(float) * (size_t)(dk * dv));
  else if (keep) memcpy(new_state, s, sizeof(float) * (size_t)(dk * dv));
}

/* every op of this file: its variant (the window op's states; the mixer's raw gates) and, for the mixer,
 * num_k_heads (the rule reads its head counts from the tensors' shapes) */
typedef struct {
  int64_t num_k_heads;
  int variant;
} OpKernel;

static OrtStatus *op_kernel(const OrtKernelInfo *info, int variant, void **out) {
  OpKernel *k = malloc(sizeof *k);
  if (!k) return dualbrain_error("GatedDeltaRule (cpu): out of memory");
  k->num_k_heads = dualbrain_attr_int(info, "num_k_heads", 0), k->variant = variant;
  *out = k;
  return NULL;
}

static OrtStatus *compute(void *kernel, OrtKernelContext *ctx) {
  const OpKernel *kn = kernel;
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
  if (kn->variant) {  /* the window op */
    int64_t wd[5] = {p.b, p.t, p.hv, p.dk, p.dv};
    if ((st = dualbrain_output(ctx, 2, wd, 5, &p.states))) return st;
  }
  if (p.b == 0 || p.hv == 0) return NULL;
  return dualbrain_parallel(ctx, head_positions, (size_t)(p.b * p.hv), &p);
}

static OrtStatus *create(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **out) {
  (void)op, (void)api;
  return op_kernel(info, 0, out);
}

static OrtStatus *create_window(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **out) {
  (void)op, (void)api;
  return op_kernel(info, 1, out);
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

/* dualbrain.cpu::GatedDeltaMixer: a GDN layer's mixer between its input and output projections in one node
 * (the runtime's load-time rewrite, ort_kernels._gated_delta_mixer, in place of the exporter's CausalConv1d,
 * Split, the q/k/v Reshapes, the q/k norms, GatedDeltaRule and the gated output norm: ~20 small nodes a
 * layer, each with its launch and its buffer). Per (row, value head) item: silu(causal conv) of that head's
 * q, k and v channels; q and k normalised as the graph's SimplifiedLayerNormalization does
 * (x rsqrt(mean(x^2) + eps) scale); rule_step; then the output normalised the same way (norm weight) times
 * silu(z). Reference: reference.gated_delta_mixer.
 * qkv [B, T, C] (C = 2 Hk dk + Hv dv: q, k, v channels), the conv weight transposed [K, C] (at load),
 * conv_state [B, C, K-1], z [B, T, Hv dv], g, beta [B, T, Hv], state [B, Hv, dk, dv], q_scale, k_scale [dk],
 * norm weight [dv], eps [3] (q's, k's, the output norm's); attribute num_k_heads
 *   -> y [B, T, Hv, dv], new conv_state [B, C, K-1], new state [B, Hv, dk, dv].
 * GatedDeltaMixerRawGates is the same with the gates' own nodes folded in too: its g and beta inputs are the
 * raw projections a and b, and a 12th input, gate_params [2, Hv] (dt_bias; A = exp(A_log)), gives
 * g = -A softplus(a + dt_bias) (torch's softplus: past 20, x itself) and beta = sigmoid(b). */
typedef struct {
  const float *qkv, *w_t, *conv_state, *z, *g, *beta, *state, *q_scale, *k_scale, *norm;
  const float *gate_params;  /* NULL: g and beta are given; else they are the raw a and b */
  float *y, *new_conv_state, *new_state;
  float q_eps, k_eps, norm_eps;
  int64_t b, t, c, kw, hk, hv, dk, dv;
} Mixer;

#if defined(__AVX512F__)
/* A four-tap conv's decode step, 16 channels at a time: the state holds each channel's last three inputs side
 * by side ([C, 3]), so 16 channels' are three registers, split into taps (and the new state made from them) by
 * permutes. Read and written a value at a time, 12 bytes apart, the conv and its new state took ~40 % of a
 * head's time at batch 8 (perf, tests/benchmarks/RESULTS.md, eighteenth pass). */
#define KW4_TAPS 3
static const int32_t kw4_tap_lo[KW4_TAPS][16] = {  /* tap j of channel i, 3i + j, where below 32 */
    {0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 0, 0, 0, 0, 0},
    {1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31, 0, 0, 0, 0, 0},
    {2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 0, 0, 0, 0, 0, 0}};
static const int32_t kw4_tap_hi[KW4_TAPS][16] = {  /* lane i kept, or 16 + (3i + j - 32) */
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 17, 20, 23, 26, 29},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 18, 21, 24, 27, 30},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 19, 22, 25, 28, 31}};

static inline __m512 kw4_tap(const __m512 *a, int j) {
  __m512 lo = _mm512_permutex2var_ps(a[0], _mm512_loadu_si512(kw4_tap_lo[j]), a[1]);
  return _mm512_permutex2var_ps(lo, _mm512_loadu_si512(kw4_tap_hi[j]), a[2]);
}

/* new state element e = 3i + k of 16 channels: input k + 1 of channel i (element e + 1), or for k = 2 the
 * new input x[i]; register m holds e = 16 m .. 16 m + 15 */
static const int32_t kw4_shift[KW4_TAPS][16] = {  /* element e + 1, from registers m and m + 1 */
    {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16},
    {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16},
    {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0}};
static const int32_t kw4_new[KW4_TAPS][16] = {   /* lane kept, or 16 + i where k = 2 */
    {0, 1, 16, 3, 4, 17, 6, 7, 18, 9, 10, 19, 12, 13, 20, 15},
    {0, 21, 2, 3, 22, 5, 6, 23, 8, 9, 24, 11, 12, 25, 14, 15},
    {26, 1, 2, 27, 4, 5, 28, 7, 8, 29, 10, 11, 30, 13, 14, 31}};

static inline void kw4_conv(const float *restrict st, const float *restrict w_t, int64_t c_n, const float *restrict x,
                            int64_t n, float *restrict y, float *restrict new_st) {
  for (int64_t c = 0; c < n; c += 16) {
    __m512 a[KW4_TAPS + 1] = {_mm512_loadu_ps(st + 3 * c), _mm512_loadu_ps(st + 3 * c + 16),
                              _mm512_loadu_ps(st + 3 * c + 32), _mm512_setzero_ps()};
    __m512 xv = _mm512_loadu_ps(x + c);
    if (y) {  /* taps 0-2 from the state, 3 the new input; summed in the plain loop's order */
      __m512 acc = _mm512_setzero_ps();
      for (int j = 0; j < KW4_TAPS; j++) acc = _mm512_fmadd_ps(_mm512_loadu_ps(w_t + j * c_n + c), kw4_tap(a, j), acc);
      _mm512_storeu_ps(y + c, _mm512_fmadd_ps(_mm512_loadu_ps(w_t + KW4_TAPS * c_n + c), xv, acc));
    }
    if (new_st)
      for (int m = 0; m < KW4_TAPS; m++) {
        __m512 shifted = _mm512_permutex2var_ps(a[m], _mm512_loadu_si512(kw4_shift[m]), a[m + 1]);
        _mm512_storeu_ps(new_st + 3 * c + 16 * m, _mm512_permutex2var_ps(shifted, _mm512_loadu_si512(kw4_new[m]), xv));
      }
  }
}

/* The decode step of a four-tap conv over channels c0 .. c0+n-1 (kw4_conv) applies */
static inline int kw4_step(const Mixer *p, int64_t n) { return p->kw == 4 && p->t == 1 && n % 16 == 0; }
#endif

/* y = silu(causal conv) of channels c0 .. c0+n-1 at position t of row b: output t reads positions t .. t+K-1
 * of the concatenation [conv_state, qkv] along time. w_t is the weight transposed, [K, C]. */
static void conv_channels(const Mixer *p, int64_t b, int64_t t, int64_t c0, int64_t n, float *restrict y) {
  int64_t kw = p->kw, c_n = p->c;
#if defined(__AVX512F__)
  if (kw4_step(p, n)) {
    kw4_conv(p->conv_state + (b * c_n + c0) * 3, p->w_t + c0, c_n, p->qkv + b * c_n + c0, n, y, NULL);
  } else
#endif
  {
    memset(y, 0, sizeof(float) * (size_t)n);
    for (int64_t j = 0, s = t; j < kw; j++, s++) {
      const float *restrict w = p->w_t + j * c_n + c0;
      if (s >= kw - 1) {
        const float *restrict x = p->qkv + (b * p->t + s - (kw - 1)) * c_n + c0;
        for (int64_t c = 0; c < n; c++) y[c] += w[c] * x[c];
      } else {
        const float *restrict st = p->conv_state + (b * c_n + c0) * (kw - 1) + s;
        for (int64_t c = 0; c < n; c++) y[c] += w[c] * st[c * (kw - 1)];
      }
    }
  }
  for (int64_t c = 0; c < n; c++) y[c] = y[c] / (1.0f + exp_approx(-y[c]));
}

/* the new conv state of channels c0 .. c0+n-1: the concatenation's last K-1 positions */
static void conv_tail(const Mixer *p, int64_t b, int64_t c0, int64_t n) {
  int64_t kw = p->kw, c_n = p->c;
#if defined(__AVX512F__)
  if (kw4_step(p, n)) {
    kw4_conv(p->conv_state + (b * c_n + c0) * 3, p->w_t + c0, c_n, p->qkv + b * c_n + c0, n, NULL,
             p->new_conv_state + (b * c_n + c0) * 3);
    return;
  }
#endif
  for (int64_t j = 0, s = p->t; j + 1 < kw; j++, s++)
    for (int64_t c = c0; c < c0 + n; c++)
      p->new_conv_state[(b * c_n + c) * (kw - 1) + j] = s >= kw - 1 ? p->qkv[(b * p->t + s - (kw - 1)) * c_n + c]
                                                                      : p->conv_state[(b * c_n + c) * (kw - 1) + s];
}

static void normalise(float *restrict x, const float *restrict scale, float eps, int64_t d) {
  float ss = 0.0f;
  for (int64_t i = 0; i < d; i++) ss += x[i] * x[i];
  float r = 1.0f / sqrtf(ss / (float)d + eps);
  for (int64_t i = 0; i < d; i++) x[i] = x[i] * r * scale[i];
}

static void mixer_head(void *user, size_t item) {
  const Mixer *p = user;
  int64_t b = (int64_t)item / p->hv, h = (int64_t)item % p->hv, group = p->hv / p->hk, hq = h / group;
  int64_t dk = p->dk, dv = p->dv, qc = hq * dk, kc = (p->hk + hq) * dk, vc = 2 * p->hk * dk + h * dv;
  float q[dk], k[dk], v[dv], s[dk * dv] __attribute__((aligned(64)));  /* S: as head_positions */
  const float *state = p->state + (b * p->hv + h) * dk * dv;
  float *new_state = p->new_state + (b * p->hv + h) * dk * dv;
  if (p->t == 0) memcpy(new_state, state, sizeof(float) * (size_t)(dk * dv));
  for (int64_t t = 0; t < p->t; t++) {
    int64_t bth = (b * p->t + t) * p->hv + h;
    float *restrict y = p->y + bth * dv;
    const float *restrict z = p->z + bth * dv;
    conv_channels(p, b, t, qc, dk, q);
    conv_channels(p, b, t, kc, dk, k);
    conv_channels(p, b, t, vc, dv, v);
    normalise(q, p->q_scale, p->q_eps, dk);
    normalise(k, p->k_scale, p->k_eps, dk);
    float decay, beta;
    if (p->gate_params) {  /* the raw projections a and b */
      float x = p->g[bth] + p->gate_params[h];
      decay = expf(-p->gate_params[p->hv + h] * (x > 20.0f ? x : log1pf(expf(x))));
      beta = 1.0f / (1.0f + expf(-p->beta[bth]));
    } else {
      decay = expf(p->g[bth]), beta = p->beta[bth];
    }
    float *to = state_to(new_state, s, t, p->t, 0);
    rule_step(state_from(state, s, t), to, to == new_state,
              t == 0 ? next_state(p->state, item, p->b * p->hv, dk * dv) : NULL, q, k, v, decay, beta, y, dk, dv);
    normalise(y, p->norm, p->norm_eps, dv);
    for (int64_t j = 0; j < dv; j++) y[j] *= z[j] / (1.0f + exp_approx(-z[j]));   /* silu(z) */
  }
  conv_tail(p, b, vc, dv);
  if (h % group == 0) conv_tail(p, b, qc, dk), conv_tail(p, b, kc, dk);  /* once per q/k head */
}

static OrtStatus *mixer_compute(void *kernel, OrtKernelContext *ctx) {
  const OpKernel *kn = kernel;  /* variant: raw gates */
  Mixer p = {0};
  int64_t xd[3], wd[2], cd[3], zd[3], gd[3], bd[3], sd[4], qd[1], kd[1], nd[1], ed[1], pd[2] = {2, 0};
  const float *eps;
  OrtStatus *st;
  if ((st = dualbrain_input(ctx, 0, 3, &p.qkv, xd)) || (st = dualbrain_input(ctx, 1, 2, &p.w_t, wd)) ||
      (st = dualbrain_input(ctx, 2, 3, &p.conv_state, cd)) || (st = dualbrain_input(ctx, 3, 3, &p.z, zd)) ||
      (st = dualbrain_input(ctx, 4, 3, &p.g, gd)) || (st = dualbrain_input(ctx, 5, 3, &p.beta, bd)) ||
      (st = dualbrain_input(ctx, 6, 4, &p.state, sd)) || (st = dualbrain_input(ctx, 7, 1, &p.q_scale, qd)) ||
      (st = dualbrain_input(ctx, 8, 1, &p.k_scale, kd)) || (st = dualbrain_input(ctx, 9, 1, &p.norm, nd)) ||
      (st = dualbrain_input(ctx, 10, 1, &eps, ed)) ||
      (kn->variant && (st = dualbrain_input(ctx, 11, 2, &p.gate_params, pd))))
    return st;
  p.b = xd[0], p.t = xd[1], p.c = xd[2], p.kw = wd[0], p.hk = kn->num_k_heads;
  p.hv = sd[1], p.dk = sd[2], p.dv = sd[3];
  int64_t rows_ok = zd[0] == p.b && zd[1] == p.t && zd[2] == p.hv * p.dv && gd[0] == p.b && gd[1] == p.t &&
                    gd[2] == p.hv && bd[0] == p.b && bd[1] == p.t && bd[2] == p.hv && sd[0] == p.b;
  if (!rows_ok || wd[1] != p.c || p.kw < 2 || cd[0] != p.b || cd[1] != p.c || cd[2] != p.kw - 1 || p.hk < 1 ||
      p.hv % p.hk || p.c != 2 * p.hk * p.dk + p.hv * p.dv || qd[0] != p.dk || kd[0] != p.dk || nd[0] != p.dv ||
      ed[0] != 3 || pd[0] != 2 || (kn->variant && pd[1] != p.hv))
    return dualbrain_error("GatedDeltaMixer (cpu): shapes must be qkv [B, T, 2 Hk dk + Hv dv], weight [K, C], "
                           "conv_state [B, C, K-1], z [B, T, Hv dv], g, beta [B, T, Hv], state [B, Hv, dk, dv], "
                           "q/k scales [dk], norm [dv], eps [3], gate_params [2, Hv]; Hk (num_k_heads) "
                           "dividing Hv");
  p.q_eps = eps[0], p.k_eps = eps[1], p.norm_eps = eps[2];
  int64_t yd[4] = {p.b, p.t, p.hv, p.dv};
  if ((st = dualbrain_output(ctx, 0, yd, 4, &p.y)) || (st = dualbrain_output(ctx, 1, cd, 3, &p.new_conv_state)) ||
      (st = dualbrain_output(ctx, 2, sd, 4, &p.new_state)))
    return st;
  if (p.b == 0 || p.hv == 0) return NULL;
  return dualbrain_parallel(ctx, mixer_head, (size_t)(p.b * p.hv), &p);
}

static OrtStatus *mixer_create(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **out) {
  (void)op, (void)api;
  return op_kernel(info, 0, out);
}

static OrtStatus *mixer_raw_create(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info,
                                   void **out) {
  (void)op, (void)api;
  return op_kernel(info, 1, out);
}

/* the new states are shaped like the old; y is left to ONNX Runtime */
static OrtStatus *mixer_infer(const OrtCustomOp *op, OrtShapeInferContext *ctx) {
  (void)op;
  OrtStatus *st = dualbrain_same_shape(ctx, 2, 1);
  return st ? st : dualbrain_same_shape(ctx, 6, 2);
}

DUALBRAIN_CPU_OP(dualbrain_gated_delta_mixer_op, "GatedDeltaMixer", 11, 3, dualbrain_float, mixer_create,
                 mixer_compute, free, mixer_infer);
DUALBRAIN_CPU_OP(dualbrain_gated_delta_mixer_raw_op, "GatedDeltaMixerRawGates", 12, 3, dualbrain_float,
                 mixer_raw_create, mixer_compute, free, mixer_infer);
