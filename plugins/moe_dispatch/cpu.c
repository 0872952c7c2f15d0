/* dualbrain::MoEDispatch in float32 on the CPU: an ONNX Runtime custom-op kernel for decode.
 *
 * Why: ONNX Runtime's fp32 com.microsoft.MoE streams the experts' weights at about half the bandwidth a
 * GEMV reaches on the same machine, and at batch 8 it takes two thirds of a decode step (the profile in
 * tests/benchmarks/RESULTS.md). Here each chosen expert's rows are read once and dotted with every
 * token routed to it, the work spread over ONNX Runtime's own intra-op threads. It is a GEMV kernel:
 * the runtime sends it calls of a few tokens and keeps ONNX Runtime's GEMM-based MoE for prefill
 * (dualbrain.runtime.backends.ort_kernels).
 *
 * Math, as reference.py: softmax over all E router logits in float32, the top k (ties to the lower
 * expert index), renormalised to sum 1 when `normalize`; expert e gives
 * fc2[e] @ (silu(gate) * up) with fc1[e]'s rows interleaved (row 2i = gate i, row 2i+1 = up i).
 * x [N, H], router_logits [N, E], fc1 [E, 2I, H], fc2 [E, H, I] -> y [N, H].
 *
 * Int4MoEDispatch and Int8MoEDispatch are the same op on the 4- and 8-bit experts of an int4 / int8
 * export (blocks of 32), in the layouts of reference.interleave_int4_rows / interleave_int8_rows (eight
 * rows interleaved; why: ../quant_blocks.h) made at load, for calls of any size, in place of ONNX
 * Runtime's QMoE, which dequantizes the chosen experts and multiplies them in float32. The activations
 * are int8 per block of 32, as in QMoE (accuracy level 4).
 *
 * Int4SharedMoEDispatch adds the layer's shared expert (Qwen3.5-MoE's `shared_expert`, gated per token by
 * sigmoid(x . shared_gate)) as one more expert, in the routed experts' layout, that every token is routed to, so it
 * is read in the same parallel pass as the routed ones instead of by its own nodes (reference.py's
 * `quant_shared_moe_dispatch`). Its gate vector is float32 [1, H].
 *
 * Registered by ../ort_kernels.c; built by dualbrain.runtime.backends.ort_kernels.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "quant_blocks.h"
#include "ort_kernel.h"
#include "vector_math.h"

/* rows of fc1 (pairs of gate/up rows) and of fc2 per parallel work item: ~256-512 KB of weights */
#define ACT_ROWS_PER_ITEM 32
#define OUT_ROWS_PER_ITEM 64

/* Dot products of one row a with vectors b0, b1 over n floats: out = {a.b0, a.b1}. Each load of the
 * row feeds two FMAs (a GEMV with one vector is load-bound, not FMA-bound); four sums in flight cover
 * the FMA latency. One row at a time, read front to back: on the Zen 3 this was tuned on, dotting two
 * rows side by side (two streams a page apart) read the experts ~20 % slower than this order
 * (tests/benchmarks/RESULTS.md). */
static inline void dot1x2(const float *a, const float *b0, const float *b1, int64_t n, float out[2]) {
  v8 s[4] = {{0}};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    v8 y0 = load8(a + i), y1 = load8(a + i + 8);
    s[0] += y0 * load8(b0 + i), s[1] += y0 * load8(b1 + i);
    s[2] += y1 * load8(b0 + i + 8), s[3] += y1 * load8(b1 + i + 8);
  }
  for (; i + 8 <= n; i += 8) {
    v8 y = load8(a + i);
    s[0] += y * load8(b0 + i), s[1] += y * load8(b1 + i);
  }
  out[0] = hsum(s[0] + s[2]), out[1] = hsum(s[1] + s[3]);
  for (; i < n; i++) out[0] += a[i] * b0[i], out[1] += a[i] * b1[i];
}

static inline float silu_mul(float g, float v) { return g / (1.0f + expf(-g)) * v; }

/* fc2 rows (1 KB each at the mid shapes) ahead of the one being read that the loop asks for; fc1 asks for the
 * next gate/up pair (8 KB). On the Intel host of the fifteenth and sixteenth passes this made fp32 decode
 * 1.06-1.09x faster at batch 1 and 1.10-1.18x at batch 8 (4 rows ahead: 1.00x / 1.13-1.15x; 1 row: 1.02-1.13x /
 * 1.11-1.14x; tests/benchmarks/RESULTS.md, sixteenth pass), as the next group's prefetch did for the
 * quantized loop (quant_blocks.h). */
