// CUDA KMeans: fused assignment, Lloyd update and k-means++ seeding over ragged groups.
// Every kernel covers all groups in one launch (a grid dimension over groups) and reads the group
// bounds from the device offsets, so no launcher ever synchronises with the device.
#include <cuda_runtime.h>

#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "kmeans/kmeans.h"

namespace raid_fast {
namespace {

// groups go in a y or z grid dimension, whose hardware limit is 65535
constexpr int64_t kMaxGroupsPerLaunch = 65535;

// assign: a block scores kAsgBM points against kAsgBN centroids at a time over kAsgBK-dim chunks;
// 16 x 16 threads, each owning a 4 x 4 register micro-tile (points ty + 16 r, centroids tx + 16 s)
constexpr int kAsgBM = 64;
constexpr int kAsgBN = 64;
constexpr int kAsgBK = 32;
constexpr int kAsgThreads = 256;
constexpr int kAsgMicro = 4;

// update: points per block, and doubles of shared memory for the privatised [kc, dc] sums
constexpr int kUpdPoints = 1024;
constexpr int kUpdSmemDoubles = 5120;
constexpr int kUpdMaxCols = 128;
constexpr int kUpdMinCols = 32;
constexpr int kUpdMaxClusters = kUpdSmemDoubles / kUpdMinCols;
constexpr int kUpdFinalThreads = 256;

// k-means++: points per mind block, which is also the chunk of the per-chunk partial sums
constexpr int kPpChunk = 128;
constexpr int kPpBK = 32;
constexpr int kPpInitThreads = 256;

constexpr unsigned kFullMask = 0xffffffffu;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void check_launch(const char* name) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("raid_fast ") + name + ": " + cudaGetErrorString(err));
  }
}

void check_call(cudaError_t err, const char* name) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("raid_fast ") + name + ": " + cudaGetErrorString(err));
  }
}

void check_sizes(const char* name, int64_t G, int64_t max_group_size, int64_t D, int64_t k) {
  if (G < 0 || max_group_size < 0 || D < 0 || k < 0) {
    throw std::runtime_error(std::string("raid_fast ") + name + ": negative size");
  }
  // group-local centroid ids travel as int inside the kernels
  if (k > INT_MAX / 2) {
    throw std::runtime_error(std::string("raid_fast ") + name + ": k too large");
  }
}

void check_grid_x(const char* name, int64_t blocks) {
  if (blocks > INT_MAX) {
    throw std::runtime_error(std::string("raid_fast ") + name + ": grid too large");
  }
}

// k-means++ fallback pick: min(floor(u * n), n - 1), kept >= 0 even for u outside [0, 1)
__device__ int64_t uniform_pick(double u, int64_t n) {
  double f = floor(u * static_cast<double>(n));
  int64_t i = f >= static_cast<double>(n - 1) ? n - 1 : static_cast<int64_t>(f);
  return i < 0 ? 0 : i;
}

