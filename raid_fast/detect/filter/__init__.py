"""The guided MoE filter of RAID, its expert blocks and its losses (no training loop here)."""

from raid_fast.detect.filter.experts import ConvRouter, DenoisingExpert, GuidanceExpert
from raid_fast.detect.filter.losses import (
    balance_loss,
    binary_focal_loss,
    dense_balance_loss,
    router_entropy,
    sparse_balance_loss,
    total_loss,
)
from raid_fast.detect.filter.moe import GuidedMoEFilter

__all__ = [
    "ConvRouter",
    "DenoisingExpert",
    "GuidanceExpert",
    "GuidedMoEFilter",
    "balance_loss",
    "binary_focal_loss",
    "dense_balance_loss",
    "router_entropy",
    "sparse_balance_loss",
    "total_loss",
]
