// cpu kernels of the search interface declared in search.h: exact (flat) and inverted-list top-k
// by 1 - q . t. both stream token rows through the register-blocked tiles of common/dot_tile.h
// (rows = tokens read in place, panel = 16 packed queries), test each tile row against the queries'
// current k-th distances with a few vector compares, and append the rare survivors to per-query
// running lists that are cut back to k by a branch-free selection when they fill. the avx2/fma
// paths are picked at run time, so the build needs no -march flag.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <vector>

#include "common/cpu.h"
#include "common/dot_tile.h"
#include "search/search.h"

namespace raid_fast {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
// token rows per chunk: the chunk's rows (74 kb at D = 384) stay in l2 while every query panel of
// the work item streams past them, and the next chunk is prefetched meanwhile.
constexpr int64_t kChunkRows = 48;
// rows of a thread's dot buffer: a chunk plus the dropped rows of a short last tile pair.
constexpr int64_t kBufRows = kChunkRows + 2 * kTileRows;
// a running list holds k + max(k, kMinSlack) keys before it is cut back to k: more slack means
// fewer cuts, less means a tighter bound sooner (k extra measured best for k = 150).
constexpr int64_t kMinSlack = 64;
// the running lists of all threads stay under this many bytes; larger calls go in query blocks.
constexpr int64_t kListBytes = int64_t{64} << 20;
// query panels per work item of the inverted-list search: a list probed by more queries is split
// into several items so that threads can share it.
constexpr int64_t kPanelsPerItem = 4;
// consecutive chunks per scheduling task of the flat search, so that a thread knows which rows
// come next and can prefetch them.
constexpr int64_t kChunksPerTask = 8;

// (dist, idx) as one integer whose order is the lexicographic order of the pair: the float's bits
// mapped to an order-preserving unsigned above the 32-bit token id.
inline uint64_t make_key(float dist, int64_t n) {
  uint32_t b;
  std::memcpy(&b, &dist, sizeof(b));
  b = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  return (static_cast<uint64_t>(b) << 32) | static_cast<uint32_t>(n);
}

inline float key_dist(uint64_t key) {
  uint32_t b = static_cast<uint32_t>(key >> 32);
  b = (b & 0x80000000u) ? (b & 0x7fffffffu) : ~b;
  float d;
  std::memcpy(&d, &b, sizeof(d));
  return d;
}

inline int64_t key_idx(uint64_t key) { return static_cast<int64_t>(key & 0xffffffffu); }

// rearranges keys a[0..n) so that a[kth] holds the key of rank kth with the smaller keys before it,
// like std::nth_element for distinct keys. the partition is branch-free: comparisons of keys in no
// particular order would mispredict about every other time, which made std::nth_element the
// largest cost after the dots.
void select_keys(uint64_t* a, int64_t n, int64_t kth) {
  int64_t lo = 0, hi = n;  // the rank-kth key lies in a[lo .. hi-1]
  while (hi - lo > 16) {
    // median of three, moved to a[hi - 1] as the pivot.
    const int64_t mid = lo + (hi - lo) / 2;
    const uint64_t x = a[lo], y = a[mid], z = a[hi - 1];
    const uint64_t small = std::min(x, y), large = std::max(x, y);
    a[lo] = std::min(small, z);
    a[mid] = std::max(large, z);
    a[hi - 1] = std::max(small, std::min(large, z));
    const uint64_t pivot = a[hi - 1];
    int64_t i = lo;
    for (int64_t j = lo; j < hi - 1; ++j) {
      const uint64_t v = a[j];
      a[j] = a[i];
      a[i] = v;
      i += v < pivot;
    }
    a[hi - 1] = a[i];
    a[i] = pivot;
    if (kth == i) return;
    if (kth < i) {
      hi = i;
    } else {
      lo = i + 1;
    }
  }
  for (int64_t i = lo + 1; i < hi; ++i) {
    const uint64_t v = a[i];
    int64_t j = i;
    for (; j > lo && a[j - 1] > v; --j) a[j] = a[j - 1];
    a[j] = v;
  }
}

int64_t list_cap(int64_t k, int64_t max_candidates) {
  return std::max<int64_t>(1, std::min(max_candidates, k + std::max(k, kMinSlack)));
}

// queries per block: as many as the running lists of nt threads allow, a multiple of 16.
int64_t query_block(int64_t M, int64_t cap, int nt) {
  const int64_t fit = kListBytes / (static_cast<int64_t>(nt) * cap * 8);
  return std::min(M, std::max<int64_t>(16, fit / 16 * 16));
}

// per thread and query a list of at most cap keys, cut back to the k smallest whenever it fills,
// and per query a bound shared by all threads: the smallest k-th distance any thread has cut at.
// a candidate farther than a bound is beaten by k keys of that thread, so no thread needs it; one
// at the bound may still win on its id and is kept. thread t only touches its own lists, and a
// stale bound is merely looser, so relaxed atomics suffice.
class RunningTopK {
 public:
  RunningTopK(int64_t n_queries, int64_t k, int64_t cap, int nt)
      : m_(n_queries),
        k_(k),
        cap_(cap),
        keys_(new uint64_t[static_cast<size_t>(nt * n_queries * cap)]),
        counts_(static_cast<size_t>(nt * n_queries), 0),
        bound_(new std::atomic<float>[static_cast<size_t>(n_queries)]) {
    for (int64_t m = 0; m < m_; ++m) bound_[m].store(kInf, std::memory_order_relaxed);
  }