// grid (point tiles, groups); block kAsgThreads. dist [N], idx [N]; centroids [G, k, D]
__global__ void __launch_bounds__(kAsgThreads)
    assign_kernel(const float* __restrict__ x, const int64_t* __restrict__ offsets, int64_t g0,
                  int64_t D, const float* __restrict__ centroids, int64_t k,
                  float* __restrict__ dist, int64_t* __restrict__ idx) {
  const int64_t g = g0 + blockIdx.y;
  const int64_t begin = offsets[g];
  const int64_t n = offsets[g + 1] - begin;
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * kAsgBM;
  // whole-block exit before any barrier
  if (p0 >= n) return;
  const int kg = static_cast<int>(k < n ? k : n);
  const int np = static_cast<int>(n - p0 < kAsgBM ? n - p0 : kAsgBM);

  // transposed tiles, padded by one so that the transposing stores hit distinct banks
  __shared__ float xs[kAsgBK][kAsgBM + 1];  // [BK, BM]
  __shared__ float cs[kAsgBK][kAsgBN + 1];  // [BK, BN]
  __shared__ float cn_s[kAsgBN];            // ||c||^2 of the current centroid tile
  __shared__ float xn_s[kAsgBM];            // ||x||^2 of the point tile

  const int tid = threadIdx.x;
  const int tx = tid % 16;
  const int ty = tid / 16;
  const float* xg = x + (begin + p0) * D;   // [np, D]
  const float* cg = centroids + g * k * D;  // [k, D]

  float best[kAsgMicro];
  int best_j[kAsgMicro];
#pragma unroll
  for (int r = 0; r < kAsgMicro; ++r) {
    best[r] = INFINITY;
    best_j[r] = 0;
  }
  float xn = 0.f;

  for (int j0 = 0; j0 < kg; j0 += kAsgBN) {
    const int nc = kg - j0 < kAsgBN ? kg - j0 : kAsgBN;
    float acc[kAsgMicro][kAsgMicro];
#pragma unroll
    for (int r = 0; r < kAsgMicro; ++r) {
#pragma unroll
      for (int s = 0; s < kAsgMicro; ++s) acc[r][s] = 0.f;
    }
    float cn = 0.f;

    for (int64_t k0 = 0; k0 < D; k0 += kAsgBK) {
      // consecutive threads read consecutive dims of one row: coalesced; masked rows/dims are 0
      for (int e = tid; e < kAsgBM * kAsgBK; e += kAsgThreads) {
        const int r = e / kAsgBK;
        const int c = e % kAsgBK;
        float v = 0.f;
        if (r < np && k0 + c < D) v = xg[static_cast<int64_t>(r) * D + k0 + c];
        xs[c][r] = v;
      }
      for (int e = tid; e < kAsgBN * kAsgBK; e += kAsgThreads) {
        const int r = e / kAsgBK;
        const int c = e % kAsgBK;
        float v = 0.f;
        if (r < nc && k0 + c < D) v = cg[static_cast<int64_t>(j0 + r) * D + k0 + c];
        cs[c][r] = v;
      }
      __syncthreads();

      // norms from the shared tiles, by threads 0..BN-1 (centroids) and BN..BN+BM-1 (points)
      if (tid < kAsgBN) {
#pragma unroll 8
        for (int kk = 0; kk < kAsgBK; ++kk) cn = fmaf(cs[kk][tid], cs[kk][tid], cn);
      } else if (j0 == 0 && tid < kAsgBN + kAsgBM) {
        const int p = tid - kAsgBN;
#pragma unroll 8
        for (int kk = 0; kk < kAsgBK; ++kk) xn = fmaf(xs[kk][p], xs[kk][p], xn);
      }

#pragma unroll 8
      for (int kk = 0; kk < kAsgBK; ++kk) {
        float a[kAsgMicro];
        float b[kAsgMicro];
#pragma unroll
        for (int r = 0; r < kAsgMicro; ++r) a[r] = xs[kk][ty + 16 * r];
#pragma unroll
        for (int s = 0; s < kAsgMicro; ++s) b[s] = cs[kk][tx + 16 * s];
#pragma unroll
        for (int r = 0; r < kAsgMicro; ++r) {
#pragma unroll
          for (int s = 0; s < kAsgMicro; ++s) acc[r][s] = fmaf(a[r], b[s], acc[r][s]);
        }
      }
      // the next chunk overwrites xs / cs
      __syncthreads();
    }

    if (tid < kAsgBN) cn_s[tid] = cn;
    if (j0 == 0 && tid >= kAsgBN && tid < kAsgBN + kAsgBM) xn_s[tid - kAsgBN] = xn;
    __syncthreads();

    // each thread visits its centroids in increasing j, so strict < keeps the smallest index
#pragma unroll
    for (int s = 0; s < kAsgMicro; ++s) {
      const int j = tx + 16 * s;
      if (j < nc) {
        const float cnj = cn_s[j];
#pragma unroll
        for (int r = 0; r < kAsgMicro; ++r) {
          const float score = cnj - 2.f * acc[r][s];
          if (score < best[r]) {
            best[r] = score;
            best_j[r] = j0 + j;
          }
        }
      }
    }
    // the next centroid tile overwrites cn_s
    __syncthreads();
  }

  // the 16 threads sharing a point are lanes of one half-warp: butterfly on (score, index)
#pragma unroll
  for (int r = 0; r < kAsgMicro; ++r) {
    float v = best[r];
    int j = best_j[r];
#pragma unroll
    for (int off = 8; off > 0; off >>= 1) {
      const float ov = __shfl_xor_sync(kFullMask, v, off);
      const int oj = __shfl_xor_sync(kFullMask, j, off);
      if (ov < v || (ov == v && oj < j)) {
        v = ov;
        j = oj;
      }
    }
    const int p = ty + 16 * r;
    if (tx == 0 && p < np) {
      float d = xn_s[p] + v;
      // written as a comparison so that a NaN distance stays NaN
      d = d < 0.f ? 0.f : d;
      dist[begin + p0 + p] = d;
      idx[begin + p0 + p] = j;
    }
  }
}

