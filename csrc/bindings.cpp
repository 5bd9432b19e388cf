// The only torch-facing file of raid_fast._C: argument checks, device dispatch, pybind11 module.
// Kernels live in plain C++ (csrc/kmeans/kmeans_cpu.cpp, csrc/search/search_cpu.cpp) and CUDA
// files that include no torch header (csrc/kmeans/kmeans_cuda.cu); they trust what is checked here.
#include <torch/extension.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#ifdef WITH_CUDA
// c10's stream and guard headers need only the CUDA runtime (ATen's CUDAContext would also pull
// in cuBLAS/cuSPARSE headers that a bare toolkit may not ship)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#endif

#include "kmeans/kmeans.h"
#include "search/search.h"

namespace {

#define CHECK_F32_CONTIG(t)                                                                     \
  TORCH_CHECK((t).scalar_type() == at::kFloat, #t " must be float32, got ", (t).scalar_type()); \
  TORCH_CHECK((t).is_contiguous(), #t " must be contiguous")

#define CHECK_I64_CONTIG(t)                                                                  \
  TORCH_CHECK((t).scalar_type() == at::kLong, #t " must be int64, got ", (t).scalar_type()); \
  TORCH_CHECK((t).is_contiguous(), #t " must be contiguous")

// offsets live on the host for CPU kernels and on the points' device for CUDA kernels
void check_groups(const at::Tensor& x, const at::Tensor& offsets) {
  TORCH_CHECK(x.dim() == 2, "x must be [N, D], got ", x.dim(), "-d");
  CHECK_F32_CONTIG(x);
  TORCH_CHECK(offsets.dim() == 1 && offsets.numel() >= 1, "offsets must be [G + 1]");
  CHECK_I64_CONTIG(offsets);
  TORCH_CHECK(offsets.device() == x.device(), "offsets must be on ", x.device(), ", got ",
              offsets.device());
}

bool is_cuda(const at::Tensor& x) {
  if (!x.is_cuda()) {
    TORCH_CHECK(x.device().is_cpu(), "raid_fast._C supports CPU and CUDA tensors, got ",
                x.device());
    return false;
  }
#ifndef WITH_CUDA
  TORCH_CHECK(false, "raid_fast was built without CUDA; cannot run on ", x.device(),
              " (rebuild with nvcc available, see `raid-fast env`)");
#endif
  return true;
}

#ifdef WITH_CUDA
void* current_stream(const at::Tensor& x) {
  return static_cast<void*>(c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
}
#endif

std::tuple<at::Tensor, at::Tensor> kmeans_assign(const at::Tensor& x, const at::Tensor& offsets,
                                                 int64_t max_group_size,
                                                 const at::Tensor& centroids, int64_t num_threads) {
  check_groups(x, offsets);
  CHECK_F32_CONTIG(centroids);
  const int64_t groups = offsets.numel() - 1;
  TORCH_CHECK(centroids.dim() == 3 && centroids.size(0) == groups && centroids.size(2) == x.size(1),
              "centroids must be [", groups, ", k, ", x.size(1), "], got ", centroids.sizes());
  TORCH_CHECK(centroids.device() == x.device(), "centroids must be on ", x.device());
  const int64_t n = x.size(0), d = x.size(1), k = centroids.size(1);
  auto dist = at::empty({n}, x.options());
  auto idx = at::empty({n}, x.options().dtype(at::kLong));
  if (n == 0) return {dist, idx};
  if (is_cuda(x)) {
#ifdef WITH_CUDA
    c10::cuda::CUDAGuard guard(x.device());
    raid_fast::kmeans_assign_cuda(x.data_ptr<float>(), offsets.data_ptr<int64_t>(), groups,
                                  max_group_size, d, centroids.data_ptr<float>(), k,
                                  dist.data_ptr<float>(), idx.data_ptr<int64_t>(),
                                  current_stream(x));
#endif
  } else {
    raid_fast::kmeans_assign_cpu(x.data_ptr<float>(), offsets.data_ptr<int64_t>(), groups, d,
                                 centroids.data_ptr<float>(), k, dist.data_ptr<float>(),
                                 idx.data_ptr<int64_t>(), static_cast<int>(num_threads));
  }
  return {dist, idx};
}

std::tuple<at::Tensor, at::Tensor> kmeans_update(const at::Tensor& x, const at::Tensor& offsets,
                                                 int64_t max_group_size, const at::Tensor& idx,
                                                 int64_t k, bool spherical, int64_t num_threads) {
  check_groups(x, offsets);
  CHECK_I64_CONTIG(idx);
  TORCH_CHECK(idx.dim() == 1 && idx.size(0) == x.size(0), "idx must be [", x.size(0), "]");
  TORCH_CHECK(idx.device() == x.device(), "idx must be on ", x.device());
  TORCH_CHECK(k >= 1, "k must be >= 1, got ", k);
  const int64_t groups = offsets.numel() - 1, d = x.size(1);
  auto centroids = at::empty({groups, k, d}, x.options());
  auto counts = at::empty({groups, k}, x.options().dtype(at::kLong));
  if (groups == 0) return {centroids, counts};
  if (is_cuda(x)) {
#ifdef WITH_CUDA
    c10::cuda::CUDAGuard guard(x.device());
    auto workspace = at::empty({raid_fast::kmeans_update_cuda_workspace_bytes(groups, k, d)},
                               x.options().dtype(at::kByte));
    raid_fast::kmeans_update_cuda(x.data_ptr<float>(), offsets.data_ptr<int64_t>(), groups,
                                  max_group_size, d, idx.data_ptr<int64_t>(), k, spherical,
                                  centroids.data_ptr<float>(), counts.data_ptr<int64_t>(),
                                  workspace.data_ptr(), current_stream(x));
#endif
  } else {
    raid_fast::kmeans_update_cpu(x.data_ptr<float>(), offsets.data_ptr<int64_t>(), groups, d,
                                 idx.data_ptr<int64_t>(), k, spherical, centroids.data_ptr<float>(),
                                 counts.data_ptr<int64_t>(), static_cast<int>(num_threads));
  }
  return {centroids, counts};
}

// one Lloyd iteration: (dist, idx) of the assignment and (centroids, counts) of the update; the CPU
// kernel reads x once, the CUDA path runs the assignment and update kernels back to back
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kmeans_step(
    const at::Tensor& x, const at::Tensor& offsets, int64_t max_group_size,
    const at::Tensor& centroids, bool spherical, int64_t num_threads) {
  if (is_cuda(x)) {
    auto [dist, idx] = kmeans_assign(x, offsets, max_group_size, centroids, num_threads);
    auto [new_centroids, counts] =
        kmeans_update(x, offsets, max_group_size, idx, centroids.size(1), spherical, num_threads);
    return {dist, idx, new_centroids, counts};
  }
  check_groups(x, offsets);
  CHECK_F32_CONTIG(centroids);
  const int64_t groups = offsets.numel() - 1, n = x.size(0), d = x.size(1);
  TORCH_CHECK(centroids.dim() == 3 && centroids.size(0) == groups && centroids.size(2) == d,
              "centroids must be [", groups, ", k, ", d, "], got ", centroids.sizes());
  TORCH_CHECK(centroids.device() == x.device(), "centroids must be on ", x.device());
  const int64_t k = centroids.size(1);
  TORCH_CHECK(k >= 1, "k must be >= 1, got ", k);
  auto dist = at::empty({n}, x.options());
  auto idx = at::empty({n}, x.options().dtype(at::kLong));
  auto new_centroids = at::empty({groups, k, d}, x.options());
  auto counts = at::empty({groups, k}, x.options().dtype(at::kLong));
  if (groups == 0) return {dist, idx, new_centroids, counts};
  raid_fast::kmeans_step_cpu(x.data_ptr<float>(), offsets.data_ptr<int64_t>(), groups, d,
                             centroids.data_ptr<float>(), k, spherical, dist.data_ptr<float>(),
                             idx.data_ptr<int64_t>(), new_centroids.data_ptr<float>(),
                             counts.data_ptr<int64_t>(), static_cast<int>(num_threads));
  return {dist, idx, new_centroids, counts};
}

std::tuple<at::Tensor, at::Tensor> kmeans_plusplus(const at::Tensor& x, const at::Tensor& offsets,
                                                   int64_t max_group_size, int64_t k,
                                                   const at::Tensor& uniforms,
                                                   int64_t num_threads) {
  check_groups(x, offsets);
  const int64_t groups = offsets.numel() - 1, d = x.size(1);
  TORCH_CHECK(k >= 1, "k must be >= 1, got ", k);
  TORCH_CHECK(uniforms.scalar_type() == at::kDouble && uniforms.is_contiguous() &&
                  uniforms.dim() == 2 && uniforms.size(0) == groups && uniforms.size(1) == k,
              "uniforms must be contiguous float64 [", groups, ", ", k, "]");
  TORCH_CHECK(uniforms.device() == x.device(), "uniforms must be on ", x.device());
  auto centroids = at::empty({groups, k, d}, x.options());
  auto chosen = at::empty({groups, k}, x.options().dtype(at::kLong));
  if (groups == 0) return {centroids, chosen};
  if (is_cuda(x)) {
#ifdef WITH_CUDA
    c10::cuda::CUDAGuard guard(x.device());
    auto workspace = at::empty(
        {raid_fast::kmeans_plusplus_cuda_workspace_bytes(x.size(0), groups, max_group_size)},
        x.options().dtype(at::kByte));
    raid_fast::kmeans_plusplus_cuda(x.data_ptr<float>(), offsets.data_ptr<int64_t>(), groups,
                                    max_group_size, d, k, uniforms.data_ptr<double>(),
                                    centroids.data_ptr<float>(), chosen.data_ptr<int64_t>(),
                                    workspace.data_ptr(), current_stream(x));
#endif
  } else {
    raid_fast::kmeans_plusplus_cpu(x.data_ptr<float>(), offsets.data_ptr<int64_t>(), groups, d, k,
                                   uniforms.data_ptr<double>(), centroids.data_ptr<float>(),
                                   chosen.data_ptr<int64_t>(), static_cast<int>(num_threads));
  }
  return {centroids, chosen};
}

// the search kernels exist for the CPU only: a CUDA tensor gets a clear error, not a crash.
void check_search_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(!t.is_cuda(), "raid_fast._C has no CUDA search kernel (", name, " is on ", t.device(),
              "); use the triton backend for CUDA tensors or pass CPU tensors");
  TORCH_CHECK(t.device().is_cpu(), "raid_fast._C search kernels need CPU tensors, ", name,
              " is on ", t.device());
}

// queries [M, D] and tokens [N, D]: float32, contiguous, CPU, ids of N tokens fit in 32 bits.
void check_search_pair(const at::Tensor& queries, const at::Tensor& tokens, int64_t k) {
  check_search_cpu(queries, "queries");
  check_search_cpu(tokens, "tokens");
  TORCH_CHECK(queries.dim() == 2, "queries must be [M, D], got ", queries.dim(), "-d");
  TORCH_CHECK(tokens.dim() == 2 && tokens.size(1) == queries.size(1), "tokens must be [N, ",
              queries.size(1), "], got ", tokens.sizes());
  CHECK_F32_CONTIG(queries);
  CHECK_F32_CONTIG(tokens);
  TORCH_CHECK(k >= 1, "k must be >= 1, got ", k);
  TORCH_CHECK(tokens.size(0) <= int64_t{0xffffffff}, "tokens must have fewer than 2^32 rows, got ",
              tokens.size(0));
}

// an optional int64 [n] vector on the CPU; its data pointer, or null when absent.
const int64_t* optional_ids(const std::optional<at::Tensor>& t, const char* name, int64_t n) {
  if (!t.has_value()) return nullptr;
  check_search_cpu(*t, name);
  TORCH_CHECK(t->scalar_type() == at::kLong, name, " must be int64, got ", t->scalar_type());
  TORCH_CHECK(t->is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t->dim() == 1 && t->size(0) == n, name, " must be [", n, "], got ", t->sizes());
  return t->data_ptr<int64_t>();
}

std::tuple<at::Tensor, at::Tensor> empty_topk(const at::Tensor& queries, int64_t k) {
  return {at::empty({queries.size(0), k}, queries.options()),
          at::empty({queries.size(0), k}, queries.options().dtype(at::kLong))};
}

// exact top-k by 1 - q . t; lo/hi restrict query m to tokens lo[m] <= n < hi[m], and
// token_group/exclude_group hide tokens of the query's own group.
std::tuple<at::Tensor, at::Tensor> cosine_topk(const at::Tensor& queries, const at::Tensor& tokens,
                                               int64_t k, const std::optional<at::Tensor>& lo,
                                               const std::optional<at::Tensor>& hi,
                                               const std::optional<at::Tensor>& token_group,
                                               const std::optional<at::Tensor>& exclude_group,
                                               int64_t num_threads) {
  check_search_pair(queries, tokens, k);
  const int64_t m = queries.size(0), n = tokens.size(0);
  TORCH_CHECK(lo.has_value() == hi.has_value(), "lo and hi must be given together");
  TORCH_CHECK(!exclude_group.has_value() || token_group.has_value(),
              "exclude_group needs token_group");
  const int64_t* lo_p = optional_ids(lo, "lo", m);
  const int64_t* hi_p = optional_ids(hi, "hi", m);
  const int64_t* group_p = optional_ids(token_group, "token_group", n);
  const int64_t* exclude_p = optional_ids(exclude_group, "exclude_group", m);
  auto [dist, idx] = empty_topk(queries, k);
  float* dist_p = dist.data_ptr<float>();
  int64_t* idx_p = idx.data_ptr<int64_t>();
  // a flat search can take seconds: other python threads may run meanwhile.
  pybind11::gil_scoped_release no_gil;
  raid_fast::cosine_topk_cpu(queries.data_ptr<float>(), m, queries.size(1),
                             tokens.data_ptr<float>(), n, k, lo_p, hi_p, group_p, exclude_p, dist_p,
                             idx_p, static_cast<int>(num_threads));
  return {dist, idx};
}

// inverted-list top-k over the union of each query's probed lists (CSR list_offsets).
std::tuple<at::Tensor, at::Tensor> ivf_topk(const at::Tensor& queries, const at::Tensor& probes,
                                            const at::Tensor& list_offsets,
                                            const at::Tensor& tokens, int64_t k,
                                            const std::optional<at::Tensor>& token_group,
                                            const std::optional<at::Tensor>& exclude_group,
                                            int64_t num_threads) {
  check_search_pair(queries, tokens, k);
  const int64_t m = queries.size(0), n = tokens.size(0);
  check_search_cpu(probes, "probes");
  check_search_cpu(list_offsets, "list_offsets");
  CHECK_I64_CONTIG(probes);
  CHECK_I64_CONTIG(list_offsets);
  TORCH_CHECK(probes.dim() == 2 && probes.size(0) == m, "probes must be [", m, ", P], got ",
              probes.sizes());
  TORCH_CHECK(list_offsets.dim() == 1 && list_offsets.numel() >= 1,
              "list_offsets must be [L + 1], got ", list_offsets.sizes());
  TORCH_CHECK(!exclude_group.has_value() || token_group.has_value(),
              "exclude_group needs token_group");
  const int64_t* group_p = optional_ids(token_group, "token_group", n);
  const int64_t* exclude_p = optional_ids(exclude_group, "exclude_group", m);
  const int64_t lists = list_offsets.numel() - 1, p = probes.size(1);
  // the kernel trusts the list structure and the probe ids: one pass over each checks them.
  const int64_t* off = list_offsets.data_ptr<int64_t>();
  TORCH_CHECK(off[0] >= 0 && off[lists] <= n, "list_offsets must lie in [0, ", n, "], got ", off[0],
              " .. ", off[lists]);
  for (int64_t l = 0; l < lists; ++l) {
    TORCH_CHECK(off[l] <= off[l + 1], "list_offsets must be non-decreasing, got ", off[l], " > ",
                off[l + 1], " at ", l);
  }
  const int64_t* pr = probes.data_ptr<int64_t>();
  for (int64_t i = 0; i < m * p; ++i) {
    TORCH_CHECK(pr[i] >= -1 && pr[i] < lists, "probes must be list ids in [0, ", lists,
                ") or -1, got ", pr[i]);
  }
  auto [dist, idx] = empty_topk(queries, k);
  float* dist_p = dist.data_ptr<float>();
  int64_t* idx_p = idx.data_ptr<int64_t>();
  pybind11::gil_scoped_release no_gil;
  raid_fast::ivf_topk_cpu(queries.data_ptr<float>(), m, queries.size(1), pr, p, off, lists,
                          tokens.data_ptr<float>(), n, k, group_p, exclude_p, dist_p, idx_p,
                          static_cast<int>(num_threads));
  return {dist, idx};
}

bool cuda_compiled() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

pybind11::dict build_info() {
  pybind11::dict info;
  info["cuda"] = cuda_compiled();
#ifdef WITH_CUDA
  info["cuda_runtime_version"] = CUDART_VERSION;
#endif
#ifdef _OPENMP
  info["openmp"] = _OPENMP;
#else
  info["openmp"] = false;
#endif
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#endif
#if defined(TORCH_VERSION_MAJOR)
  info["torch_built_with"] = std::to_string(TORCH_VERSION_MAJOR) + "." +
                             std::to_string(TORCH_VERSION_MINOR) + "." +
                             std::to_string(TORCH_VERSION_PATCH);
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "raid_fast compiled kernels (KMeans CPU twin and CUDA, CPU search)";
  m.def("kmeans_assign", &kmeans_assign, "fused nearest-centroid search over ragged groups");
  m.def("kmeans_update", &kmeans_update, "Lloyd update with empty-cluster splitting");
  m.def("kmeans_step", &kmeans_step, "one Lloyd iteration: assignment then update");
  m.def("kmeans_plusplus", &kmeans_plusplus, "k-means++ seeding from given uniforms");
  m.def("cosine_topk", &cosine_topk, "exact cosine top-k with optional ranges and exclusion (CPU)");
  m.def("ivf_topk", &ivf_topk, "inverted-list cosine top-k over probed lists (CPU)");
  m.def("cuda_compiled", &cuda_compiled, "whether the CUDA kernels were compiled in");
  m.def("build_info", &build_info, "compile-time configuration");
}