#define FC2_PREFETCH_ROWS 2
/* Ask for n floats at a, a cache line at a time (a prefetch never faults: past the end is harmless). */
static inline void prefetch_floats(const float *a, int64_t n) {
  for (int64_t o = 0; o < n; o += 16) __builtin_prefetch(a + o, 0, 3);
}

/* One call's routing, grouped by expert: pairs start[u]..start[u+1]-1 go to expert used[u]. Expert
 * e_count, when used, is the shared one. */
typedef struct {
  const float *x, *fc1, *fc2;
  float *y, *act;  /* act: [pairs, I] swiglu activations */
  int64_t n, h, i, e_count;
  int64_t n_used, act_chunks;
  int32_t *used, *tok;
  int64_t *start;
  float *w;
} Plan;

static void expert_inputs(void *user, size_t item) {  /* act = silu(x fc1_gate^T) * (x fc1_up^T) */
  const Plan *p = user;
  int64_t u = (int64_t)item / p->act_chunks, c = (int64_t)item % p->act_chunks;
  int64_t e = p->used[u], r0 = c * ACT_ROWS_PER_ITEM, q0 = p->start[u], q1 = p->start[u + 1];
  int64_t r1 = r0 + ACT_ROWS_PER_ITEM < p->i ? r0 + ACT_ROWS_PER_ITEM : p->i;
  float g[2], v[2];
  for (int64_t r = r0; r < r1; r++) {
    const float *gate = p->fc1 + (e * 2 * p->i + 2 * r) * p->h, *up = gate + p->h;
    prefetch_floats(up + p->h, 2 * p->h);  /* the next gate/up pair, asked for before this pair's work */
    int64_t q = q0;
    for (; q + 2 <= q1; q += 2) {  /* two tokens per pass over each row */
      const float *x0 = p->x + (int64_t)p->tok[q] * p->h, *x1 = p->x + (int64_t)p->tok[q + 1] * p->h;
      dot1x2(gate, x0, x1, p->h, g);
      dot1x2(up, x0, x1, p->h, v);
      p->act[q * p->i + r] = silu_mul(g[0], v[0]);
      p->act[(q + 1) * p->i + r] = silu_mul(g[1], v[1]);
    }
    if (q < q1) {
      /* gate row, then up row: in address order. As two arguments of one call, GCC read them up first,
       * and that backward step every 4 KB cost the stream prefetcher a third of this phase's rate
       * (tests/benchmarks/RESULTS.md, seventh pass). */
      const float *x0 = p->x + (int64_t)p->tok[q] * p->h;
      float g0 = dot1(gate, x0, p->h);
      float v0 = dot1(up, x0, p->h);
      p->act[q * p->i + r] = silu_mul(g0, v0);
    }
  }
}

static void expert_outputs(void *user, size_t item) {  /* y[:, rows] = sum over pairs of w * fc2 act */
  const Plan *p = user;
  int64_t h0 = (int64_t)item * OUT_ROWS_PER_ITEM;
  int64_t h1 = h0 + OUT_ROWS_PER_ITEM < p->h ? h0 + OUT_ROWS_PER_ITEM : p->h;
  float o[2];
  for (int64_t t = 0; t < p->n; t++) memset(p->y + t * p->h + h0, 0, (size_t)(h1 - h0) * sizeof(float));
  for (int64_t u = 0; u < p->n_used; u++) {
    const float *base = p->fc2 + (int64_t)p->used[u] * p->h * p->i;
    int64_t q0 = p->start[u], q1 = p->start[u + 1];
    for (int64_t hh = h0; hh < h1; hh++) {
      const float *a = base + hh * p->i;
      prefetch_floats(a + FC2_PREFETCH_ROWS * p->i, p->i);
      int64_t q = q0;
      for (; q + 2 <= q1; q += 2) {
        dot1x2(a, p->act + q * p->i, p->act + (q + 1) * p->i, p->i, o);
        p->y[(int64_t)p->tok[q] * p->h + hh] += p->w[q] * o[0];
        p->y[(int64_t)p->tok[q + 1] * p->h + hh] += p->w[q + 1] * o[1];
      }
      if (q < q1) p->y[(int64_t)p->tok[q] * p->h + hh] += p->w[q] * dot1(a, p->act + q * p->i, p->i);
    }
  }
}