// grid (point tiles x dim chunks x cluster chunks flattened, groups); block dc threads, one dim
// column each, so that the privatised sums need no atomics and add points in index order.
// sums [G, k, D] double, counts [G, k]
__global__ void __launch_bounds__(kUpdMaxCols)
    update_sums_kernel(const float* __restrict__ x, const int64_t* __restrict__ offsets, int64_t g0,
                       int64_t D, const int64_t* __restrict__ idx, int64_t k, int tiles, int ndc,
                       int dc, int kc, double* __restrict__ sums,
                       unsigned long long* __restrict__ counts) {
  const int64_t g = g0 + blockIdx.y;
  const int tile = blockIdx.x % tiles;
  const int rest = blockIdx.x / tiles;
  const int dchunk = rest % ndc;
  const int kchunk = rest / ndc;
  const int64_t begin = offsets[g];
  const int64_t n = offsets[g + 1] - begin;
  const int64_t kg = k < n ? k : n;
  const int64_t p0 = static_cast<int64_t>(tile) * kUpdPoints;
  const int64_t j0 = static_cast<int64_t>(kchunk) * kc;
  // whole-block exit before any barrier
  if (p0 >= n || j0 >= kg) return;
  const int nj = static_cast<int>(kg - j0 < kc ? kg - j0 : kc);
  const int np = static_cast<int>(n - p0 < kUpdPoints ? n - p0 : kUpdPoints);

  __shared__ double s_sum[kUpdSmemDoubles];    // [nj, dc]
  __shared__ int s_idx[kUpdPoints];            // chunk-local cluster of each point, -1 outside
  __shared__ unsigned s_cnt[kUpdMaxClusters];  // [nj]

  const int tid = threadIdx.x;
  const int64_t d = static_cast<int64_t>(dchunk) * dc + tid;
  const bool col_ok = d < D;

  // each thread only ever touches its own column of s_sum
  for (int c = 0; c < nj; ++c) s_sum[c * dc + tid] = 0.0;
  for (int c = tid; c < nj; c += blockDim.x) s_cnt[c] = 0;
  for (int q = tid; q < np; q += blockDim.x) {
    const int64_t j = idx[begin + p0 + q];
    s_idx[q] = (j >= j0 && j < j0 + nj) ? static_cast<int>(j - j0) : -1;
  }
  __syncthreads();

  const float* xt = x + (begin + p0) * D;  // [np, D]
#pragma unroll 8
  for (int q = 0; q < np; ++q) {
    const int c = s_idx[q];
    // loaded whatever c is (row q exists) so that unrolled iterations overlap their loads
    const float v = col_ok ? xt[static_cast<int64_t>(q) * D + d] : 0.f;
    if (c >= 0) {
      s_sum[c * dc + tid] += static_cast<double>(v);
      // a single thread counts, so the histogram needs no atomics
      if (tid == 0) s_cnt[c] += 1u;
    }
  }
  __syncthreads();

  double* gs = sums + (g * k + j0) * D;  // [nj, D]
  if (col_ok) {
    for (int c = 0; c < nj; ++c) {
      if (s_cnt[c] != 0u) atomicAdd(gs + static_cast<int64_t>(c) * D + d, s_sum[c * dc + tid]);
    }
  }
  // counts do not depend on the dim chunk: only chunk 0 publishes them
  if (dchunk == 0) {
    for (int c = tid; c < nj; c += blockDim.x) {
      if (s_cnt[c] != 0u) {
        atomicAdd(counts + g * k + j0 + c, static_cast<unsigned long long>(s_cnt[c]));
      }
    }
  }
}

