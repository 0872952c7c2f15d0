/* dualbrain.cpu::CachedAttention in float32 on the CPU: an ONNX Runtime custom-op kernel for the full-attention
 * layers, in place of the exporter's `Attention` node over Transpose(Concat(past, new)) K and V.
 *
 * Why: ONNX Runtime's CPU Attention copies the whole cache for that Concat/Transpose and repeats K/V per query
 * head, so the backend ran it split into ~25 nodes (runtime.backends.onnxruntime.split_attention) that still
 * transpose the call's K/V, build (B, heads, S, T) score rows, tile the mask per head and slice the softmax
 * in two. Here the cache is read in place, each key and value row once for all the query heads that share it,
 * with the softmax kept online (no score rows, no copies).
 *
 * How the work is cut: a parallel item is one query position and one contiguous range of keys (a "part"),
 * over every batch row and head. A decode step's few positions get several parts each, merged at the end as
 * flash-decoding does, so that each core streams its own stretch of the cache: two cores each reading one K/V
 * head's half of every row streamed 9-21 GB/s on the 2-core EPYC, where contiguous halves streamed 28-39.
 * Within a part, the keys go a chunk at a time (about 64 KB of K rows), the next chunk's K and V asked for in
 * order while this one is scored from cache.
 *
 * q [B, Hq, S, D], past_key / past_value [P, B, Hkv, D], new_key / new_value [S, B, Hkv, D],
 * mask [B, 1, S, P + S] bool, scale [1] -> [B, Hq, S, D], as reference.py (a query that sees no key: zeros).
 * Registered by ../ort_kernels.c; built by dualbrain.runtime.backends.ort_kernels.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ort_kernel.h"
#include "vector_math.h"

#define CHUNK_BYTES 65536   /* K bytes scored between updates of the running softmax */
#define MAX_CHUNK_KEYS 64
#define ITEMS 8             /* parallel items a call aims for: enough for the cores to share evenly */
#define SERIAL_MERGE 65536  /* floats of partial results merged on the calling thread */

typedef struct {
  const float *q, *past_k, *new_k, *past_v, *new_v;
  const uint8_t *mask;
  float *o, *partial;       /* partial [S, parts, B, Hq, D]: each part's acc (with one part, o itself) */
  float *stats;             /* [S, parts, B, Hq, 2]: each part's running max and total */
  float scale;
  int64_t b, hq, hkv, s, p, d, parts, part_keys, chunk;
  volatile int out_of_memory;
} Attention;

/* row j of the cache as the node sees it (the past's rows, then the call's own); rows (j, b, g) of one j are
 * contiguous */
static inline const float *row(const Attention *p, const float *past, const float *new_rows, int64_t j, int64_t b,
                               int64_t g) {
  return j < p->p ? past + ((j * p->b + b) * p->hkv + g) * p->d
                  : new_rows + (((j - p->p) * p->b + b) * p->hkv + g) * p->d;
}

/* The next chunk's K and V rows (every batch row and head: contiguous), asked for into L2 in address order a
 * little at a time while this chunk is scored, so that the loads overlap the work (asked for all at once,
 * they stalled the core until they came). */
typedef struct {
  const char *k, *k_end, *v, *v_end;
} Ahead;

static Ahead ahead_of(const Attention *p, int64_t j0, int64_t n) {
  if (n <= 0) return (Ahead){0};
  if (j0 < p->p && j0 + n > p->p) n = p->p - j0;  /* up to the past's end (the call's own rows are few) */
  size_t bytes = sizeof(float) * (size_t)(n * p->b * p->hkv * p->d);
  const char *k = (const char *)row(p, p->past_k, p->new_k, j0, 0, 0);
  const char *v = (const char *)row(p, p->past_v, p->new_v, j0, 0, 0);
  return (Ahead){k, k + bytes, v, v + bytes};
}