  float bound(int64_t m) const { return bound_[m].load(std::memory_order_relaxed); }

  // appends key to thread t's list of query m; true when that cut the list back to k (and so may
  // have lowered the query's bound).
  bool push(int t, int64_t m, uint64_t key) {
    const int64_t s = t * m_ + m;
    uint64_t* list = keys_.get() + s * cap_;  // [cap]
    int64_t c = counts_[s];
    list[c++] = key;
    if (c < cap_ || cap_ <= k_) {
      counts_[s] = c;
      return false;
    }
    select_keys(list, c, k_ - 1);
    counts_[s] = k_;
    const float cut = key_dist(list[k_ - 1]);
    float cur = bound_[m].load(std::memory_order_relaxed);
    while (cut < cur && !bound_[m].compare_exchange_weak(cur, cut, std::memory_order_relaxed)) {
    }
    return true;
  }

  // the k smallest keys of query m over all threads, ascending: dist [k], idx [k], missing slots
  // +inf / -1. scratch holds nt * cap keys.
  void finish(int nt, int64_t m, uint64_t* scratch, float* dist, int64_t* idx) const {
    const uint64_t last = make_key(bound(m), 0xffffffff);
    int64_t n = 0;
    for (int t = 0; t < nt; ++t) {
      const int64_t s = t * m_ + m;
      const uint64_t* list = keys_.get() + s * cap_;
      for (int64_t i = 0; i < counts_[s]; ++i) {
        if (list[i] <= last) scratch[n++] = list[i];
      }
    }
    const int64_t keep = std::min(n, k_);
    if (n > keep) select_keys(scratch, n, keep);
    std::sort(scratch, scratch + keep);
    for (int64_t j = 0; j < keep; ++j) {
      dist[j] = key_dist(scratch[j]);
      idx[j] = key_idx(scratch[j]);
    }
    std::fill(dist + keep, dist + k_, kInf);
    std::fill(idx + keep, idx + k_, int64_t{-1});
  }

 private:
  int64_t m_, k_, cap_;
  std::unique_ptr<uint64_t[]> keys_;             // [nt, M, cap]
  std::vector<int64_t> counts_;                  // [nt, M]
  std::unique_ptr<std::atomic<float>[]> bound_;  // [M]
};

// a group of up to 16 queries packed as one panel of the micro-kernel.
struct Panel {
  int64_t first;  // position of its first query in the caller's query list
  int nq;         // queries in it
  int width;      // 16, or 8 for a last panel of at most 8 queries
};

// panels over queries begin .. end-1: full 16-wide ones, then one 8- or 16-wide panel for the rest
// (an 8-wide panel runs the two-tile kernel, so padding costs at most 7 columns).
void make_panels(int64_t begin, int64_t end, std::vector<Panel>& out) {
  for (int64_t p = begin; p < end; p += 16) {
    const int nq = static_cast<int>(std::min<int64_t>(16, end - p));
    out.push_back({p, nq, nq <= 8 ? 8 : 16});
  }
}

// software prefetches of the rows that come next, spread over the tile calls of the current rows
// so that their trip from memory overlaps the fmas instead of stalling the next pass.
struct Prefetch {
  const char* next = nullptr;
  const char* end = nullptr;
  int64_t lines_per_call = 0;

