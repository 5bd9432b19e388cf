// cpu kernels of the kmeans interface declared in kmeans.h: fused assignment, lloyd update, the
// lloyd step that does both in one pass over x, and k-means++ seeding. the avx2/fma paths are
// picked at run time, so the build needs no -march flag.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <new>
#include <vector>

#include "common/cpu.h"
#include "common/dot_tile.h"
#include "kmeans.h"

// an empty asm that claims to modify v keeps a product from being fused into the following add:
// under -ffp-contract=fast with fma enabled the compiler could otherwise emit an fma and change
// the float32 rounding that the k-means++ contract pins down.
#if defined(__GNUC__) && defined(__x86_64__)
#define RAID_FAST_OPAQUE(v) __asm__("" : "+x"(v))
#elif defined(__GNUC__) && defined(__aarch64__)
#define RAID_FAST_OPAQUE(v) __asm__("" : "+w"(v))
#else
#define RAID_FAST_OPAQUE(v) ((void)0)
#endif

namespace raid_fast {
namespace {

int64_t group_k(const int64_t* offsets, int64_t g, int64_t k) {
  return std::min(k, offsets[g + 1] - offsets[g]);
}

// points per chunk: the unit whose dots are kept in a buffer until the argmin.
constexpr int64_t kAssignChunk = 16 * kTileRows;
// rows of a thread's dot buffer: a chunk plus room for the dropped rows of a short last tile pair.
constexpr int64_t kBufRows = kAssignChunk + 2 * kTileRows;
// chunks per scheduling task.
constexpr int64_t kChunksPerTask = 8;

// the group's centroids as column panels: panel j0 (16 or, for the last one, 8 columns wide) lives
// at pack + j0 * D with layout [D][width]; columns >= k_g are zero and get a norm of +inf so that
// they can never win the argmin.
void pack_centroids(const float* cent, int64_t kg, int64_t kp, int64_t D, float* pack, float* c2) {
  for (int64_t j0 = 0; j0 < kp; j0 += 16) {
    const int64_t w = std::min<int64_t>(16, kp - j0);
    float* panel = pack + j0 * D;  // [D, w]
    for (int64_t c = 0; c < w; ++c) {
      const int64_t j = j0 + c;
      if (j < kg) {
        const float* row = cent + j * D;
        double s = 0.0;
        for (int64_t d = 0; d < D; ++d) {
          panel[d * w + c] = row[d];
          s += static_cast<double>(row[d]) * row[d];
        }
        c2[j] = static_cast<float>(s);
      } else {
        for (int64_t d = 0; d < D; ++d) panel[d * w + c] = 0.0f;
        c2[j] = std::numeric_limits<float>::infinity();
      }
    }
  }
}

// the argmin compares the keys ||c_j||^2 - 2 x.c_j and adds ||x||^2 only to the winner: the sum
// ||x||^2 + ||c_j||^2 would round at a larger magnitude and blur close distances. strict < in
// ascending j gives the smallest index on ties.
void argmin_scalar(const float* key, int64_t kg, float x2, float* dist, int64_t* idx) {
  float best = key[0];
  int64_t bj = 0;
  for (int64_t j = 1; j < kg; ++j) {
    if (key[j] < best) {
      best = key[j];
      bj = j;
    }
  }
  const float d = x2 + best;
  *dist = d > 0.0f ? d : 0.0f;
  *idx = bj;
}

// portable path, same tiling and dim blocks as the avx2 path so that the compiler can vectorise
// over columns and both paths round alike.
void assign_chunk_generic(const float* x, int64_t D, int64_t begin, int64_t end, const float* pack,
                          const float* c2, int64_t kg, int64_t kp, float* buf, float* dist,
                          int64_t* idx) {
  for (int64_t i0 = begin; i0 < end; i0 += kTileRows) {
    const int64_t rows = std::min<int64_t>(kTileRows, end - i0);
    // missing rows of a short tile repeat the last real row; their results are dropped.
    const float* xr[kTileRows];
    for (int p = 0; p < kTileRows; ++p) xr[p] = x + (i0 + std::min<int64_t>(p, rows - 1)) * D;
    for (int64_t d0 = 0; d0 < D; d0 += kDimBlock) {
      const int64_t d1 = std::min(D, d0 + kDimBlock);
      int64_t j0 = 0;
      for (; j0 + 16 <= kp; j0 += 16) {
        dot_tile_generic<16>(xr, pack + j0 * D, d0, d1, d0 > 0, buf + j0, kp);
      }
      if (j0 < kp) dot_tile_generic<8>(xr, pack + j0 * D, d0, d1, d0 > 0, buf + j0, kp);
    }
    for (int64_t p = 0; p < rows; ++p) {
      float x2 = 0.0f;
      for (int64_t d = 0; d < D; ++d) x2 += xr[p][d] * xr[p][d];
      float* dv = buf + p * kp;  // [kp]
      for (int64_t j = 0; j < kg; ++j) dv[j] = c2[j] - 2.0f * dv[j];
      argmin_scalar(dv, kg, x2, dist + i0 + p, idx + i0 + p);
    }
  }
}

#ifdef RAID_FAST_X86

__attribute__((target("avx2,fma"))) float sqnorm_avx2(const float* v, int64_t D) {
  __m256 a0 = _mm256_setzero_ps();
  __m256 a1 = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    const __m256 u0 = _mm256_loadu_ps(v + d);
    const __m256 u1 = _mm256_loadu_ps(v + d + 8);
    a0 = _mm256_fmadd_ps(u0, u0, a0);
    a1 = _mm256_fmadd_ps(u1, u1, a1);
  }
  for (; d + 8 <= D; d += 8) {
    const __m256 u0 = _mm256_loadu_ps(v + d);
    a0 = _mm256_fmadd_ps(u0, u0, a0);
  }
  a0 = _mm256_add_ps(a0, a1);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(a0), _mm256_extractf128_ps(a0, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  float s = _mm_cvtss_f32(h);
  for (; d < D; ++d) s += v[d] * v[d];
  return s;
}

// turns the dots of one point into keys in place and takes the argmin: the vector min gives the
// smallest key, the first column holding it is what a strict < scan in ascending j returns.
__attribute__((target("avx2,fma"))) void argmin_avx2(float x2, const float* c2, int64_t kg,
                                                     int64_t kp, float* dv, float* dist,
                                                     int64_t* idx) {
  const __m256 two = _mm256_set1_ps(2.0f);
  __m256 mv = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < kp; j += 8) {
    const __m256 v = _mm256_fnmadd_ps(two, _mm256_loadu_ps(dv + j), _mm256_loadu_ps(c2 + j));
    _mm256_storeu_ps(dv + j, v);
    mv = _mm256_min_ps(mv, v);
  }
  __m128 h = _mm_min_ps(_mm256_castps256_ps128(mv), _mm256_extractf128_ps(mv, 1));
  h = _mm_min_ps(h, _mm_movehl_ps(h, h));
  h = _mm_min_ss(h, _mm_movehdup_ps(h));
  const float m = _mm_cvtss_f32(h);
  for (int64_t j = 0; j < kg; ++j) {
    if (dv[j] == m) {
      const float d = x2 + m;
      *dist = d > 0.0f ? d : 0.0f;
      *idx = j;
      return;
    }
  }
  // only reached with nan keys, where the vector min is not well defined.
  argmin_scalar(dv, kg, x2, dist, idx);
}

// loop order: blocks of kDimBlock dims, then panels, then tiles, so that the slice of one panel
// [kDimBlock, 16] stays in l1 while the tiles of the chunk stream past it. the norms go first:
// that pass pulls the chunk's rows into cache at full bandwidth before the fma loops need them.
// buf [kBufRows, kp] holds the dots until the argmin.
// rows next_begin .. next_end-1 (the thread's next chunk) are prefetched a few lines per tile, so
// that their trip from memory overlaps the fmas instead of stalling the next norm pass.
__attribute__((target("avx2,fma"))) void assign_chunk_avx2(const float* x, int64_t D, int64_t begin,
                                                           int64_t end, int64_t next_begin,
                                                           int64_t next_end, const float* pack,
                                                           const float* c2, int64_t kg, int64_t kp,
                                                           float* buf, float* dist, int64_t* idx) {
  float x2[kAssignChunk];
  for (int64_t i = begin; i < end; ++i) x2[i - begin] = sqnorm_avx2(x + i * D, D);
  const char* pf = reinterpret_cast<const char*>(x + next_begin * D);
  const char* pf_end = reinterpret_cast<const char*>(x + next_end * D);
  const int64_t n_tiles = (end - begin + kTileRows - 1) / kTileRows;
  const int64_t n_calls = (D + kDimBlock - 1) / kDimBlock * (kp / 16 + kp % 16 / 8) * n_tiles;
  const int64_t pf_step = ((pf_end - pf) / 64 + n_calls - 1) / std::max<int64_t>(n_calls, 1);
  for (int64_t d0 = 0; d0 < D; d0 += kDimBlock) {
    const int64_t d1 = std::min(D, d0 + kDimBlock);
    for (int64_t j0 = 0; j0 < kp; j0 += 16) {
      const float* panel = pack + j0 * D;
      const bool wide = j0 + 16 <= kp;
      const int64_t step = wide ? kTileRows : 2 * kTileRows;
      for (int64_t i0 = begin; i0 < end; i0 += step) {
        const int64_t rows = std::min<int64_t>(step, end - i0);
        // missing rows of a short tile repeat the last real row; their results land in the spare
        // rows at the end of buf and are dropped.
        const float* xr[2 * kTileRows];
        for (int p = 0; p < step; ++p) xr[p] = x + (i0 + std::min<int64_t>(p, rows - 1)) * D;
        for (int64_t l = 0; l < pf_step && pf < pf_end; ++l, pf += 64) {
          _mm_prefetch(pf, _MM_HINT_T0);
        }
        float* out = buf + (i0 - begin) * kp + j0;
        if (wide) {
          dot_tile16_avx2(xr, panel, d0, d1, d0 > 0, out, kp);
        } else {
          dot_tile8_avx2(xr, panel, d0, d1, d0 > 0, out, kp);
        }
      }
    }
  }
  for (int64_t i = begin; i < end; ++i) {
    argmin_avx2(x2[i - begin], c2, kg, kp, buf + (i - begin) * kp, dist + i, idx + i);
  }
}

#endif  // RAID_FAST_X86

// groups with fewer point-dims than this are updated by a single thread each; larger ones split
// their points among all threads.
constexpr int64_t kSerialGroupWork = int64_t{1} << 20;

// sums [kg, D] and cnt [kg] over points begin .. end-1 of x; labels outside [0, kg) are skipped.
// both paths give every element the same double adds in the same order, so they agree exactly.
void accumulate_generic(const float* x, const int64_t* idx, int64_t begin, int64_t end, int64_t D,
                        int64_t kg, double* sums, int64_t* cnt) {
  for (int64_t i = begin; i < end; ++i) {
    const int64_t j = idx[i];
    if (j < 0 || j >= kg) continue;
    ++cnt[j];
    const float* xi = x + i * D;
    double* s = sums + j * D;
    for (int64_t d = 0; d < D; ++d) s[d] += static_cast<double>(xi[d]);
  }
}

#ifdef RAID_FAST_X86

// 4 dims per ymm: the floats are widened with cvtps_pd, then added to the double sums.
__attribute__((target("avx2"))) inline void add_row_avx2(const float* xi, int64_t D, double* s) {
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    const __m256d v0 = _mm256_cvtps_pd(_mm_loadu_ps(xi + d));
    const __m256d v1 = _mm256_cvtps_pd(_mm_loadu_ps(xi + d + 4));
    const __m256d v2 = _mm256_cvtps_pd(_mm_loadu_ps(xi + d + 8));
    const __m256d v3 = _mm256_cvtps_pd(_mm_loadu_ps(xi + d + 12));
    _mm256_storeu_pd(s + d, _mm256_add_pd(_mm256_loadu_pd(s + d), v0));
    _mm256_storeu_pd(s + d + 4, _mm256_add_pd(_mm256_loadu_pd(s + d + 4), v1));
    _mm256_storeu_pd(s + d + 8, _mm256_add_pd(_mm256_loadu_pd(s + d + 8), v2));
    _mm256_storeu_pd(s + d + 12, _mm256_add_pd(_mm256_loadu_pd(s + d + 12), v3));
  }
  for (; d + 4 <= D; d += 4) {
    const __m256d v = _mm256_cvtps_pd(_mm_loadu_ps(xi + d));
    _mm256_storeu_pd(s + d, _mm256_add_pd(_mm256_loadu_pd(s + d), v));
  }
  for (; d < D; ++d) s[d] += static_cast<double>(xi[d]);
}