static inline void ask_ahead(Ahead *a, int64_t bytes) {
  for (int64_t i = 0; i < bytes && a->k < a->k_end; i += 64, a->k += 64) __builtin_prefetch(a->k, 0, 2);
  for (int64_t i = 0; i < bytes && a->v < a->v_end; i += 64, a->v += 64) __builtin_prefetch(a->v, 0, 2);
}

/* acc += sum_j w[j] values[j] over n rows: 64 floats of acc in registers at a time, eight sums in flight to
 * cover the FMA latency (with four, the loop waited on it) */
static void accumulate(float *restrict acc, const float *restrict w, const float *const *values, int64_t n,
                       int64_t d) {
  int64_t i0 = 0;
  for (; i0 + 64 <= d; i0 += 64) {
    v8 tile[8];
    for (int k = 0; k < 8; k++) tile[k] = load8(acc + i0 + 8 * k);
    for (int64_t j = 0; j < n; j++)
      for (int k = 0; k < 8; k++) tile[k] += w[j] * load8(values[j] + i0 + 8 * k);
    memcpy(acc + i0, tile, sizeof tile);
  }
  for (; i0 + 8 <= d; i0 += 8) {
    v8 tile = load8(acc + i0);
    for (int64_t j = 0; j < n; j++) tile += w[j] * load8(values[j] + i0);
    memcpy(acc + i0, &tile, sizeof tile);
  }
  for (; i0 < d; i0++)
    for (int64_t j = 0; j < n; j++) acc[i0] += w[j] * values[j][i0];
}

/* one query head over n scored keys: rescale acc and the total to the new running max, add the keys' weights */
static void online_softmax(float *restrict acc, float *top, float *total, float *restrict w,
                           const float *const *values, int64_t n, int64_t d) {
  float m = *top;
  for (int64_t j = 0; j < n; j++) m = w[j] > m ? w[j] : m;
  if (m > *top) {
    float c = exp_approx(*top - m);
    *total *= c;
    for (int64_t i = 0; i < d; i++) acc[i] *= c;
    *top = m;
  }
  float add = 0.0f;
  for (int64_t j = 0; j < n; j++) w[j] = exp_approx(w[j] - m), add += w[j];
  *total += add;
  accumulate(acc, w, values, n, d);
}

/* part `part` of query position s for head h of the B * Hq: its acc, and its running max and total */
static inline float *acc_of(const Attention *p, int64_t s, int64_t part, int64_t h) {
  return p->parts == 1 ? p->o + (h * p->s + s) * p->d
                       : p->partial + ((s * p->parts + part) * p->b * p->hq + h) * p->d;
}

static inline float *stats_of(const Attention *p, int64_t s, int64_t part, int64_t h) {
  return p->stats + ((s * p->parts + part) * p->b * p->hq + h) * 2;
}

static int seen_by_any_row(const Attention *p, int64_t s, int64_t j) {
  for (int64_t b = 0; b < p->b; b++)
    if (p->mask[(b * p->s + s) * (p->p + p->s) + j]) return 1;
  return 0;
}

/* One query position s over one part's keys, every batch row and head: the part's acc, max and total per
 * (row, head). */