  // rows r0 .. r1-1 of tokens, over about `calls` tile calls.
  Prefetch(const float* tokens, int64_t D, int64_t r0, int64_t r1, int64_t calls) {
    if (r1 <= r0) return;
    next = reinterpret_cast<const char*>(tokens + r0 * D);
    end = reinterpret_cast<const char*>(tokens + r1 * D);
    lines_per_call = ((end - next) / 64 + calls - 1) / std::max<int64_t>(calls, 1);
  }
};

// tile calls that the dots of rows r0 .. r1-1 against one panel of width w make.
int64_t tile_calls(int64_t D, int64_t r0, int64_t r1, int w) {
  const int64_t step = w == 16 ? kTileRows : 2 * kTileRows;
  return (D + kDimBlock - 1) / kDimBlock * ((r1 - r0 + step - 1) / step);
}

void pack_panel_generic(const float* queries, int64_t D, const int64_t* rows, int nq, int w,
                        float* panel) {
  for (int c = 0; c < w; ++c) {
    const float* q = c < nq ? queries + rows[c] * D : nullptr;
    for (int64_t d = 0; d < D; ++d) panel[d * w + c] = q != nullptr ? q[d] : 0.0f;
  }
}

// dots of token rows r0 .. r1-1 against one panel into buf [r1 - r0, w] (plus spare rows).
void panel_dots_generic(const float* tokens, int64_t D, int64_t r0, int64_t r1, const float* panel,
                        int w, float* buf) {
  for (int64_t i0 = r0; i0 < r1; i0 += kTileRows) {
    const int64_t rows = std::min<int64_t>(kTileRows, r1 - i0);
    // missing rows of a short tile repeat the last real row; their results are dropped.
    const float* xr[kTileRows];
    for (int p = 0; p < kTileRows; ++p) {
      xr[p] = tokens + (i0 + std::min<int64_t>(p, rows - 1)) * D;
    }
    float* out = buf + (i0 - r0) * w;  // [kTileRows, w]
    for (int64_t d0 = 0; d0 < D; d0 += kDimBlock) {
      const int64_t d1 = std::min(D, d0 + kDimBlock);
      if (w == 16) {
        dot_tile_generic<16>(xr, panel, d0, d1, d0 > 0, out, 16);
      } else {
        dot_tile_generic<8>(xr, panel, d0, d1, d0 > 0, out, 8);
      }
    }
  }
}

// the candidates of buf [r1 - r0, w] (tokens r0 .. r1-1 against the panel's queries) that are
// within their query's bound go to its running list. bound [w] is the thread's copy, -inf in
// unused columns; slot [w] the queries' running-list ids; admit(c, n) the range and group test.
template <typename Admit>
void collect_generic(const float* buf, int w, int64_t r0, int64_t r1, float* bound,
                     const int64_t* slot, const Admit& admit, RunningTopK& top, int t) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* row = buf + (r - r0) * w;  // [w]
    for (int c = 0; c < w; ++c) {
      const float d = 1.0f - row[c];
      if (!(d <= bound[c]) || !admit(c, r)) continue;
      if (top.push(t, slot[c], make_key(d, r))) bound[c] = top.bound(slot[c]);
    }
  }
}

#ifdef RAID_FAST_X86

// the same panel with 8x8 transposes: 8 queries' rows in, 8 panel rows of 8 columns out.
__attribute__((target("avx2"))) void pack_panel_avx2(const float* queries, int64_t D,
                                                     const int64_t* rows, int nq, int w,
                                                     float* panel) {
  for (int c0 = 0; c0 < w; c0 += 8) {
    const float* src[8];
    for (int p = 0; p < 8; ++p) src[p] = c0 + p < nq ? queries + rows[c0 + p] * D : nullptr;
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) {
      __m256 r[8];
      for (int p = 0; p < 8; ++p) {
        r[p] = src[p] != nullptr ? _mm256_loadu_ps(src[p] + d) : _mm256_setzero_ps();
      }
      transpose8(r);
      for (int q = 0; q < 8; ++q) _mm256_store_ps(panel + (d + q) * w + c0, r[q]);
    }
    for (; d < D; ++d) {
      for (int p = 0; p < 8; ++p) panel[d * w + c0 + p] = src[p] != nullptr ? src[p][d] : 0.0f;
    }
  }
}

