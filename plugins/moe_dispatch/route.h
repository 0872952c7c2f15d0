/* The MoE kernels' routing, shared by the float (cpu.c) and quantized (cpu_quant.c) MoE kernels: the
 * router's top k per token, as reference.py's `route`, grouped by expert so that each chosen expert's
 * rows are read once for all the tokens routed to it. */
#ifndef DUALBRAIN_MOE_ROUTE_H
#define DUALBRAIN_MOE_ROUTE_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* One call's routing: pairs start[u]..start[u+1]-1 go to expert used[u]; pair q is token tok[q] with
 * routing weight w[q] and its swiglu activations act[q * i ..] (i floats, filled by the kernel). */
typedef struct {
  int64_t n, i;  /* tokens, expert width */
  int64_t n_used;
  int32_t *used, *tok;
  int64_t *start;
  float *w, *act;
} Routing;

/* Top-k of softmax(logits) per token, grouped by expert into `p`; its arrays live in one malloc'd block,
 * returned in *mem (NULL when out of memory). */
static void moe_route(Routing *p, const float *logits, int64_t e_count, int64_t k, int normalize, void **mem) {
  size_t pairs = (size_t)(p->n * k), ne = (size_t)e_count;
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
      pick[t * k + j] = (int32_t)best;
      kept += pick_w[t * k + j] = prob[best];
      count[best + 1]++;
    }
    if (normalize)
      for (int64_t j = 0; j < k; j++) pick_w[t * k + j] /= kept;
  }
  p->n_used = 0;
  for (int64_t e = 0; e < e_count; e++) {  /* count[e] becomes where expert e's pairs start */
    count[e + 1] += count[e];
    if (count[e + 1] > count[e]) {
      p->used[p->n_used] = (int32_t)e;
      p->start[p->n_used++] = count[e];
    }
  }
  p->start[p->n_used] = (int64_t)pairs;
  for (int64_t t = 0; t < p->n; t++)        /* within an expert, tokens in order */
    for (int64_t j = 0; j < k; j++) {
      int64_t q = count[pick[t * k + j]]++;
      p->tok[q] = (int32_t)t;
      p->w[q] = pick_w[t * k + j];
    }
}

static inline float silu_mul(float g, float v) { return g / (1.0f + expf(-g)) * v; }

#endif