// grid (groups); block kUpdFinalThreads. Works in double in place on the sums workspace, as the
// reference does, and rounds to float32 once at the end.
// sums [G, k, D], counts_ws [G, k], work [G, k], centroids [G, k, D], counts [G, k]
__global__ void __launch_bounds__(kUpdFinalThreads)
    update_finalize_kernel(const int64_t* __restrict__ offsets, int64_t g0, int64_t D, int64_t k,
                           bool spherical, double* __restrict__ sums,
                           const unsigned long long* __restrict__ counts_ws,
                           int64_t* __restrict__ work, float* __restrict__ centroids,
                           int64_t* __restrict__ counts) {
  const int64_t g = g0 + blockIdx.x;
  const int64_t n = offsets[g + 1] - offsets[g];
  const int64_t kg = k < n ? k : n;
  const int tid = threadIdx.x;
  const int bs = blockDim.x;

  double* c = sums + g * k * D;                       // [k, D]
  const unsigned long long* cnt = counts_ws + g * k;  // [k]
  int64_t* w = work + g * k;                          // [k]
  float* out = centroids + g * k * D;                 // [k, D]
  int64_t* out_counts = counts + g * k;               // [k]

  __shared__ int64_t s_m;

  for (int64_t j = tid; j < k; j += bs) {
    const int64_t cj = j < kg ? static_cast<int64_t>(cnt[j]) : 0;
    out_counts[j] = cj;
    w[j] = cj;
  }
  // means; an empty cluster's sum is 0 and is replaced by its split below
  for (int64_t e = tid; e < kg * D; e += bs) {
    const int64_t cj = static_cast<int64_t>(cnt[e / D]);
    if (cj > 0) c[e] /= static_cast<double>(cj);
  }
  __syncthreads();

  // sequential over j; the loop and the continue test are uniform across the block
  for (int64_t j = 0; j < kg; ++j) {
    if (cnt[j] != 0ull) continue;
    if (tid == 0) {
      int64_t m = 0;
      for (int64_t jj = 1; jj < kg; ++jj) {
        if (w[jj] > w[m]) m = jj;
      }
      const int64_t half = w[m] / 2;
      w[j] = half;
      w[m] -= half;
      s_m = m;
    }
    __syncthreads();
    const int64_t m = s_m;
    double* cj = c + j * D;
    double* cm = c + m * D;
    for (int64_t d = tid; d < D; d += bs) {
      const double v = cm[d];
      const bool even = (d % 2) == 0;
      cj[d] = v * (even ? 1.0 + kSplitEps : 1.0 - kSplitEps);
      cm[d] = v * (even ? 1.0 - kSplitEps : 1.0 + kSplitEps);
    }
    // s_m and the rows are reread by the next split
    __syncthreads();
  }

  if (spherical) {
    // one thread per row, dims in increasing order
    for (int64_t j = tid; j < kg; j += bs) {
      double* cj = c + j * D;
      double ss = 0.0;
      for (int64_t d = 0; d < D; ++d) ss += cj[d] * cj[d];
      const double norm = sqrt(ss);
      if (norm > 0.0) {
        for (int64_t d = 0; d < D; ++d) cj[d] /= norm;
      }
    }
    __syncthreads();
  }

  for (int64_t e = tid; e < k * D; e += bs) {
    out[e] = e < kg * D ? static_cast<float>(c[e]) : 0.f;
  }
}

