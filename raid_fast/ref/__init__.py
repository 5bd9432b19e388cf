"""Pure-torch references, one per op: readable, any device, the only test oracle."""

from raid_fast.ref.kmeans import kmeans_assign_ref, kmeans_plusplus_ref, kmeans_update_ref

__all__ = ["kmeans_assign_ref", "kmeans_plusplus_ref", "kmeans_update_ref"]