__attribute__((target("avx2"))) void accumulate_avx2(const float* x, const int64_t* idx,
                                                     int64_t begin, int64_t end, int64_t D,
                                                     int64_t kg, double* sums, int64_t* cnt) {
  for (int64_t i = begin; i < end; ++i) {
    const int64_t j = idx[i];
    if (j < 0 || j >= kg) continue;
    ++cnt[j];
    add_row_avx2(x + i * D, D, sums + j * D);
  }
}

#endif  // RAID_FAST_X86

void accumulate(const float* x, const int64_t* idx, int64_t begin, int64_t end, int64_t D,
                int64_t kg, bool avx2, double* sums, int64_t* cnt) {
#ifdef RAID_FAST_X86
  if (avx2) {
    accumulate_avx2(x, idx, begin, end, D, kg, sums, cnt);
    return;
  }
#endif
  (void)avx2;
  accumulate_generic(x, idx, begin, end, D, kg, sums, cnt);
}

// means, empty-cluster splits and normalisation of one group, all in double in place of its sums
// [kg, D], rounded to float32 once at the end; writes cent [k, D] and counts_out [k] (pre-split).
void finalize_group(double* sums, const int64_t* cnt, int64_t kg, int64_t k, int64_t D,
                    bool spherical, float* cent, int64_t* counts_out) {
  bool any_empty = false;
  for (int64_t j = 0; j < kg; ++j) {
    counts_out[j] = cnt[j];
    double* c = sums + j * D;
    if (cnt[j] > 0) {
      const double n = static_cast<double>(cnt[j]);
      for (int64_t d = 0; d < D; ++d) c[d] /= n;
    } else {
      any_empty = true;
    }
  }
  if (any_empty) {
    std::vector<int64_t> work(cnt, cnt + kg);
    const double up = 1.0 + kSplitEps;
    const double down = 1.0 - kSplitEps;
    for (int64_t j = 0; j < kg; ++j) {
      if (work[j] != 0) continue;
      // with valid labels the sum of work stays N_g >= k_g >= 1, so the largest cluster is never
      // empty.
      int64_t m = 0;
      for (int64_t jj = 1; jj < kg; ++jj) {
        if (work[jj] > work[m]) m = jj;
      }
      double* cj = sums + j * D;
      double* cm = sums + m * D;
      for (int64_t d = 0; d < D; ++d) {
        const double v = cm[d];
        const bool even = (d % 2) == 0;
        cj[d] = v * (even ? up : down);
        cm[d] = v * (even ? down : up);
      }
      work[j] = work[m] / 2;
      work[m] -= work[j];
    }
  }
  if (spherical) {
    for (int64_t j = 0; j < kg; ++j) {
      double* c = sums + j * D;
      double s = 0.0;
      for (int64_t d = 0; d < D; ++d) s += c[d] * c[d];
      const double norm = std::sqrt(s);
      if (norm > 0.0) {
        for (int64_t d = 0; d < D; ++d) c[d] /= norm;
      }
    }
  }
  for (int64_t e = 0; e < kg * D; ++e) cent[e] = static_cast<float>(sums[e]);
  for (int64_t j = kg; j < k; ++j) counts_out[j] = 0;
  std::fill(cent + kg * D, cent + k * D, 0.0f);
}

