"""The ``torch`` backend: the plain torch references of ``raid_fast.ref``, any device, always
available; the last resort of auto selection and the oracle of every test."""

from __future__ import annotations

import torch

from raid_fast._dispatch import Args, Backend, Impl
from raid_fast.ref.cost_volume import cost_volume_ref
from raid_fast.ref.ivf_search import ivf_topk_ref
from raid_fast.ref.kmeans import kmeans_assign_ref, kmeans_plusplus_ref, kmeans_update_ref
from raid_fast.ref.probe import probe_prototypes_ref
from raid_fast.ref.similarity import cosine_topk_ref


def _cosine_topk(queries, tokens, k, lo, hi, token_group, exclude_group, unit_norm):
    # the reference computes 1 - q . t whatever the norms
    return cosine_topk_ref(queries, tokens, k, lo, hi, token_group, exclude_group)


def _ivf_topk_cost_volume(queries, probes, list_offsets, tokens, k, token_group, exclude_group, b, h, w, pad_cost):
    # the definition: the inverted-list top-K, then its distances laid out as a volume
    dist, idx = ivf_topk_ref(queries, probes, list_offsets, tokens, k, token_group, exclude_group)
    return dist, idx, cost_volume_ref(dist.view(b, h * w, k), h, w, pad_cost)


def _kmeans_assign(x, offsets, max_size, centroids):
    return kmeans_assign_ref(x, offsets, centroids)


def _kmeans_update(x, offsets, max_size, idx, k, spherical):
    return kmeans_update_ref(x, offsets, idx, k, spherical)


def _kmeans_step(x, offsets, max_size, centroids, spherical):
    dist, idx = kmeans_assign_ref(x, offsets, centroids)
    new_centroids, counts = kmeans_update_ref(x, offsets, idx, centroids.shape[1], spherical)
    return dist, idx, new_centroids, counts


def _kmeans_plusplus(x, offsets, max_size, k, uniforms):
    return kmeans_plusplus_ref(x, offsets, k, uniforms)


def float32_points(args: Args) -> str | None:
    """KMeans backends other than triton compute on float32 points; ``kmeans`` hands them the points
    rounded to half precision as float32, which is the same computation."""
    if args.x.dtype != torch.float32:
        return f"computes on float32 points, got {args.x.dtype}"
    return None


BACKENDS = (
    Backend(
        "torch",
        priority=100,
        impls={
            "cosine_topk": Impl(_cosine_topk),
            "ivf_topk": Impl(ivf_topk_ref),
            "ivf_topk_cost_volume": Impl(_ivf_topk_cost_volume),
            "cost_volume": Impl(cost_volume_ref),
            "probe_prototypes": Impl(probe_prototypes_ref),
            "kmeans_assign": Impl(_kmeans_assign, float32_points),
            "kmeans_update": Impl(_kmeans_update, float32_points),
            "kmeans_step": Impl(_kmeans_step, float32_points),
            "kmeans_plusplus": Impl(_kmeans_plusplus, float32_points),
        },
    ),
)