// grid (groups); block kPpInitThreads. Writes chosen[g, 0], centroid row 0 and zeroes the rest.
// centroids [G, k, D], chosen [G, k], uniforms [G, k]
__global__ void __launch_bounds__(kPpInitThreads)
    plusplus_init_kernel(const float* __restrict__ x, const int64_t* __restrict__ offsets,
                         int64_t g0, int64_t D, int64_t k, const double* __restrict__ uniforms,
                         float* __restrict__ centroids, int64_t* __restrict__ chosen) {
  const int64_t g = g0 + blockIdx.x;
  const int64_t begin = offsets[g];
  const int64_t n = offsets[g + 1] - begin;
  const int64_t first = n > 0 ? uniform_pick(uniforms[g * k], n) : -1;
  const float* xr = x + (begin + (first < 0 ? 0 : first)) * D;  // [D]
  float* out = centroids + g * k * D;                           // [k, D]
  for (int64_t e = threadIdx.x; e < k * D; e += blockDim.x) {
    out[e] = (first >= 0 && e < D) ? xr[e] : 0.f;
  }
  for (int64_t t = threadIdx.x; t < k; t += blockDim.x) {
    chosen[g * k + t] = t == 0 ? first : -1;
  }
}

// grid (point chunks, groups); block kPpChunk, one point per thread. mind[i] takes the squared
// distance to centroid t (init: overwrite, else min), float32 terms summed in increasing d without
// contraction (the _rn intrinsics forbid fma) to match the CPU bit for bit; partials[g, chunk] is
// the double sum of the chunk's mind values in increasing i.
// mind [N], partials [G, nchunks], centroids [G, k, D]
__global__ void __launch_bounds__(kPpChunk)
    plusplus_mind_kernel(const float* __restrict__ x, const int64_t* __restrict__ offsets,
                         int64_t g0, int64_t D, int64_t k, int64_t t, bool init,
                         const float* __restrict__ centroids, float* __restrict__ mind,
                         double* __restrict__ partials, int64_t nchunks) {
  const int64_t g = g0 + blockIdx.y;
  const int64_t begin = offsets[g];
  const int64_t n = offsets[g + 1] - begin;
  const int64_t kg = k < n ? k : n;
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * kPpChunk;
  // whole-block exit before any barrier
  if (p0 >= n || t >= kg) return;
  const int np = static_cast<int>(n - p0 < kPpChunk ? n - p0 : kPpChunk);

  __shared__ float xs[kPpChunk][kPpBK + 1];  // [chunk, BK], padded: row reads hit distinct banks
  __shared__ float cs[kPpBK];                // [BK]
  __shared__ float ms[kPpChunk];             // [chunk]

  const int tid = threadIdx.x;
  const float* xt = x + (begin + p0) * D;           // [np, D]
  const float* crow = centroids + (g * k + t) * D;  // [D]
  float acc = 0.f;

  for (int64_t k0 = 0; k0 < D; k0 += kPpBK) {
    for (int e = tid; e < kPpChunk * kPpBK; e += kPpChunk) {
      const int r = e / kPpBK;
      const int c = e % kPpBK;
      float v = 0.f;
      if (r < np && k0 + c < D) v = xt[static_cast<int64_t>(r) * D + k0 + c];
      xs[r][c] = v;
    }
    if (tid < kPpBK) cs[tid] = k0 + tid < D ? crow[k0 + tid] : 0.f;
    __syncthreads();
    const int nd = static_cast<int>(D - k0 < kPpBK ? D - k0 : kPpBK);
    for (int dd = 0; dd < nd; ++dd) {
      const float diff = __fsub_rn(xs[tid][dd], cs[dd]);
      acc = __fadd_rn(acc, __fmul_rn(diff, diff));
    }
    // the next chunk overwrites xs / cs
    __syncthreads();
  }

  float m = 0.f;
  if (tid < np) {
    const int64_t i = begin + p0 + tid;
    if (init) {
      m = acc;
    } else {
      // std::min(old, new) semantics
      const float old = mind[i];
      m = acc < old ? acc : old;
    }
    mind[i] = m;
  }
  ms[tid] = m;
  __syncthreads();
  if (tid == 0) {
    double s = 0.0;
    for (int q = 0; q < np; ++q) s += static_cast<double>(ms[q]);
    partials[g * nchunks + blockIdx.x] = s;
  }
}