/* Top-k of softmax(logits) per token, grouped by expert into `p`; its arrays live in one malloc'd block,
 * returned in *mem (NULL when out of memory). With a `shared_gate` [H], each token also goes to expert
 * e_count with the weight sigmoid(x . shared_gate). */
static void route(Plan *p, const float *logits, int64_t e_count, int64_t k, int normalize, const float *shared_gate,
                  void **mem) {
  int64_t kk = k + (shared_gate != NULL);  /* pairs a token */
  size_t pairs = (size_t)(p->n * kk), ne = (size_t)(e_count + (shared_gate != NULL));
  size_t bytes = sizeof(int64_t) * 2 * (ne + 1) + sizeof(int32_t) * (ne + 2 * pairs) +
                 sizeof(float) * (ne + 2 * pairs + pairs * (size_t)p->i) + ne;
  char *m = *mem = malloc(bytes);
  if (!m) return;
  int64_t *count = (int64_t *)m;    m += sizeof(int64_t) * (ne + 1);
  p->start = (int64_t *)m;          m += sizeof(int64_t) * (ne + 1);
  p->used = (int32_t *)m;           m += sizeof(int32_t) * ne;
  int32_t *pick = (int32_t *)m;     m += sizeof(int32_t) * pairs;   /* expert of choice j of token t */
  p->tok = (int32_t *)m;            m += sizeof(int32_t) * pairs;
  float *prob = (float *)m;         m += sizeof(float) * ne;
  float *pick_w = (float *)m;       m += sizeof(float) * pairs;
  p->w = (float *)m;                m += sizeof(float) * pairs;
  p->act = (float *)m;              m += sizeof(float) * pairs * (size_t)p->i;
  unsigned char *taken = (unsigned char *)m;

  memset(count, 0, sizeof(int64_t) * (ne + 1));
  for (int64_t t = 0; t < p->n; t++) {
    const float *l = logits + t * e_count;
    float mx = l[0], sum = 0.0f, kept = 0.0f;
    for (int64_t e = 1; e < e_count; e++) mx = l[e] > mx ? l[e] : mx;
    for (int64_t e = 0; e < e_count; e++) sum += prob[e] = expf(l[e] - mx);
    for (int64_t e = 0; e < e_count; e++) prob[e] /= sum;
    memset(taken, 0, ne);
    for (int64_t j = 0; j < k; j++) {  /* the largest left; the lower index on ties */
      int64_t best = -1;
      for (int64_t e = 0; e < e_count; e++)
        if (!taken[e] && (best < 0 || prob[e] > prob[best])) best = e;
      taken[best] = 1;
      pick[t * kk + j] = (int32_t)best;
      kept += pick_w[t * kk + j] = prob[best];
      count[best + 1]++;
    }
    if (normalize)
      for (int64_t j = 0; j < k; j++) pick_w[t * kk + j] /= kept;
    if (shared_gate) {
      pick[t * kk + k] = (int32_t)e_count;
      pick_w[t * kk + k] = 1.0f / (1.0f + expf(-dot1(p->x + t * p->h, shared_gate, p->h)));
      count[e_count + 1]++;
    }
  }
  p->n_used = 0;
  for (int64_t e = 0; e < (int64_t)ne; e++) {  /* count[e] becomes where expert e's pairs start */
    count[e + 1] += count[e];
    if (count[e + 1] > count[e]) {
      p->used[p->n_used] = (int32_t)e;
      p->start[p->n_used++] = count[e];
    }
  }
  p->start[p->n_used] = (int64_t)pairs;
  for (int64_t t = 0; t < p->n; t++)        /* within an expert, tokens in order */
    for (int64_t j = 0; j < kk; j++) {
      int64_t q = count[pick[t * kk + j]]++;
      p->tok[q] = (int32_t)t;
      p->w[q] = pick_w[t * kk + j];
    }
}

/* ---- ONNX Runtime glue ------------------------------------------------------------------------ */

typedef struct {
  int64_t top_k, normalize;
} MoeKernel;

/* The routed call every op shares: x, the router's logits, the output; the shared expert's gate vector
 * [1, H] (input `shared_gate`, when > 0); then the routing into *mem (NULL with no tokens). p->h and p->i
 * must be set. */
