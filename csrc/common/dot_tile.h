// the register-blocked dot micro-kernels shared by kmeans_cpu.cpp (points x centroids) and
// search_cpu.cpp (tokens x queries): rows = kTileRows vectors read in place, columns = a panel of
// 16 (or 8) vectors packed as [D][width], dots summed per block of kDimBlock dims and then across
// blocks. every dot depends only on its two vectors, not on where it sits in a tile.
#pragma once

#include <cstdint>

#include "common/cpu.h"

namespace raid_fast {

// rows per register tile of the micro-kernel: 6 rows x 16 panel columns = 12 ymm accumulators.
constexpr int kTileRows = 6;
// dims per block: a [kDimBlock, 16] panel slice plus a tile's rows fit in l1, and dots summed
// per block, then across blocks, round less than one chain over all of D.
constexpr int64_t kDimBlock = 192;

// x . c for kTileRows rows and W panel columns over dims d0 .. d1-1, added to out when add is set.
// out [kTileRows, ldo].
template <int W>
inline void dot_tile_generic(const float* const* xr, const float* panel, int64_t d0, int64_t d1,
                             bool add, float* out, int64_t ldo) {
  float acc[kTileRows][W] = {};
  for (int64_t d = d0; d < d1; ++d) {
    const float* b = panel + d * W;  // [W]
    for (int p = 0; p < kTileRows; ++p) {
      const float a = xr[p][d];
      for (int c = 0; c < W; ++c) acc[p][c] += a * b[c];
    }
  }
  for (int p = 0; p < kTileRows; ++p) {
    for (int c = 0; c < W; ++c) out[p * ldo + c] = add ? out[p * ldo + c] + acc[p][c] : acc[p][c];
  }
}

#ifdef RAID_FAST_X86

// a tile's sums over one block of dims are added to the earlier blocks' sums rather than
// continued from them: the two-level sum rounds less than one long chain over D.
__attribute__((target("avx2,fma"))) inline void store_dots(float* out, __m256 v, bool add) {
  _mm256_storeu_ps(out, add ? _mm256_add_ps(_mm256_loadu_ps(out), v) : v);
}

// register-blocked x . c for kTileRows rows and 16 panel columns over dims d0 .. d1-1: per dim, two
// aligned loads of the packed panel row and one broadcast per row feed 12 fmas. the 12
// accumulators are named variables so that no compiler is tempted to keep them in memory. with
// add set, the tile adds to the sums already in out (a later block of dims).
__attribute__((target("avx2,fma"))) inline void dot_tile16_avx2(const float* const* xr,
                                                                const float* panel, int64_t d0,
                                                                int64_t d1, bool add, float* out,
                                                                int64_t ldo) {
  __m256 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
  c00 = c01 = c10 = c11 = c20 = c21 = _mm256_setzero_ps();
  c30 = c31 = c40 = c41 = c50 = c51 = _mm256_setzero_ps();
  const float* x0 = xr[0];
  const float* x1 = xr[1];
  const float* x2 = xr[2];
  const float* x3 = xr[3];
  const float* x4 = xr[4];
  const float* x5 = xr[5];
  for (int64_t d = d0; d < d1; ++d) {
    const __m256 b0 = _mm256_load_ps(panel + d * 16);
    const __m256 b1 = _mm256_load_ps(panel + d * 16 + 8);
    __m256 a = _mm256_broadcast_ss(x0 + d);
    c00 = _mm256_fmadd_ps(a, b0, c00);
    c01 = _mm256_fmadd_ps(a, b1, c01);
    a = _mm256_broadcast_ss(x1 + d);
    c10 = _mm256_fmadd_ps(a, b0, c10);
    c11 = _mm256_fmadd_ps(a, b1, c11);
    a = _mm256_broadcast_ss(x2 + d);
    c20 = _mm256_fmadd_ps(a, b0, c20);
    c21 = _mm256_fmadd_ps(a, b1, c21);
    a = _mm256_broadcast_ss(x3 + d);
    c30 = _mm256_fmadd_ps(a, b0, c30);
    c31 = _mm256_fmadd_ps(a, b1, c31);
    a = _mm256_broadcast_ss(x4 + d);
    c40 = _mm256_fmadd_ps(a, b0, c40);
    c41 = _mm256_fmadd_ps(a, b1, c41);
    a = _mm256_broadcast_ss(x5 + d);
    c50 = _mm256_fmadd_ps(a, b0, c50);
    c51 = _mm256_fmadd_ps(a, b1, c51);
  }
  store_dots(out, c00, add);
  store_dots(out + 8, c01, add);
  store_dots(out + ldo, c10, add);
  store_dots(out + ldo + 8, c11, add);
  store_dots(out + 2 * ldo, c20, add);
  store_dots(out + 2 * ldo + 8, c21, add);
  store_dots(out + 3 * ldo, c30, add);
  store_dots(out + 3 * ldo + 8, c31, add);
  store_dots(out + 4 * ldo, c40, add);
  store_dots(out + 4 * ldo + 8, c41, add);
  store_dots(out + 5 * ldo, c50, add);
  store_dots(out + 5 * ldo + 8, c51, add);
}

// the same for the last panel when it is only 8 columns wide, over two tiles at once: 12 rows
// keep 12 independent fma chains in flight, as many as the 16-wide kernel has. every column still
// sums its dims in the same order as in the 16-wide kernel, so equal columns get equal dots.
__attribute__((target("avx2,fma"))) inline void dot_tile8_avx2(const float* const* xr,
                                                               const float* panel, int64_t d0,
                                                               int64_t d1, bool add, float* out,
                                                               int64_t ldo) {
  __m256 c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11;
  c0 = c1 = c2 = c3 = c4 = c5 = _mm256_setzero_ps();
  c6 = c7 = c8 = c9 = c10 = c11 = _mm256_setzero_ps();
  const float* x0 = xr[0];
  const float* x1 = xr[1];
  const float* x2 = xr[2];
  const float* x3 = xr[3];
  const float* x4 = xr[4];
  const float* x5 = xr[5];
  const float* x6 = xr[6];
  const float* x7 = xr[7];
  const float* x8 = xr[8];
  const float* x9 = xr[9];
  const float* x10 = xr[10];
  const float* x11 = xr[11];
  for (int64_t d = d0; d < d1; ++d) {
    const __m256 b = _mm256_load_ps(panel + d * 8);
    c0 = _mm256_fmadd_ps(_mm256_broadcast_ss(x0 + d), b, c0);
    c1 = _mm256_fmadd_ps(_mm256_broadcast_ss(x1 + d), b, c1);
    c2 = _mm256_fmadd_ps(_mm256_broadcast_ss(x2 + d), b, c2);
    c3 = _mm256_fmadd_ps(_mm256_broadcast_ss(x3 + d), b, c3);
    c4 = _mm256_fmadd_ps(_mm256_broadcast_ss(x4 + d), b, c4);
    c5 = _mm256_fmadd_ps(_mm256_broadcast_ss(x5 + d), b, c5);
    c6 = _mm256_fmadd_ps(_mm256_broadcast_ss(x6 + d), b, c6);
    c7 = _mm256_fmadd_ps(_mm256_broadcast_ss(x7 + d), b, c7);
    c8 = _mm256_fmadd_ps(_mm256_broadcast_ss(x8 + d), b, c8);
    c9 = _mm256_fmadd_ps(_mm256_broadcast_ss(x9 + d), b, c9);
    c10 = _mm256_fmadd_ps(_mm256_broadcast_ss(x10 + d), b, c10);
    c11 = _mm256_fmadd_ps(_mm256_broadcast_ss(x11 + d), b, c11);
  }
  store_dots(out, c0, add);
  store_dots(out + ldo, c1, add);
  store_dots(out + 2 * ldo, c2, add);
  store_dots(out + 3 * ldo, c3, add);
  store_dots(out + 4 * ldo, c4, add);
  store_dots(out + 5 * ldo, c5, add);
  store_dots(out + 6 * ldo, c6, add);
  store_dots(out + 7 * ldo, c7, add);
  store_dots(out + 8 * ldo, c8, add);
  store_dots(out + 9 * ldo, c9, add);
  store_dots(out + 10 * ldo, c10, add);
  store_dots(out + 11 * ldo, c11, add);
}

// lane p of r[q] becomes element q of input row p.
__attribute__((target("avx2"))) inline void transpose8(__m256* r) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]);
  const __m256 t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]);
  const __m256 t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]);
  const __m256 t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]);
  const __m256 t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// exact distances of 8 * NB consecutive rows: each lane owns one point and adds its terms in order
// of d, so the result is bit-identical to sqdist_exact while NB independent chains hide latency.

#endif  // RAID_FAST_X86

}  // namespace raid_fast