// the centroids of every group packed for the assignment micro-kernels, plus the dispatch of one
// chunk of points to the avx2 or the portable kernel.
struct PackedCentroids {
  const int64_t* offsets;
  int64_t D;
  int64_t k;
  bool avx2;
  std::vector<int64_t> kp;        // per group: padded width, a multiple of 8
  std::vector<int64_t> pack_off;  // per group: offset into pack
  std::vector<int64_t> c2_off;    // per group: offset into c2
  int64_t max_kp = 8;
  std::unique_ptr<float[], FreeDeleter> pack;  // per group [kp, D] as column panels
  std::unique_ptr<float[], FreeDeleter> c2;    // per group [kp]

  PackedCentroids(const int64_t* offsets_in, int64_t G, int64_t D_in, const float* centroids,
                  int64_t k_in, int nt)
      : offsets(offsets_in),
        D(D_in),
        k(k_in),
        avx2(cpu_has_avx2_fma()),
        kp(G),
        pack_off(G + 1, 0),
        c2_off(G + 1, 0) {
    (void)nt;  // only read by the omp clause
    for (int64_t g = 0; g < G; ++g) {
      kp[g] = round_up(std::max<int64_t>(group_k(offsets, g, k), 1), 8);
      max_kp = std::max(max_kp, kp[g]);
      pack_off[g + 1] = pack_off[g] + kp[g] * D;
      c2_off[g + 1] = c2_off[g] + kp[g];
    }
    pack = alloc_floats(pack_off[G]);
    c2 = alloc_floats(c2_off[G]);
    RAID_FAST_OMP(parallel for schedule(dynamic) num_threads(nt))
    for (int64_t g = 0; g < G; ++g) {
      const int64_t kg = group_k(offsets, g, k);
      if (kg > 0) {
        pack_centroids(centroids + g * k * D, kg, kp[g], D, pack.get() + pack_off[g],
                       c2.get() + c2_off[g]);
      }
    }
  }

