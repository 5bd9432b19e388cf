// Plain C++ interface of the KMeans kernels: raw pointers and int64 sizes, no torch, no CUDA
// headers (a CUDA stream travels as void*). bindings.cpp is the only caller.
//
// Layout shared by every function below (letters: G groups, N points in all, D dims, k centroids):
//   x          [N, D]    float32, row-major, contiguous. Group g owns rows offsets[g] ..
//   offsets[g+1]-1. offsets    [G + 1]   int64, offsets[0] = 0, non-decreasing, offsets[G] = N.
//   Host memory for the
//                        *_cpu functions, device memory for the *_cuda functions.
//   centroids  [G, k, D] float32, contiguous. Group g uses its first k_g = min(k, N_g) rows,
//                        N_g = offsets[g+1] - offsets[g]; rows k_g .. k-1 are unused (written as
//                        0).
// Distances are squared Euclidean. Ties go to the smallest centroid index.
#pragma once

#include <cstdint>

namespace raid_fast {

// Relative perturbation used when an empty cluster is re-seeded by splitting the largest one.
constexpr double kSplitEps = 1.0 / 1024.0;

// ---- CPU ------------------------------------------------------------------------------------

// For each point i of group g: idx[i] = argmin_{j < k_g} ||x_i - c_gj||^2 (group-local centroid
// id), dist[i] = that squared distance, clamped at >= 0.   dist [N] float32, idx [N] int64.
void kmeans_assign_cpu(const float* x, const int64_t* offsets, int64_t G, int64_t D,
                       const float* centroids, int64_t k, float* dist, int64_t* idx,
                       int num_threads);

// One Lloyd update from an assignment idx [N] (values in [0, k_g)):
//   counts[g, j]    = number of points of group g assigned to j (before any re-seeding);
//   centroids[g, j] = mean of those points (accumulated in double), for j < k_g;
//   empty clusters, in ascending j: m = argmax_j' cnt[j'] (smallest index on ties, cnt being a
//   working
//     copy of counts updated by earlier splits); c_j = c_m; then for every dim d: if d is even
//     c_j[d] *= 1 + eps and c_m[d] *= 1 - eps, else c_j[d] *= 1 - eps and c_m[d] *= 1 + eps
//     (eps = kSplitEps, products in double); cnt[j] = cnt[m] / 2 (integer division); cnt[m] -=
//     cnt[j];
//   spherical: every row j < k_g divided by its L2 norm when the norm is > 0 (after the splits);
//   rows j >= k_g are set to 0; counts for j >= k_g are 0.
// centroids [G, k, D] float32 output, counts [G, k] int64 output.
void kmeans_update_cpu(const float* x, const int64_t* offsets, int64_t G, int64_t D,
                       const int64_t* idx, int64_t k, bool spherical, float* centroids,
                       int64_t* counts, int num_threads);

// One fused Lloyd step over the data, reading x once: the assignment of kmeans_assign_cpu (dist,
// idx, identical results) and, from it, the update of kmeans_update_cpu (new_centroids, counts,
// same rules: double accumulation, empty-cluster split, spherical normalisation, zero rows >= k_g).
// centroids [G, k, D] input; dist [N], idx [N], new_centroids [G, k, D], counts [G, k] outputs.
void kmeans_step_cpu(const float* x, const int64_t* offsets, int64_t G, int64_t D,
                     const float* centroids, int64_t k, bool spherical, float* dist, int64_t* idx,
                     float* new_centroids, int64_t* counts, int num_threads);

// k-means++ seeding, driven by given uniforms [G, k] float64 in [0, 1) so that every backend picks
// the same points. For group g (n = N_g, k_g = min(k, n)):
//   chosen[0] = min(floor(u[g,0] * n), n - 1);
//   mind[i]   = sum_d (x_i[d] - x_chosen0[d])^2   (float32 terms, accumulated in float32);
//   for t = 1 .. k_g-1:
//     total = sum_i mind[i] in double;
//     if total > 0: target = u[g,t] * total; chosen[t] = smallest i with (sum_{i' <= i} mind[i'],
//     in
//                   double, in order of i) > target; if there is none, the largest i with mind[i] >
//                   0;
//     else:         chosen[t] = min(floor(u[g,t] * n), n - 1);
//     mind[i] = min(mind[i], sum_d (x_i[d] - x_chosen_t[d])^2);
//   centroids[g, t] = x[offsets[g] + chosen[t]] for t < k_g, rows t >= k_g set to 0;
//   chosen[g, t] = group-local index, -1 for t >= k_g.
// centroids [G, k, D] float32 output, chosen [G, k] int64 output.
void kmeans_plusplus_cpu(const float* x, const int64_t* offsets, int64_t G, int64_t D, int64_t k,
                         const double* uniforms, float* centroids, int64_t* chosen,
                         int num_threads);

// ---- CUDA (all pointers are device pointers; stream is a cudaStream_t) ----------------------
// max_group_size = max_g N_g, given by the caller so that no launcher reads offsets on the host.
// Workspaces are device buffers the caller allocates with the byte sizes below (any contents).
// Launchers enqueue work only (no host synchronisation, no allocation) and throw std::runtime_error
// with cudaGetErrorString's text when a launch fails.

int64_t kmeans_update_cuda_workspace_bytes(int64_t G, int64_t k, int64_t D);
int64_t kmeans_plusplus_cuda_workspace_bytes(int64_t N, int64_t G, int64_t max_group_size);

void kmeans_assign_cuda(const float* x, const int64_t* offsets, int64_t G, int64_t max_group_size,
                        int64_t D, const float* centroids, int64_t k, float* dist, int64_t* idx,
                        void* stream);

void kmeans_update_cuda(const float* x, const int64_t* offsets, int64_t G, int64_t max_group_size,
                        int64_t D, const int64_t* idx, int64_t k, bool spherical, float* centroids,
                        int64_t* counts, void* workspace, void* stream);

void kmeans_plusplus_cuda(const float* x, const int64_t* offsets, int64_t G, int64_t max_group_size,
                          int64_t D, int64_t k, const double* uniforms, float* centroids,
                          int64_t* chosen, void* workspace, void* stream);

}  // namespace raid_fast
