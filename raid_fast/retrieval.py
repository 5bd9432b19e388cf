"""``retrieve()``: coarse-to-fine (hierarchical) or exact (flat) retrieval of template tokens.

Letters: B images, L = H * W query tokens per image, D dims, K neighbours, P probed prototypes
(``nprobe``), C classes, S prototype slots per class.

Hierarchical (paper section 3.3): class by cosine of the query CLS token to the class prototypes
-> per token, the top-P semantic prototypes of that class (the top-1 is returned as guidance)
-> per token, one global top-K over the union of the P probed instance lists.
Flat: one exact top-K over every token of the database, or over one class's tokens when
``class_ids`` are given (the accuracy oracle and the "Flat" rows of the paper's Table 4).
Hierarchical retrieval of a [B, D, H, W] grid also builds the cost volume (pad cost 1.0) in the same
op, fused into the merge where the backend can (triton); ``Retrieval.cost_volume`` reuses it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from raid_fast import _checks, ops, routing
from raid_fast.database import TokenDatabase
from raid_fast.ops.search import ivf_topk_cost_volume

MODES = ("hierarchical", "flat")


@dataclass
class Retrieval:
    """Result of ``retrieve``.

    Attributes:
        dist: [B, L, K] float32 ascending 1 - cos; +inf where fewer than K candidates exist.
        idx: [B, L, K] int64 global token ids into ``db.tokens``; -1 where missing.
        proto: [B, L, D] float32 top-1 semantic prototype of each token (guidance g_s).
        proto_idx: [B, L] int64 its global id c * S + j into the database's lists.
        class_ids: [B] int64 routed (or given) class of each image.
        grid: (H, W) of the query tokens when known (from [B, D, H, W] input), else None.
    """

    dist: torch.Tensor
    idx: torch.Tensor
    proto: torch.Tensor
    proto_idx: torch.Tensor
    class_ids: torch.Tensor
    grid: tuple[int, int] | None = None
    # (token_image [N], token_pos [N], tokens per image) of the database, for template_ids
    _templates: tuple[torch.Tensor, torch.Tensor, int] | None = field(default=None, repr=False, compare=False)
    # (h, w, pad_cost) -> the volume ``retrieve`` built with the search; not a public field
    _volume: tuple[tuple[int, int, float], torch.Tensor] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def __iter__(self):
        """``dist, idx = retrieve(...)``: unpacks like faiss's ``D, I``."""
        return iter((self.dist, self.idx))

    @property
    def template_ids(self) -> torch.Tensor:
        """[B, L, K] int64 neighbour ids in template order: ``image * L_t + position``, i.e. row-major
        indices into the ``[I, L_t, D]`` patch tokens the database was built from (``add`` appends
        images), -1 where missing. ``idx`` indexes the database's own grouped token order."""
        token_image, token_pos, per_image = self._templates
        safe = self.idx.clamp_min(0)
        ids = token_image[safe] * per_image + token_pos[safe]
        return torch.where(self.idx >= 0, ids, -1)

    def cost_volume(self, h: int | None = None, w: int | None = None, pad_cost: float = 1.0) -> torch.Tensor:
        """[B, K, H, W] matching cost volume; channel 0 is the 1-NN cost. ``h, w`` default to the
        query grid; missing neighbours cost ``pad_cost``. The volume built by ``retrieve`` (grid
        input, hierarchical mode, pad_cost 1.0) is returned as is, not copied."""
        if h is None or w is None:
            if self.grid is None:
                msg = "cost_volume needs h and w: the queries were given as [B, L, D]"
                raise ValueError(msg)
            h, w = self.grid
        if self._volume is not None:
            key, volume = self._volume
            if _is_int(h) and _is_int(w) and (int(h), int(w), float(pad_cost)) == key:
                return volume
        return ops.cost_volume(self.dist, h, w, pad_cost)