  // size of the dot buffer that assign_chunk needs.
  int64_t buf_floats() const { return kBufRows * max_kp; }

  // dist and idx of points begin .. end-1 (at most kAssignChunk) of group g; points
  // next_begin .. next_end-1 are prefetched on the way. every point's result depends on its own
  // row only, not on where the chunk starts. buf [buf_floats()] is scratch.
  void assign_chunk(const float* x, int64_t g, int64_t begin, int64_t end, int64_t next_begin,
                    int64_t next_end, float* buf, float* dist, int64_t* idx) const {
    const int64_t kg = group_k(offsets, g, k);
    const float* pg = pack.get() + pack_off[g];
    const float* cg = c2.get() + c2_off[g];
#ifdef RAID_FAST_X86
    if (avx2) {
      assign_chunk_avx2(x, D, begin, end, next_begin, next_end, pg, cg, kg, kp[g], buf, dist, idx);
      return;
    }
#endif
    (void)next_begin;
    (void)next_end;
    assign_chunk_generic(x, D, begin, end, pg, cg, kg, kp[g], buf, dist, idx);
  }
};

// the lloyd update shared by kmeans_update_cpu and kmeans_step_cpu. fill(g, begin, end, sums, cnt)
// must add points begin .. end-1 of group g, in order of i, to sums [k_g, D] and cnt [k_g], which
// come zeroed; it runs inside a parallel region, once per small group with all of its points and
// once per slice of a large group. the slicing depends on nt only, not on the threads the runtime
// hands out, and the slices are reduced in order, so the result is the same for every fill that
// adds the same values.
template <typename Fill>
void lloyd_update(const int64_t* offsets, int64_t G, int64_t D, int64_t k, bool spherical, int nt,
                  const Fill& fill, float* centroids, int64_t* counts) {
  std::vector<int64_t> small, large;
  int64_t max_small_kd = 0, max_large_kd = 0;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t n = offsets[g + 1] - offsets[g];
    const int64_t kd = group_k(offsets, g, k) * D;
    if (n * D < kSerialGroupWork || nt == 1) {
      small.push_back(g);
      max_small_kd = std::max(max_small_kd, kd);
    } else {
      large.push_back(g);
      max_large_kd = std::max(max_large_kd, kd);
    }
  }

  if (!small.empty()) {
    // per thread: sums [k_g, D] and counts [k_g] of the group it is working on.
    std::vector<double> sums(static_cast<size_t>(nt) * std::max<int64_t>(max_small_kd, 1));
    std::vector<int64_t> cnts(static_cast<size_t>(nt) * k);
    const int64_t n_small = static_cast<int64_t>(small.size());
    RAID_FAST_OMP(parallel for schedule(dynamic) num_threads(nt))
    for (int64_t s = 0; s < n_small; ++s) {
      const int64_t g = small[s];
      const int64_t kg = group_k(offsets, g, k);
      double* sg = sums.data() + thread_id() * std::max<int64_t>(max_small_kd, 1);
      int64_t* cg = cnts.data() + thread_id() * k;
      std::fill(sg, sg + kg * D, 0.0);
      std::fill(cg, cg + kg, int64_t{0});
      fill(g, offsets[g], offsets[g + 1], sg, cg);
      finalize_group(sg, cg, kg, k, D, spherical, centroids + g * k * D, counts + g * k);
    }
  }

  if (!large.empty()) {
    // nt slices of the points, each with its partial sums [k_g, D] and counts [k_g].
    std::vector<double> sums(static_cast<size_t>(nt) * max_large_kd);
    std::vector<int64_t> cnts(static_cast<size_t>(nt) * k);
    for (const int64_t g : large) {
      const int64_t kg = group_k(offsets, g, k);
      const int64_t kd = kg * D;
      const int64_t begin = offsets[g];
      const int64_t n = offsets[g + 1] - begin;
      RAID_FAST_OMP(parallel for schedule(static) num_threads(nt))
      for (int t = 0; t < nt; ++t) {
        double* st = sums.data() + t * max_large_kd;
        int64_t* ct = cnts.data() + t * k;
        std::fill(st, st + kd, 0.0);
        std::fill(ct, ct + kg, int64_t{0});
        fill(g, begin + n * t / nt, begin + n * (t + 1) / nt, st, ct);
      }
      RAID_FAST_OMP(parallel for schedule(static) num_threads(nt))
      for (int64_t e = 0; e < kd; ++e) {
        double s = sums[e];
        for (int t = 1; t < nt; ++t) s += sums[t * max_large_kd + e];
        sums[e] = s;
      }
      for (int64_t j = 0; j < kg; ++j) {
        for (int t = 1; t < nt; ++t) cnts[j] += cnts[t * k + j];
      }
      finalize_group(sums.data(), cnts.data(), kg, k, D, spherical, centroids + g * k * D,
                     counts + g * k);
    }
  }
}

