/* GatedDeltaMixerRawGates alone, as a decode step of the mid-size MoE runs it: 9 GDN layers of 16 value heads
 * (8 q/k heads, dk = dv = 64, a four-tap conv), each layer's states its own, 256 MB streamed between steps so
 * that every step starts cold (at batch 8 a layer's states are 2 MB, out of cache in a real step); the median
 * ms of a step at batch B on two threads (kernel_steps.h).
 *
 *     cc -O3 -march=native -Iplugins -DDUALBRAIN_CPU_DOMAIN='"x"' tests/benchmarks/gated_delta_mixer_steps.c -lm \
 *         -lpthread -o /tmp/gdn_steps && /tmp/gdn_steps 8 40
 */
#include "kernel_steps.h"
#include "gated_delta/cpu.c"

int main(int argc, char **argv) {
  int batch = argc > 1 ? atoi(argv[1]) : 8, steps = argc > 2 ? atoi(argv[2]) : 40;
  enum { LAYERS = 9, HK = 8, HV = 16, DK = 64, DV = 64, KW = 4, C = 2 * HK * DK + HV * DV, FLUSH = 64 << 20 };
  if (batch < 1 || steps < 1 || steps > 10000) return fprintf(stderr, "usage: %s [batch] [steps]\n", argv[0]), 2;
  pool_begin();
  size_t state = (size_t)batch * HV * DK * DV, conv = (size_t)batch * C * (KW - 1);
  float *w_t = step_floats(KW * C, 1e-4f), *q_scale = step_floats(DK, 1e-3f), *k_scale = step_floats(DK, 1e-3f);
  float *norm = step_floats(DV, 1e-3f), *gate_params = step_floats(2 * HV, 1e-3f), *eps = step_floats(3, 0.0f);
  float *qkv = step_floats((size_t)batch * C, 1e-4f), *z = step_floats((size_t)batch * HV * DV, 1e-4f);
  float *g = step_floats((size_t)batch * HV, 1e-3f), *beta = step_floats((size_t)batch * HV, 1e-3f);
  float *states[LAYERS][2], *convs[LAYERS][2];
  for (int l = 0; l < LAYERS; l++)
    for (int i = 0; i < 2; i++) states[l][i] = step_floats(state, 1e-4f), convs[l][i] = step_floats(conv, 1e-4f);
  step_out[0] = step_floats((size_t)batch * HV * DV, 0.0f);
  float *flush = step_floats(FLUSH, 1e-3f), sink = 0.0f;
  OpKernel kernel = {.num_k_heads = HK, .variant = 1};
  double *t = malloc(sizeof(double) * (size_t)steps);
  for (int s = 0; s < steps; s++) {
    for (size_t i = 0; i < FLUSH; i += 16) sink += flush[i];
    double t0 = step_now();
    for (int l = 0; l < LAYERS; l++) {
      int in = s % 2;  /* the states a step reads; it writes the other pair */
      step_in[0] = (StepInput){qkv, {batch, 1, C}, 3};
      step_in[1] = (StepInput){w_t, {KW, C}, 2};
      step_in[2] = (StepInput){convs[l][in], {batch, C, KW - 1}, 3};
      step_in[3] = (StepInput){z, {batch, 1, HV * DV}, 3};
      step_in[4] = (StepInput){g, {batch, 1, HV}, 3};
      step_in[5] = (StepInput){beta, {batch, 1, HV}, 3};
      step_in[6] = (StepInput){states[l][in], {batch, HV, DK, DV}, 4};
      step_in[7] = (StepInput){q_scale, {DK}, 1};
      step_in[8] = (StepInput){k_scale, {DK}, 1};
      step_in[9] = (StepInput){norm, {DV}, 1};
      step_in[10] = (StepInput){eps, {3}, 1};
      step_in[11] = (StepInput){gate_params, {2, HV}, 2};
      step_out[1] = convs[l][1 - in], step_out[2] = states[l][1 - in];
      if (mixer_compute(&kernel, NULL)) return 1;
    }
    t[s] = step_now() - t0;
  }
  char what[80];
  snprintf(what, sizeof what, "GatedDeltaMixerRawGates, 9 layers, batch %d%s", batch, sink == 1.0f ? " " : "");
  step_report(what, t, steps);
  return 0;
}