// loop order as in the kmeans assignment: blocks of dims, then tiles, so that the panel's slice
// [kDimBlock, w] stays in l1 while the chunk's rows stream past it from l2.
__attribute__((target("avx2,fma"))) void panel_dots_avx2(const float* tokens, int64_t D, int64_t r0,
                                                         int64_t r1, const float* panel, int w,
                                                         float* buf, Prefetch& pf) {
  const int64_t step = w == 16 ? kTileRows : 2 * kTileRows;
  for (int64_t d0 = 0; d0 < D; d0 += kDimBlock) {
    const int64_t d1 = std::min(D, d0 + kDimBlock);
    for (int64_t i0 = r0; i0 < r1; i0 += step) {
      const int64_t rows = std::min<int64_t>(step, r1 - i0);
      // missing rows of a short tile repeat the last real row; their results land in the spare
      // rows of buf and are dropped.
      const float* xr[2 * kTileRows];
      for (int p = 0; p < step; ++p) xr[p] = tokens + (i0 + std::min<int64_t>(p, rows - 1)) * D;
      for (int64_t l = 0; l < pf.lines_per_call && pf.next < pf.end; ++l, pf.next += 64) {
        _mm_prefetch(pf.next, _MM_HINT_T1);
      }
      float* out = buf + (i0 - r0) * w;  // [step, w]
      if (w == 16) {
        dot_tile16_avx2(xr, panel, d0, d1, d0 > 0, out, 16);
      } else {
        dot_tile8_avx2(xr, panel, d0, d1, d0 > 0, out, 8);
      }
    }
  }
}

// per row, 1 - dot for all columns and one compare with the bounds; only rows with a survivor
// leave the vector path.
template <typename Admit>
__attribute__((target("avx2,fma"))) void collect_avx2(const float* buf, int w, int64_t r0,
                                                      int64_t r1, float* bound, const int64_t* slot,
                                                      const Admit& admit, RunningTopK& top, int t) {
  const __m256 one = _mm256_set1_ps(1.0f);
  for (int64_t r = r0; r < r1; ++r) {
    const float* row = buf + (r - r0) * w;  // [w]
    const __m256 d0 = _mm256_sub_ps(one, _mm256_loadu_ps(row));
    unsigned mask = static_cast<unsigned>(
        _mm256_movemask_ps(_mm256_cmp_ps(d0, _mm256_loadu_ps(bound), _CMP_LE_OQ)));
    if (w == 16) {
      const __m256 d1 = _mm256_sub_ps(one, _mm256_loadu_ps(row + 8));
      mask |= static_cast<unsigned>(
                  _mm256_movemask_ps(_mm256_cmp_ps(d1, _mm256_loadu_ps(bound + 8), _CMP_LE_OQ)))
              << 8;
    }
    while (mask != 0) {
      const int c = __builtin_ctz(mask);
      mask &= mask - 1;
      if (!admit(c, r)) continue;
      if (top.push(t, slot[c], make_key(1.0f - row[c], r))) bound[c] = top.bound(slot[c]);
    }
  }
}

#endif  // RAID_FAST_X86

void pack_panel(const float* queries, int64_t D, const int64_t* rows, int nq, int w, bool avx2,
                float* panel) {
#ifdef RAID_FAST_X86
  if (avx2) {
    pack_panel_avx2(queries, D, rows, nq, w, panel);
    return;
  }
#endif
  (void)avx2;
  pack_panel_generic(queries, D, rows, nq, w, panel);
}

// one thread's view of a scan: the token rows, its dot buffer [kBufRows, 16] and running lists.
struct Scanner {
  const float* tokens;
  int64_t D;
  bool avx2;
  float* buf;
  RunningTopK* top;
  int t;

  // dots of token rows r0 .. r1-1 against a panel of width w, then their survivors into the
  // running lists (see collect_generic for bound, slot and admit); pf advances on the way.
  template <typename Admit>
  void scan(int64_t r0, int64_t r1, const float* panel, int w, float* bound, const int64_t* slot,
            const Admit& admit, Prefetch& pf) const {
#ifdef RAID_FAST_X86
    if (avx2) {
      panel_dots_avx2(tokens, D, r0, r1, panel, w, buf, pf);
      collect_avx2(buf, w, r0, r1, bound, slot, admit, *top, t);
      return;
    }
#endif
    (void)pf;
    panel_dots_generic(tokens, D, r0, r1, panel, w, buf);
    collect_generic(buf, w, r0, r1, bound, slot, admit, *top, t);
  }
};