// groups with fewer point-dims than this are seeded by a single thread each.
constexpr int64_t kSerialSeedWork = int64_t{1} << 18;
// points per scheduling block of the parallel mind update.
constexpr int64_t kSeedBlock = 256;

// sum_d (x[d] - c[d])^2 with float32 terms added in order of d, as the seeding contract requires.
float sqdist_exact(const float* x, const float* c, int64_t D) {
  float s = 0.0f;
  for (int64_t d = 0; d < D; ++d) {
    const float diff = x[d] - c[d];
    float sq = diff * diff;
    RAID_FAST_OPAQUE(sq);
    s += sq;
  }
  return s;
}

void mind_range_generic(const float* xg, int64_t D, int64_t begin, int64_t end, const float* c,
                        bool first, float* mind) {
  for (int64_t i = begin; i < end; ++i) {
    const float v = sqdist_exact(xg + i * D, c, D);
    if (first || v < mind[i]) mind[i] = v;
  }
}

#ifdef RAID_FAST_X86

// no fma in the target on purpose: sub, mul and add must round separately.
template <int NB>
__attribute__((target("avx2"))) void sqdist_rows_avx2(const float* rows, int64_t D, const float* c,
                                                      float* out) {
  __m256 acc[NB];
  for (int b = 0; b < NB; ++b) acc[b] = _mm256_setzero_ps();
  const int64_t d8 = D / 8 * 8;
  for (int64_t d0 = 0; d0 < d8; d0 += 8) {
    __m256 cv[8];
    for (int q = 0; q < 8; ++q) cv[q] = _mm256_broadcast_ss(c + d0 + q);
    for (int b = 0; b < NB; ++b) {
      __m256 r[8];
      for (int p = 0; p < 8; ++p) r[p] = _mm256_loadu_ps(rows + (b * 8 + p) * D + d0);
      transpose8(r);
      for (int q = 0; q < 8; ++q) {
        const __m256 diff = _mm256_sub_ps(r[q], cv[q]);
        __m256 sq = _mm256_mul_ps(diff, diff);
        RAID_FAST_OPAQUE(sq);
        acc[b] = _mm256_add_ps(acc[b], sq);
      }
    }
  }
  for (int b = 0; b < NB; ++b) _mm256_storeu_ps(out + 8 * b, acc[b]);
  if (d8 < D) {
    for (int p = 0; p < 8 * NB; ++p) {
      const float* xp = rows + p * D;
      float s = out[p];
      for (int64_t d = d8; d < D; ++d) {
        const float diff = xp[d] - c[d];
        float sq = diff * diff;
        RAID_FAST_OPAQUE(sq);
        s += sq;
      }
      out[p] = s;
    }
  }
}

