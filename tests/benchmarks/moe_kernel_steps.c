/* Int4MoEDispatch alone, as a decode step of the mid-size MoE runs it: 12 layers of 64 experts (hidden 1024,
 * intermediate 256, top 8), each layer's experts its own random bytes (~31 MB, so a step streams from memory),
 * random router logits per layer; the median ms of a step at batch B on two threads (kernel_steps.h).
 *
 *     cc -O3 -march=native -Iplugins -DDUALBRAIN_CPU_DOMAIN='"x"' tests/benchmarks/moe_kernel_steps.c -lm -lpthread \
 *         -o /tmp/moe_steps && /tmp/moe_steps 8 60 [half]
 *
 * `half`: the scales in float16 (as the loader lays out an export's float16 scales), else float32.
 *
 * For an A/B, build it from each tree and alternate the binaries a few times (tests/benchmarks/RESULTS.md). */
#include "kernel_steps.h"
#include "moe_dispatch/cpu.c"

int main(int argc, char **argv) {
  int batch = argc > 1 ? atoi(argv[1]) : 8, steps = argc > 2 ? atoi(argv[2]) : 60;
  int half = argc > 3 && !strcmp(argv[3], "half");
  enum { LAYERS = 12, E = 64, H = 1024, I = 256, LOGIT_SETS = 64 };
  if (batch < 1 || steps < 1 || steps > 10000) return fprintf(stderr, "usage: %s [batch] [steps]\n", argv[0]), 2;
  pool_begin();
  size_t blocks1 = (size_t)E * 2 * I / 8 * H / 32, blocks2 = (size_t)E * H / 8 * I / 32;  /* of eight rows */
  uint8_t *w1[LAYERS], *w2[LAYERS];
  const void *s1[LAYERS], *s2[LAYERS];
  for (int l = 0; l < LAYERS; l++) {
    w1[l] = aligned_alloc(64, blocks1 * 128), w2[l] = aligned_alloc(64, blocks2 * 128);
    for (size_t i = 0; i < blocks1 * 16; i++) ((uint64_t *)w1[l])[i] = step_bits();
    for (size_t i = 0; i < blocks2 * 16; i++) ((uint64_t *)w2[l])[i] = step_bits();
    s1[l] = step_scales(blocks1 * 8, 1e-5f, half), s2[l] = step_scales(blocks2 * 8, 1e-5f, half);
  }
  float *x = step_floats((size_t)batch * H, 1e-3f), *logits[LOGIT_SETS];
  for (int i = 0; i < LOGIT_SETS; i++) logits[i] = step_floats((size_t)batch * E, 1e-3f);
  step_out[0] = aligned_alloc(64, (size_t)batch * H * sizeof(float));
  MoeKernel kernel = {.top_k = 8, .normalize = 1};
  double *t = malloc(sizeof(double) * (size_t)steps);
  for (int s = 0; s < steps; s++) {
    double t0 = step_now();
    for (int l = 0; l < LAYERS; l++) {
      step_in[0] = (StepInput){x, {batch, H}, 2};
      step_in[1] = (StepInput){logits[(s * LAYERS + l) % LOGIT_SETS], {batch, E}, 2};
      step_in[2] = (StepInput){w1[l], {E, 2 * I / 8, H / 32, 128}, 4};
      step_in[3] = (StepInput){s1[l], {E, 2 * I / 8, H / 32, 8}, 4, half};
      step_in[4] = (StepInput){w2[l], {E, H / 8, I / 32, 128}, 4};
      step_in[5] = (StepInput){s2[l], {E, H / 8, I / 32, 8}, 4, half};
      if (int4_compute(&kernel, NULL)) return 1;
    }
    t[s] = step_now() - t0;
  }
  char what[64];
  snprintf(what, sizeof what, "Int4MoEDispatch, 12 layers, batch %d, %s scales", batch, half ? "float16" : "float32");
  step_report(what, t, steps);
  return 0;
}
