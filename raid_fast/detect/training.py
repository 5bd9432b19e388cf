"""Training of the guided MoE filter on synthetic anomalies (paper section 3.5, authors' ``run_train_*.py``).

One step: a batch of template images -> seeded synthetic anomalies (masks at image size) ->
backbone tokens -> leave-one-out retrieval in the query's known class (a training query never
retrieves its own image's tokens) -> guidance G0 and cost volume C -> filter -> M upsampled to the
mask size (bilinear, align_corners=True) -> ``total_loss`` -> Adam step.

After each epoch the filter is evaluated on a held-out split of the training images (each held-out
image clean plus one synthetic anomaly of it, fixed seed; never the test set); ``last.pt`` is written
every epoch and ``best.pt`` when the held-out metric improves. ``train(..., resume=True)`` continues
from ``last.pt`` and gives the same weights as an uninterrupted run (deterministic CPU case).

The run folder is locked while a run writes to it (a second run into it fails at once), a new run
refuses a folder that holds another run's checkpoints unless asked to overwrite them, and
``last.pt`` / ``best.pt`` stay consistent through an interruption at any point (see
:mod:`raid_fast.detect.checkpoints`).

Example:
    >>> cfg = TrainConfig(epochs=5, out_dir="runs/mvtec")
    >>> filter, history = train(cfg, backbone, db, images, image_ids=torch.arange(len(images)))
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raid_fast import _checks, _fileio
from raid_fast.database import TokenDatabase
from raid_fast.detect.checkpoints import (
    checkpoint_files,
    filter_args,
    read_checkpoint,
    repair_best,
    rng_state,
    save_checkpoint,
    set_rng_state,
    weights_digest,
)
from raid_fast.detect.detector import Detector
from raid_fast.detect.filter import GuidedMoEFilter, binary_focal_loss, total_loss
from raid_fast.detect.metrics import auroc
from raid_fast.detect.synthesis import AnomalySynthesizer

log = logging.getLogger(__name__)


VAL_METRICS = ("p_auroc", "loss")


VAL_SEED_OFFSET = 1_000_003  # the held-out anomalies use their own fixed stream, apart from training's

# settings a resumed run may change; any other difference from last.pt's config is refused, since
# the resumed run would mix two settings (the optimizer state, for one, carries the old lr)
RESUME_MAY_CHANGE = ("epochs", "log_every", "out_dir", "device")


@dataclass
class TrainConfig:
    """Training settings (defaults: the authors' values where they fit a short run).

    Attributes:
        epochs: total epochs (the authors train 100).
        batch_size: images per step (16).
        lr: Adam learning rate (1e-4, default betas, no weight decay, no schedule).
        lambda_bal: weight of the router balance loss (0.005).
        k: neighbours per token = the filter's cost-volume depth (150).
        nprobe: semantic prototypes probed per token (5).
        mode: ``"hierarchical"`` or ``"flat"`` retrieval.
        image_size: expected input size (int, square) or None to accept any; a mismatch is an error,
            since resizing belongs to the data loader (one preprocessing chain for everything).
        seed: seed of the model init, the split, the batch order and the synthetic anomalies.
        val_fraction: held-out share of the training images, per class (at least one image per
            class that has two or more); 0 disables validation and ``best.pt``.
        val_metric: ``"p_auroc"`` (pixel AUROC of S = M + C[:, 0], higher is better) or ``"loss"``
            (focal loss of M, lower is better).
        dense_router_epoch: first epoch (0-based) in which router 2 weights the denoising experts;
            before it M is the plain expert mean. The authors use 30 (of 100); the default 0 turns
            router 2 on from the start, which suits short runs.
        amp: bf16 autocast for the filter, on CUDA only (ignored on CPU); the backbone runs at its own
            ``precision`` (``load_backbone(..., precision="bf16")``).
        out_dir: checkpoint folder (``last.pt``, ``best.pt``); None saves nothing.
        log_every: steps between log lines.
        p_normal: probability that a training sample stays normal (0.5).
        texture_dir: optional DTD ``images/`` folder for the texture anomaly source.
        foreground: optional ``{database class id: "dark" | "bright"}``: synthetic anomalies of
            that class's images stay inside the Otsu foreground (the authors' per-class rule, see
            :data:`raid_fast.detect.perlin.FOREGROUND_MODES`); classes not listed use the whole image.
        device: device of the filter and the training tensors; None = the database's device.
    """

    epochs: int = 100
    batch_size: int = 16
    lr: float = 1e-4
    lambda_bal: float = 0.005
    k: int = 150
    nprobe: int = 5
    mode: str = "hierarchical"
    image_size: int | None = None
    seed: int = 0
    val_fraction: float = 0.1
    val_metric: str = "p_auroc"
    dense_router_epoch: int = 0
    amp: bool = True
    out_dir: str | None = None
    log_every: int = 50
    p_normal: float = 0.5
    texture_dir: str | None = None
    foreground: dict | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        self.epochs = _checks.check_int("epochs", self.epochs, 1)
        self.batch_size = _checks.check_int("batch_size", self.batch_size, 1)
        self.k = _checks.check_int("k", self.k, 1)
        self.nprobe = _checks.check_int("nprobe", self.nprobe, 1)
        self.seed = _checks.check_int("seed", self.seed)
        self.dense_router_epoch = _checks.check_int("dense_router_epoch", self.dense_router_epoch, 0)
        self.log_every = _checks.check_int("log_every", self.log_every, 1)
        if self.image_size is not None:
            self.image_size = _checks.check_int("image_size", self.image_size, 1)
        _checks.check_choice("mode", self.mode, ("hierarchical", "flat"))
        _checks.check_choice("val_metric", self.val_metric, VAL_METRICS)
        self.lr = _float("lr", self.lr, low=0.0, low_open=True)
        self.lambda_bal = _float("lambda_bal", self.lambda_bal, low=0.0)
        self.val_fraction = _float("val_fraction", self.val_fraction, low=0.0, high=1.0, high_open=True)
        self.p_normal = _float("p_normal", self.p_normal, low=0.0, high=1.0)
        if self.texture_dir is not None and not Path(self.texture_dir).is_dir():
            msg = f"texture_dir must be an existing folder (e.g. DTD images/), got {str(self.texture_dir)!r}"
            raise FileNotFoundError(msg)
        if self.out_dir is not None:
            self.out_dir = str(self.out_dir)
        if self.texture_dir is not None:
            self.texture_dir = str(self.texture_dir)
        self.amp = bool(self.amp)
        if self.foreground is not None:
            if not isinstance(self.foreground, dict):
                msg = f"foreground must be a dict {{class id: 'dark' | 'bright'}}, got {type(self.foreground).__name__}"
                raise TypeError(msg)
            fg = {}
            for cls, mode in self.foreground.items():
                _checks.check_choice(f"foreground[{cls!r}]", mode, ("dark", "bright"))
                fg[_checks.check_int("foreground class id", cls, 0)] = mode
            self.foreground = fg


def _float(name: str, value: Any, low=None, high=None, low_open=False, high_open=False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        msg = f"{name} must be a number, got {type(value).__name__} {value!r}"
        raise TypeError(msg)
    v = float(value)
    lo_ok = low is None or (v > low if low_open else v >= low)
    hi_ok = high is None or (v < high if high_open else v <= high)
    if not (math.isfinite(v) and lo_ok and hi_ok):
        lo = "" if low is None else f"{'(' if low_open else '['}{low}"
        hi = "" if high is None else f"{high}{')' if high_open else ']'}"
        expected = (
            f"in {lo}, {hi}" if low is not None and high is not None else (f"> {low}" if low_open else f">= {low}")
        )
        msg = f"{name} must be {expected}, got {value!r}"
        raise ValueError(msg)
    return v


def split_train_val(class_ids: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded per-class split of image indices: ``(train_idx, val_idx)``, both sorted int64.

    Each class gives ``round(val_fraction * n)`` images to validation, at least one when
    ``val_fraction > 0`` and the class has two or more images, and never all of them.
    """
    train_idx, val_idx = [], []
    for c in torch.unique(class_ids).tolist():
        idx = torch.nonzero(class_ids == c).flatten()
        n = idx.numel()
        n_val = 0
        if val_fraction > 0 and n >= 2:
            n_val = min(max(1, round(val_fraction * n)), n - 1)
        g = torch.Generator().manual_seed(seed * 7919 + int(c))
        perm = idx[torch.randperm(n, generator=g)]
        val_idx.append(perm[:n_val])
        train_idx.append(perm[n_val:])
    return torch.sort(torch.cat(train_idx)).values, torch.sort(torch.cat(val_idx)).values