__attribute__((target("avx2"))) void mind_range_avx2(const float* xg, int64_t D, int64_t begin,
                                                     int64_t end, const float* c, bool first,
                                                     float* mind) {
  alignas(32) float v[32];
  int64_t i = begin;
  while (i < end) {
    int64_t m;
    if (end - i >= 32) {
      sqdist_rows_avx2<4>(xg + i * D, D, c, v);
      m = 32;
    } else if (end - i >= 8) {
      sqdist_rows_avx2<1>(xg + i * D, D, c, v);
      m = 8;
    } else {
      m = end - i;
      for (int64_t p = 0; p < m; ++p) v[p] = sqdist_exact(xg + (i + p) * D, c, D);
    }
    for (int64_t p = 0; p < m; ++p) {
      if (first || v[p] < mind[i + p]) mind[i + p] = v[p];
    }
    i += m;
  }
}

#endif  // RAID_FAST_X86

void mind_range(const float* xg, int64_t D, int64_t begin, int64_t end, const float* c, bool first,
                bool avx2, float* mind) {
#ifdef RAID_FAST_X86
  if (avx2) {
    mind_range_avx2(xg, D, begin, end, c, first, mind);
    return;
  }
#endif
  (void)avx2;
  mind_range_generic(xg, D, begin, end, c, first, mind);
}