static void part_keys(void *user, size_t item) {
  Attention *p = user;
  int64_t s = (int64_t)item / p->parts, part = (int64_t)item % p->parts, t = p->p + p->s, d = p->d;
  int64_t rep = p->hq / p->hkv, heads = p->b * p->hq, chunk = p->chunk;
  int64_t j_begin = part * p->part_keys, j_end = j_begin + p->part_keys < t ? j_begin + p->part_keys : t;
  for (int64_t h = 0; h < heads; h++) {
    memset(acc_of(p, s, part, h), 0, sizeof(float) * (size_t)d);
    stats_of(p, s, part, h)[0] = -INFINITY, stats_of(p, s, part, h)[1] = 0.0f;
  }
  while (j_end > j_begin && !seen_by_any_row(p, s, j_end - 1)) j_end--;  /* a prefill's later keys: masked */
  float *w = malloc(sizeof(float) * (size_t)(rep * chunk));
  const float **values = malloc(sizeof(float *) * (size_t)chunk);
  if (!w || !values) {
    p->out_of_memory = 1;
    free(w), free(values);
    return;
  }
  Ahead first = ahead_of(p, j_begin, j_end - j_begin < chunk ? j_end - j_begin : chunk);
  ask_ahead(&first, INT64_MAX);
  for (int64_t j0 = j_begin; j0 < j_end; j0 += chunk) {
    int64_t n = j_end - j0 < chunk ? j_end - j0 : chunk, row_bytes = (int64_t)sizeof(float) * d;
    Ahead next = ahead_of(p, j0 + n, j_end - j0 - n < chunk ? j_end - j0 - n : chunk);
    for (int64_t b = 0; b < p->b; b++) {
      const uint8_t *visible = p->mask + (b * p->s + s) * t + j0;
      for (int64_t g = 0; g < p->hkv; g++) {
        const float *q = p->q + ((b * p->hq + g * rep) * p->s + s) * d;
        int64_t seen = 0;
        for (int64_t j = 0; j < n; j++) {
          if (!visible[j]) continue;
          const float *k = row(p, p->past_k, p->new_k, j0 + j, b, g);
          ask_ahead(&next, row_bytes);
          for (int64_t r = 0; r < rep; r++) w[r * chunk + seen] = dot1(q + r * p->s * d, k, d) * p->scale;
          values[seen++] = row(p, p->past_v, p->new_v, j0 + j, b, g);
        }
        for (int64_t r = 0; seen && r < rep; r++) {
          int64_t h = b * p->hq + g * rep + r;
          float *stats = stats_of(p, s, part, h);
          online_softmax(acc_of(p, s, part, h), stats, stats + 1, w + r * chunk, values, seen, d);
        }
      }
    }
    ask_ahead(&next, INT64_MAX);  /* what masked keys left unasked */
  }
  free(w), free(values);
}

/* One (position, row, head): its parts' partial softmaxes as one (a part that saw no key has total 0). */
static void merge_parts(void *user, size_t item) {
  const Attention *p = user;
  int64_t heads = p->b * p->hq, d = p->d, s = (int64_t)item / heads, h = (int64_t)item % heads;
  float top = -INFINITY, total = 0.0f, *o = p->o + (h * p->s + s) * d;
  if (p->parts == 1) {  /* o holds the one part's acc */
    total = stats_of(p, s, 0, h)[1];
  } else {
    for (int64_t c = 0; c < p->parts; c++) {
      const float *stats = stats_of(p, s, c, h);
      top = stats[1] > 0.0f && stats[0] > top ? stats[0] : top;
    }
    memset(o, 0, sizeof(float) * (size_t)d);
    for (int64_t c = 0; c < p->parts; c++) {
      const float *stats = stats_of(p, s, c, h), *acc = acc_of(p, s, c, h);
      if (stats[1] <= 0.0f) continue;
      float f = exp_approx(stats[0] - top);
      total += f * stats[1];
      for (int64_t i = 0; i < d; i++) o[i] += f * acc[i];
    }
  }
  float inv = total > 0.0f ? 1.0f / total : 0.0f;
  for (int64_t i = 0; i < d; i++) o[i] *= inv;
}

