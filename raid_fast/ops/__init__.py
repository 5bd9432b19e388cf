"""Public functional ops: validate at the boundary, then dispatch (``raid_fast._dispatch``)."""

from raid_fast.ops.kmeans import kmeans_assign

__all__ = ["kmeans_assign"]