int64_t uniform_pick(double u, int64_t n) {
  const double f = std::floor(u * static_cast<double>(n));
  if (!(f > 0.0)) return 0;
  return f >= static_cast<double>(n - 1) ? n - 1 : static_cast<int64_t>(f);
}

// the next seed from mind [n]: sampling by the running sum in double, in order of i.
int64_t pick_next(const float* mind, int64_t n, double u) {
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) total += static_cast<double>(mind[i]);
  if (!(total > 0.0)) return uniform_pick(u, n);
  const double target = u * total;
  double run = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    run += static_cast<double>(mind[i]);
    if (run > target) return i;
  }
  for (int64_t i = n - 1; i >= 0; --i) {
    if (mind[i] > 0.0f) return i;
  }
  return uniform_pick(u, n);
}

// copies the chosen rows of a seeded group and clears the unused slots.
void write_seeds(const float* xg, int64_t D, int64_t kg, int64_t k, const int64_t* picks,
                 float* cent, int64_t* chosen) {
  for (int64_t t = 0; t < kg; ++t) {
    std::copy(xg + picks[t] * D, xg + (picks[t] + 1) * D, cent + t * D);
    chosen[t] = picks[t];
  }
  for (int64_t t = kg; t < k; ++t) {
    std::fill(cent + t * D, cent + (t + 1) * D, 0.0f);
    chosen[t] = -1;
  }
}

}  // namespace

void kmeans_assign_cpu(const float* x, const int64_t* offsets, int64_t G, int64_t D,
                       const float* centroids, int64_t k, float* dist, int64_t* idx,
                       int num_threads) {
  if (G <= 0 || k <= 0) return;
  const int nt = std::max(1, num_threads);
  const PackedCentroids packed(offsets, G, D, centroids, k, nt);

  std::vector<int64_t> chunk_group, chunk_begin;
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t i = offsets[g]; i < offsets[g + 1]; i += kAssignChunk) {
      chunk_group.push_back(g);
      chunk_begin.push_back(i);
    }
  }
  auto bufs = alloc_floats(nt * packed.buf_floats());  // per thread [kBufRows, max_kp]
  const int64_t n_chunks = static_cast<int64_t>(chunk_group.size());
  const int64_t n_tasks = (n_chunks + kChunksPerTask - 1) / kChunksPerTask;

  // a thread takes kChunksPerTask consecutive chunks at a time, so it knows which rows come next.
  RAID_FAST_OMP(parallel for schedule(dynamic) num_threads(nt))
  for (int64_t task = 0; task < n_tasks; ++task) {
    float* buf = bufs.get() + thread_id() * packed.buf_floats();
    const int64_t c_end = std::min(n_chunks, (task + 1) * kChunksPerTask);
    for (int64_t c = task * kChunksPerTask; c < c_end; ++c) {
      const int64_t g = chunk_group[c];
      const int64_t begin = chunk_begin[c];
      const int64_t end = std::min(begin + kAssignChunk, offsets[g + 1]);
      int64_t next_begin = end, next_end = end;
      if (c + 1 < c_end) {
        next_begin = chunk_begin[c + 1];
        next_end = std::min(next_begin + kAssignChunk, offsets[chunk_group[c + 1] + 1]);
      }
      packed.assign_chunk(x, g, begin, end, next_begin, next_end, buf, dist, idx);
    }
  }
}

void kmeans_update_cpu(const float* x, const int64_t* offsets, int64_t G, int64_t D,
                       const int64_t* idx, int64_t k, bool spherical, float* centroids,
                       int64_t* counts, int num_threads) {
  if (G <= 0 || k <= 0) return;
  const int nt = std::max(1, num_threads);
  const bool avx2 = cpu_has_avx2_fma();
  auto fill = [&](int64_t g, int64_t begin, int64_t end, double* sums, int64_t* cnt) {
    accumulate(x, idx, begin, end, D, group_k(offsets, g, k), avx2, sums, cnt);
  };
  lloyd_update(offsets, G, D, k, spherical, nt, fill, centroids, counts);
}