static OrtStatus *route_call(const MoeKernel *kn, OrtKernelContext *ctx, Plan *p, int64_t e_count, size_t shared_gate,
                             void **mem) {
  int64_t xd[2], ld[2], gd[2];
  const float *logits, *gate = NULL;
  OrtStatus *st;
  *mem = NULL;
  if ((st = dualbrain_input(ctx, 0, 2, &p->x, xd)) || (st = dualbrain_input(ctx, 1, 2, &logits, ld))) return st;
  if (xd[0] != ld[0] || xd[1] != p->h || ld[1] != e_count)
    return dualbrain_error("MoEDispatch (cpu): x must be [N, H] and router_logits [N, E], as the experts");
  if (kn->top_k < 1 || kn->top_k > e_count) return dualbrain_error("MoEDispatch (cpu): top_k must be in 1..E");
  if (shared_gate && (st = dualbrain_input(ctx, shared_gate, 2, &gate, gd))) return st;
  if (gate && (gd[0] != 1 || gd[1] != p->h)) return dualbrain_error("MoEDispatch (cpu): shared_gate must be [1, H]");
  p->n = xd[0];
  p->e_count = e_count;
  if ((st = dualbrain_output(ctx, 0, xd, 2, &p->y))) return st;
  if (p->n == 0) return NULL;
  route(p, logits, e_count, kn->top_k, (int)kn->normalize, gate, mem);
  return *mem ? NULL : dualbrain_error("MoEDispatch (cpu): out of memory");
}

static OrtStatus *compute(void *kernel, OrtKernelContext *ctx) {
  int64_t f1[3], f2[3];
  Plan p = {0};
  void *mem;
  OrtStatus *st;
  if ((st = dualbrain_input(ctx, 2, 3, &p.fc1, f1)) || (st = dualbrain_input(ctx, 3, 3, &p.fc2, f2))) return st;
  p.h = f2[1], p.i = f2[2];
  if (f1[0] != f2[0] || f1[1] != 2 * p.i || f1[2] != p.h)
    return dualbrain_error("MoEDispatch (cpu): shapes must be x [N, H], router_logits [N, E], fc1 [E, 2I, H], fc2 [E, H, I]");
  if ((st = route_call(kernel, ctx, &p, f1[0], 0, &mem)) || !mem) return st;
  p.act_chunks = (p.i + ACT_ROWS_PER_ITEM - 1) / ACT_ROWS_PER_ITEM;
  st = dualbrain_parallel(ctx, expert_inputs, (size_t)(p.n_used * p.act_chunks), &p);
  if (!st) st = dualbrain_parallel(ctx, expert_outputs, (size_t)((p.h + OUT_ROWS_PER_ITEM - 1) / OUT_ROWS_PER_ITEM), &p);
  free(mem);
  return st;
}

/* ---- Int4MoEDispatch / Int8MoEDispatch: 4- or 8-bit experts, eight rows interleaved ------------- */

#define IN_GROUPS_PER_ITEM 8      /* fc1: groups of eight rows (four gate/up pairs) per work item: 40 KB; so an
                                   * item makes one block of 32 activations of each of its pairs */
_Static_assert(4 * IN_GROUPS_PER_ITEM == INT4_BLOCK, "a fc1 item rounds whole blocks of its activations");
#define OUT_GROUPS_PER_ITEM 32    /* fc2: per item, 256 output rows of every chosen expert (8 KB each) */

typedef struct {
  Plan *p;
  int bits;                       /* 4 or 8: 32 x bits bytes a block of eight rows */
  const uint8_t *w1, *w2;         /* [E, 2I/8, H/32, 32 bits], [E, H/8, I/32, 32 bits] */
  Scales s1, s2;                  /* [E, 2I/8, H/32, 8], [E, H/8, I/32, 8], float16 or float32 */
  const uint8_t *sw1, *sw2;       /* the shared expert (expert E): [1, ...] as w1, w2 */
  Scales ss1, ss2;
  const int8_t *pq;               /* each pair's token [pairs, H] as int8, in pair order */
  const float *ps;                /* its scale per block of 32 */
  const int32_t *pc;              /* -(the mid zero point x its sum) per block (int8_blocks) */
  int8_t *aq;                     /* each pair's activations [pairs, I] as int8, their scales and sums: as pq */
  float *as;
  int32_t *ac;
  int32_t zero_point;
} QuantPlan;