// writes the results of block queries 0 .. n-1 (row of block query i: rows[i]) from top.
void finish_block(const RunningTopK& top, int64_t n, int64_t k, int64_t cap, const int64_t* rows,
                  int nt, float* dist, int64_t* idx) {
  std::vector<uint64_t> scratch(static_cast<size_t>(nt) * nt * cap);  // per thread [nt * cap]
  RAID_FAST_OMP(parallel for schedule(static) num_threads(nt))
  for (int64_t i = 0; i < n; ++i) {
    uint64_t* s = scratch.data() + static_cast<int64_t>(thread_id()) * nt * cap;
    top.finish(nt, i, s, dist + rows[i] * k, idx + rows[i] * k);
  }
}

}  // namespace

void cosine_topk_cpu(const float* queries, int64_t M, int64_t D, const float* tokens, int64_t N,
                     int64_t k, const int64_t* lo, const int64_t* hi, const int64_t* token_group,
                     const int64_t* exclude_group, float* dist, int64_t* idx, int num_threads) {
  if (M <= 0 || k <= 0) return;
  const int nt = std::max(1, num_threads);
  const bool avx2 = cpu_has_avx2_fma();
  const bool ranged = lo != nullptr && hi != nullptr;
  const bool grouped = token_group != nullptr && exclude_group != nullptr;

  std::vector<int64_t> qlo(M, 0), qhi(M, N);  // [M] admitted token range, clamped to [0, N]
  std::vector<int64_t> order(M);              // [M] queries in scan order
  std::iota(order.begin(), order.end(), int64_t{0});
  if (ranged) {
    for (int64_t m = 0; m < M; ++m) {
      qlo[m] = std::min(std::max(lo[m], int64_t{0}), N);
      qhi[m] = std::max(qlo[m], std::min(hi[m], N));
    }
    // queries of one range (one class, one image) end up in the same panels.
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      return qlo[a] != qlo[b] ? qlo[a] < qlo[b] : qhi[a] < qhi[b];
    });
  }
  int64_t max_candidates = 0;
  for (int64_t m = 0; m < M; ++m) max_candidates = std::max(max_candidates, qhi[m] - qlo[m]);
  const int64_t cap = list_cap(k, max_candidates);
  const int64_t block = query_block(M, cap, nt);
  auto bufs = alloc_floats(nt * kBufRows * 16);  // per thread [kBufRows, 16]

  for (int64_t b0 = 0; b0 < M; b0 += block) {
    const int64_t nb = std::min(block, M - b0);
    const int64_t* rows = order.data() + b0;  // [nb] query of each block position
    std::vector<Panel> panels;
    make_panels(0, nb, panels);
    const int64_t n_panels = static_cast<int64_t>(panels.size());
    auto packed = alloc_floats(n_panels * 16 * D);  // per panel [D, width]
    // per panel the union and the intersection of its queries' ranges.
    std::vector<int64_t> lo_min(n_panels), hi_max(n_panels), lo_max(n_panels), hi_min(n_panels);
    int64_t first = N, last = 0;
    for (int64_t p = 0; p < n_panels; ++p) {
      const Panel& pn = panels[p];
      pack_panel(queries, D, rows + pn.first, pn.nq, pn.width, avx2, packed.get() + p * 16 * D);
      lo_min[p] = lo_max[p] = qlo[rows[pn.first]];
      hi_min[p] = hi_max[p] = qhi[rows[pn.first]];
      for (int c = 1; c < pn.nq; ++c) {
        const int64_t m = rows[pn.first + c];
        lo_min[p] = std::min(lo_min[p], qlo[m]);
        lo_max[p] = std::max(lo_max[p], qlo[m]);
        hi_min[p] = std::min(hi_min[p], qhi[m]);
        hi_max[p] = std::max(hi_max[p], qhi[m]);
      }
      if (lo_min[p] < hi_max[p]) {
        first = std::min(first, lo_min[p]);
        last = std::max(last, hi_max[p]);
      }
    }
    RunningTopK top(nb, k, cap, nt);
    const int64_t n_chunks = last > first ? (last - first + kChunkRows - 1) / kChunkRows : 0;
    const int64_t n_tasks = (n_chunks + kChunksPerTask - 1) / kChunksPerTask;

    RAID_FAST_OMP(parallel for schedule(dynamic) num_threads(nt))
    for (int64_t task = 0; task < n_tasks; ++task) {
      const int t = thread_id();
      const Scanner sc{tokens, D, avx2, bufs.get() + t * kBufRows * 16, &top, t};
      const int64_t ch_end = std::min(n_chunks, (task + 1) * kChunksPerTask);
      for (int64_t ch = task * kChunksPerTask; ch < ch_end; ++ch) {
        const int64_t c0 = first + ch * kChunkRows;
        const int64_t c1 = std::min(last, c0 + kChunkRows);
        // the task's next chunk is fetched while this one is multiplied.
        Prefetch pf(tokens, D, c1, ch + 1 < ch_end ? std::min(last, c1 + kChunkRows) : c1,
                    n_panels * tile_calls(D, c0, c1, 16));
        for (int64_t p = 0; p < n_panels; ++p) {
          const Panel& pn = panels[p];
          const int64_t r0 = std::max(c0, lo_min[p]);
          const int64_t r1 = std::min(c1, hi_max[p]);
          if (r0 >= r1) continue;
          float bound[16];
          int64_t slot[16];
          const int64_t* q = rows + pn.first;  // [nq] the panel's queries
          for (int c = 0; c < pn.width; ++c) {
            slot[c] = pn.first + std::min(c, pn.nq - 1);
            bound[c] = c < pn.nq ? top.bound(slot[c]) : -kInf;
          }
          const float* panel = packed.get() + p * 16 * D;
          // the range test is only needed where the rows are not inside every query's range.
          const bool check_range = r0 < lo_max[p] || r1 > hi_min[p];
          if (!check_range && !grouped) {
            sc.scan(r0, r1, panel, pn.width, bound, slot, [](int, int64_t) { return true; }, pf);
          } else {
            auto admit = [&](int c, int64_t n) {
              const int64_t m = q[c];
              if (check_range && (n < qlo[m] || n >= qhi[m])) return false;
              return !grouped || token_group[n] != exclude_group[m];
            };
            sc.scan(r0, r1, panel, pn.width, bound, slot, admit, pf);
          }
        }
      }
    }
    finish_block(top, nb, k, cap, rows, nt, dist, idx);
  }
}

