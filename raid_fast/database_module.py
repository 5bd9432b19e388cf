"""A ``TokenDatabase`` as the buffers of an ``nn.Module``: it travels in a model's ``state_dict``,
moves with ``.to()`` and is part of the program ``torch.export`` writes (``Detector`` holds one)."""

from __future__ import annotations

import torch
from torch import nn

from raid_fast.database import TENSOR_FIELDS, TokenDatabase

_BUFFERS = (*TENSOR_FIELDS, "probe_bias")


class DatabaseModule(nn.Module):
    """``DatabaseModule(db).db`` is ``db`` again, built over this module's buffers (no copy).

    Loading a ``state_dict`` takes the saved buffers whatever their length: the number of tokens,
    images and classes is data, not architecture.
    """

    def __init__(self, db: TokenDatabase) -> None:
        super().__init__()
        if not isinstance(db, TokenDatabase):
            msg = f"db must be a raid_fast.TokenDatabase, got {type(db).__name__}"
            raise TypeError(msg)
        for name in _BUFFERS:
            self.register_buffer(name, getattr(db, name))
        self.params = dict(db.params)
        self.class_purity = db.class_purity
        self.min_used = db.min_used

    @property
    def db(self) -> TokenDatabase:
        return TokenDatabase(
            **{name: getattr(self, name) for name in TENSOR_FIELDS},
            params=self.params,
            class_purity=self.class_purity,
            probe_bias=self.probe_bias,
            min_used=self.min_used,
        )

    def get_extra_state(self) -> dict:
        return {"params": self.params, "class_purity": self.class_purity, "min_used": self.min_used}

    def set_extra_state(self, state: dict) -> None:
        self.params = dict(state["params"])
        self.class_purity = state["class_purity"]
        self.min_used = int(state["min_used"])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        for name in _BUFFERS:
            key = prefix + name
            if key in state_dict and state_dict[key].dim() == getattr(self, name).dim():
                setattr(self, name, torch.empty_like(state_dict[key], device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)

    def extra_repr(self) -> str:
        return repr(self.db)