def _is_int(v) -> bool:
    # what ops.cost_volume accepts as h / w; anything else goes there for its error
    return not isinstance(v, bool) and isinstance(v, (int, np.integer))


def _grid(grid, n_pos: int, given: tuple[int, int] | None) -> tuple[int, int] | None:
    """The (h, w) token grid: from [B, D, H, W] queries, or ``grid`` for [B, L, D] ones (L = h * w)."""
    if grid is None:
        return given
    if not isinstance(grid, (tuple, list)) or len(grid) != 2:
        msg = f"grid must be an (h, w) pair, got {grid!r}"
        raise ValueError(msg)
    h, w = (_checks.check_int(f"grid[{i}]", v, minimum=1) for i, v in enumerate(grid))
    if h * w != n_pos or (given is not None and given != (h, w)):
        msg = f"grid must match the query tokens ({given or f'L = {n_pos}'}), got grid=({h}, {w})"
        raise ValueError(msg)
    return h, w


def _queries(query_tokens, db: TokenDatabase) -> tuple[torch.Tensor, tuple[int, int] | None]:
    q = _checks.as_tensor("query_tokens", query_tokens)
    _checks.check_floating("query_tokens", q)
    _checks.check_ndim("query_tokens", q, (3, 4), f"[B, L, {db.dim}] or [B, {db.dim}, H, W]")
    grid = None
    if q.dim() == 4:
        if q.shape[1] != db.dim:
            msg = f"query_tokens [B, D, H, W] must have D={db.dim} like the database, got shape {tuple(q.shape)}"
            raise ValueError(msg)
        grid = (q.shape[2], q.shape[3])
        q = q.flatten(2).transpose(1, 2)
    elif q.shape[2] != db.dim:
        msg = f"query_tokens [B, L, D] must have D={db.dim} like the database, got shape {tuple(q.shape)}"
        raise ValueError(msg)
    _checks.check_same_device(query_tokens=q, database=db.tokens)
    _checks.check_finite("query_tokens", q)
    return q.float(), grid


def _exclude(exclude_images, b: int, n_pos: int, dev) -> torch.Tensor | None:
    if exclude_images is None:
        return None
    ex = _checks.as_tensor("exclude_images", exclude_images)
    if ex.dim() != 1 or ex.shape[0] != b or ex.is_floating_point():
        msg = f"exclude_images must be [{b}] integer template image ids (-1 for none), got {tuple(ex.shape)} {ex.dtype}"
        raise ValueError(msg)
    return ex.to(device=dev, dtype=torch.int64).repeat_interleave(n_pos)  # [B * L]


