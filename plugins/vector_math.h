/* Vector-friendly float32 math for the CPU kernels (plugins/<op>/cpu.c): written so that a loop of calls
 * vectorises under plain -O3, or in GCC's vector extension. */
#ifndef DUALBRAIN_VECTOR_MATH_H
#define DUALBRAIN_VECTOR_MATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* e^x to within 1e-7 relative (Cephes' expf: Cody-Waite reduction, degree-6 polynomial), written so that a
 * loop of them vectorises: glibc's expf is a call per value (silu's was the fused op's largest cost), and
 * so are fminf / fmaxf; floorf does not vectorise without -ffast-math, so n is rounded by adding and taking
 * away 1.5 * 2^23. */
static inline float exp_approx(float x) {
  x = x < -87.3f ? -87.3f : x > 88.3f ? 88.3f : x;
  float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float e = 1.9875691500e-4f;
  e = e * r + 1.3981999507e-3f, e = e * r + 8.3334519073e-3f, e = e * r + 4.1665795894e-2f;
  e = e * r + 1.6666665459e-1f, e = e * r + 5.0000001201e-1f;
  int32_t bits = ((int32_t)n + 127) << 23;
  float scale;
  memcpy(&scale, &bits, sizeof scale);
  return (e * r * r + r + 1.0f) * scale;
}

/* max |x| over n floats, NaN ignored (0 for none): the activations' scale of the quantized kernels
 * (quant_blocks.h's int8_blocks, Int8MatMul's int16 tokens), which run it on the calling thread alone. With
 * AVX-512, 16 at a time: max_ps(a, b) gives b where either is NaN, so a NaN |x| leaves the running max as the
 * plain compare does, and the max is the same whatever the order. */
static inline float abs_max(const float *x, int64_t n) {
  float mx = 0.0f;
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 magnitude = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  __m512 mv = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) mv = _mm512_max_ps(_mm512_and_ps(_mm512_loadu_ps(x + i), magnitude), mv);
  mx = _mm512_reduce_max_ps(mv);
#endif
  for (; i < n; i++) mx = fabsf(x[i]) > mx ? fabsf(x[i]) : mx;
  return mx;
}

/* eight floats in GCC's vector extension (one AVX2 register) */
typedef float v8 __attribute__((vector_size(32)));

static inline v8 load8(const float *p) {
  v8 v;
  memcpy(&v, p, sizeof v);
  return v;
}

static inline float hsum(v8 s) { return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])); }

/* a . b over n floats: four sums in flight cover the FMA latency */
static inline float dot1(const float *a, const float *b, int64_t n) {
  v8 s[4] = {{0}};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32)
    for (int j = 0; j < 4; j++) s[j] += load8(a + i + 8 * j) * load8(b + i + 8 * j);
  for (; i + 8 <= n; i += 8) s[0] += load8(a + i) * load8(b + i);
  float r = hsum((s[0] + s[1]) + (s[2] + s[3]));
  for (; i < n; i++) r += a[i] * b[i];
  return r;
}

#endif