/* Expert e's fc1 (`fc` 1) or fc2 (2) blocks and scales: a routed expert's, or the shared one's (e == E), each
 * `groups` x `blocks` blocks of eight rows */
static inline void expert_blocks(const QuantPlan *z, int fc, int64_t e, int64_t groups, int64_t blocks,
                                 const uint8_t **w, Scales *s) {
  int shared = e == z->p->e_count;
  int64_t at = shared ? 0 : e * groups * blocks;  /* the shared expert's tensors hold it alone */
  *w = (fc == 1 ? (shared ? z->sw1 : z->w1) : (shared ? z->sw2 : z->w2)) + at * 32 * z->bits;
  *s = scales_from(fc == 1 ? (shared ? z->ss1 : z->s1) : (shared ? z->ss2 : z->s2), at * 8);
}

static void quant_expert_inputs(void *user, size_t item) {  /* act = silu(gate) * up, four units a group */
  const QuantPlan *z = user;
  const Plan *p = z->p;
  int64_t groups = 2 * p->i / 8, blocks = p->h / INT4_BLOCK;
  int64_t chunks = (groups + IN_GROUPS_PER_ITEM - 1) / IN_GROUPS_PER_ITEM;
  int64_t u = (int64_t)item / chunks, g0 = (int64_t)item % chunks * IN_GROUPS_PER_ITEM, e = p->used[u];
  int64_t g1 = g0 + IN_GROUPS_PER_ITEM < groups ? g0 + IN_GROUPS_PER_ITEM : groups;
  float o[DOT_OUT_FLOATS];
  const uint8_t *w1;
  Scales s1;
  expert_blocks(z, 1, e, groups, blocks, &w1, &s1);
  for (int64_t g = g0; g < g1; g += DOT_MAX_GROUPS) {  /* two groups (eight gate/up pairs) a call */
    int pair = dot_groups(g, g1);
    const uint8_t *w = w1 + g * blocks * 32 * z->bits;
    Scales s = scales_from(s1, g * blocks * 8);
    for (int64_t q = p->start[u]; q < p->start[u + 1]; q += DOT_MAX_TOKENS) {
      int count = dot_tokens(q, p->start[u + 1]);
      groups_dot_some(z->bits, pair, w, s, z->pq + q * p->h, z->ps + q * blocks, z->pc + q * blocks, p->h, count, o);
      for (int t = 0; t < count; t++)
        for (int j = 0; j < 4 * pair; j++)
          p->act[(q + t) * p->i + 4 * g + j] = silu_mul(o[8 * pair * t + 2 * j], o[8 * pair * t + 2 * j + 1]);
    }
  }
  /* This item's activations, one block of each pair, rounded to int8 for fc2 here, on every thread: rounded on
   * the calling thread between the passes, all pairs' took ~8 us a layer at batch 8 while the others waited. */
  int64_t a0 = 4 * g0;
  for (int64_t q = p->start[u]; q < p->start[u + 1]; q++) {
    int64_t at = q * p->i + a0;
    int8_blocks(p->act + at, 1, 4 * (g1 - g0), z->zero_point, z->aq + at, z->as + at / INT4_BLOCK,
                z->ac + at / INT4_BLOCK);
  }
}

static void quant_expert_outputs(void *user, size_t item) {  /* y[:, rows] = sum over pairs of w * fc2 act */
  const QuantPlan *z = user;
  const Plan *p = z->p;
  int64_t groups = p->h / 8, blocks = p->i / INT4_BLOCK;
  int64_t g0 = (int64_t)item * OUT_GROUPS_PER_ITEM, g1 = g0 + OUT_GROUPS_PER_ITEM < groups ? g0 + OUT_GROUPS_PER_ITEM : groups;
  float o[DOT_OUT_FLOATS];
  for (int64_t t = 0; t < p->n; t++) memset(p->y + t * p->h + 8 * g0, 0, sizeof(float) * 8 * (size_t)(g1 - g0));
  for (int64_t u = 0; u < p->n_used; u++) {
    const uint8_t *w2;
    Scales s2;
    expert_blocks(z, 2, p->used[u], groups, blocks, &w2, &s2);
    for (int64_t g = g0; g < g1; g += DOT_MAX_GROUPS) {
      int pair = dot_groups(g, g1);
      const uint8_t *w = w2 + g * blocks * 32 * z->bits;
      Scales s = scales_from(s2, g * blocks * 8);
      for (int64_t q = p->start[u]; q < p->start[u + 1]; q += DOT_MAX_TOKENS) {
        int count = dot_tokens(q, p->start[u + 1]);
        groups_dot_some(z->bits, pair, w, s, z->aq + q * p->i, z->as + q * blocks, z->ac + q * blocks, p->i, count, o);
        for (int t = 0; t < count; t++) {
          float *y = p->y + (int64_t)p->tok[q + t] * p->h + 8 * g;
          for (int r = 0; r < 8 * pair; r++) y[r] += p->w[q + t] * o[8 * pair * t + r];
        }
      }
    }
  }
}

