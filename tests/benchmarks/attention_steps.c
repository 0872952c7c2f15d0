/* CachedAttention alone, as a decode step of the mid-size MoE runs it: 3 full-attention layers of 8 query and 2
 * key/value heads of 128, B rows each with P cached positions (a layer's cache is B x 8 KB a position: at batch
 * 8 and 164 positions, the middle of the standard bench's 64 + 200 tokens, 2.7 MB of K and V), 256 MB streamed
 * between steps so that every step starts cold; the median ms of a step on two threads (kernel_steps.h).
 *
 *     cc -O3 -march=native -Iplugins -DDUALBRAIN_CPU_DOMAIN='"x"' tests/benchmarks/attention_steps.c -lm \
 *         -lpthread -o /tmp/attention_steps && /tmp/attention_steps 8 164 60
 */
#include "kernel_steps.h"
#include "cached_attention/cpu.c"

int main(int argc, char **argv) {
  int batch = argc > 1 ? atoi(argv[1]) : 8, past = argc > 2 ? atoi(argv[2]) : 164;
  int steps = argc > 3 ? atoi(argv[3]) : 60;
  enum { LAYERS = 3, HQ = 8, HKV = 2, D = 128, FLUSH = 64 << 20 };
  if (batch < 1 || past < 0 || steps < 1 || steps > 10000)
    return fprintf(stderr, "usage: %s [batch] [past] [steps]\n", argv[0]), 2;
  pool_begin();
  size_t cache = (size_t)past * batch * HKV * D, fresh = (size_t)batch * HKV * D;
  float *q = step_floats((size_t)batch * HQ * D, 1e-2f), *scale = step_floats(1, 0.0f);
  float *new_k = step_floats(fresh, 1e-3f), *new_v = step_floats(fresh, 1e-3f), *keys[LAYERS], *values[LAYERS];
  for (int l = 0; l < LAYERS; l++) keys[l] = step_floats(cache, 1e-3f), values[l] = step_floats(cache, 1e-3f);
  uint8_t *mask = malloc((size_t)batch * (past + 1));
  memset(mask, 1, (size_t)batch * (past + 1));
  scale[0] = 0.0884f;
  step_out[0] = step_floats((size_t)batch * HQ * D, 0.0f);
  float *flush = step_floats(FLUSH, 1e-3f), sink = 0.0f;
  double *t = malloc(sizeof(double) * (size_t)steps);
  for (int s = 0; s < steps; s++) {
    for (size_t i = 0; i < FLUSH; i += 16) sink += flush[i];
    double t0 = step_now();
    for (int l = 0; l < LAYERS; l++) {
      step_in[0] = (StepInput){q, {batch, HQ, 1, D}, 4};
      step_in[1] = (StepInput){keys[l], {past, batch, HKV, D}, 4};
      step_in[2] = (StepInput){new_k, {1, batch, HKV, D}, 4};
      step_in[3] = (StepInput){values[l], {past, batch, HKV, D}, 4};
      step_in[4] = (StepInput){new_v, {1, batch, HKV, D}, 4};
      step_in[5] = (StepInput){mask, {batch, 1, 1, past + 1}, 4};
      step_in[6] = (StepInput){scale, {1}, 1};
      if (compute(NULL, NULL)) return 1;
    }
    t[s] = step_now() - t0;
  }
  char what[80];
  snprintf(what, sizeof what, "CachedAttention, 3 layers, batch %d, %d past%s", batch, past, sink == 1.0f ? " " : "");
  step_report(what, t, steps);
  printf("  %.1f MB of K and V a step\n", 2.0 * LAYERS * (double)cache * 4 / 1e6);
  return 0;
}