// grid (groups); block one warp. Picks chosen[g, t] from mind and partials and copies the point
// into centroids[g, t]. Every lane runs the same sequential double sums on values broadcast by
// shuffles, so every lane takes the same branches and the full-mask shuffles stay converged.
// mind [N], partials [G, nchunks], uniforms [G, k], centroids [G, k, D], chosen [G, k]
__global__ void __launch_bounds__(32)
    plusplus_select_kernel(const float* __restrict__ x, const int64_t* __restrict__ offsets,
                           int64_t g0, int64_t D, int64_t k, int64_t t,
                           const double* __restrict__ uniforms, const float* __restrict__ mind,
                           const double* __restrict__ partials, int64_t nchunks,
                           float* __restrict__ centroids, int64_t* __restrict__ chosen) {
  const int64_t g = g0 + blockIdx.x;
  const int64_t begin = offsets[g];
  const int64_t n = offsets[g + 1] - begin;
  const int64_t kg = k < n ? k : n;
  if (t >= kg) return;
  const int lane = threadIdx.x;
  const int64_t nc = (n + kPpChunk - 1) / kPpChunk;
  const double* part = partials + g * nchunks;  // [nc]
  const float* gm = mind + begin;               // [n]
  const double u = uniforms[g * k + t];

  // total over chunk partials in chunk order
  double total = 0.0;
  for (int64_t base = 0; base < nc; base += 32) {
    const int64_t c = base + lane;
    const double v = c < nc ? part[c] : 0.0;
    const int cnt = static_cast<int>(nc - base < 32 ? nc - base : 32);
    for (int q = 0; q < cnt; ++q) total += __shfl_sync(kFullMask, v, q);
  }

  int64_t pick = -1;
  if (total > 0.0) {
    const double target = u * total;
    // smallest chunk whose running sum passes target; run is the sum of the chunks before it
    int64_t chunk = -1;
    double run = 0.0;
    for (int64_t base = 0; base < nc && chunk < 0; base += 32) {
      const int64_t c = base + lane;
      const double v = c < nc ? part[c] : 0.0;
      const int cnt = static_cast<int>(nc - base < 32 ? nc - base : 32);
      for (int q = 0; q < cnt; ++q) {
        const double next = run + __shfl_sync(kFullMask, v, q);
        if (next > target) {
          chunk = base + q;
          break;
        }
        run = next;
      }
    }
    if (chunk >= 0) {
      // smallest i of the chunk whose running sum passes target
      const int64_t i0 = chunk * kPpChunk;
      const int64_t ni = n - i0 < kPpChunk ? n - i0 : kPpChunk;
      int64_t last_pos = -1;
      for (int64_t base = 0; base < ni && pick < 0; base += 32) {
        const int64_t q = base + lane;
        const float v = q < ni ? gm[i0 + q] : 0.f;
        const unsigned pos = __ballot_sync(kFullMask, v > 0.f);
        if (pos != 0u) last_pos = i0 + base + 31 - __clz(pos);
        const int cnt = static_cast<int>(ni - base < 32 ? ni - base : 32);
        for (int qq = 0; qq < cnt; ++qq) {
          run += static_cast<double>(__shfl_sync(kFullMask, v, qq));
          if (run > target) {
            pick = i0 + base + qq;
            break;
          }
        }
      }
      // double rounding can leave the in-chunk sum just short of the chunk partial: the target
      // then lies in this chunk's mass, whose last positive point (the whole chunk was scanned
      // when pick < 0) is the one to take
      if (pick < 0) pick = last_pos;
    } else {
      // no prefix passes target: the largest i with mind[i] > 0, found through the last chunk
      // with a positive partial (a sum of non-negative terms is > 0 iff one term is)
      int64_t last_chunk = -1;
      for (int64_t base = ((nc - 1) / 32) * 32; base >= 0 && last_chunk < 0; base -= 32) {
        const int64_t c = base + lane;
        const double v = c < nc ? part[c] : 0.0;
        const unsigned pos = __ballot_sync(kFullMask, v > 0.0);
        if (pos != 0u) last_chunk = base + 31 - __clz(pos);
      }
      if (last_chunk >= 0) {
        const int64_t i0 = last_chunk * kPpChunk;
        const int64_t ni = n - i0 < kPpChunk ? n - i0 : kPpChunk;
        for (int64_t base = ((ni - 1) / 32) * 32; base >= 0 && pick < 0; base -= 32) {
          const int64_t q = base + lane;
          const float v = q < ni ? gm[i0 + q] : 0.f;
          const unsigned pos = __ballot_sync(kFullMask, v > 0.f);
          if (pos != 0u) pick = i0 + base + 31 - __clz(pos);
        }
      }
    }
  }
  // total == 0 (or NaN), and a safety net for the unreachable case of no positive mind
  if (pick < 0) pick = uniform_pick(u, n);

  if (lane == 0) chosen[g * k + t] = pick;
  const float* xr = x + (begin + pick) * D;  // [D]
  float* out = centroids + (g * k + t) * D;  // [D]
  for (int64_t d = lane; d < D; d += 32) out[d] = xr[d];
}

}  // namespace

