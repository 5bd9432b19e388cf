"""Regression benchmarks of the detector's parts: cost volume, guided MoE filter, whole predict.

Each case checks its result against the reference before it times anything, so a wrong fast path
fails instead of reporting a speed:

- cost volume: the dispatched op against ``raid_fast.ref.cost_volume_ref`` (bit-equal);
- filter: the float32 forward against the same weights in float64 (it has one implementation;
  the gate catches dtype, layout and non-determinism bugs), and two eval calls equal;
- predict: the auto-dispatched detector against the same detector on the torch reference backend.

Sizes: ``small`` (CI, 2 CPU cores) and ``full`` (``--bench-size full``: the paper's filter, D = 384,
K = 150 on 18 x 18 tokens, and predict with DINOv2 ViT-S/14 at 252 px, random init, over a
15 x 80-template random database).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import pytest
import torch

import raid_fast as rf
from benchmarks import _bench
from raid_fast.ref.cost_volume import cost_volume_ref


@dataclass(frozen=True)
class Size:
    batch: int
    grid: int
    dim: int
    k: int
    classes: int
    templates: int
    image_size: int
    backbone: str


SIZES = {
    "small": Size(
        batch=2, grid=8, dim=152, k=50, classes=3, templates=6, image_size=128, backbone="efficientnet_lite0"
    ),
    "full": Size(batch=1, grid=18, dim=384, k=150, classes=15, templates=80, image_size=252, backbone="dinov2_vits14"),
}


def _size(bench_size: str) -> Size:
    return SIZES["full" if bench_size.startswith("full") else "small"]


@pytest.fixture(scope="module")
def bench_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def test_cost_volume(benchmark, bench_size, bench_device):
    s = _size(bench_size)
    gen = torch.Generator().manual_seed(0)
    dist = torch.rand(s.batch, s.grid * s.grid, s.k, generator=gen).sort(dim=-1).values
    dist[:, :, -3:] = float("inf")  # missing neighbours take the pad cost
    dist = dist.to(bench_device)
    got = rf.ops.cost_volume(dist, s.grid, s.grid)
    if not torch.equal(got, cost_volume_ref(dist, s.grid, s.grid)):
        msg = "correctness gate failed: cost_volume differs from the reference"
        raise AssertionError(msg)
    # microseconds per call: let pytest-benchmark calibrate many rounds instead of three
    benchmark(lambda: (rf.ops.cost_volume(dist, s.grid, s.grid), _bench.sync(bench_device)))
    benchmark.extra_info.update({**asdict(s), "device": _bench.device_name(bench_device)})


def test_filter_forward(benchmark, bench_size, bench_rounds, bench_device):
    s = _size(bench_size)
    torch.manual_seed(0)
    filter = rf.GuidedMoEFilter(dim=s.dim, k=s.k).eval()
    gen = torch.Generator().manual_seed(1)
    guidance = torch.randn(s.batch, 2 * s.dim, s.grid, s.grid, generator=gen)
    cost = torch.rand(s.batch, s.k, s.grid, s.grid, generator=gen)
    with torch.no_grad():
        ref, _ = copy.deepcopy(filter).double()(guidance.double(), cost.double())
    filter, guidance, cost = filter.to(bench_device), guidance.to(bench_device), cost.to(bench_device)

    def forward():
        with torch.no_grad():
            return filter(guidance, cost)[0]

    first, second = forward(), forward()
    if not torch.equal(first, second):
        msg = "correctness gate failed: the filter's eval forward is not deterministic"
        raise AssertionError(msg)
    if not torch.allclose(first.double().cpu(), ref, rtol=1e-3, atol=1e-4):
        err = float((first.double().cpu() - ref).abs().max())
        msg = f"correctness gate failed: float32 filter differs from float64 by {err:.3g}"
        raise AssertionError(msg)
    _bench.pedantic(
        benchmark,
        forward,
        bench_device,
        bench_rounds,
        {**asdict(s), "params": sum(p.numel() for p in filter.parameters())},
    )


def _detector_case(s: Size, device: str):
    """A detector with its backbone's tokens of random template images as the database."""
    pretrained = s.backbone == "efficientnet_lite0"  # DINOv2 weights are not shipped: random init for timing
    backbone = rf.load_backbone(s.backbone, image_size=s.image_size, pretrained=pretrained, device=device)
    gen = torch.Generator().manual_seed(0)
    n_img = s.classes * s.templates
    if s.backbone == "efficientnet_lite0":
        templates = torch.rand(n_img, 3, s.image_size, s.image_size, generator=gen).to(device)
        with torch.no_grad():
            tokens, cls, _ = backbone(templates)
    else:  # full size: random unit tokens (timing does not depend on content)
        tokens = torch.randn(n_img, s.grid * s.grid, s.dim, generator=gen).to(device)
        cls = torch.randn(n_img, s.dim, generator=gen).to(device)
    labels = torch.arange(s.classes).repeat_interleave(s.templates)
    db = rf.TokenDatabase.build(tokens, cls, labels=labels, n_semantic=16, kmeans_iters=5)
    torch.manual_seed(0)
    filter = rf.GuidedMoEFilter(dim=db.dim, k=s.k).to(device).eval()
    images = torch.rand(s.batch, 3, s.image_size, s.image_size, generator=gen).to(device)
    return backbone, db, filter, images


@pytest.mark.parametrize("with_filter", [False, True], ids=["retrieval_only", "filter"])
def test_predict(benchmark, bench_size, bench_rounds, bench_device, with_filter):
    s = _size(bench_size)
    backbone, db, filter, images = _detector_case(s, bench_device)
    kw = {"filter": filter if with_filter else None, "k": s.k, "nprobe": 5}
    det = rf.Detector(backbone, db, **kw)
    ref = rf.Detector(backbone, db, backend="torch", **kw)
    got, want = det.predict(images), ref.predict(images)
    if not torch.allclose(got.score_map, want.score_map, rtol=1e-4, atol=1e-4):
        msg = "correctness gate failed: predict differs from the torch reference backend"
        raise AssertionError(msg)
    _bench.pedantic(
        benchmark, lambda: det.predict(images), bench_device, bench_rounds, {**asdict(s), "filter": with_filter}
    )
