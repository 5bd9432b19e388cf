"""The benchmark scripts themselves: FLOP counting, the Table 4 rows, the scaling sweeps and plots.

Tiny sizes: these tests keep the scripts from rotting; they time nothing that is judged.
"""

import csv

import pytest
import torch
import torch.nn.functional as F

import raid_fast as rf
from benchmarks import scaling, table4


def small_db(seed=0):
    gen = torch.Generator().manual_seed(seed)
    patch = torch.randn(6, 20, 16, generator=gen)
    cls = torch.randn(6, 16, generator=gen)
    return rf.TokenDatabase.build(patch, cls, labels=torch.arange(3).repeat_interleave(2), n_semantic=4, kmeans_iters=3)


def test_retrieval_flops_counts_the_vectors_scored():
    db = small_db()
    q = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    cls_ids = torch.tensor([0, 2])
    flat = table4.Row("RAID", "flat", "multi")
    assert table4.retrieval_flops(db, q, flat, cls_ids, 2) == 2 * 16 * 2 * 5 * db.n_tokens
    # by hand: per token, its class's prototypes and the sizes of its 2 best lists
    expected = 2 * 16 * 2 * db.n_classes  # routing
    for b in range(2):
        c = int(cls_ids[b])
        s = int(db.n_semantic[c])
        for t in range(5):
            sims = [float(F.normalize(q[b, t], dim=0) @ db.semantic_prototypes[c, j]) for j in range(s)]
            best = sorted(range(s), key=lambda j: -sims[j])[:2]
            expected += 2 * 16 * s
            for j in best:
                expected += 2 * 16 * int(db.list_offsets[c * db.s_max + j + 1] - db.list_offsets[c * db.s_max + j])
    hier = table4.Row("RAID", "hierarchical", "multi")
    assert table4.retrieval_flops(db, q, hier, cls_ids, 2) == expected
    single = table4.Row("RAID", "hierarchical", "single")
    assert table4.retrieval_flops(db, q, single, cls_ids, 2) == expected - 2 * 16 * 2 * db.n_classes


def test_module_flops_counts_convolutions():
    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert table4.module_flops(conv, torch.randn(1, 3, 10, 10)) == 2 * 8 * 3 * 9 * 100


def test_table4_efficiency_row_in_process(tmp_path):
    pytest.importorskip("timm")
    scale = table4.SCALES["small"]
    db = table4.random_database(scale, 2, "cpu")
    path = tmp_path / "db.safetensors"
    db.save(path)
    row = table4.Row("RAID", "hierarchical", "multi", k=8)
    res = table4.measure_efficiency(row, scale, str(path), "cpu", rounds=1)
    assert res["predict_s"] > 0 and res["retrieval_s"] > 0 and res["memory_gb"] > 0
    assert res["gflops"] == pytest.approx(res["gflops_backbone"] + res["gflops_filter"] + res["gflops_retrieval"])
    assert res["gflops_filter"] > 0 and res["gflops_backbone"] > 0
    table = table4.format_table({row.name: res}, {}, "cpu")
    assert "RAID Hier./multi" in table and "(0.062, " in table  # the paper's figure and the ratio beside ours
    info = {"scale": "small", "data": "none", "title": "t"}
    csv_path, md_path = table4.write_results({row.name: res}, {}, info, str(tmp_path), "cpu")
    assert "torch " in md_path.read_text() and "RAID Hier./multi" in md_path.read_text()
    assert len(list(csv.DictReader(csv_path.open()))) == 2  # predict and retrieval times


def test_table4_accuracy_on_the_embedded_dataset():
    pytest.importorskip("skimage")
    pytest.importorskip("timm")
    acc = table4.run_accuracy(None, "efficientnet_lite0", None, 64, None, "cpu", nprobe=3)
    assert set(acc) == {r.name for r in table4.ROWS}
    for name, a in acc.items():
        assert 0.0 <= a["recall"] <= 1.0 and 0.5 < a["p_auroc"] <= 1.0, name
        assert a["scored_with"] == "retrieval only"


def test_scaling_quick_run_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    base = scaling.Setting(dim=16, n_semantic=4, k=6, grid=3, classes=2, templates=2, modes=4)
    rows = scaling.run(scaling.QUICK, "cpu", rounds=1, base=base, with_real=False)
    assert {r["sweep"] for r in rows} == {"templates", "classes", "nprobe"}
    one_class = [r for r in rows if r["sweep"] == "classes" and r["x"] == 1 and r["mode"] == "flat"]
    assert float(one_class[0]["recall"]) == pytest.approx(1.0)  # one class: flat is the exact in-class search
    scaling.write_csv(rows, tmp_path / "s.csv")
    scaling.plot(rows, tmp_path / "s.png", "test", base)
    assert len(list(csv.DictReader((tmp_path / "s.csv").open()))) == len(rows)
    assert (tmp_path / "s.png").stat().st_size > 10_000


def test_scaling_gate_fails_a_wrong_fast_path(monkeypatch):
    base = scaling.Setting(dim=16, n_semantic=4, k=6, grid=3, classes=2, templates=2, modes=4)
    db, q, qc = scaling.make_case(base)
    real = rf.retrieve

    def off_by_a_bit(*args, backend=None, **kw):
        res = real(*args, backend=backend, **kw)
        if backend is None:  # the dispatched (timed) path only; the reference stays right
            res.dist = res.dist + 1e-2
        return res

    monkeypatch.setattr(rf, "retrieve", off_by_a_bit)
    with pytest.raises(AssertionError, match="correctness gate failed: flat retrieval"):
        scaling.measure(db, q, qc, base, "cpu", rounds=1)


def test_kernel_profile_report(tmp_path):
    from benchmarks import kernel_profile

    assert kernel_profile.main(["--device", "cpu", "--scale", "small", "--out", str(tmp_path)]) == 0
    (report,) = tmp_path.glob("profile_*_small.txt")
    text = report.read_text()
    for case in ("retrieve_b1", "retrieve_b32", "flat_b1", "lloyd_fp32"):
        assert f"== {case}:" in text
    assert "Self CPU" in text  # the profiler's table, sorted by own time


def test_retrieval_provider_variants_set_their_switches(monkeypatch):
    # a GPU provider such as flat_multi_filter_tf32x3 runs flat_multi with both kernel switches set,
    # and leaves them unset afterwards
    pytest.importorskip("triton")
    from raid_fast.kernels import cosine_filter, cosine_topk

    from benchmarks import bench_retrieval

    seen = []
    real = rf.retrieve

    def spy(*args, **kwargs):
        seen.append((kwargs["mode"], cosine_filter.FLAT_SEARCH, cosine_topk.DOT_PRECISION))
        return real(*args, **kwargs)

    monkeypatch.setattr(rf, "retrieve", spy)
    w = bench_retrieval.WORKLOADS["small"]
    for provider in ("flat_multi_filter_tf32x3", "hierarchical_tf32x3", "flat_multi"):
        fn, out = bench_retrieval.setup(w, provider, "cpu")
        fn()
        assert out["res"].idx.shape[-1] == w.k
    assert seen == [("flat", "filter", "tf32x3"), ("hierarchical", None, "tf32x3"), ("flat", None, None)]
    assert cosine_filter.FLAT_SEARCH is None and cosine_topk.DOT_PRECISION is None