void kmeans_step_cpu(const float* x, const int64_t* offsets, int64_t G, int64_t D,
                     const float* centroids, int64_t k, bool spherical, float* dist, int64_t* idx,
                     float* new_centroids, int64_t* counts, int num_threads) {
  if (G <= 0 || k <= 0) return;
  const int nt = std::max(1, num_threads);
  const PackedCentroids packed(offsets, G, D, centroids, k, nt);
  auto bufs = alloc_floats(nt * packed.buf_floats());  // per thread [kBufRows, max_kp]
  // each chunk of points is added to the sums right after its argmin, while its rows are still in
  // cache, so x is read from memory once. the update's slicing and order of adds are kept, so the
  // result equals kmeans_assign_cpu followed by kmeans_update_cpu.
  auto fill = [&](int64_t g, int64_t begin, int64_t end, double* sums, int64_t* cnt) {
    float* buf = bufs.get() + thread_id() * packed.buf_floats();
    const int64_t kg = group_k(offsets, g, k);
    for (int64_t i = begin; i < end; i += kAssignChunk) {
      const int64_t e = std::min(i + kAssignChunk, end);
      packed.assign_chunk(x, g, i, e, e, std::min(e + kAssignChunk, end), buf, dist, idx);
      accumulate(x, idx, i, e, D, kg, packed.avx2, sums, cnt);
    }
  };
  lloyd_update(offsets, G, D, k, spherical, nt, fill, new_centroids, counts);
}

void kmeans_plusplus_cpu(const float* x, const int64_t* offsets, int64_t G, int64_t D, int64_t k,
                         const double* uniforms, float* centroids, int64_t* chosen,
                         int num_threads) {
  if (G <= 0 || k <= 0) return;
  const int nt = std::max(1, num_threads);
  const bool avx2 = cpu_has_avx2_fma();

  std::vector<int64_t> small, large;
  int64_t max_small_n = 1, max_large_n = 1;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t n = offsets[g + 1] - offsets[g];
    if (n * D < kSerialSeedWork || nt == 1) {
      small.push_back(g);
      max_small_n = std::max(max_small_n, n);
    } else {
      large.push_back(g);
      max_large_n = std::max(max_large_n, n);
    }
  }
  std::vector<int64_t> picks_all(static_cast<size_t>(nt) * k);

  if (!small.empty()) {
    auto minds = alloc_floats(nt * max_small_n);  // per thread [n]
    const int64_t n_small = static_cast<int64_t>(small.size());
    RAID_FAST_OMP(parallel for schedule(dynamic) num_threads(nt))
    for (int64_t s = 0; s < n_small; ++s) {
      const int64_t g = small[s];
      const int64_t n = offsets[g + 1] - offsets[g];
      const int64_t kg = std::min(k, n);
      const float* xg = x + offsets[g] * D;
      const double* u = uniforms + g * k;
      float* mind = minds.get() + thread_id() * max_small_n;
      int64_t* picks = picks_all.data() + thread_id() * k;
      if (kg > 0) picks[0] = uniform_pick(u[0], n);
      for (int64_t t = 1; t < kg; ++t) {
        mind_range(xg, D, 0, n, xg + picks[t - 1] * D, t == 1, avx2, mind);
        picks[t] = pick_next(mind, n, u[t]);
      }
      write_seeds(xg, D, kg, k, picks, centroids + g * k * D, chosen + g * k);
    }
  }

  if (!large.empty()) {
    auto mind_buf = alloc_floats(max_large_n);  // [n]
    float* mind = mind_buf.get();
    int64_t* picks = picks_all.data();
    for (const int64_t g : large) {
      const int64_t n = offsets[g + 1] - offsets[g];
      const int64_t kg = std::min(k, n);
      const float* xg = x + offsets[g] * D;
      const double* u = uniforms + g * k;
      const int64_t n_blocks = (n + kSeedBlock - 1) / kSeedBlock;
      picks[0] = uniform_pick(u[0], n);
      RAID_FAST_OMP(parallel num_threads(nt))
      for (int64_t t = 1; t < kg; ++t) {
        const float* c = xg + picks[t - 1] * D;
        RAID_FAST_OMP(for schedule(static))
        for (int64_t b = 0; b < n_blocks; ++b) {
          mind_range(xg, D, b * kSeedBlock, std::min(n, (b + 1) * kSeedBlock), c, t == 1, avx2,
                     mind);
        }
        RAID_FAST_OMP(single)
        picks[t] = pick_next(mind, n, u[t]);
      }
      write_seeds(xg, D, kg, k, picks, centroids + g * k * D, chosen + g * k);
    }
  }
}

}  // namespace raid_fast
