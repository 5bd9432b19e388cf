"""Deployment: ``torch.compile(detector, fullgraph=True)`` with the inductor C++ backend (no graph
breaks, equal to eager), ``torch.export`` of the detector as a program and as an AOTInductor
package (reloaded outputs equal to eager), the database in the detector's state_dict, and the fused
retrieve + cost volume reached by ``predict``."""

import pytest
import torch

import raid_fast as rf
from raid_fast import _dispatch
from raid_fast.detect.backbones import Backbone
from raid_fast.detect.export import export_detector, load_exported
from raid_fast.detect.filter import GuidedMoEFilter
from tests.utils import backend_params


class TinyBackbone(Backbone):
    """Two convolutions (stride 8): a real ``Backbone`` (preprocessing, checks) that compiles fast."""

    name, dim, stride = "tiny", 16, 8

    def __init__(self) -> None:
        super().__init__((32, 32), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, 4, 1))
        self._freeze()

    def _features(self, x):
        f = self.net(x)  # [B, 16, 4, 4]
        return f.flatten(2).transpose(1, 2), f.mean((2, 3))


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    bb = TinyBackbone()
    with torch.no_grad():
        tokens, cls, _ = bb(torch.rand(6, 3, 32, 32))
    db = rf.TokenDatabase.build(tokens, cls, labels=torch.tensor([0, 0, 0, 1, 1, 1]), n_semantic=4, kmeans_iters=3)
    filt = GuidedMoEFilter(dim=db.dim, k=8, n_guidance_experts=2, guidance_top_k=1, n_denoise_experts=2)
    return rf.Detector(bb, db, filter=filt, k=8, nprobe=2).eval()


def _assert_same(out, ref, atol=1e-5):
    assert isinstance(out, rf.Prediction)
    for name, a, b in zip(ref._fields, out, ref):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, atol=atol, rtol=1e-5, msg=name)
        else:
            assert torch.equal(a, b), name


def test_compile_fullgraph_inductor_equals_eager(detector):
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = detector(images)
        explained = torch._dynamo.explain(detector)(images)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
        compiled = torch.compile(detector, fullgraph=True, backend="inductor")
        _assert_same(compiled(images), ref)


def test_input_checks_stay_in_eager_mode(detector):
    bad = torch.rand(1, 3, 32, 32)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="images must be finite"):
        detector(bad)
    with pytest.raises(ValueError, match=r"images must be floats in \[0, 1\]"):
        detector(2.0 * torch.rand(1, 3, 32, 32))


@pytest.mark.parametrize("package", ["program", "aoti"])
def test_export_round_trip(detector, package, tmp_path):
    images = torch.rand(2, 3, 32, 32)
    ref = detector.predict(images)
    path = export_detector(detector, images, tmp_path / "detector.pt2", package=package)
    assert [p.name for p in tmp_path.iterdir()] == ["detector.pt2"]  # no temporary left behind
    exported = load_exported(path)
    assert exported.kind == package
    _assert_same(exported(images), ref)


def test_export_errors(detector, tmp_path):
    with pytest.raises(TypeError, match="detector must be a raid_fast.Detector"):
        export_detector(torch.nn.Linear(2, 2), torch.rand(1, 3, 32, 32), tmp_path / "x.pt2")
    with pytest.raises(ValueError, match="package must be one of"):
        export_detector(detector, torch.rand(1, 3, 32, 32), tmp_path / "x.pt2", package="onnx")
    with pytest.raises(ValueError, match="must be a file to write"):
        export_detector(detector, torch.rand(1, 3, 32, 32), tmp_path, package="program")
    with pytest.raises(FileNotFoundError, match="no exported detector"):
        load_exported(tmp_path / "missing.pt2")


def test_database_travels_in_the_state_dict(detector):
    state = detector.state_dict()
    assert torch.equal(state["database.tokens"], detector.db.tokens)
    other_tokens, other_cls, _ = detector.backbone(torch.rand(4, 3, 32, 32))
    other = rf.TokenDatabase.build(other_tokens, other_cls, n_semantic=2, kmeans_iters=1)
    fresh = rf.Detector(
        detector.backbone,
        other,
        filter=GuidedMoEFilter(dim=16, k=8, n_guidance_experts=2, guidance_top_k=1, n_denoise_experts=2),
        k=8,
        nprobe=2,
    ).eval()
    fresh.load_state_dict(state)
    assert fresh.db.n_tokens == detector.db.n_tokens and fresh.db.params == detector.db.params
    images = torch.rand(2, 3, 32, 32)
    _assert_same(fresh.predict(images), detector.predict(images), atol=0)


@pytest.mark.parametrize("backend", backend_params("ivf_topk_cost_volume"))
def test_predict_reaches_the_fused_search(detector, backend, monkeypatch):
    """One probe and one fused search + cost volume per predict, whatever the token layout."""
    calls = []
    real = _dispatch.call

    def spy(op, *args, **kwargs):
        calls.append((op, _dispatch.select(op, *args, backend=kwargs.get("backend"), prefer=kwargs.get("prefer"))))
        return real(op, *args, **kwargs)

    monkeypatch.setattr(_dispatch, "call", spy)
    detector.backend = backend
    try:
        detector.predict(torch.rand(2, 3, 32, 32))
    finally:
        detector.backend = None
    probe = "triton" if backend == "triton" else "torch"
    assert calls == [("probe_prototypes", probe), ("ivf_topk_cost_volume", backend)]
