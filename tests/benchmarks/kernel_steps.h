/* What the kernel step harnesses (moe_kernel_steps.c, gated_delta_mixer_steps.c) share: the ONNX Runtime glue
 * of plugins/ort_kernel.h stubbed, inputs served from a table, and dualbrain_parallel run on two threads that
 * take contiguous halves of the items, as ONNX Runtime's intra-op pool hands a thread consecutive items (checked
 * on 1.32: items 0-15 on one thread, 16-31 on the other). The harness includes one op's cpu.c after this.
 *
 * Why: end to end, a change worth 5 % of one kernel is below this host's noise (decode A/Bs of the same library
 * differ by up to 10 %); run alone, without Python or ONNX Runtime, the kernels repeat to within a few %. */
#include <immintrin.h>  /* _cvtss_sh */
#include <malloc.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ort_kernel.h"

const OrtApi *dualbrain_api;
typedef struct { const void *data; int64_t dims[5]; size_t rank; int half; } StepInput;  /* half: float16 scales */
static StepInput step_in[16];
static float *step_out[4];

OrtStatus *dualbrain_error(const char *m) { fprintf(stderr, "kernel error: %s\n", m); return (OrtStatus *)1; }
OrtStatus *dualbrain_input(OrtKernelContext *c, size_t i, size_t r, const float **d, int64_t *dims) {
  (void)c, *d = step_in[i].data, memcpy(dims, step_in[i].dims, sizeof(int64_t) * r);
  return NULL;
}
OrtStatus *dualbrain_input_of(OrtKernelContext *c, size_t i, int type, size_t r, size_t *rank, const void **d,
                              int64_t *dims) {
  (void)c, (void)type, *d = step_in[i].data, memcpy(dims, step_in[i].dims, sizeof(int64_t) * r);
  if (rank) *rank = step_in[i].rank;
  return NULL;
}
OrtStatus *dualbrain_scales_input(OrtKernelContext *c, size_t i, size_t r, const void **d, int *half, int64_t *dims) {
  (void)c, *d = step_in[i].data, *half = step_in[i].half, memcpy(dims, step_in[i].dims, sizeof(int64_t) * r);
  return NULL;
}
OrtStatus *dualbrain_output(OrtKernelContext *c, size_t i, const int64_t *d, size_t r, float **o) {
  (void)c, (void)d, (void)r, *o = step_out[i];
  return NULL;
}
int64_t dualbrain_attr_int(const OrtKernelInfo *i, const char *n, int64_t f) { (void)i, (void)n; return f; }
OrtStatus *dualbrain_same_shape(OrtShapeInferContext *c, size_t i, size_t o) { (void)c, (void)i, (void)o; return NULL; }
const char *dualbrain_cpu_provider(const OrtCustomOp *op) { (void)op; return "cpu"; }
int dualbrain_float(const OrtCustomOp *op, size_t i) { (void)op, (void)i; return 1; }
int dualbrain_required(const OrtCustomOp *op, size_t i) { (void)op, (void)i; return 0; }
int dualbrain_default_memory(const OrtCustomOp *op, size_t i) { (void)op, (void)i; return 0; }
int dualbrain_one(const OrtCustomOp *op) { (void)op; return 1; }
int dualbrain_first_version(const OrtCustomOp *op) { (void)op; return 1; }
int dualbrain_last_version(const OrtCustomOp *op) { (void)op; return 1; }
OrtStatus *dualbrain_no_settings(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **out) {
  (void)op, (void)api, (void)info, *out = NULL;
  return NULL;
}
void dualbrain_no_kernel(void *k) { (void)k; }

static void (*pool_fn)(void *, size_t);
static void *pool_user;
static size_t pool_total;
static pthread_barrier_t pool_start, pool_end;

static void pool_half(int half) {
  size_t mid = (pool_total + 1) / 2, a = half ? mid : 0, b = half ? pool_total : mid;
  for (size_t i = a; i < b; i++) pool_fn(pool_user, i);
}
static void *pool_worker(void *arg) {
  (void)arg;
  for (;;) pthread_barrier_wait(&pool_start), pool_half(1), pthread_barrier_wait(&pool_end);
  return NULL;
}
OrtStatus *dualbrain_parallel(OrtKernelContext *ctx, void (*fn)(void *, size_t), size_t total, void *user) {
  (void)ctx, pool_fn = fn, pool_user = user, pool_total = total;
  pthread_barrier_wait(&pool_start), pool_half(0), pthread_barrier_wait(&pool_end);
  return NULL;
}
static void pool_begin(void) {
  pthread_t th;
  /* The kernels malloc and free their scratch (~100-200 KB at batch 8) every call. In ONNX Runtime's process
   * glibc has by then raised its trim threshold (a freed mmap'd block of ours or ORT's does that), so the
   * scratch's pages stay mapped: ~5 page faults a batch-8 decode step of the mid-size MoE. Here nothing raises
   * it, the heap's top was given back every call and faulted in again (~13 faults a MoE layer, 0.4 ms a
   * batch-8 step of 12 layers), which is not what a decode step pays; so raise it as that process has. */
  mallopt(M_TRIM_THRESHOLD, 64 << 20), mallopt(M_MMAP_THRESHOLD, 32 << 20);
  pthread_barrier_init(&pool_start, NULL, 2), pthread_barrier_init(&pool_end, NULL, 2);
  pthread_create(&th, NULL, pool_worker, NULL);
}

static double step_now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}
static uint64_t step_rng = 88172645463325252ull;
static uint64_t step_bits(void) { return step_rng ^= step_rng << 13, step_rng ^= step_rng >> 7, step_rng ^= step_rng << 17; }
static float *step_floats(size_t n, float scale) {
  float *a = aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64);
  for (size_t i = 0; i < n; i++) a[i] = (float)((int)(step_bits() % 2001) - 1000) * scale;
  return a;
}
/* step_floats' values as a layout's scales: float16 (`half`, rounded by the F16C instruction) or float32 */
static const void *step_scales(size_t n, float scale, int half) {
  float *f = step_floats(n, scale);
  if (!half) return f;
  uint16_t *h = aligned_alloc(64, (n * sizeof(uint16_t) + 63) / 64 * 64);
  for (size_t i = 0; i < n; i++) h[i] = _cvtss_sh(f[i], 0);
  free(f);
  return h;
}
static int step_compare(const void *a, const void *b) { double x = *(const double *)a, y = *(const double *)b; return (x > y) - (x < y); }
/* the median and the least of n step times, in ms */
static void step_report(const char *what, double *t, int n) {
  qsort(t, (size_t)n, sizeof *t, step_compare);
  printf("%s: %.3f ms a step (median of %d; least %.3f)\n", what, t[n / 2] * 1e3, n, t[0] * 1e3);
}