/* The shared expert's four tensors at inputs 6-9: one expert shaped as the routed ones (f1, s1, f2, s2) */
static OrtStatus *quant_shared(OrtKernelContext *ctx, QuantPlan *z, const int64_t *f1, const int64_t *f2) {
  int64_t d[4][4];
  OrtStatus *st;
  if ((st = dualbrain_input_of(ctx, 6, ORT_TENSOR_UINT8, 4, NULL, (const void **)&z->sw1, d[0])) ||
      (st = dualbrain_scales_input(ctx, 7, 4, &z->ss1.at, &z->ss1.half, d[1])) ||
      (st = dualbrain_input_of(ctx, 8, ORT_TENSOR_UINT8, 4, NULL, (const void **)&z->sw2, d[2])) ||
      (st = dualbrain_scales_input(ctx, 9, 4, &z->ss2.at, &z->ss2.half, d[3])))
    return st;
  const int64_t *want[4] = {f1, f1, f2, f2};
  for (int t = 0; t < 4; t++)
    if (d[t][0] != 1 || d[t][1] != want[t][1] || d[t][2] != want[t][2] || d[t][3] != (t % 2 ? 8 : want[t][3]))
      return dualbrain_error("Int4SharedMoEDispatch (cpu): the shared expert must be one expert in the routed experts' "
                             "layout ([1, ...] each)");
  return NULL;
}

static OrtStatus *quant_compute(void *kernel, OrtKernelContext *ctx, int bits, int shared) {
  int64_t f1[4], s1[4], f2[4], s2[4];
  Plan p = {0};
  QuantPlan z = {.p = &p, .bits = bits, .zero_point = 1 << (bits - 1)};
  void *mem;
  OrtStatus *st;
  if ((st = dualbrain_input_of(ctx, 2, ORT_TENSOR_UINT8, 4, NULL, (const void **)&z.w1, f1)) ||
      (st = dualbrain_scales_input(ctx, 3, 4, &z.s1.at, &z.s1.half, s1)) ||
      (st = dualbrain_input_of(ctx, 4, ORT_TENSOR_UINT8, 4, NULL, (const void **)&z.w2, f2)) ||
      (st = dualbrain_scales_input(ctx, 5, 4, &z.s2.at, &z.s2.half, s2)))
    return st;
  p.h = f2[1] * 8, p.i = f1[1] * 4;
  if (f1[0] != f2[0] || f1[2] * INT4_BLOCK != p.h || f2[2] * INT4_BLOCK != p.i || f1[3] != 32 * bits || f2[3] != 32 * bits ||
      s1[0] != f1[0] || s1[1] != f1[1] || s1[2] != f1[2] || s1[3] != 8 ||
      s2[0] != f2[0] || s2[1] != f2[1] || s2[2] != f2[2] || s2[3] != 8)
    return dualbrain_error(bits == 4 ? "Int4MoEDispatch (cpu): shapes must be fc1 [E, 2I/8, H/32, 128], fc1_scales "
                                       "[E, 2I/8, H/32, 8], fc2 [E, H/8, I/32, 128], fc2_scales [E, H/8, I/32, 8] "
                                       "(interleave_int4_rows)"
                                     : "Int8MoEDispatch (cpu): shapes must be fc1 [E, 2I/8, H/32, 256], fc1_scales "
                                       "[E, 2I/8, H/32, 8], fc2 [E, H/8, I/32, 256], fc2_scales [E, H/8, I/32, 8] "
                                       "(interleave_int8_rows)");
  if (shared && (st = quant_shared(ctx, &z, f1, f2))) return st;
  if ((st = route_call(kernel, ctx, &p, f1[0], shared ? 10 : 0, &mem)) || !mem) return st;
  int64_t pairs = p.start[p.n_used], hb = p.h / INT4_BLOCK, xb = p.n * hb, pb = pairs * hb;
  int64_t ab = pairs * p.i / INT4_BLOCK;
  char *buf = malloc((sizeof(float) + sizeof(int32_t)) * (size_t)(xb + pb + ab) +
                     (size_t)((p.n + pairs) * p.h + pairs * p.i));
  if (!buf) {
    free(mem);
    return dualbrain_error("Int4MoEDispatch / Int8MoEDispatch (cpu): out of memory");
  }
  float *xs = (float *)buf, *ps = xs + xb, *as = ps + pb;
  int32_t *xc = (int32_t *)(as + ab), *pc = xc + xb, *ac = pc + pb;
  int8_t *xq = (int8_t *)(ac + ab), *pq = xq + p.n * p.h, *aq = pq + pairs * p.h;
  z.pq = pq, z.aq = aq, z.ps = ps, z.as = as, z.pc = pc, z.ac = ac;
  int8_blocks(p.x, p.n, p.h, z.zero_point, xq, xs, xc);
  for (int64_t q = 0; q < pairs; q++) {  /* each expert's tokens side by side, so that fc1 reads them as fc2 does */
    int64_t t = p.tok[q];
    memcpy(pq + q * p.h, xq + t * p.h, (size_t)p.h);
    memcpy(ps + q * hb, xs + t * hb, sizeof(float) * (size_t)hb);
    memcpy(pc + q * hb, xc + t * hb, sizeof(int32_t) * (size_t)hb);
  }
  int64_t in_chunks = (2 * p.i / 8 + IN_GROUPS_PER_ITEM - 1) / IN_GROUPS_PER_ITEM;
  st = dualbrain_parallel(ctx, quant_expert_inputs, (size_t)(p.n_used * in_chunks), &z);
  if (!st)
    st = dualbrain_parallel(ctx, quant_expert_outputs, (size_t)((p.h / 8 + OUT_GROUPS_PER_ITEM - 1) / OUT_GROUPS_PER_ITEM), &z);
  free(buf);
  free(mem);
  return st;
}

