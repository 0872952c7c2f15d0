/* Int4MatMul alone, as a decode step of the mid-size MoE's int4 export runs it: per GDN layer (9) a 1024 -> 3104
 * and a 1024 -> 1024 linear, per attention layer (3) 1024 -> 2560 and 1024 -> 1024, and the LM head 1024 -> 32000
 * (~57 MB of 4-bit weights and scales, so a step streams from memory); the median ms of a step at batch B on two
 * threads (kernel_steps.h), and the rate its weight bytes were read at.
 *
 *     cc -O3 -march=native -Iplugins -DDUALBRAIN_CPU_DOMAIN='"x"' tests/benchmarks/int4_matmul_steps.c -lm \
 *         -lpthread -o /tmp/int4_steps && /tmp/int4_steps 8 60
 */
#include "kernel_steps.h"
#include "int4_matmul/cpu.c"

int main(int argc, char **argv) {
  int batch = argc > 1 ? atoi(argv[1]) : 8, steps = argc > 2 ? atoi(argv[2]) : 60;
  enum { K = 1024, LINEARS = 9 * 2 + 3 * 2 + 1 };
  int64_t rows[LINEARS];
  for (int l = 0; l < 12; l++) rows[2 * l] = l % 4 == 3 ? 2560 : 3104, rows[2 * l + 1] = 1024;
  rows[LINEARS - 1] = 32000;
  if (batch < 1 || steps < 1 || steps > 10000) return fprintf(stderr, "usage: %s [batch] [steps]\n", argv[0]), 2;
  pool_begin();
  uint8_t *w[LINEARS];
  float *s[LINEARS];
  double bytes = 0;
  for (int l = 0; l < LINEARS; l++) {
    size_t blocks = (size_t)rows[l] / 8 * K / 32;
    w[l] = aligned_alloc(64, blocks * 128);
    for (size_t i = 0; i < blocks * 16; i++) ((uint64_t *)w[l])[i] = step_bits();
    s[l] = step_floats(blocks * 8, 1e-5f);
    bytes += (double)blocks * (128 + 32);
  }
  float *x = step_floats((size_t)batch * K, 1e-3f);
  step_out[0] = aligned_alloc(64, (size_t)batch * 32000 * sizeof(float));
  double *t = malloc(sizeof(double) * (size_t)steps);
  for (int st = 0; st < steps; st++) {
    double t0 = step_now();
    for (int l = 0; l < LINEARS; l++) {
      step_in[0] = (StepInput){x, {batch, 1, K}, 3};
      step_in[1] = (StepInput){w[l], {rows[l] / 8, K / 32, 128}, 3};
      step_in[2] = (StepInput){s[l], {rows[l] / 8, K / 32, 8}, 3};
      if (compute(NULL, NULL)) return 1;
    }
    t[st] = step_now() - t0;
  }
  char what[64];
  snprintf(what, sizeof what, "Int4MatMul, 25 linears, batch %d", batch);
  step_report(what, t, steps);
  printf("  %.1f MB a step: %.1f GB/s at the median\n", bytes / 1e6, bytes / t[steps / 2] / 1e9);
  return 0;
}
