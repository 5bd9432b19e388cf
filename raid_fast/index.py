"""``Index``: repeated exact or inverted-file search over one bank of vectors, faiss-style.

Letters: N bank vectors, D dims, D' search dims (D + 1 for ``"l2"``), L lists, M queries, K neighbours.

Flat (``n_lists=None``): every query scans the whole bank, as ``raid_fast.knn`` (exact). IVF
(``n_lists=L``): the bank is clustered by raid_fast's KMeans into L lists (contiguous in memory,
CSR), each query scans the ``nprobe`` lists whose centroids are nearest by the index's metric, and
the candidates are scored exactly (see :mod:`raid_fast.neighbors`). Ids always index the bank in the
order it was given (``add`` appends). The index is an ``nn.Module`` whose buffers are the bank and
its lists, so it travels in a model's ``state_dict``; ``save``/``load`` write a safetensors file
with a format version and a checksum per tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import weakref

import torch
from torch import nn

from raid_fast import _checks, ops
from raid_fast.bf16_filter import FilterBank, prepare_bank
from raid_fast.clustering import kmeans
from raid_fast.neighbors import as_vectors, check_metric, flat_search, rescore, search_vectors

FORMAT = "raid_fast.Index"
FORMAT_VERSION = 1
_BUFFERS = ("vectors", "centroids", "list_offsets", "list_ids", "list_vectors")


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


class Index(nn.Module):
    """A searchable bank of vectors.

    Args:
        bank: optional [N, D] vectors to add (and, for IVF, to train the lists on).
        metric: ``"l2"`` (squared Euclidean), ``"ip"`` or ``"cosine"`` (see ``raid_fast.knn``).
        n_lists: None for exact flat search, else the number of IVF lists (trained on the first
            vectors added, at most one list per vector).
        nprobe: lists scanned per query (IVF).
        dim: D, when no bank is given yet.
        niter, seed: KMeans iterations and seed of the IVF training.
        backend: backend of the search ops (None = auto).

    Example:
        >>> index = raid_fast.Index(memory_bank, metric="l2")            # flat, exact
        >>> dist, idx = index.search(features, k=9)
        >>> ivf = raid_fast.Index(memory_bank, metric="l2", n_lists=256, nprobe=8)
    """

    def __init__(
        self,
        bank=None,
        metric: str = "l2",
        n_lists: int | None = None,
        nprobe: int = 1,
        *,
        dim: int | None = None,
        niter: int = 25,
        seed: int = 0,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.metric = check_metric(metric)
        self.n_lists = None if n_lists is None else _checks.check_int("n_lists", n_lists, minimum=1)
        self.nprobe = _checks.check_int("nprobe", nprobe, minimum=1)
        self.niter = _checks.check_int("niter", niter, minimum=0)
        self.seed = _checks.check_int("seed", seed)
        self.backend = backend
        if bank is None and dim is None:
            msg = "Index needs a bank [N, D] or its dim"
            raise ValueError(msg)
        d = dim if bank is None else as_vectors("bank", bank).shape[1]
        d = _checks.check_int("dim", d, minimum=1)
        device = "cpu" if bank is None else _checks.as_tensor("bank", bank).device
        d_search = d + 1 if self.metric == "l2" else d
        self.register_buffer("vectors", torch.zeros(0, d, device=device))  # [N, D] in bank order
        self.register_buffer("centroids", torch.zeros(0, d, device=device))  # [L, D] (IVF)
        self.register_buffer("list_offsets", torch.zeros(1, dtype=torch.int64, device=device))  # [L + 1]
        self.register_buffer("list_ids", torch.zeros(0, dtype=torch.int64, device=device))  # [N] bank id by list slot
        self.register_buffer("list_vectors", torch.zeros(0, d_search, device=device))  # [N, D'] by list slot
        if bank is not None:
            self.add(bank)

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    @property
    def ntotal(self) -> int:
        return self.vectors.shape[0]

    @property
    def is_trained(self) -> bool:
        return self.n_lists is None or self.centroids.shape[0] > 0

    def __len__(self) -> int:
        return self.ntotal

    def extra_repr(self) -> str:
        lists = "flat" if self.n_lists is None else f"n_lists={self.n_lists}, nprobe={self.nprobe}"
        return f"metric={self.metric!r}, {lists}, ntotal={self.ntotal}, dim={self.dim}"

    def train(self, mode_or_vectors=True):  # noqa: D102 (nn.Module.train keeps its meaning for bools)
        if isinstance(mode_or_vectors, bool):
            return super().train(mode_or_vectors)
        x = as_vectors("x", mode_or_vectors, dim=self.dim)
        if self.n_lists is None:
            return self
        n_lists = min(self.n_lists, x.shape[0])
        if n_lists == 0:
            msg = "training an IVF index needs at least one vector"
            raise ValueError(msg)
        res = kmeans(
            search_vectors(x, "cosine", "bank") if self.metric == "cosine" else x,
            n_lists,
            niter=self.niter,
            seed=self.seed,
            spherical=self.metric == "cosine",
        )
        self.centroids = res.centroids.to(self.vectors.device)
        # vectors added before (re)training go to the new lists
        vectors = self.vectors
        self.reset()
        if vectors.shape[0]:
            self.add(vectors)
        return self

    def _assign(self, x: torch.Tensor, p: int) -> torch.Tensor:
        """[M, D] -> [M, P] ids of the P nearest lists by the index's metric (descending score)."""
        c = self.centroids
        if self.metric == "l2":
            score = 2.0 * x @ c.T - (c * c).sum(1)[None, :]  # -||x - c||^2 + ||x||^2
        elif self.metric == "ip":
            score = x @ c.T
        else:
            score = search_vectors(x, "cosine", "query") @ search_vectors(c, "cosine", "bank").T
        return score.topk(min(p, c.shape[0]), dim=1).indices

    def add(self, x) -> Index:
        """Appends vectors [n, D] (ids ``ntotal .. ntotal + n - 1``); an untrained IVF index trains on them."""
        x = as_vectors("x", x, dim=self.dim)
        _checks.check_same_device(x=x, index=self.vectors)
        if x.shape[0] == 0:
            return self
        if not self.is_trained:
            self.train(x)
        start = self.ntotal
        self.vectors = torch.cat([self.vectors, x])
        new_vectors = search_vectors(x, self.metric, "bank")  # [n, D']
        new_ids = torch.arange(start, start + x.shape[0], device=x.device)
        if self.n_lists is None:
            self.list_ids = torch.cat([self.list_ids, new_ids])
            self.list_vectors = torch.cat([self.list_vectors, new_vectors])
            self.list_offsets = torch.tensor([0, self.ntotal], device=x.device)
            return self
        n_lists = self.centroids.shape[0]
        old_list = torch.repeat_interleave(
            torch.arange(n_lists, device=x.device), self.list_offsets[1:] - self.list_offsets[:-1]
        )
        list_of = torch.cat([old_list, self._assign(x, 1)[:, 0]])  # [N]
        order = torch.argsort(list_of, stable=True)  # earlier vectors stay first in their list
        self.list_ids = torch.cat([self.list_ids, new_ids])[order]
        self.list_vectors = torch.cat([self.list_vectors, new_vectors])[order]
        counts = torch.bincount(list_of, minlength=n_lists)
        self.list_offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return self

    def search(
        self, queries, k: int, nprobe: int | None = None, exact_distances: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(dist, idx)`` [M, K] (or [B, M, K]) of the K nearest bank vectors, ``raid_fast.knn``'s
        conventions (``exact_distances`` as there); IVF scans the ``nprobe`` nearest lists (default
        ``self.nprobe``)."""
        q = as_vectors("queries", queries, dim=self.dim, ndims=(2, 3))
        _checks.check_same_device(queries=q, index=self.vectors)
        k = _checks.check_int("k", k, minimum=1)
        flat = q.reshape(-1, self.dim)  # [M, D]
        if self.ntotal == 0:
            fill = float("-inf") if self.metric == "ip" else float("inf")
            dist = torch.full((*q.shape[:-1], k), fill, device=q.device)
            return dist, torch.full((*q.shape[:-1], k), -1, dtype=torch.int64, device=q.device)
        if self.n_lists is None:  # list slots are bank ids
            ids = flat_search(
                flat, self.vectors, k, self.metric, self.backend, lambda: self.list_vectors, self._filter_bank
            )
        else:
            sq = search_vectors(flat, self.metric, "query")
            p = _checks.check_int("nprobe", self.nprobe if nprobe is None else nprobe, minimum=1)
            if not self.is_trained:
                probes = torch.full((flat.shape[0], 1), -1, dtype=torch.int64, device=flat.device)
            else:
                probes = self._assign(flat, p)  # [M, P]
            _, slot = ops.ivf_topk(sq, probes, self.list_offsets, self.list_vectors, k, backend=self.backend)
            ids = torch.where(slot >= 0, self.list_ids[slot.clamp_min(0)], -1)  # list slot -> bank id
        dist, idx = rescore(flat, self.vectors, ids, self.metric, exact_distances)
        dist, idx = dist[:, :k].contiguous(), idx[:, :k].contiguous()
        return dist.view(*q.shape[:-1], k), idx.view(*q.shape[:-1], k)

    def _filter_bank(self) -> FilterBank | None:
        """The bank's bfloat16 copy for the CPU filter (:mod:`raid_fast.bf16_filter`), built on the
        first search that uses it and kept while ``vectors`` stays the same tensor, unchanged."""
        cached = self.__dict__.get("_filter_cache")
        if cached is None or cached[0]() is not self.vectors or cached[1] != self.vectors._version:
            cached = (weakref.ref(self.vectors), self.vectors._version, prepare_bank(self.vectors, self.metric))
            self.__dict__["_filter_cache"] = cached
        return cached[2]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_filter_cache", None)  # derived, and a weak reference does not pickle
        return state

    def reset(self) -> Index:
        """Removes every vector (an IVF index keeps its lists' centroids)."""
        self.vectors = self.vectors[:0]
        self.list_ids = self.list_ids[:0]
        self.list_vectors = self.list_vectors[:0]
        n_lists = self.centroids.shape[0] if self.n_lists is not None else 1
        self.list_offsets = torch.zeros(n_lists + 1, dtype=torch.int64, device=self.vectors.device)
        return self

    def get_extra_state(self) -> dict:
        return {"metric": self.metric, "n_lists": self.n_lists, "nprobe": self.nprobe}

    def set_extra_state(self, state: dict) -> None:
        if state.get("metric") != self.metric or state.get("n_lists") != self.n_lists:
            msg = (
                f"the state is of an index with metric={state.get('metric')!r}, n_lists={state.get('n_lists')}; "
                f"this one has metric={self.metric!r}, n_lists={self.n_lists}"
            )
            raise ValueError(msg)
        self.nprobe = state.get("nprobe", self.nprobe)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        # the bank's size is data, not architecture: take the saved buffers whatever their length
        for name in _BUFFERS:
            key = prefix + name
            if key in state_dict and state_dict[key].shape[1:] == getattr(self, name).shape[1:]:
                setattr(self, name, torch.empty_like(state_dict[key], device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the index to a safetensors file (format version, settings, a SHA-256 per tensor),
        through a temporary file in the same folder and an atomic rename."""
        from safetensors.torch import save_file

        tensors = {name: getattr(self, name).detach().cpu().contiguous() for name in _BUFFERS}
        meta = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "settings": json.dumps(
                {
                    "metric": self.metric,
                    "n_lists": self.n_lists,
                    "nprobe": self.nprobe,
                    "niter": self.niter,
                    "seed": self.seed,
                }
            ),
            "sha256": json.dumps({name: _sha256(t) for name, t in tensors.items()}),
        }
        path = os.fspath(path)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path) or "."
        )
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: str | os.PathLike, device="cpu", backend: str | None = None) -> Index:
        """Reads a file written by ``save``; a damaged file, another format or an inconsistent index
        raises ``ValueError`` naming the path and the problem."""
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            msg = f"no index at {path!r}"
            raise FileNotFoundError(msg)
        try:
            with safe_open(path, framework="pt") as fh:
                meta = fh.metadata() or {}
                tensors = {name: fh.get_tensor(name) for name in fh.keys()}
            settings = json.loads(meta.get("settings", "null"))
            sums = json.loads(meta.get("sha256", "null"))
        except Exception as exc:  # safetensors and json raise their own error types on damaged files
            msg = f"{path!r} is not a readable raid_fast index (damaged or truncated file?): {exc}"
            raise ValueError(msg) from exc
        if meta.get("format") != FORMAT or meta.get("format_version") != str(FORMAT_VERSION):
            msg = f"{path!r} is not a raid_fast index of format version {FORMAT_VERSION} (format {meta.get('format')!r}, version {meta.get('format_version')!r})"
            raise ValueError(msg)
        if not isinstance(settings, dict) or not isinstance(sums, dict) or set(tensors) != set(_BUFFERS):
            msg = f"{path!r} is not a complete raid_fast index (settings, checksums or tensors missing)"
            raise ValueError(msg)
        bad = [name for name in _BUFFERS if sums.get(name) != _sha256(tensors[name])]
        if bad:
            msg = f"{path!r} is damaged: checksum mismatch in {bad}"
            raise ValueError(msg)
        vectors = tensors["vectors"]
        if vectors.dim() != 2 or vectors.dtype != torch.float32:
            msg = f"{path!r}: vectors must be float32 [N, D], got {vectors.dtype} {tuple(vectors.shape)}"
            raise ValueError(msg)
        index = cls(
            metric=settings.get("metric"),
            n_lists=settings.get("n_lists"),
            nprobe=settings.get("nprobe", 1),
            dim=vectors.shape[1],
            niter=settings.get("niter", 25),
            seed=settings.get("seed", 0),
            backend=backend,
        )
        _check_layout(path, index, tensors)
        for name in _BUFFERS:
            setattr(index, name, tensors[name])
        return index.to(device)


def _check_layout(path: str, index: Index, t: dict[str, torch.Tensor]) -> None:
    """Every invariant search relies on, so that a crafted file is an error, not a wrong answer."""
    n, d = t["vectors"].shape
    d_search = d + 1 if index.metric == "l2" else d
    off, ids = t["list_offsets"], t["list_ids"]
    problems = []
    if t["list_vectors"].shape != (n, d_search) or t["list_vectors"].dtype != torch.float32:
        problems.append(f"list_vectors must be float32 [{n}, {d_search}]")
    if off.dtype != torch.int64 or off.dim() != 1 or off.numel() < 1 or int(off[0]) != 0 or int(off[-1]) != n:
        problems.append(f"list_offsets must be int64 [L + 1] from 0 to {n}")
    elif off.numel() > 1 and bool((off[1:] < off[:-1]).any()):
        problems.append("list_offsets must be non-decreasing")
    if ids.dtype != torch.int64 or ids.shape != (n,) or not torch.equal(ids.sort().values, torch.arange(n)):
        problems.append(f"list_ids must be a permutation of 0..{n - 1}")
    elif index.n_lists is None and not torch.equal(ids, torch.arange(n)):
        problems.append("list_ids of a flat index must be 0..N-1 in order")
    c = t["centroids"]
    if index.n_lists is not None and (c.dim() != 2 or c.shape[1] != d or c.shape[0] != off.numel() - 1):
        problems.append(f"centroids must be [L, {d}] with L + 1 = {off.numel()} list offsets")
    for name in ("vectors", "centroids", "list_vectors"):
        if t[name].numel() and not bool(torch.isfinite(t[name]).all()):
            problems.append(f"{name} must be finite")
    if problems:
        msg = f"{path!r} is not a consistent raid_fast index: " + "; ".join(problems)
        raise ValueError(msg)
