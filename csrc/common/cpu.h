// helpers shared by the cpu kernels (kmeans_cpu.cpp, search_cpu.cpp): run-time avx2/fma
// detection, omp directives that vanish without -fopenmp, the omp thread id and aligned storage.
// private to csrc; bindings.cpp never includes it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define RAID_FAST_X86 1
#endif

// omp directives go through a macro so that a build without -fopenmp drops them silently instead
// of warning about unknown pragmas.
#ifdef _OPENMP
#include <omp.h>
#define RAID_FAST_PRAGMA(x) _Pragma(#x)
#define RAID_FAST_OMP(...) RAID_FAST_PRAGMA(omp __VA_ARGS__)
#else
#define RAID_FAST_OMP(...)
#endif

namespace raid_fast {

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

// 64-byte aligned float storage, so packed panels can use aligned loads.
inline std::unique_ptr<float[], FreeDeleter> alloc_floats(int64_t n) {
  size_t bytes = static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(float);
  bytes = (bytes + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, bytes);
  if (p == nullptr) throw std::bad_alloc();
  return std::unique_ptr<float[], FreeDeleter>(static_cast<float*>(p));
}

inline bool cpu_has_avx2_fma() {
#ifdef RAID_FAST_X86
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

}  // namespace raid_fast