def synthesize(
    synth: AnomalySynthesizer,
    images: torch.Tensor,
    keys: list[list[int]],
    foreground: list[str | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic anomalies of ``images [B, 3, H, W]``; sample b draws from ``default_rng(keys[b])``.

    ``foreground[b]`` (``"dark"``, ``"bright"`` or None) restricts sample b's mask to its Otsu
    foreground. Returns ``(images [B, 3, H, W], masks [B, H, W])`` on the input's device.
    """
    out, masks = [], []
    fgs = foreground if foreground is not None else [None] * len(keys)
    for img, key, fg in zip(images, keys, fgs):
        a, m = synth(img, np.random.default_rng(key), foreground=fg)
        out.append(a)
        masks.append(m)
    return torch.stack(out), torch.stack(masks).to(images.dtype)


def forward_batch(
    det: Detector,
    filter: nn.Module,
    images: torch.Tensor,
    image_ids: torch.Tensor,
    class_ids: torch.Tensor,
    dense_router: bool,
    amp: bool = False,
) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """Filter map of a batch: ``(M_up [B, H, W] float32, aux, C0_up [B, H, W])`` at the image size.

    Retrieval goes through ``det.match`` (``det`` has no filter) with the query's class and
    ``exclude_images = image_ids`` (leave-one-out), without gradients; ``amp`` runs the filter under
    CUDA bf16 autocast (the backbone's precision is its own setting, see ``load_backbone``).
    """
    with torch.no_grad():
        matching = det.match(images, class_ids=class_ids, exclude_images=image_ids)
        cost, guidance = matching.cost.float(), matching.guidance.float()  # [B, K, h, w], [B, 2D, h, w]
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and images.is_cuda):
        m, aux = filter(guidance, cost, dense_router=dense_router)
    size = tuple(images.shape[-2:])
    m_up = F.interpolate(m.float()[:, None], size=size, mode="bilinear", align_corners=True)[:, 0]
    c0_up = F.interpolate(cost[:, :1], size=size, mode="bilinear", align_corners=True)[:, 0]
    aux = {k: (v.float() if torch.is_tensor(v) else v) for k, v in aux.items()}
    return m_up, aux, c0_up


@torch.no_grad()
def evaluate_heldout(
    det: Detector,
    filter: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    image_ids: torch.Tensor,
    class_ids: torch.Tensor,
    batch_size: int,
    dense_router: bool,
    amp: bool = False,
) -> dict[str, float]:
    """``{"p_auroc", "loss"}`` of the filter (eval mode) on held-out images and masks [N, H, W].

    P-AUROC scores S = M + C[:, 0] upsampled (as at inference, before the blur); loss is the focal
    loss of M. P-AUROC is NaN when the masks hold one class only.
    """
    was_training = filter.training
    filter.eval()
    try:
        scores, losses, weights = [], [], []
        dev = next(filter.parameters()).device
        for s in range(0, images.shape[0], batch_size):
            sl = slice(s, s + batch_size)
            x, y = images[sl].to(dev), masks[sl].to(dev)
            m_up, _, c0_up = forward_batch(
                det, filter, x, image_ids[sl].to(dev), class_ids[sl].to(dev), dense_router, amp
            )
            scores.append((m_up + c0_up).cpu())
            losses.append(float(binary_focal_loss(m_up, y)))
            weights.append(x.shape[0])
    finally:
        filter.train(was_training)
    loss = float(np.average(losses, weights=weights))
    return {"p_auroc": float(auroc(torch.cat(scores), masks.cpu() > 0.5)), "loss": loss}


def _check_inputs(db, images, image_ids, class_ids, config):
    if not isinstance(db, TokenDatabase):
        msg = f"db must be a raid_fast.TokenDatabase, got {type(db).__name__}"
        raise TypeError(msg)
    images = _checks.as_tensor("images", images)
    _checks.check_ndim("images", images, (4,), "[N, 3, H, W] in [0, 1]")
    _checks.check_floating("images", images)
    n = images.shape[0]
    if images.shape[1] != 3 or n == 0:
        msg = f"images must be [N >= 1, 3, H, W] in [0, 1], got shape {tuple(images.shape)}"
        raise ValueError(msg)
    if config.image_size is not None and tuple(images.shape[-2:]) != (config.image_size,) * 2:
        msg = f"images must be {config.image_size}x{config.image_size} (config.image_size), got {tuple(images.shape[-2:])}"
        raise ValueError(msg)
    image_ids = _checks.as_tensor("image_ids", image_ids).to(torch.int64).cpu().flatten()
    if image_ids.numel() != n or bool(((image_ids < -1) | (image_ids >= db.n_images)).any()):
        msg = f"image_ids must be [{n}] template image ids in [-1, {db.n_images}) (-1: not in the database), got {image_ids.tolist()[:8]}..."
        raise ValueError(msg)
    in_db = image_ids >= 0
    db_class = torch.full((n,), -1, dtype=torch.int64)
    db_class[in_db] = db.image_class.cpu()[image_ids[in_db]]
    if class_ids is None:
        if not bool(in_db.all()):
            msg = "class_ids must be given when some images are not templates of the database (image_ids == -1)"
            raise ValueError(msg)
        class_ids = db_class
    class_ids = _checks.as_tensor("class_ids", class_ids).to(torch.int64).cpu().flatten()
    if class_ids.numel() != n or bool(((class_ids < 0) | (class_ids >= db.n_classes)).any()):
        msg = f"class_ids must be [{n}] database class ids in [0, {db.n_classes}), got {class_ids.tolist()[:8]}..."
        raise ValueError(msg)
    if bool((in_db & (class_ids != db_class)).any()):
        msg = "class_ids must match the database's class of each template image (db.image_class[image_ids])"
        raise ValueError(msg)
    return images, image_ids, class_ids


def train(
    config: TrainConfig,
    backbone: Callable[..., Any],
    db: TokenDatabase,
    images: torch.Tensor,
    image_ids: Any,
    class_ids: Any = None,
    filter: nn.Module | None = None,  # noqa: A002 (the paper's word, as in Detector)
    resume: bool = False,
    progress: bool = True,
    evaluate_fn: Callable[..., dict] = evaluate_heldout,
    overwrite: bool = False,
) -> tuple[nn.Module, dict]:
    """Trains a guided MoE filter; returns ``(filter with the last weights, history)``.

    Args:
        config: a :class:`TrainConfig`.
        backbone: ``images -> (tokens [B, h*w, D], cls [B, D], (h, w))``, the one that built ``db``.
        db: the template database.
        images: [N, 3, H, W] float training images in [0, 1] (normal images; split into train and
            held-out parts here). Kept on the CPU; batches move to the training device.
        image_ids: [N] template image id of each image in ``db`` (its tokens are excluded from its
            own retrieval), -1 for an image that is not a template.
        class_ids: [N] database class of each image; default ``db.image_class[image_ids]``.
        filter: the filter to train; default a seeded ``GuidedMoEFilter(dim=db.dim, k=config.k)``.
        resume: continue from ``config.out_dir/last.pt`` (its weights, optimizer, epoch, history);
            the config must equal the saved one except in :data:`RESUME_MAY_CHANGE`. A ``best.pt``
            left behind by an interrupted write is repaired first.
        progress: tqdm progress bar with the running loss.
        evaluate_fn: held-out evaluation (kept swappable for tests), signature of
            :func:`evaluate_heldout`.
        overwrite: start a new run in an ``out_dir`` that holds another run's ``last.pt`` /
            ``best.pt``, deleting those two files (nothing else); without it such a folder is
            refused (``FileExistsError``).

    Returns:
        ``(filter, history)``; history holds ``"epochs"`` (per-epoch dicts: epoch, step,
        train_loss, val_loss, val_p_auroc, dense_router), ``"step_loss"`` (every step's loss),
        ``"best_epoch"`` and ``"best_metric"`` (None without a held-out split).
    """
    if not isinstance(config, TrainConfig):
        msg = f"config must be a raid_fast.TrainConfig, got {type(config).__name__}"
        raise TypeError(msg)
    images, image_ids, class_ids = _check_inputs(db, images, image_ids, class_ids, config)
    out_dir = Path(config.out_dir) if config.out_dir is not None else None
    if resume and (out_dir is None or not (out_dir / "last.pt").is_file()):
        msg = f"resume=True needs a checkpoint at out_dir/last.pt, none at {str(out_dir)!r}"
        raise FileNotFoundError(msg)
    if out_dir is None:
        lock = contextlib.nullcontext()
    else:
        # checked before any compute: an unwritable folder fails now, not after the first epoch
        _fileio.check_output_folder(out_dir, "config.out_dir")
        lock = _fileio.folder_lock(out_dir, "training run")
    with lock:
        return _train(
            config, backbone, db, images, image_ids, class_ids, filter, resume, progress, evaluate_fn, overwrite
        )


def _start_run(config: TrainConfig, out_dir: Path | None, resume: bool, overwrite: bool) -> dict | None:
    """The checkpoint to resume from (validated, ``best.pt`` repaired), or None for a new run,
    after clearing (``overwrite``) or refusing a folder that holds another run."""
    if out_dir is None:
        return None
    if not resume:
        existing = checkpoint_files(out_dir)
        if existing and not overwrite:
            names = ", ".join(p.name for p in existing)
            msg = (
                f"{str(out_dir)!r} holds another run ({names}); resume it (--resume), replace it (--overwrite) "
                "or choose another folder"
            )
            raise FileExistsError(msg)
        for p in existing:
            p.unlink()
            log.info("removed %s of the previous run (overwrite)", p)
        return None
    last = read_checkpoint(out_dir / "last.pt")
    now = dataclasses.asdict(config)
    saved = last["config"]
    diffs = [
        f"{key}: {saved.get(key)!r} in last.pt, {value!r} now"
        for key, value in now.items()
        if key not in RESUME_MAY_CHANGE and saved.get(key, value) != value
    ]
    if diffs:
        msg = (
            f"resume must continue the run in {str(out_dir)!r} with its settings; these differ: {'; '.join(diffs)}. "
            "Start a new run (another folder, or --overwrite) to change them"
        )
        raise ValueError(msg)
    done = repair_best(out_dir, last)
    if done:
        log.warning("raid_fast: %s: %s", out_dir, done)
    return last


def _train(config, backbone, db, images, image_ids, class_ids, filter, resume, progress, evaluate_fn, overwrite):  # noqa: A002
    device = torch.device(config.device) if config.device is not None else db.device
    out_dir = Path(config.out_dir) if config.out_dir is not None else None
    ckpt = _start_run(config, out_dir, resume, overwrite)

    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    random.seed(config.seed)
    if filter is None:
        filter = GuidedMoEFilter(dim=db.dim, k=config.k)  # noqa: A001
    if getattr(filter, "k", config.k) != config.k or getattr(filter, "dim", db.dim) != db.dim:
        msg = f"filter must have k={config.k} (config.k) and dim={db.dim} (db.dim), got k={filter.k}, dim={filter.dim}"
        raise ValueError(msg)
    filter.to(device).train()
    optimizer = torch.optim.Adam(filter.parameters(), lr=config.lr)
    det = Detector(backbone, db, filter=None, k=config.k, nprobe=config.nprobe, mode=config.mode)

    tr_idx, va_idx = split_train_val(class_ids, config.val_fraction, config.seed)
    fg_classes = config.foreground or {}
    if any(c >= db.n_classes for c in fg_classes):
        msg = f"config.foreground must name database class ids in [0, {db.n_classes}), got {sorted(fg_classes)}"
        raise ValueError(msg)

    def fg_of(idx: torch.Tensor) -> list[str | None] | None:
        return [fg_classes.get(int(class_ids[i])) for i in idx] if fg_classes else None

    synth = AnomalySynthesizer(p_normal=config.p_normal, texture_dir=config.texture_dir, seed=config.seed)
    val = None
    if va_idx.numel() > 0:
        # held-out set: each image clean (zero mask) plus one synthetic anomaly of it, fixed seed
        vs = AnomalySynthesizer(p_normal=0.0, texture_dir=config.texture_dir, seed=config.seed)
        clean = images[va_idx]
        bad, bad_masks = synthesize(vs, clean, [[config.seed, VAL_SEED_OFFSET, int(i)] for i in va_idx], fg_of(va_idx))
        val = (
            torch.cat([clean, bad]),
            torch.cat([torch.zeros_like(bad_masks), bad_masks]),
            torch.cat([image_ids[va_idx]] * 2),
            torch.cat([class_ids[va_idx]] * 2),
        )

    history: dict = {"epochs": [], "step_loss": [], "best_epoch": None, "best_metric": None}
    start_epoch, step = 0, 0
    run_id, best_record = uuid.uuid4().hex, None
    if ckpt is not None:
        try:
            filter.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            msg = f"{str(out_dir / 'last.pt')!r} does not fit this filter ({type(exc).__name__}: {str(exc)[:200]})"
            raise ValueError(msg) from None
        start_epoch, step, history = ckpt["epoch"], ckpt["step"], ckpt["history"]
        run_id, best_record = ckpt["run_id"], ckpt["best"]
        set_rng_state(ckpt["rng"])

    n_train = tr_idx.numel()
    for epoch in range(start_epoch, config.epochs):
        dense = epoch >= config.dense_router_epoch
        order = tr_idx[torch.randperm(n_train, generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch))]
        batches = [order[s : s + config.batch_size] for s in range(0, n_train, config.batch_size)]
        bar = _progress(batches, progress, f"epoch {epoch + 1}/{config.epochs}")
        total, count = 0.0, 0
        for idx in bar:
            x, y = synthesize(synth, images[idx], [[config.seed, epoch, int(i)] for i in idx], fg_of(idx))
            x, y = x.to(device), y.to(device)
            m_up, aux, _ = forward_batch(
                det, filter, x, image_ids[idx].to(device), class_ids[idx].to(device), dense, config.amp
            )
            loss = total_loss(m_up, y, aux, lambda_bal=config.lambda_bal)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            lv = float(loss.detach())
            history["step_loss"].append(lv)
            total, count = total + lv * len(idx), count + len(idx)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{lv:.4f}")
            if step % config.log_every == 0:
                log.info("epoch %d step %d loss %.5f", epoch + 1, step, lv)
        record = {"epoch": epoch + 1, "step": step, "train_loss": total / max(count, 1), "dense_router": dense}
        improved = False
        if val is not None:
            metrics = evaluate_fn(det, filter, *val, batch_size=config.batch_size, dense_router=dense, amp=config.amp)
            record["val_loss"], record["val_p_auroc"] = metrics["loss"], metrics["p_auroc"]
            value = metrics[config.val_metric]
            best = history["best_metric"]
            if not math.isnan(value):
                higher = config.val_metric == "p_auroc"
                improved = best is None or (value > best if higher else value < best)
            if improved:
                history["best_epoch"], history["best_metric"] = epoch + 1, value
        history["epochs"].append(record)
        val_text = (
            f", held-out loss {record['val_loss']:.5f}, P-AUROC {record['val_p_auroc']:.4f}"
            f"{' (best)' if improved else ''}"
            if "val_loss" in record
            else ""
        )
        log.info("epoch %d/%d: train loss %.5f%s", epoch + 1, config.epochs, record["train_loss"], val_text)
        if out_dir is not None:
            model_state = filter.state_dict()
            if improved:
                best_record = {"epoch": epoch + 1, "digest": weights_digest(model_state)}
            state = {
                "model": model_state,
                "optimizer": optimizer.state_dict(),
                "config": dataclasses.asdict(config),
                "filter_args": filter_args(filter),
                "epoch": epoch + 1,
                "step": step,
                "history": history,
                "rng": rng_state(),
                "run_id": run_id,
                "role": "last",
                "best": best_record,
            }
            # last.pt first: it records the best epoch, and when that is this epoch it holds the same
            # weights, so an interruption before best.pt is written is repaired from it on resume
            save_checkpoint(out_dir / "last.pt", state)
            if improved:
                save_checkpoint(out_dir / "best.pt", {**state, "role": "best"})
    return filter, history


def _progress(batches: list, enabled: bool, desc: str):
    if not enabled:
        return batches
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        return batches
    return tqdm(batches, desc=desc, leave=False)