int64_t kmeans_update_cuda_workspace_bytes(int64_t G, int64_t k, int64_t D) {
  if (G <= 0 || k <= 0 || D < 0) return 0;
  // sums [G, k, D] double, counts [G, k] uint64, working counts [G, k] int64
  return static_cast<int64_t>(sizeof(double)) * G * k * D +
         static_cast<int64_t>(sizeof(unsigned long long)) * G * k +
         static_cast<int64_t>(sizeof(int64_t)) * G * k;
}

int64_t kmeans_plusplus_cuda_workspace_bytes(int64_t N, int64_t G, int64_t max_group_size) {
  if (G <= 0 || N < 0 || max_group_size < 0) return 0;
  // partials [G, nchunks] double, then mind [N] float
  const int64_t nchunks = ceil_div(max_group_size, kPpChunk);
  return static_cast<int64_t>(sizeof(double)) * G * nchunks +
         static_cast<int64_t>(sizeof(float)) * N;
}

void kmeans_assign_cuda(const float* x, const int64_t* offsets, int64_t G, int64_t max_group_size,
                        int64_t D, const float* centroids, int64_t k, float* dist, int64_t* idx,
                        void* stream) {
  const char* name = "kmeans_assign_cuda";
  check_sizes(name, G, max_group_size, D, k);
  if (G == 0 || max_group_size == 0) return;
  if (k == 0) throw std::runtime_error("raid_fast kmeans_assign_cuda: k must be >= 1");
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int64_t tiles = ceil_div(max_group_size, kAsgBM);
  check_grid_x(name, tiles);
  for (int64_t g0 = 0; g0 < G; g0 += kMaxGroupsPerLaunch) {
    const int64_t gn = G - g0 < kMaxGroupsPerLaunch ? G - g0 : kMaxGroupsPerLaunch;
    dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(gn));
    assign_kernel<<<grid, kAsgThreads, 0, s>>>(x, offsets, g0, D, centroids, k, dist, idx);
    check_launch(name);
  }
}

