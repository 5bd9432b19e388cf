"""Ragged groups: G independent problems stored as one value matrix plus offsets (CSR).

Letters: G groups, N values in all, N_g = offsets[g+1] - offsets[g] values in group g.
A dense batch [G, n, D] is the special case offsets = [0, n, 2n, ..., G*n].
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from raid_fast import _checks


@dataclass(frozen=True, eq=False)
class Groups:
    """Offsets of ragged groups, kept on the host (for loops and launch sizes) and the data device."""

    offsets_cpu: torch.Tensor  # [G + 1] int64, host
    device: torch.device

    @classmethod
    def uniform(cls, n_groups: int, group_size: int, device: torch.device) -> Groups:
        offsets = torch.arange(n_groups + 1, dtype=torch.int64) * group_size
        return cls(offsets, torch.device(device))

    @classmethod
    def from_offsets(cls, offsets, n_values: int, device: torch.device, name: str = "offsets") -> Groups:
        """Validates user offsets: 1-d int64-like, starts at 0, non-decreasing, ends at n_values."""
        offsets = _checks.as_tensor(name, offsets)
        _checks.check_ndim(name, offsets, (1,), "[G + 1] (1-d)")
        if offsets.dtype not in (torch.int64, torch.int32):
            msg = f"{name} must have dtype torch.int64 or torch.int32, got {offsets.dtype}"
            raise TypeError(msg)
        if offsets.device.type != "cpu" and offsets.device != torch.device(device):
            msg = f"{name} must be on the CPU or on the values' device {device}, got {offsets.device}"
            raise ValueError(msg)
        # a sync point when offsets live on the GPU: once per call, at the boundary
        off = offsets.detach().to("cpu", torch.int64).contiguous()
        if off.numel() < 1:
            msg = f"{name} must hold G + 1 >= 1 entries, got {tuple(off.shape)}"
            raise ValueError(msg)
        if int(off[0]) != 0 or int(off[-1]) != n_values:
            msg = f"{name} must start at 0 and end at the number of values {n_values}, got {int(off[0])} .. {int(off[-1])}"
            raise ValueError(msg)
        if off.numel() > 1 and bool((off[1:] < off[:-1]).any()):
            msg = f"{name} must be non-decreasing, got {off.tolist()[:16]}"
            raise ValueError(msg)
        return cls(off, torch.device(device))

    @property
    def n_groups(self) -> int:
        return self.offsets_cpu.numel() - 1

    @cached_property
    def sizes_cpu(self) -> torch.Tensor:  # [G] int64
        return self.offsets_cpu[1:] - self.offsets_cpu[:-1]

    @cached_property
    def max_size(self) -> int:
        return int(self.sizes_cpu.max()) if self.n_groups else 0

    @cached_property
    def offsets(self) -> torch.Tensor:  # [G + 1] int64 on the data device
        return self.offsets_cpu.to(self.device)

    @cached_property
    def group_of_value(self) -> torch.Tensor:  # [N] int64 on the data device
        ids = torch.arange(self.n_groups, dtype=torch.int64)
        return torch.repeat_interleave(ids, self.sizes_cpu).to(self.device)

    def segment_sum(self, values: torch.Tensor) -> torch.Tensor:
        """[N] -> [G] float64 sums per group, on the data device, without a host sync."""
        out = torch.zeros(self.n_groups, dtype=torch.float64, device=values.device)
        return out.index_add_(0, self.group_of_value, values.to(torch.float64))
