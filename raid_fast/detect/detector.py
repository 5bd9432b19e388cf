"""End-to-end RAID detector: images -> tokens -> retrieval -> (guided MoE filter) -> anomaly maps.

Letters: B images, H x W input size, h x w token grid, D token dim, K neighbours.
Score map S = M + C[:, 0] (the filter's map plus the 1-NN cost, as the authors' code adds at test
time); with ``filter=None``, S = C[:, 0] (retrieval only, the paper's ablation ID0). The pixel map
is S upsampled to the input size and blurred (sigma 4); the image score reduces S to one value
(``image_score``: by default the mean of its top 1 %, see :class:`raid_fast.detect.anomaly_map.ImageScore`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from raid_fast import _checks
from raid_fast.database import TokenDatabase
from raid_fast.database_module import DatabaseModule
from raid_fast.detect.anomaly_map import DEFAULT_IMAGE_SCORE, AnomalyMapGenerator, ImageScore
from raid_fast.detect.backbones import PRECISIONS
from raid_fast.retrieval import Retrieval, retrieve


class Prediction(NamedTuple):
    """Output of ``Detector.predict`` (and of the module call ``detector(images)``); a named tuple,
    so that compiled and exported detectors return it too.

    Attributes:
        pixel_map: [B, H, W] float32 anomaly map at the input size.
        score: [B] float32 image anomaly score.
        class_ids: [B] int64 routed class of each image.
        score_map: [B, h, w] float32 map S on the token grid, before upsampling.
    """

    pixel_map: torch.Tensor
    score: torch.Tensor
    class_ids: torch.Tensor
    score_map: torch.Tensor


@dataclass
class Matching:
    """Retrieval of a batch as the filter reads it (``Detector.match``).

    Attributes:
        tokens: [B, L, D] float32 query patch tokens (L = h * w, row-major).
        grid: (h, w) token grid.
        retrieval: the :class:`~raid_fast.Retrieval` (neighbours, guidance prototypes, class ids).
        cost: [B, K, h, w] float32 cost volume; channel 0 is the 1-NN cost.
    """

    tokens: torch.Tensor
    grid: tuple[int, int]
    retrieval: Retrieval
    cost: torch.Tensor

    @property
    def guidance(self) -> torch.Tensor:
        """G0 [B, 2D, h, w]: query tokens and their top-1 semantic prototypes (see :func:`guidance_maps`);
        built on each access."""
        return guidance_maps(self.tokens, self.retrieval.proto, self.grid)


def guidance_maps(tokens: torch.Tensor, proto: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """G0 = cat(query tokens, top-1 semantic prototype) as [B, 2D, h, w] (query first, as the code)."""
    b, _, d = tokens.shape
    h, w = grid
    both = torch.cat([tokens, proto.to(tokens.dtype)], dim=-1)  # [B, L, 2D]
    return both.transpose(1, 2).reshape(b, 2 * d, h, w)


class Detector(nn.Module):
    """RAID inference: ``Detector(backbone, db, filter=None).predict(images)``.

    Args:
        backbone: callable ``images [B, 3, H, W] in [0, 1] -> (tokens [B, h*w, D], cls [B, D], (h, w))``,
            e.g. ``raid_fast.load_backbone(...)``.
        db: the ``TokenDatabase`` built from the same backbone's template tokens.
        filter: a trained ``GuidedMoEFilter`` or None (retrieval only).
        k: neighbours per token (the filter's K when a filter is given).
        nprobe: semantic prototypes probed per token.
        mode: ``"hierarchical"`` or ``"flat"`` retrieval.
        sigma: Gaussian blur of the pixel map.
        pad_cost: cost of missing neighbours in the cost volume.
        backend: backend for the search ops (None = auto).
        filter_precision: ``"fp32"``, or ``"bf16"`` / ``"fp16"`` to run the filter under autocast
            (its map is returned as float32; the backbone has its own ``precision``). Retrieval always
            runs in float32.
        image_score: reduction of S to the image score: ``"top1%"`` (default, the authors'),
            ``"max"`` (PatchCore's) or ``"top<k>"`` / ``"top<p>%"`` (see ``anomaly_map.ImageScore``);
            ``detector.image_score.spec`` gives it back.
        align_corners: the pixel map's bilinear upsampling (see ``AnomalyMapGenerator``); False keeps
            token values at the centres of their pixels.

    Example:
        >>> det = raid_fast.Detector(raid_fast.load_backbone("efficientnet_lite0"), db)
        >>> out = det.predict(images)          # out.pixel_map [B, H, W], out.score [B]
    """

    def __init__(
        self,
        backbone: Callable[..., Any],
        db: TokenDatabase,
        filter: nn.Module | None = None,  # noqa: A002 (the paper's word)
        k: int = 150,
        nprobe: int = 5,
        mode: str = "hierarchical",
        sigma: float = 4.0,
        pad_cost: float = 1.0,
        backend: str | None = None,
        filter_precision: str = "fp32",
        image_score: str = DEFAULT_IMAGE_SCORE,
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(db, TokenDatabase):
            msg = f"db must be a raid_fast.TokenDatabase, got {type(db).__name__}"
            raise TypeError(msg)
        filter_k = getattr(filter, "k", k)
        if filter is not None and filter_k != k:
            msg = f"k must equal the filter's cost-volume depth {filter_k}, got k={k}"
            raise ValueError(msg)
        self.backbone = backbone
        # the database as buffers: in the state_dict, moved by .to(), inside exported programs
        self.database = DatabaseModule(db)
        self.filter = filter
        self.k, self.nprobe, self.mode = k, nprobe, mode
        self.pad_cost = float(pad_cost)
        self.backend = backend
        _checks.check_choice("filter_precision", filter_precision, tuple(PRECISIONS))
        self.filter_precision = filter_precision
        self.image_score = ImageScore(image_score)
        self.maps = AnomalyMapGenerator(sigma, align_corners)

    @property
    def db(self) -> TokenDatabase:
        """The token database (a view of ``self.database``'s buffers)."""
        return self.database.db

    def match(self, images, class_ids=None, exclude_images=None) -> Matching:
        """Backbone tokens, retrieval and cost volume of a batch (what the filter reads).

        Args:
            images: [B, 3, H, W] in [0, 1].
            class_ids: [B] database class per image instead of routing by the CLS token.
            exclude_images: [B] template image id whose tokens image b must not retrieve (training).
        """
        tokens, cls, grid = self.backbone(images)
        res = retrieve(
            tokens,
            self.db,
            query_cls=cls,
            class_ids=class_ids,
            k=self.k,
            nprobe=self.nprobe,
            mode=self.mode,
            exclude_images=exclude_images,
            backend=self.backend,
            grid=grid,  # the volume is built in the search's pass (fused on triton)
            pad_cost=self.pad_cost,
        )
        return Matching(tokens=tokens, grid=grid, retrieval=res, cost=res.cost_volume(*grid, pad_cost=self.pad_cost))

    def score_maps(self, images, class_ids=None, exclude_images=None) -> tuple[torch.Tensor, Matching]:
        """``(S [B, h, w], matching)``: S = M + C[:, 0] with a filter, C[:, 0] without."""
        matching = self.match(images, class_ids, exclude_images)
        score = matching.cost[:, 0]
        if self.filter is not None:
            dtype = PRECISIONS[self.filter_precision]
            with torch.autocast(score.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                m, _ = self.filter(matching.guidance, matching.cost)
            score = score + m.float()
        return score, matching

    def forward(self, images, class_ids=None) -> Prediction:
        """Anomaly maps and scores of images [B, 3, H, W] in [0, 1], in the modules' current mode;
        what ``torch.compile`` and ``torch.export`` trace (``predict`` is the eval-mode, no-grad call)."""
        images = _checks.as_tensor("images", images)
        score_map, matching = self.score_maps(images, class_ids)
        return Prediction(
            pixel_map=self.maps(score_map, tuple(images.shape[-2:])),
            score=self.image_score(score_map),
            class_ids=matching.retrieval.class_ids,
            score_map=score_map,
        )

    @torch.no_grad()
    def predict(self, images, class_ids=None) -> Prediction:
        """Anomaly maps and scores of a batch of images [B, 3, H, W] in [0, 1] (deterministic: the
        filter runs in eval mode, whatever its mode before)."""
        was_training = self.filter.training if self.filter is not None else False
        if self.filter is not None:
            self.filter.eval()
        try:
            return self(images, class_ids)
        finally:
            if self.filter is not None:
                self.filter.train(was_training)