void kmeans_update_cuda(const float* x, const int64_t* offsets, int64_t G, int64_t max_group_size,
                        int64_t D, const int64_t* idx, int64_t k, bool spherical, float* centroids,
                        int64_t* counts, void* workspace, void* stream) {
  const char* name = "kmeans_update_cuda";
  check_sizes(name, G, max_group_size, D, k);
  if (G == 0 || k == 0) return;
  check_grid_x(name, G);
  cudaStream_t s = static_cast<cudaStream_t>(stream);

  double* sums = static_cast<double*>(workspace);                             // [G, k, D]
  auto* counts_ws = reinterpret_cast<unsigned long long*>(sums + G * k * D);  // [G, k]
  auto* work = reinterpret_cast<int64_t*>(counts_ws + G * k);                 // [G, k]
  check_call(cudaMemsetAsync(workspace, 0,
                             static_cast<size_t>(kmeans_update_cuda_workspace_bytes(G, k, D)), s),
             name);

  const int64_t kmax = k < max_group_size ? k : max_group_size;
  if (kmax > 0) {
    // one thread per dim column, a multiple of 32 in [kUpdMinCols, kUpdMaxCols], narrowed while
    // that lets all clusters fit one block (a cluster chunk rereads its points' rows)
    const int64_t dc64 = ceil_div(D < 1 ? 1 : D, 32) * 32;
    int dc = static_cast<int>(dc64 < kUpdMaxCols ? dc64 : kUpdMaxCols);
    while (dc > kUpdMinCols && kUpdSmemDoubles / dc < kmax) dc -= 32;
    const int64_t kc64 = kUpdSmemDoubles / dc;
    const int kc = static_cast<int>(kmax < kc64 ? kmax : kc64);
    const int64_t ndc = ceil_div(D < 1 ? 1 : D, dc);
    const int64_t nkc = ceil_div(kmax, kc);
    const int64_t tiles = ceil_div(max_group_size, kUpdPoints);
    check_grid_x(name, tiles * ndc * nkc);
    for (int64_t g0 = 0; g0 < G; g0 += kMaxGroupsPerLaunch) {
      const int64_t gn = G - g0 < kMaxGroupsPerLaunch ? G - g0 : kMaxGroupsPerLaunch;
      dim3 grid(static_cast<unsigned>(tiles * ndc * nkc), static_cast<unsigned>(gn));
      update_sums_kernel<<<grid, dc, 0, s>>>(x, offsets, g0, D, idx, k, static_cast<int>(tiles),
                                             static_cast<int>(ndc), dc, kc, sums, counts_ws);
      check_launch(name);
    }
  }
  update_finalize_kernel<<<static_cast<unsigned>(G), kUpdFinalThreads, 0, s>>>(
      offsets, 0, D, k, spherical, sums, counts_ws, work, centroids, counts);
  check_launch(name);
}

void kmeans_plusplus_cuda(const float* x, const int64_t* offsets, int64_t G, int64_t max_group_size,
                          int64_t D, int64_t k, const double* uniforms, float* centroids,
                          int64_t* chosen, void* workspace, void* stream) {
  const char* name = "kmeans_plusplus_cuda";
  check_sizes(name, G, max_group_size, D, k);
  if (G == 0 || k == 0) return;
  check_grid_x(name, G);
  cudaStream_t s = static_cast<cudaStream_t>(stream);

  const int64_t nchunks = ceil_div(max_group_size, kPpChunk);
  double* partials = static_cast<double*>(workspace);              // [G, nchunks]
  float* mind = reinterpret_cast<float*>(partials + G * nchunks);  // [N]
  // mind needs no zeroing (and N is unknown here): the t = 0 pass writes every point of every
  // group that a later step reads; the partials are zeroed so that no read can see stale bytes
  if (nchunks > 0) {
    check_call(cudaMemsetAsync(partials, 0, static_cast<size_t>(sizeof(double) * G * nchunks), s),
               name);
  }

  plusplus_init_kernel<<<static_cast<unsigned>(G), kPpInitThreads, 0, s>>>(
      x, offsets, 0, D, k, uniforms, centroids, chosen);
  check_launch(name);

  const int64_t kmax = k < max_group_size ? k : max_group_size;
  if (kmax < 2) return;
  check_grid_x(name, nchunks);
  for (int64_t t = 0; t < kmax; ++t) {
    if (t > 0) {
      plusplus_select_kernel<<<static_cast<unsigned>(G), 32, 0, s>>>(
          x, offsets, 0, D, k, t, uniforms, mind, partials, nchunks, centroids, chosen);
      check_launch(name);
    }
    // the newest centroid only matters if another pick follows
    if (t + 1 < kmax) {
      for (int64_t g0 = 0; g0 < G; g0 += kMaxGroupsPerLaunch) {
        const int64_t gn = G - g0 < kMaxGroupsPerLaunch ? G - g0 : kMaxGroupsPerLaunch;
        dim3 grid(static_cast<unsigned>(nchunks), static_cast<unsigned>(gn));
        plusplus_mind_kernel<<<grid, kPpChunk, 0, s>>>(x, offsets, g0, D, k, t, t == 0, centroids,
                                                       mind, partials, nchunks);
        check_launch(name);
      }
    }
  }
}

}  // namespace raid_fast
