"""Filter checkpoints: one dict per file (weights, optimizer, config, epoch, history, RNG state),
written atomically; read by training (resume), evaluation and prediction."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from raid_fast.detect.filter import GuidedMoEFilter


def save_checkpoint(path: os.PathLike, state: dict) -> None:
    """Writes ``state`` atomically: a temporary file in the same folder, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: os.PathLike, filter: nn.Module | None = None, map_location: Any = "cpu"):
    """``(filter, checkpoint dict)``; builds a ``GuidedMoEFilter`` from the saved dims when ``filter`` is None."""
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    if filter is None:
        filter = GuidedMoEFilter(**ckpt["filter_args"])
    filter.load_state_dict(ckpt["model"])
    return filter, ckpt


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def filter_args(filter: nn.Module) -> dict:
    names = ("dim", "k", "n_guidance_experts", "guidance_top_k", "n_denoise_experts", "router_noise")
    return {n: getattr(filter, n) for n in names if hasattr(filter, n)}