static OrtStatus *int4_compute(void *kernel, OrtKernelContext *ctx) { return quant_compute(kernel, ctx, 4, 0); }
static OrtStatus *int8_compute(void *kernel, OrtKernelContext *ctx) { return quant_compute(kernel, ctx, 8, 0); }
static OrtStatus *int4_shared_compute(void *kernel, OrtKernelContext *ctx) { return quant_compute(kernel, ctx, 4, 1); }


static OrtStatus *create(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **out) {
  (void)op, (void)api;
  MoeKernel *k = malloc(sizeof *k);
  if (!k) return dualbrain_error("MoEDispatch (cpu): out of memory");
  k->top_k = dualbrain_attr_int(info, "top_k", -1);
  k->normalize = dualbrain_attr_int(info, "normalize", 1);
  *out = k;
  return NULL;
}

static OrtStatus *infer(const OrtCustomOp *op, OrtShapeInferContext *ctx) { (void)op; return dualbrain_same_shape(ctx, 0, 0); }

static int quant_input_type(const OrtCustomOp *op, size_t index) {
  (void)op;
  if (index == 3 || index == 5 || index == 7 || index == 9) return ORT_TENSOR_UNDEFINED;  /* scales: 16 or 32 bits */
  return index == 2 || index == 4 || index == 6 || index == 8 ? ORT_TENSOR_UINT8 : ORT_TENSOR_FLOAT;
}

DUALBRAIN_CPU_OP(dualbrain_moe_dispatch_op, "MoEDispatch", 4, 1, dualbrain_float, create, compute, free, infer);
DUALBRAIN_CPU_OP(dualbrain_int4_moe_dispatch_op, "Int4MoEDispatch", 6, 1, quant_input_type, create, int4_compute, free,
                 infer);
DUALBRAIN_CPU_OP(dualbrain_int8_moe_dispatch_op, "Int8MoEDispatch", 6, 1, quant_input_type, create, int8_compute, free,
                 infer);
DUALBRAIN_CPU_OP(dualbrain_int4_shared_moe_dispatch_op, "Int4SharedMoEDispatch", 11, 1, quant_input_type, create,
                 int4_shared_compute, free, infer);