void ivf_topk_cpu(const float* queries, int64_t M, int64_t D, const int64_t* probes, int64_t P,
                  const int64_t* list_offsets, int64_t L, const float* tokens, int64_t N, int64_t k,
                  const int64_t* token_group, const int64_t* exclude_group, float* dist,
                  int64_t* idx, int num_threads) {
  if (M <= 0 || k <= 0) return;
  (void)N;
  const int nt = std::max(1, num_threads);
  const bool avx2 = cpu_has_avx2_fma();
  const bool grouped = token_group != nullptr && exclude_group != nullptr;
  auto list_size = [&](int64_t l) { return list_offsets[l + 1] - list_offsets[l]; };
  // a probe that counts: a valid id of a non-empty list, not repeated earlier in its row.
  auto counts = [&](const int64_t* row, int64_t s) {
    const int64_t l = row[s];
    if (l < 0 || list_size(l) <= 0) return false;
    for (int64_t s2 = 0; s2 < s; ++s2) {
      if (row[s2] == l) return false;
    }
    return true;
  };
  const int64_t block = query_block(M, list_cap(k, std::numeric_limits<int64_t>::max()), nt);
  auto bufs = alloc_floats(nt * kBufRows * 16);             // per thread [kBufRows, 16]
  auto packs = alloc_floats(nt * kPanelsPerItem * 16 * D);  // per thread [panels, D, 16]
  std::vector<int64_t> rows(block);                         // [block] row of each block query

  for (int64_t b0 = 0; b0 < M; b0 += block) {
    const int64_t nb = std::min(block, M - b0);
    // inverted probe map of the block: for each list, the block's queries that probe it.
    std::vector<int64_t> start(L + 1, 0);      // [L + 1] CSR into members
    std::vector<int64_t> n_candidates(nb, 0);  // [nb]
    for (int64_t i = 0; i < nb; ++i) {
      const int64_t* row = probes + (b0 + i) * P;  // [P]
      for (int64_t s = 0; s < P; ++s) {
        if (!counts(row, s)) continue;
        ++start[row[s] + 1];
        n_candidates[i] += list_size(row[s]);
      }
    }
    for (int64_t l = 0; l < L; ++l) start[l + 1] += start[l];
    std::vector<int64_t> members(start[L]);  // block positions, ascending within each list
    {
      std::vector<int64_t> fill(start.begin(), start.end() - 1);
      for (int64_t i = 0; i < nb; ++i) {
        const int64_t* row = probes + (b0 + i) * P;
        for (int64_t s = 0; s < P; ++s) {
          if (counts(row, s)) members[fill[row[s]]++] = i;
        }
      }
    }
    const int64_t cap = list_cap(k, *std::max_element(n_candidates.begin(), n_candidates.end()));
    RunningTopK top(nb, k, cap, nt);

    // work items: a list with at most kPanelsPerItem panels of its queries, biggest first so that
    // the dynamic schedule ends evenly.
    struct Item {
      int64_t list, begin, end;  // members begin .. end-1
    };
    std::vector<Item> items;
    for (int64_t l = 0; l < L; ++l) {
      for (int64_t b = start[l]; b < start[l + 1]; b += 16 * kPanelsPerItem) {
        items.push_back({l, b, std::min(start[l + 1], b + 16 * kPanelsPerItem)});
      }
    }
    std::stable_sort(items.begin(), items.end(), [&](const Item& a, const Item& b) {
      return list_size(a.list) * (a.end - a.begin) > list_size(b.list) * (b.end - b.begin);
    });
    const int64_t n_items = static_cast<int64_t>(items.size());

    RAID_FAST_OMP(parallel for schedule(dynamic) num_threads(nt))
    for (int64_t it = 0; it < n_items; ++it) {
      const int t = thread_id();
      const Scanner sc{tokens, D, avx2, bufs.get() + t * kBufRows * 16, &top, t};
      float* pack = packs.get() + t * kPanelsPerItem * 16 * D;  // [panels, D, 16]
      const Item& item = items[it];
      const int64_t n = item.end - item.begin;
      const int64_t* q = members.data() + item.begin;  // [n] block positions of the queries
      std::vector<int64_t> global(n);                  // [n] their query rows
      for (int64_t j = 0; j < n; ++j) global[j] = b0 + q[j];
      std::vector<Panel> panels;
      make_panels(0, n, panels);
      const int64_t n_panels = static_cast<int64_t>(panels.size());
      for (int64_t p = 0; p < n_panels; ++p) {
        pack_panel(queries, D, global.data() + panels[p].first, panels[p].nq, panels[p].width, avx2,
                   pack + p * 16 * D);
      }
      const int64_t lo = list_offsets[item.list], hi = list_offsets[item.list + 1];
      for (int64_t c0 = lo; c0 < hi; c0 += kChunkRows) {
        const int64_t c1 = std::min(hi, c0 + kChunkRows);
        // the next rows are the item's next chunk or the next item's first one, which this thread
        // or the other ones take next.
        int64_t n0 = c1, n1 = std::min(hi, c1 + kChunkRows);
        if (c1 == hi && it + 1 < n_items) {
          n0 = list_offsets[items[it + 1].list];
          n1 = std::min(list_offsets[items[it + 1].list + 1], n0 + kChunkRows);
        }
        Prefetch pf(tokens, D, n0, n1, n_panels * tile_calls(D, c0, c1, 16));
        for (int64_t p = 0; p < n_panels; ++p) {
          const Panel& pn = panels[p];
          float bound[16];
          int64_t slot[16];
          for (int c = 0; c < pn.width; ++c) {
            slot[c] = q[pn.first + std::min(c, pn.nq - 1)];
            bound[c] = c < pn.nq ? top.bound(slot[c]) : -kInf;
          }
          const float* panel = pack + p * 16 * D;
          if (!grouped) {
            sc.scan(c0, c1, panel, pn.width, bound, slot, [](int, int64_t) { return true; }, pf);
          } else {
            const int64_t* g = global.data() + pn.first;  // [nq]
            auto admit = [&](int c, int64_t r) { return token_group[r] != exclude_group[g[c]]; };
            sc.scan(c0, c1, panel, pn.width, bound, slot, admit, pf);
          }
        }
      }
    }
    for (int64_t i = 0; i < nb; ++i) rows[i] = b0 + i;
    finish_block(top, nb, k, cap, rows.data(), nt, dist, idx);
  }
}

}  // namespace raid_fast
