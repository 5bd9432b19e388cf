"""Public functional ops: validate at the boundary, then dispatch (``raid_fast._dispatch``). Every
op is also the custom op ``torch.ops.raid_fast.<name>`` (``raid_fast.ops.library``)."""

from raid_fast.ops import library
from raid_fast.ops.kmeans import kmeans_assign
from raid_fast.ops.search import cosine_topk, cost_volume, ivf_topk, ivf_topk_cost_volume

__all__ = ["cosine_topk", "cost_volume", "ivf_topk", "ivf_topk_cost_volume", "kmeans_assign", "library"]
