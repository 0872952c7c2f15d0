/* How fast the fp32 MoE kernel's two phases stream the experts, outside ONNX Runtime.
 *
 * Drives plugins/moe_dispatch/cpu.c's own work items (expert_inputs: the fc1 gate/up rows;
 * expert_outputs: the fc2 rows) with OpenMP on 2 threads over twelve layers of mid-size experts
 * (64 experts of [2 x 256, 1024] and [1024, 256], 8 routed per layer, one token), and beside them the
 * same reads written as plain loops (`plain`): a phase slower than its plain loop is losing to its
 * access order, not to the memory. That is how the seventh pass found the kernel reading each up row
 * before its gate row (tests/benchmarks/RESULTS.md).
 *
 *   cc -O3 -std=gnu11 -march=native -fopenmp -Iplugins -DDUALBRAIN_CPU_DOMAIN='"bench"' \
 *      tests/benchmarks/moe_kernel_stream.c plugins/ort_kernels.c plugins/causal_conv/cpu.c \
 *      plugins/int8_matmul/cpu.c plugins/int4_matmul/cpu.c plugins/gated_delta/cpu.c \
 *      plugins/cached_attention/cpu.c -o /tmp/moe_stream -lm && /tmp/moe_stream [reps]
 */
#include "../../plugins/moe_dispatch/cpu.c"

#include <omp.h>
#include <stdio.h>
#include <time.h>

enum { H = 1024, I = 256, L = 12, K = 8, E = 64 };

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

static unsigned lcg(unsigned *s) { return (*s = *s * 1103515245u + 12345u) >> 8; }

/* the reads of expert_inputs / expert_outputs for one token, in address order */
static void plain_inputs(const Plan *p, int item, float act[K][I]) {
  int u = item / p->act_chunks, c = item % p->act_chunks;
  const float *base = p->fc1 + (size_t)p->used[u] * 2 * I * H;
  for (int r = c * ACT_ROWS_PER_ITEM; r < (c + 1) * ACT_ROWS_PER_ITEM; r++) {
    float g = dot1(base + (size_t)2 * r * H, p->x, H);
    float v = dot1(base + (size_t)(2 * r + 1) * H, p->x, H);
    act[u][r] = silu_mul(g, v);
  }
}

static void plain_outputs(const Plan *p, int item, float act[K][I]) {
  int h0 = item * OUT_ROWS_PER_ITEM;
  for (int h = h0; h < h0 + OUT_ROWS_PER_ITEM; h++) p->y[h] = 0;
  for (int u = 0; u < K; u++)
    for (int h = h0; h < h0 + OUT_ROWS_PER_ITEM; h++)
      p->y[h] += p->w[u] * dot1(p->fc2 + ((size_t)p->used[u] * H + h) * I, act[u], I);
}

int main(int argc, char **argv) {
  int reps = argc > 1 ? atoi(argv[1]) : 30;
  size_t n1 = (size_t)2 * I * H * E * L, n2 = (size_t)H * I * E * L;
  float *fc1 = aligned_alloc(64, n1 * sizeof(float)), *fc2 = aligned_alloc(64, n2 * sizeof(float));
  static float x[H], y[H], logits[E], act[K][I];
  unsigned seed = 1;
  for (size_t i = 0; i < n1; i++) fc1[i] = (float)((int)(lcg(&seed) % 2001) - 1000) * 1e-5f;
  for (size_t i = 0; i < n2; i++) fc2[i] = (float)((int)(lcg(&seed) % 2001) - 1000) * 1e-5f;
  double t[2][2] = {{0}};  /* [kernel, plain][phase] */
  for (int rep = 0; rep < 2 * reps; rep++)  /* the kernel and the plain loops in turn, over all layers */
    for (int l = 0, way = rep % 2; l < L; l++) {
      for (int i = 0; i < H; i++) x[i] = (float)((int)(lcg(&seed) % 2001) - 1000) * 1e-3f;
      for (int e = 0; e < E; e++) logits[e] = (float)(lcg(&seed) % 1000) * 1e-2f;
      Plan p = {.x = x, .y = y, .n = 1, .h = H, .i = I,
                .fc1 = fc1 + (size_t)l * E * 2 * I * H, .fc2 = fc2 + (size_t)l * E * H * I};
      void *mem;
      route(&p, logits, E, K, 1, NULL, &mem);  /* no shared expert */
      if (!mem) return 1;
      p.act_chunks = I / ACT_ROWS_PER_ITEM;
      int items1 = (int)(p.n_used * p.act_chunks), items2 = H / OUT_ROWS_PER_ITEM;
      {
        double t0 = now();
#pragma omp parallel for schedule(dynamic, 1) num_threads(2)
        for (int it = 0; it < items1; it++)
          way ? plain_inputs(&p, it, act) : expert_inputs(&p, (size_t)it);
        double t1 = now();
#pragma omp parallel for schedule(dynamic, 1) num_threads(2)
        for (int it = 0; it < items2; it++)
          way ? plain_outputs(&p, it, act) : expert_outputs(&p, (size_t)it);
        if (rep >= 2) t[way][0] += t1 - t0, t[way][1] += now() - t1;  /* the first of each warms up */
      }
      free(mem);
    }
  double b1 = 4.0 * K * 2 * I * H * L * (reps - 1), b2 = 4.0 * K * H * I * L * (reps - 1);
  printf("GB/s       fc1 (gate/up)  fc2 (down)\nkernel     %13.1f  %10.1f\nplain      %13.1f  %10.1f\n",
         b1 / t[0][0] / 1e9, b2 / t[0][1] / 1e9, b1 / t[1][0] / 1e9, b2 / t[1][1] / 1e9);
  return 0;
}
