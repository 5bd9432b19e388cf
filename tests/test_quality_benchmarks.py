"""The accuracy benchmarks (benchmarks/ablation.py, benchmarks/vs_patchcore.py) on a tiny embedded
dataset: they run end to end and write what they say; the numbers they print are not judged here.
anomalib's rows run only where anomalib is installed (not in CI)."""

import csv

import pytest
import torch

pytest.importorskip("skimage")
pytest.importorskip("timm")

from benchmarks import _quality, ablation, vs_patchcore  # noqa: E402
from raid_fast.detect.metrics import IMAGE_METRICS, PIXEL_METRICS  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from raid_fast.data import make_embedded_dataset

    out = tmp_path_factory.mktemp("tiny")
    return make_embedded_dataset(out / "data", image_size=32, n_train=3, n_test_good=2, n_test_bad=2)


def _rows(path):
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_ablation_all_parts(tiny, tmp_path):
    argv = ["--data", str(tiny), "--image-size", "32", "--epochs", "1", "--k-sweep", "2", "150"]
    assert ablation.main([*argv, "--nprobe-sweep", "1", "--out", str(tmp_path)]) == 0
    stem = _quality.results_stem("ablation")
    rows = _rows(tmp_path / f"{stem}.csv")
    parts = {}
    for r in rows:
        parts.setdefault(r["part"], []).append(r["row"])
        for m in IMAGE_METRICS + PIXEL_METRICS:
            assert 0.0 <= float(r[m]) <= 1.0, (r["row"], m)
    # 8 token options x (3 image scores + the corner-aligned map)
    assert len(parts["features"]) == 32 and "s8 p1 L124 top1%" in parts["features"]
    assert parts["components"] == [
        "ID0 retrieval only",
        "ID0 retrieval only",
        *ablation.VARIANTS,
        ablation.FULL,  # the full model also with flat retrieval
    ]
    assert parts["K"] == ["full model, K = 2", "full model, K = 150"]
    assert parts["nprobe"] == [
        "retrieval only, nprobe = 1",
        "retrieval only, flat exact (routed class)",
        "full model, nprobe = 1",
        "full model, flat exact (routed class)",
    ]
    k150 = next(r for r in rows if r["row"] == "full model, K = 150")
    full = next(r for r in rows if r["row"] == ablation.FULL and r["retrieval"] == "hierarchical")
    # K = 150 is the components' full model, not trained twice
    assert k150["train_s"] == "" and all(k150[m] == full[m] for m in IMAGE_METRICS + PIXEL_METRICS)
    text = (tmp_path / f"{stem}.md").read_text()
    assert "| ID0 retrieval only | hierarchical |" in text and "97.9 / 97.5" in text  # the paper's beside ours


def test_unguided_filter_ignores_the_guidance():
    f = ablation.UnguidedFilter(dim=4, k=3).eval()
    cost = torch.rand(2, 3, 5, 5)
    a, _ = f(torch.randn(2, 8, 5, 5), cost)
    b, _ = f(torch.randn(2, 8, 5, 5), cost)
    assert torch.equal(a, b)
    assert not torch.equal(a, f(torch.randn(2, 8, 5, 5), torch.rand(2, 3, 5, 5))[0])


def test_vs_patchcore_without_anomalib(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(vs_patchcore, "anomalib_version", lambda: None)
    argv = ["--data", str(tiny), "--image-size", "32", "--epochs", "1", "--out", str(tmp_path)]
    assert vs_patchcore.main(argv) == 0
    assert "anomalib is not installed" in capsys.readouterr().err
    stem = _quality.results_stem("vs_patchcore")
    rows = _rows(tmp_path / f"{stem}.csv")
    methods = [vs_patchcore.HIER, vs_patchcore.FLAT, vs_patchcore.FILTER]
    assert [r["method"] for r in rows if r["class"] == "mean"] == methods
    assert {r["class"] for r in rows} == {"brick", "grass", "gravel", "mean"}
    assert all(float(r["predict_s_per_image"]) > 0 for r in rows)
    assert "anomalib PatchCore did not run" in (tmp_path / f"{stem}.md").read_text()


def test_vs_patchcore_checks_name_each_target():
    mean = {m: 0.5 for m in IMAGE_METRICS + PIXEL_METRICS}
    better = {**mean, "P-AP": 0.6, "P-AUROC": 0.6, "P-F1max": 0.6, "AUPRO": 0.6}
    results = {
        vs_patchcore.PATCHCORE: {"mean": {**mean, "I-AUROC": 0.7}},
        vs_patchcore.HIER: {"mean": mean},
        vs_patchcore.FLAT: {"mean": mean},
        vs_patchcore.FILTER: {"mean": better},
    }
    lines = vs_patchcore.checks(results)
    assert "I-AUROC: -20.00 (BELOW)" in lines[3] and all("(ok)" in line for line in lines[:3] + lines[4:])


def test_patchcore_sees_raid_fasts_inputs_and_features():
    """anomalib's extractor, with the weights loaded as the benchmark loads them, gives exactly the
    stage maps raid_fast's backbone computes from the same preprocessed images."""
    pytest.importorskip("anomalib")
    from raid_fast.detect.backbones import load_backbone

    model = vs_patchcore.patchcore_model()
    bb = load_backbone("efficientnet_lite0", image_size=64)
    x = bb.preprocess(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        got = model.feature_extractor(x)
        maps = bb.model.forward_intermediates(x, indices=[2, 3], intermediates_only=True)
    assert torch.equal(got["blocks.2"], maps[0]) and torch.equal(got["blocks.4"], maps[1])


def test_vs_patchcore_with_anomalib(tiny, tmp_path):
    pytest.importorskip("anomalib")
    argv = ["--data", str(tiny), "--image-size", "32", "--epochs", "1", "--coreset-ratio", "1.0"]
    assert vs_patchcore.main([*argv, "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path / f"{_quality.results_stem('vs_patchcore')}.csv")
    pc = next(r for r in rows if r["class"] == "mean" and r["method"] == vs_patchcore.PATCHCORE)
    assert pc["anomalib"] != "not run" and 0.5 < float(pc["P-AUROC"]) <= 1.0