static OrtStatus *compute(void *kernel, OrtKernelContext *ctx) {
  (void)kernel;
  int64_t qd[4], pkd[4], nkd[4], pvd[4], nvd[4], md[4], sd[1];
  const float *scale;
  Attention p = {0};
  OrtStatus *st;
  if ((st = dualbrain_input(ctx, 0, 4, &p.q, qd)) || (st = dualbrain_input(ctx, 1, 4, &p.past_k, pkd)) ||
      (st = dualbrain_input(ctx, 2, 4, &p.new_k, nkd)) || (st = dualbrain_input(ctx, 3, 4, &p.past_v, pvd)) ||
      (st = dualbrain_input(ctx, 4, 4, &p.new_v, nvd)) ||
      (st = dualbrain_input_of(ctx, 5, ORT_TENSOR_BOOL, 4, NULL, (const void **)&p.mask, md)) ||
      (st = dualbrain_input(ctx, 6, 1, &scale, sd)))
    return st;
  p.b = qd[0], p.hq = qd[1], p.s = qd[2], p.d = qd[3], p.p = pkd[0], p.hkv = pkd[2];
  int same = 1;
  for (int i = 0; i < 4; i++) same &= pkd[i] == pvd[i] && nkd[i] == nvd[i];
  if (!same || pkd[1] != p.b || pkd[3] != p.d || nkd[0] != p.s || nkd[1] != p.b || nkd[2] != p.hkv ||
      nkd[3] != p.d || p.hkv < 1 || p.hq % p.hkv || md[0] != p.b || md[1] != 1 || md[2] != p.s ||
      md[3] != p.p + p.s || sd[0] != 1)
    return dualbrain_error("CachedAttention (cpu): shapes must be q [B, Hq, S, D], past key / value [P, B, Hkv, D], "
                           "new key / value [S, B, Hkv, D], mask [B, 1, S, P + S], scale [1], Hq a multiple of Hkv");
  p.scale = scale[0];
  if ((st = dualbrain_output(ctx, 0, qd, 4, &p.o))) return st;
  int64_t t = p.p + p.s, heads = p.b * p.hq;
  if (heads == 0 || p.s == 0 || p.d == 0) return NULL;
  int64_t row_bytes = p.b * p.hkv * p.d * (int64_t)sizeof(float);
  p.chunk = CHUNK_BYTES / row_bytes < 1 ? 1 : CHUNK_BYTES / row_bytes > MAX_CHUNK_KEYS ? MAX_CHUNK_KEYS
                                                                                       : CHUNK_BYTES / row_bytes;
  int64_t chunks = (t + p.chunk - 1) / p.chunk, want = (ITEMS + p.s - 1) / p.s;
  p.parts = want < chunks ? want : chunks;
  p.part_keys = (chunks + p.parts - 1) / p.parts * p.chunk;
  p.parts = (t + p.part_keys - 1) / p.part_keys;
  size_t parts = (size_t)(p.s * p.parts * heads), accs = p.parts > 1 ? parts * (size_t)p.d : 0;
  p.stats = malloc(sizeof(float) * (2 * parts + accs));
  if (!p.stats) return dualbrain_error("CachedAttention (cpu): out of memory");
  p.partial = p.parts > 1 ? p.stats + 2 * parts : NULL;
  st = dualbrain_parallel(ctx, part_keys, (size_t)(p.s * p.parts), &p);
  if (!st && p.out_of_memory) st = dualbrain_error("CachedAttention (cpu): out of memory");
  if (!st && p.s * heads * p.parts * p.d <= SERIAL_MERGE)  /* a decode step's: less work than a thread handoff */
    for (int64_t i = 0; i < p.s * heads; i++) merge_parts(&p, (size_t)i);
  else if (!st)
    st = dualbrain_parallel(ctx, merge_parts, (size_t)(p.s * heads), &p);
  free(p.stats);
  return st;
}

static int input_type(const OrtCustomOp *op, size_t index) {
  (void)op;
  return index == 5 ? ORT_TENSOR_BOOL : ORT_TENSOR_FLOAT;
}

static OrtStatus *infer(const OrtCustomOp *op, OrtShapeInferContext *ctx) {
  (void)op;
  return dualbrain_same_shape(ctx, 0, 0);
}

DUALBRAIN_CPU_OP(dualbrain_cached_attention_op, "CachedAttention", 7, 1, input_type, dualbrain_no_settings, compute,
                 dualbrain_no_kernel, infer);
