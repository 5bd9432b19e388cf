// Plain C++ interface of the CPU search kernels: raw pointers and int64 sizes, no torch.
// bindings.cpp is the only caller.
//
// Letters: M queries, N tokens, D dims, K neighbours, P probe slots per query, L lists.
//   queries  [M, D]  float32, row-major, contiguous, unit-norm.
//   tokens   [N, D]  float32, row-major, contiguous, unit-norm; N < 2^32 (ids packed in 32 bits).
//   dist     [M, K]  float32 output: 1 - q . t in float32, ascending; +inf in missing slots.
//   idx      [M, K]  int64 output: global token ids; -1 in missing slots.
// Every dot q . t is the same float32 sum in both functions (blocks of 192 dims, each a chain in
// order of d, fma on the avx2 path, then added), whatever the thread count or the place of q and t
// in a tile. The result is exactly the K smallest admissible (dist, idx) pairs in lexicographic
// order, so equal distances go to the smaller token id and the output does not depend on
// num_threads.
// token_group [N] / exclude_group [M] int64 (both given or the exclusion is off): token n is not
// admissible for query m when token_group[n] == exclude_group[m].
#pragma once

#include <cstdint>

namespace raid_fast {

// exact top-K over tokens. lo, hi [M] int64 (both null or both given): query m only admits tokens
// max(lo[m], 0) <= n < min(hi[m], N); an empty range gives a row of missing slots.
void cosine_topk_cpu(const float* queries, int64_t M, int64_t D, const float* tokens, int64_t N,
                     int64_t k, const int64_t* lo, const int64_t* hi, const int64_t* token_group,
                     const int64_t* exclude_group, float* dist, int64_t* idx, int num_threads);

// inverted-list top-K: one global top-K over the union of each query's probed lists.
//   probes       [M, P] int64, values in [-1, L): -1 marks an unused slot, a repeated id in a row
//                counts once.
//   list_offsets [L + 1] int64 CSR offsets into tokens, non-decreasing, 0 <= list_offsets[0],
//                list_offsets[L] <= N; list l owns tokens list_offsets[l] .. list_offsets[l+1]-1.
void ivf_topk_cpu(const float* queries, int64_t M, int64_t D, const int64_t* probes, int64_t P,
                  const int64_t* list_offsets, int64_t L, const float* tokens, int64_t N, int64_t k,
                  const int64_t* token_group, const int64_t* exclude_group, float* dist,
                  int64_t* idx, int num_threads);

}  // namespace raid_fast
