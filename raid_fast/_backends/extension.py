"""The ``cpp`` and ``cuda`` backends: the compiled extension ``raid_fast._C``.

``cpp``: CPU tensors, float32 values (flat and inverted-list search, KMeans). ``cuda``: CUDA tensors
(KMeans). Both are unavailable, with the build or import error as the reason, when the extension
is missing; ``raid_fast._ext`` keeps ``import raid_fast`` working either way.
"""

from __future__ import annotations

import torch

from raid_fast import _ext
from raid_fast._backends.reference import float32_points
from raid_fast._dispatch import Args, Backend, Impl
from raid_fast.ref.cost_volume import cost_volume_ref

_INT_DTYPES = (torch.int64, torch.int32)


def _ids(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.int64).contiguous()


def _cosine_topk(queries, tokens, k, lo, hi, token_group, exclude_group, unit_norm):
    # any norms: the kernel computes 1 - q . t and keeps a shared K-th cutoff, nothing assumes |q . t| <= 1
    return _ext._C.cosine_topk(
        queries.contiguous(),
        tokens.contiguous(),
        int(k),
        _ids(lo),
        _ids(hi),
        _ids(token_group),
        _ids(exclude_group),
        torch.get_num_threads(),
    )


def _ivf_topk(queries, probes, list_offsets, tokens, k, token_group, exclude_group):
    return _ext._C.ivf_topk(
        queries.contiguous(),
        _ids(probes),
        _ids(list_offsets),
        tokens.contiguous(),
        int(k),
        _ids(token_group),
        _ids(exclude_group),
        torch.get_num_threads(),
    )


def _ivf_topk_cost_volume(queries, probes, list_offsets, tokens, k, token_group, exclude_group, b, h, w, pad_cost):
    # the cpp search, then the torch layout (a permute and a fill: nothing to gain in C++)
    dist, idx = _ivf_topk(queries, probes, list_offsets, tokens, k, token_group, exclude_group)
    return dist, idx, cost_volume_ref(dist.view(b, h * w, k), h, w, pad_cost)


def _search_reason(floats: dict, ints: dict) -> str | None:
    """Why the cpp search cannot take these tensors (CPU float32 values, CPU integer ids), or None."""
    for name, t in {**floats, **ints}.items():
        if t is not None and t.device.type != "cpu":
            return f"{name} is on {t.device}; the cpp search kernels need CPU tensors"
    for name, t in floats.items():
        if t.dtype != torch.float32:
            return f"{name} must be torch.float32, got {t.dtype}"
    for name, t in ints.items():
        if t is not None and t.dtype not in _INT_DTYPES:
            return f"{name} must be torch.int64 or torch.int32, got {t.dtype}"
    if ints["exclude_group"] is not None and ints["token_group"] is None:
        return "exclude_group needs token_group"
    if floats["tokens"].shape[0] >= 2**32:
        return f"N={floats['tokens'].shape[0]} tokens is not below 2^32 (ids are packed into 32 bits)"
    return None


def _cosine_topk_supports(a: Args) -> str | None:
    if (a.lo is None) != (a.hi is None):
        return "lo and hi must be given together"
    ints = {"lo": a.lo, "hi": a.hi, "token_group": a.token_group, "exclude_group": a.exclude_group}
    return _search_reason({"queries": a.queries, "tokens": a.tokens}, ints)


def _ivf_topk_supports(a: Args) -> str | None:
    ints = {
        "probes": a.probes,
        "list_offsets": a.list_offsets,
        "token_group": a.token_group,
        "exclude_group": a.exclude_group,
    }
    return _search_reason({"queries": a.queries, "tokens": a.tokens}, ints)


def _offsets_for(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    # the kernels read group boundaries on the points' device (host loops on CPU, a kernel argument on GPU)
    return offsets.to(device=x.device, dtype=torch.int64).contiguous()


# the kernels read rows in place: .contiguous() copies only a strided input
def _kmeans_assign(x, offsets, max_size, centroids):
    return _ext._C.kmeans_assign(
        x.contiguous(), _offsets_for(x, offsets), max_size, centroids.contiguous(), torch.get_num_threads()
    )


def _kmeans_update(x, offsets, max_size, idx, k, spherical):
    return _ext._C.kmeans_update(
        x.contiguous(), _offsets_for(x, offsets), max_size, idx.contiguous(), k, spherical, torch.get_num_threads()
    )


def _kmeans_step(x, offsets, max_size, centroids, spherical):
    return _ext._C.kmeans_step(
        x.contiguous(), _offsets_for(x, offsets), max_size, centroids.contiguous(), spherical, torch.get_num_threads()
    )


def _kmeans_plusplus(x, offsets, max_size, k, uniforms):
    return _ext._C.kmeans_plusplus(
        x.contiguous(),
        _offsets_for(x, offsets),
        max_size,
        k,
        uniforms.to(x.device).contiguous(),
        torch.get_num_threads(),
    )


def _on(kind: str):
    def supports(a: Args) -> str | None:
        if a.x.device.type != kind:
            return f"needs {kind} tensors, got {a.x.device}"
        return float32_points(a)

    return supports


def _kmeans_impls(kind: str) -> dict[str, Impl]:
    supports = _on(kind)
    return {
        "kmeans_assign": Impl(_kmeans_assign, supports),
        "kmeans_update": Impl(_kmeans_update, supports),
        "kmeans_step": Impl(_kmeans_step, supports),
        "kmeans_plusplus": Impl(_kmeans_plusplus, supports),
    }


BACKENDS = (
    Backend(
        "cpp",
        priority=10,
        available=_ext.ext_unavailable_reason,
        impls={
            "cosine_topk": Impl(_cosine_topk, _cosine_topk_supports),
            "ivf_topk": Impl(_ivf_topk, _ivf_topk_supports),
            "ivf_topk_cost_volume": Impl(_ivf_topk_cost_volume, _ivf_topk_supports),
            **_kmeans_impls("cpu"),
        },
    ),
    Backend("cuda", priority=0, available=_ext.ext_cuda_unavailable_reason, impls=_kmeans_impls("cuda")),
)