def retrieve(
    query_tokens,
    db: TokenDatabase,
    query_cls=None,
    class_ids=None,
    k: int = 150,
    nprobe: int = 5,
    mode: str = "hierarchical",
    exclude_images=None,
    backend: str | None = None,
    grid: tuple[int, int] | None = None,
    pad_cost: float = 1.0,
) -> Retrieval:
    """Retrieves the K nearest template tokens of every query token.

    Args:
        query_tokens: [B, L, D] or [B, D, H, W] query patch tokens (tensor or numpy; normalised here).
        db: the ``TokenDatabase``, on the queries' device.
        query_cls: [B, D] query CLS tokens, to route each image to a class.
        class_ids: [B] (or a scalar) class per image, instead of routing. Flat mode with class_ids
            searches that class only (single-class flat); without, the whole database.
        k: neighbours per token (>= 1). Fewer candidates than K give idx -1 / dist +inf.
        nprobe: P, semantic prototypes probed per token (1 <= P <= S), hierarchical mode.
        mode: ``"hierarchical"`` or ``"flat"``.
        exclude_images: [B] template image ids whose tokens image b must not retrieve (-1: none),
            e.g. a training query's own image.
        backend: ``None`` (auto) or a backend name for the search ops.
        grid: (h, w) of [B, L, D] query tokens (L = h * w, row-major), to build the cost volume in the
            same pass as the search (hierarchical mode; fused into the merge on triton), as a
            [B, D, H, W] input does; ``res.cost_volume()`` then returns it.
        pad_cost: cost of missing neighbours in that volume.

    Returns:
        A ``Retrieval`` (dist, idx [B, L, K]; proto [B, L, D]; proto_idx [B, L]; class_ids [B]).

    Example:
        >>> res = raid_fast.retrieve(tokens, db, query_cls=cls, k=150, nprobe=5)
        >>> cost = res.cost_volume(32, 32)          # [B, 150, 32, 32]
    """
    _checks.check_choice("mode", mode, MODES)
    if not isinstance(db, TokenDatabase):
        msg = f"db must be a raid_fast.TokenDatabase, got {type(db).__name__}"
        raise TypeError(msg)
    if db.n_tokens == 0:
        msg = "db is empty: build it from template tokens first"
        raise ValueError(msg)
    k = _checks.check_int("k", k, minimum=1)
    nprobe = _checks.check_int("nprobe", nprobe, minimum=1, maximum=db.s_max if mode == "hierarchical" else None)
    q, grid_in = _queries(query_tokens, db)  # [B, L, D] float32, not yet unit-norm
    grid = _grid(grid, q.shape[1], grid_in)
    pad_cost = float(pad_cost)
    b, n_pos, dim = q.shape
    ids, qc = routing.resolve(class_ids, query_cls, db, q)
    exclude = _exclude(exclude_images, b, n_pos, db.device)
    group = db.token_image if exclude is not None else None
    volume = None

    if mode == "hierarchical":
        if ids is None and qc is None:
            msg = f"hierarchical retrieval over {db.n_classes} classes needs query_cls or class_ids"
            raise ValueError(msg)
        ids, flat_q, probes, proto = routing.probe(q, db, ids, qc, nprobe, backend)  # [B], [M, D], [B, L, P], [B, L, D]
        args = (flat_q, probes.reshape(b * n_pos, probes.shape[-1]), db.list_offsets, db.tokens, k, group, exclude)
        if grid is not None and n_pos > 0:
            # one pass: the search and its [B, K, H, W] volume (fused into the merge on triton)
            dist, idx, grid_volume = ivf_topk_cost_volume(*args, b, *grid, pad_cost, backend=backend)
            volume = ((grid[0], grid[1], pad_cost), grid_volume)
        else:
            dist, idx = ops.ivf_topk(*args, backend=backend)
        proto_idx = probes[..., 0]
    else:
        flat_q = F.normalize(q, dim=-1).reshape(b * n_pos, dim)  # [M, D]
        lo = hi = None
        if class_ids is not None:
            bounds = db.class_offsets
            lo = bounds[ids].repeat_interleave(n_pos)
            hi = bounds[ids + 1].repeat_interleave(n_pos)
        dist, idx = ops.cosine_topk(flat_q, db.tokens, k, lo, hi, group, exclude, backend=backend)
        if ids is None and qc is None:
            # no class given: each image takes the class that most of its 1-NN tokens belong to
            nn_class = torch.searchsorted(db.class_offsets, idx[:, 0].clamp_min(0), right=True) - 1
            ids = (
                torch.mode(nn_class.view(b, n_pos), dim=1).values
                if n_pos
                else torch.zeros(b, dtype=torch.int64, device=db.device)
            )
        ids, _, probes, proto = routing.probe(q, db, ids, qc, 1, backend)
        proto_idx = probes[..., 0]
    if b == 0:
        ids = torch.zeros(0, dtype=torch.int64, device=db.device)
    res = Retrieval(
        dist=dist.view(b, n_pos, k),
        idx=idx.view(b, n_pos, k),
        proto=proto,
        proto_idx=proto_idx,
        class_ids=ids,
        grid=grid,
        _templates=(db.token_image, db.token_pos, int(db.params.get("tokens_per_image", n_pos))),
    )
    res._volume = volume
    return res
