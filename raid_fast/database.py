"""The hierarchical token database: class prototypes -> semantic prototypes -> instance tokens.

Letters: I template images, L tokens per image (H * W), D dims, C classes, S semantic prototypes
per class (``n_semantic``), N instance tokens in all.

Build (paper section 3.2): class prototypes by spherical KMeans over the unit-normalised CLS tokens
(label-free, ``n_classes`` given) or one per label; per class, S semantic prototypes by spherical
KMeans over its unit-normalised patch tokens (fewer when a class has fewer tokens); every patch
token stored once, unit-norm, grouped by (class, prototype) into contiguous lists (CSR), so a
probed prototype is one slice ``tokens[list_offsets[c*S + j] : list_offsets[c*S + j + 1]]``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from raid_fast import _checks, database_io
from raid_fast.clustering import kmeans

logger = logging.getLogger("raid_fast")

TENSOR_FIELDS = (
    "class_prototypes",
    "semantic_prototypes",
    "n_semantic",
    "tokens",
    "list_offsets",
    "token_image",
    "token_pos",
    "image_class",
)


def _tokens_as_bld(name: str, t) -> torch.Tensor:
    """[I, L, D] or [I, D, H, W] -> [I, L, D] float32 (L = H * W, row-major positions)."""
    t = _checks.as_tensor(name, t)
    _checks.check_floating(name, t)
    _checks.check_ndim(name, t, (3, 4), "[I, L, D] or [I, D, H, W]")
    if t.dim() == 4:
        t = t.flatten(2).transpose(1, 2)
    return t.float()


def _labels_tensor(labels, n: int) -> torch.Tensor:
    labels = _checks.as_tensor("labels", labels)
    _checks.check_ndim("labels", labels, (1,), f"[{n}] (one label per image)")
    if labels.shape[0] != n:
        msg = f"labels must have one entry per image ({n}), got {labels.shape[0]}"
        raise ValueError(msg)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        msg = f"labels must be integers, got dtype {labels.dtype}"
        raise TypeError(msg)
    return labels.to(torch.int64).cpu()


@dataclass
class TokenDatabase:
    """Hierarchical vector database of template tokens (see the module docstring).

    Attributes:
        class_prototypes: [C, D] unit-norm class prototypes (CLS directions).
        semantic_prototypes: [C, S, D] unit-norm; rows >= n_semantic[c] are zero.
        n_semantic: [C] int64 prototypes used per class.
        tokens: [N, D] unit-norm instance tokens grouped by (class, prototype).
        list_offsets: [C * S + 1] int64 CSR offsets of the lists.
        token_image: [N] int64 template image id of each token.
        token_pos: [N] int64 position (row-major index into the H x W grid) of each token.
        image_class: [I] int64 class of each template image.
        params: build parameters and class labels, saved with the database.
        class_purity: purity of the label-free class clustering against given labels, else None.
    """

    class_prototypes: torch.Tensor
    semantic_prototypes: torch.Tensor
    n_semantic: torch.Tensor
    tokens: torch.Tensor
    list_offsets: torch.Tensor
    token_image: torch.Tensor
    token_pos: torch.Tensor
    image_class: torch.Tensor
    params: dict = field(default_factory=dict)
    class_purity: float | None = None
    # derived from semantic_prototypes / n_semantic (see routing.probe_bias): 0 for the prototype slots
    # a class uses and -inf for its empty ones [C, S], and the smallest n_semantic; computed once here
    # so that retrieval reads them without a host sync or a copy per call
    probe_bias: torch.Tensor | None = field(default=None, repr=False, compare=False)
    min_used: int | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.probe_bias is None or self.min_used is None:
            n_sem = self.n_semantic.cpu()
            used = torch.arange(self.semantic_prototypes.shape[1])[None, :] < n_sem[:, None]  # [C, S]
            self.probe_bias = torch.zeros(used.shape).masked_fill_(~used, float("-inf")).to(self.device)
            self.min_used = int(n_sem.min()) if n_sem.numel() else 0

    @property
    def n_classes(self) -> int:
        return self.class_prototypes.shape[0]

    @property
    def n_lists(self) -> int:
        return self.list_offsets.numel() - 1

    @property
    def s_max(self) -> int:
        """S: prototype slots per class (the configured ``n_semantic``)."""
        return self.semantic_prototypes.shape[1]

    @property
    def dim(self) -> int:
        return self.tokens.shape[1]

    @property
    def n_tokens(self) -> int:
        return self.tokens.shape[0]

    @property
    def n_images(self) -> int:
        return self.image_class.numel()

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    @property
    def class_offsets(self) -> torch.Tensor:
        """[C + 1] int64: class c owns tokens class_offsets[c] .. class_offsets[c+1]-1."""
        return self.list_offsets[:: self.s_max].contiguous()

    def __repr__(self) -> str:
        return (
            f"TokenDatabase(classes={self.n_classes}, semantic={self.s_max}, tokens={self.n_tokens}, "
            f"dim={self.dim}, images={self.n_images}, device={self.device})"
        )

    @classmethod
    def build(
        cls,
        patch_tokens,
        cls_tokens=None,
        labels=None,
        n_classes: int | None = None,
        n_semantic: int = 50,
        kmeans_iters: int = 25,
        seed: int = 0,
        kmeans_precision: str = "fp32",
        backend: str | None = None,
        progress: bool = False,
    ) -> TokenDatabase:
        """Builds the database from template tokens.

        Args:
            patch_tokens: [I, L, D] (or [I, D, H, W]) template patch tokens.
            cls_tokens: [I, D] template CLS tokens, or None to use each image's mean patch token
                (global average pooling) as its CLS token: enough for one class or ``labels``.
            labels: optional [I] integer class labels. Alone, they define the classes (labelled
                mode); with ``n_classes`` they only score the label-free clustering (purity).
            n_classes: number of class prototypes found by KMeans over the CLS tokens (label-free,
                as the paper). With neither labels nor n_classes, all templates form one class.
            n_semantic: S, semantic prototypes per class.
            kmeans_iters: Lloyd iterations of both clusterings.
            seed: seeds both clusterings.
            kmeans_precision: ``"fp32"``, or ``"fp16"`` / ``"bf16"`` for both clusterings (see
                ``raid_fast.kmeans``; on a GPU the one-pass triton Lloyd loop). Tokens are unit-norm,
                so fp16 loses nothing to range; the lists then follow the half-precision assignment.
            backend: KMeans backend (``None`` = auto).
            progress: progress bars for the clusterings.

        Returns:
            The database, on the device of ``patch_tokens``.
        """
        patch = _tokens_as_bld("patch_tokens", patch_tokens)
        n_img, n_pos, dim = patch.shape
        clst = _checks.as_tensor("cls_tokens", cls_tokens) if cls_tokens is not None else patch.mean(dim=1)
        _checks.check_floating("cls_tokens", clst)
        _checks.check_ndim("cls_tokens", clst, (2,), f"[{n_img}, {dim}]")
        if tuple(clst.shape) != (n_img, dim):
            msg = f"cls_tokens must have shape [{n_img}, {dim}] (one per template image), got {tuple(clst.shape)}"
            raise ValueError(msg)
        _checks.check_same_device(patch_tokens=patch, cls_tokens=clst)
        if n_img == 0 or n_pos == 0 or dim == 0:
            msg = f"patch_tokens must hold at least one image with tokens, got shape {tuple(patch.shape)}"
            raise ValueError(msg)
        n_semantic = _checks.check_int("n_semantic", n_semantic, minimum=1)
        kmeans_iters = _checks.check_int("kmeans_iters", kmeans_iters, minimum=0)
        _checks.check_choice("kmeans_precision", kmeans_precision, ("fp32", "fp16", "bf16"))
        _checks.check_finite("patch_tokens", patch)
        _checks.check_finite("cls_tokens", clst)
        dev = patch.device
        cls_unit = F.normalize(clst.float(), dim=1)  # [I, D]

        label_t = _labels_tensor(labels, n_img) if labels is not None else None
        purity = None
        if n_classes is not None:
            n_classes = _checks.check_int("n_classes", n_classes, minimum=1, maximum=n_img)
            km = kmeans(
                cls_unit,
                n_classes,
                niter=kmeans_iters,
                seed=seed,
                spherical=True,
                precision=kmeans_precision,
                backend=backend,
            )
            image_class = km.labels.cpu()
            used = torch.unique(image_class)
            if used.numel() < n_classes:
                # a cluster left without images would be a class with no tokens: drop it
                logger.warning(
                    "raid_fast: %d of %d CLS clusters are empty; using %d classes",
                    n_classes - used.numel(),
                    n_classes,
                    used.numel(),
                )
                image_class = torch.searchsorted(used, image_class)
                n_classes = used.numel()
            class_labels = list(range(n_classes))
            mode = "kmeans"
            if label_t is not None:
                purity = _purity(image_class, label_t, n_classes)
                logger.info("raid_fast: label-free class prototypes, purity %.4f against the given labels", purity)
        elif label_t is not None:
            uniq, image_class = torch.unique(label_t, return_inverse=True)
            class_labels = uniq.tolist()
            n_classes = len(class_labels)
            mode = "labels"
        else:
            image_class = torch.zeros(n_img, dtype=torch.int64)
            class_labels = [0]
            n_classes = 1
            mode = "single"
        class_protos = _class_means(cls_unit, image_class.to(dev), n_classes)  # [C, D]

        # semantic prototypes: one ragged spherical KMeans problem per class, all in one call
        img_order = torch.argsort(image_class, stable=True)  # [I] images grouped by class
        imgs_per_class = torch.bincount(image_class, minlength=n_classes)  # [C]
        values = F.normalize(patch[img_order.to(dev)].reshape(-1, dim), dim=1)  # [N, D]
        offsets = torch.zeros(n_classes + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(imgs_per_class * n_pos, 0)
        km = kmeans(
            values,
            n_semantic,
            niter=kmeans_iters,
            seed=seed,
            spherical=True,
            offsets=offsets,
            precision=kmeans_precision,
            backend=backend,
            progress=progress,
        )
        token_image = img_order.repeat_interleave(n_pos).to(dev)  # [N]
        token_pos = torch.arange(n_pos, device=dev).repeat(n_img)  # [N]
        token_class = image_class.to(dev)[token_image]
        list_id = token_class * n_semantic + km.labels  # [N]
        db = cls._from_lists(
            class_protos, km.centroids, km.n_centroids, values, list_id, token_image, token_pos, image_class.to(dev)
        )
        db.params = {
            "mode": mode,
            "n_classes": n_classes,
            "n_semantic": n_semantic,
            "kmeans_iters": kmeans_iters,
            "kmeans_precision": kmeans_precision,
            "seed": seed,
            "tokens_per_image": n_pos,
            # retrieval routes by the same kind of CLS token when none is given
            "cls_source": "given" if cls_tokens is not None else "mean_patch",
            "dim": dim,
            "class_labels": class_labels,
        }
        db.class_purity = purity
        return db

    @classmethod
    def _from_lists(cls, class_protos, sem_protos, n_sem, values, list_id, token_image, token_pos, image_class):
        """Groups tokens by list id (stable, so earlier tokens stay first) into the CSR layout."""
        n_lists = sem_protos.shape[0] * sem_protos.shape[1]
        order = torch.argsort(list_id, stable=True)
        counts = torch.bincount(list_id, minlength=n_lists)  # [C * S]
        list_offsets = torch.zeros(n_lists + 1, dtype=torch.int64, device=values.device)
        list_offsets[1:] = torch.cumsum(counts, 0)
        return cls(
            class_prototypes=class_protos.contiguous(),
            semantic_prototypes=sem_protos.contiguous(),
            n_semantic=n_sem.to(torch.int64).cpu(),
            tokens=values[order].contiguous(),
            list_offsets=list_offsets,
            token_image=token_image[order].contiguous(),
            token_pos=token_pos[order].contiguous(),
            image_class=image_class.contiguous(),
        )

    def classify(self, cls_tokens) -> torch.Tensor:
        """[B, D] CLS tokens -> [B] int64 class ids: argmax cosine to the class prototypes (first on ties).
        A NaN or all-zero CLS token has no nearest class and raises ``ValueError``."""
        q = _checks.as_tensor("cls_tokens", cls_tokens)
        _checks.check_floating("cls_tokens", q)
        _checks.check_ndim("cls_tokens", q, (2,), f"[B, {self.dim}]")
        if q.shape[1] != self.dim:
            msg = f"cls_tokens must have D={self.dim} like the database, got shape {tuple(q.shape)}"
            raise ValueError(msg)
        _checks.check_same_device(cls_tokens=q, database=self.class_prototypes)
        _checks.check_directions("cls_tokens", q, row="image")
        return (F.normalize(q.float(), dim=1) @ self.class_prototypes.T).argmax(dim=1)

    def add(self, patch_tokens, cls_tokens=None, labels=None) -> TokenDatabase:
        """Adds template images without re-clustering; returns ``self``.

        Each new image goes to the class of its label (labelled databases, labels optional) or of its
        nearest class prototype by CLS cosine (``cls_tokens=None``: the mean patch token, as in
        ``build``); each token to the nearest semantic prototype of that class. Prototypes are not updated. New images get ids n_images, n_images + 1, ...
        """
        patch = _tokens_as_bld("patch_tokens", patch_tokens)
        n_new, n_pos, dim = patch.shape
        if dim != self.dim:
            msg = f"patch_tokens must have D={self.dim} like the database, got shape {tuple(patch.shape)}"
            raise ValueError(msg)
        if n_new == 0:
            return self
        _checks.check_same_device(patch_tokens=patch, database=self.tokens)
        _checks.check_finite("patch_tokens", patch)
        if labels is not None and self.params.get("mode") == "labels":
            label_t = _labels_tensor(labels, n_new)
            known = {lab: i for i, lab in enumerate(self.params["class_labels"])}
            unknown = sorted({int(v) for v in label_t.tolist()} - set(known))
            if unknown:
                msg = f"labels must be classes of the database {sorted(known)}, got unknown {unknown}; rebuild to add classes"
                raise ValueError(msg)
            new_class = torch.tensor([known[int(v)] for v in label_t.tolist()], dtype=torch.int64, device=self.device)
        else:
            clst = _checks.as_tensor("cls_tokens", cls_tokens) if cls_tokens is not None else patch.mean(dim=1)
            if clst.dim() != 2 or tuple(clst.shape) != (n_new, dim):
                msg = f"cls_tokens must have shape [{n_new}, {dim}], got {tuple(clst.shape)}"
                raise ValueError(msg)
            _checks.check_finite("cls_tokens", clst)
            new_class = self.classify(clst)
        values = F.normalize(patch.reshape(-1, dim), dim=1)  # [n_new * L, D]
        token_class = new_class.repeat_interleave(n_pos)  # [n_new * L]
        sem = self.semantic_prototypes[token_class]  # [n_new * L, S, D]
        sims = torch.einsum("nd,nsd->ns", values, sem)
        valid = (
            torch.arange(self.s_max, device=self.device)[None, :]
            < self.n_semantic.to(self.device)[token_class][:, None]
        )
        proto = sims.masked_fill(~valid, float("-inf")).argmax(dim=1)
        new_list = token_class * self.s_max + proto
        old_list = torch.repeat_interleave(
            torch.arange(self.n_lists, device=self.device), self.list_offsets[1:] - self.list_offsets[:-1]
        )
        image_ids = torch.arange(self.n_images, self.n_images + n_new, device=self.device)
        merged = type(self)._from_lists(
            self.class_prototypes,
            self.semantic_prototypes,
            self.n_semantic,
            torch.cat([self.tokens, values]),
            torch.cat([old_list, new_list]),
            torch.cat([self.token_image, image_ids.repeat_interleave(n_pos)]),
            torch.cat([self.token_pos, torch.arange(n_pos, device=self.device).repeat(n_new)]),
            torch.cat([self.image_class, new_class]),
        )
        for name in TENSOR_FIELDS:
            setattr(self, name, getattr(merged, name))
        self.probe_bias, self.min_used = merged.probe_bias, merged.min_used
        return self

    def to(self, device) -> TokenDatabase:
        """A copy on ``device`` (``n_semantic`` stays on the CPU)."""
        moved = {name: getattr(self, name).to(device) for name in TENSOR_FIELDS if name != "n_semantic"}
        return replace(self, **moved, params=dict(self.params), probe_bias=self.probe_bias.to(device))

    def save(self, path: str | os.PathLike) -> None:
        """Writes a safetensors file (see :mod:`raid_fast.database_io`): format version, build
        parameters and a SHA-256 of every tensor, so that a damaged file is detected on load."""
        database_io.save(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, device="cpu", verify: bool = True) -> TokenDatabase:
        """Reads a file written by ``save``; a file of another format version or a damaged file
        raises ``ValueError`` naming the path and the problem."""
        return database_io.load(path, device, verify)

    def stats(self) -> dict[str, Any]:
        """Sizes per level: tokens per class and per list (min / mean / max)."""
        per_list = (self.list_offsets[1:] - self.list_offsets[:-1]).float()
        per_class = (self.class_offsets[1:] - self.class_offsets[:-1]).float()
        return {
            "classes": self.n_classes,
            "lists": self.n_lists,
            "tokens": self.n_tokens,
            "tokens_per_class": (per_class.min().item(), per_class.mean().item(), per_class.max().item()),
            "tokens_per_list": (per_list.min().item(), per_list.mean().item(), per_list.max().item()),
            "class_purity": self.class_purity,
        }


def _class_means(cls_unit: torch.Tensor, image_class: torch.Tensor, n_classes: int) -> torch.Tensor:
    """[I, D], [I] -> [C, D] unit-norm mean direction of each class's CLS tokens."""
    sums = torch.zeros(n_classes, cls_unit.shape[1], dtype=torch.float64, device=cls_unit.device)
    sums.index_add_(0, image_class, cls_unit.double())
    return F.normalize(sums, dim=1).float()


def _purity(cluster: torch.Tensor, labels: torch.Tensor, n_clusters: int) -> float:
    """Fraction of images whose cluster's majority label is their own label."""
    uniq, lab = torch.unique(labels, return_inverse=True)
    table = torch.zeros(n_clusters, len(uniq), dtype=torch.int64)
    table.index_put_((cluster, lab), torch.ones_like(lab), accumulate=True)
    return float(table.max(dim=1).values.sum()) / max(1, labels.numel())
