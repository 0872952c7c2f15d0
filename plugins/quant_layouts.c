/* The interleaved layouts of dualbrain's quantized CPU kernels (quant_blocks.h), made at load from the
 * export's bytes. The numpy references (moe_dispatch.reference.interleave_int4_rows /
 * interleave_int8_rows, int4_matmul.reference.interleave_linear) define them; these do the same in one
 * pass, because numpy's nibble shuffles ran at ~0.4 GB/s: ~40 s of loading for a 35B-A3B's 16 GB of
 * int4 experts. Called through ctypes by dualbrain.runtime.backends.ort_kernels; the scales (a quarter
 * of the bytes) stay with numpy (moe_dispatch.reference.interleave_scales: float16 where exact).
 */
#include <stdint.h>
#include <string.h>

#define EXPORT __attribute__((visibility("default")))

static inline uint32_t load_word(const uint8_t *p) {
  uint32_t w;
  memcpy(&w, p, 4);
  return w;
}

/* QMoE's 4-bit rows [groups * 8, blocks * 16 bytes] -> [groups, blocks, 128]: each row's 32-bit word of
 * values 8c..8c+7 (nibbles in order) becomes v0 v4 v1 v5 v2 v6 v3 v7 and moves to lane r of chunk c */
EXPORT void dualbrain_interleave_int4_rows(const uint8_t *packed, uint8_t *out, int64_t groups, int64_t blocks) {
  for (int64_t g = 0; g < groups; g++)
    for (int r = 0; r < 8; r++) {
      const uint8_t *row = packed + (8 * g + r) * blocks * 16;
      for (int64_t b = 0; b < blocks; b++)
        for (int c = 0; c < 4; c++) {
          uint32_t x = load_word(row + 16 * b + 4 * c);
          x = (x & 0xFF0000FFu) | ((x & 0x00FF0000u) >> 8) | ((x & 0x0000FF00u) << 8);
          x = (x & 0xF00FF00Fu) | ((x & 0x0F000F00u) >> 4) | ((x & 0x00F000F0u) << 4);
          memcpy(out + (g * blocks + b) * 128 + 32 * c + 4 * r, &x, 4);
        }
    }
}

/* QMoE's 8-bit rows [groups * 8, blocks * 32 bytes] -> [groups, blocks, 256]: row r's values 4c..4c+3 to
 * lane r of chunk c */
EXPORT void dualbrain_interleave_int8_rows(const uint8_t *q, uint8_t *out, int64_t groups, int64_t blocks) {
  for (int64_t g = 0; g < groups; g++)
    for (int r = 0; r < 8; r++) {
      const uint8_t *row = q + (8 * g + r) * blocks * 32;
      for (int64_t b = 0; b < blocks; b++)
        for (int c = 0; c < 8; c++) memcpy(out + (g * blocks + b) * 256 + 32 * c + 4 * r, row + 32 * b + 4 * c, 4);
    }
}

/* The export's signed int4 weight [K, N] (two's complement nibbles, (k, n) at k N + n, the even one low)
 * -> [N/8, K/32, 128] with the mid zero point: byte (g, b, 32c + 4r + i) holds (32b + 8c + i, 8g + r)
 * low and (32b + 8c + 4 + i, 8g + r) high. Block by block, so the 32 source rows a block reads stay in
 * cache while every group's 128 bytes of it are written. */
EXPORT void dualbrain_interleave_linear(const uint8_t *packed, uint8_t *out, int64_t k, int64_t n) {
  int64_t blocks = k / 32, groups = n / 8, half = n / 2;
  for (int64_t b = 0; b < blocks; b++)
    for (int64_t g = 0; g < groups; g++) {
      uint8_t blk[128] = {0};
      for (int kk = 0; kk < 32; kk++) {
        uint32_t x = load_word(packed + (32 * b + kk) * half + 4 * g) ^ 0x88888888u;  /* v -> v + 8 (mod 16) */
        int c = kk / 8, i = kk % 4, shift = kk % 8 >= 4 ? 4 : 0;
        for (int r = 0; r < 8; r++) blk[32 * c + 4 * r + i] |= (uint8_t)(((x >> (4 * r)) & 0x0F) << shift);
      }
      memcpy(out + (g * blocks + b) * 128, blk, 128);
    }
}
