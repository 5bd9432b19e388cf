"""The command line end to end on a tiny generated dataset: build-db, eval, predict; its errors."""

import json

import pytest

from raid_fast.app import cli
from raid_fast.detect import checkpoints
from tests.utils import tiny_embedded_dataset


def fails(argv, capsys, code, match):
    """Runs the CLI and checks it failed with ``code`` and one stderr line matching ``match``."""
    import re

    assert cli.main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(match, err[0]), err
    assert err[0].startswith(f"raid-fast {argv[0]}: error: ")
    return err[0]


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    root = tiny_embedded_dataset(tmp_path_factory, n_train=6, n_test_good=2, n_test_bad=3)
    # a parent folder that does not exist yet: build-db creates it
    db = tmp_path_factory.mktemp("db") / "nested" / "db.safetensors"
    assert cli.main(["build-db", "--data", str(root), "--out", str(db), "--image-size", "64", "--n-semantic", "8"]) == 0
    return root, db


def test_build_db_records_its_backbone(tiny_dataset):
    from raid_fast import TokenDatabase

    _, db_path = tiny_dataset
    db = TokenDatabase.load(db_path)
    assert db.params["backbone"] == "efficientnet_lite0" and db.params["image_size"] == 64
    assert db.params["class_names"] == ["brick", "grass", "gravel"] and db.n_images == 18


def test_build_db_half_precision_kmeans(tiny_dataset, tmp_path):
    from raid_fast import TokenDatabase

    root, _ = tiny_dataset
    out = tmp_path / "db16.safetensors"
    args = ["build-db", "--data", str(root), "--out", str(out), "--image-size", "64", "--n-semantic", "8"]
    assert cli.main([*args, "--kmeans-precision", "fp16", "--kmeans-iters", "3"]) == 0
    assert TokenDatabase.load(out).params["kmeans_precision"] == "fp16"


def test_eval_prints_table_and_writes_json(tiny_dataset, tmp_path, capsys):
    root, db = tiny_dataset
    out = tmp_path / "metrics.json"
    assert cli.main(["eval", "--data", str(root), "--db", str(db), "--k", "20", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "I-AUROC" in printed and "mean" in printed
    results = json.loads(out.read_text())
    assert set(results) == {"brick", "grass", "gravel", "mean"}
    assert 0.5 < results["mean"]["P-AUROC"] <= 1.0


def test_predict_writes_overlays(tiny_dataset, tmp_path, capsys):
    root, db = tiny_dataset
    images = sorted(str(p) for p in (root / "brick" / "test").glob("*/000.png"))
    out = tmp_path / "overlays"
    assert cli.main(["predict", *images, "--db", str(db), "--k", "20", "--out", str(out)]) == 0
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == len(images)
    from PIL import Image

    assert Image.open(pngs[0]).size == (128, 64)  # image beside its overlay


def test_eval_on_a_database_without_backbone_record(tmp_path, capsys):
    import torch

    from raid_fast import TokenDatabase

    db = TokenDatabase.build(torch.randn(2, 4, 8), torch.randn(2, 8), n_semantic=2, kmeans_iters=1)
    path = tmp_path / "bare.safetensors"
    db.save(path)
    fails(["eval", "--data", str(tmp_path), "--db", str(path)], capsys, 2, "does not record its backbone")


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
    root, db = tiny_dataset
    run = tmp_path_factory.mktemp("run")
    args = ["train", "--data", str(root), "--db", str(db), "--out", str(run), "--epochs", "1", "--batch-size", "4"]
    assert cli.main([*args, "--k", "20", "--nprobe", "3", "--val-fraction", "0.2"]) == 0
    return run


def test_train_writes_resumable_checkpoints(tiny_dataset, trained, tmp_path, capsys):
    import shutil

    root, db = tiny_dataset
    ckpt = checkpoints.read_checkpoint(trained / "last.pt")
    assert ckpt["epoch"] == 1 and ckpt["config"]["k"] == 20 and ckpt["config"]["image_size"] == 64
    assert (trained / "best.pt").is_file()
    # resume from a copy: one more epoch continues the history instead of restarting it
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    args = ["train", "--data", str(root), "--db", str(db), "--out", str(run), "--epochs", "2", "--batch-size", "4"]
    assert cli.main([*args, "--k", "20", "--nprobe", "3", "--val-fraction", "0.2", "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "epoch   1" in printed and "epoch   2" in printed
    resumed = checkpoints.read_checkpoint(run / "last.pt")
    assert resumed["epoch"] == 2 and resumed["history"]["epochs"][0] == ckpt["history"]["epochs"][0]


def test_eval_and_predict_with_a_trained_filter(tiny_dataset, trained, tmp_path, capsys):
    root, db = tiny_dataset
    out = tmp_path / "metrics.csv"
    # k, nprobe and mode come from the checkpoint
    assert (
        cli.main(
            ["eval", "--data", str(root), "--db", str(db), "--filter", str(trained / "best.pt"), "--out", str(out)]
        )
        == 0
    )
    assert "mean" in capsys.readouterr().out and out.read_text().startswith("class,I-AUROC")
    images = sorted(str(p) for p in (root / "grass" / "test").glob("*/001*.png"))
    assert (
        cli.main(
            ["predict", *images, "--db", str(db), "--filter", str(trained / "last.pt"), "--out", str(tmp_path / "png")]
        )
        == 0
    )
    assert len(list((tmp_path / "png").glob("*.png"))) == len(images)
    capsys.readouterr()
    base = ["eval", "--data", str(root), "--db", str(db)]
    fails(
        [*base, "--filter", str(trained / "last.pt"), "--k", "30"],
        capsys,
        2,
        "k must equal the filter's cost-volume depth 20, got k=30",
    )
    bogus = tmp_path / "bogus.pt"
    import torch

    torch.save({"weights": 1}, bogus)
    fails([*base, "--filter", str(bogus)], capsys, 2, r"old-format \(pickled\) filter checkpoint")
    bogus.write_text("not a checkpoint at all")
    fails([*base, "--filter", str(bogus)], capsys, 2, "is not a filter checkpoint")
    fails([*base, "--filter", str(tmp_path / "none.pt")], capsys, 2, "filter checkpoint not found")


def test_train_foreground_needs_known_classes(tiny_dataset, tmp_path, capsys):
    root, db = tiny_dataset
    base = ["train", "--data", str(root), "--db", str(db), "--out", str(tmp_path), "--epochs", "1", "--k", "20"]
    fails([*base, "--foreground", "screw=dark"], capsys, 2, "'<class>=dark|bright' with a class of the database")


def test_demo_end_to_end(tmp_path, capsys):
    pytest.importorskip("skimage")
    pytest.importorskip("timm")
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--image-size", "64", "--epochs", "1", "--k", "20", "--examples", "2"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    for text in ("retrieval only", "+ MoE filter", "I-AUROC", "AUPRO", "mean"):
        assert text in printed
    report = json.loads((out / "report.json").read_text())
    assert set(report["metrics"]) == {"retrieval only", "+ MoE filter"}
    assert set(report["metrics"]["+ MoE filter"]) == {"brick", "grass", "gravel", "mean"}
    assert report["settings"]["k"] == 20 and report["timings_s"]["total"] > 0
    from PIL import Image

    pngs = sorted((out / "overlays").glob("*.png"))
    assert len(pngs) == 6  # 2 per class: one defect, one normal
    assert Image.open(out / "overview.png").size == (4 * 64, 3 * (64 + 18))  # image, truth, 2 maps; 1 row per class


def test_errors_are_one_line_with_an_exit_code_and_debug_shows_the_traceback(tmp_path, capsys):
    missing = str(tmp_path / "missing.safetensors")
    fails(
        ["eval", "--data", str(tmp_path), "--db", missing], capsys, 2, r"no token database at '.*missing.safetensors'"
    )
    for argv in (["--debug", "eval"], ["eval", "--debug"]):
        assert cli.main([*argv, "--data", str(tmp_path), "--db", missing]) == 2
        assert "Traceback (most recent call last)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # argparse's own usage errors keep exit code 2
        cli.main(["eval", "--data"])
    assert info.value.code == 2


@pytest.fixture
def no_compute(monkeypatch):
    """Any dataset, database or backbone load fails the test: output checks must come first."""
    from raid_fast import TokenDatabase
    from raid_fast.app import pipelines

    def boom(*args, **kwargs):
        raise AssertionError("computed before checking the output path")

    monkeypatch.setattr(pipelines, "load_datasets", boom)
    monkeypatch.setattr(pipelines, "load_backbone", boom)
    monkeypatch.setattr(TokenDatabase, "load", boom)


def test_output_paths_are_checked_before_any_compute(tmp_path, capsys, no_compute):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    data, db = str(tmp_path), str(tmp_path / "db.safetensors")
    fails(["build-db", "--data", data, "--out", str(tmp_path)], capsys, 2, "--out must be a file path, got the folder")
    fails(
        ["build-db", "--data", data, "--out", str(blocker / "db.safetensors")],
        capsys,
        2,
        "cannot be created: a file stands",
    )
    fails(["eval", "--data", data, "--db", db, "--out", str(tmp_path)], capsys, 2, "--out must be a file path")
    fails(["train", "--data", data, "--db", db, "--out", str(blocker / "run")], capsys, 2, "--out .* cannot be created")
    fails(["predict", str(blocker), "--db", db, "--out", str(blocker / "png")], capsys, 2, "--out .* cannot be created")


@pytest.mark.skipif(
    not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() == 0, reason="root writes anywhere"
)
def test_train_into_a_read_only_folder_fails_at_once(tmp_path, capsys, no_compute):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    fails(
        ["train", "--data", str(tmp_path), "--db", "x", "--out", str(ro / "run")], capsys, 2, "not writable|Permission"
    )


def test_predict_streams_its_inputs_and_keeps_overlays_of_equal_stems(tiny_dataset, tmp_path, capsys, monkeypatch):
    import shutil

    from raid_fast.detect.detector import Detector

    root, db = tiny_dataset
    src = sorted((root / "grass" / "test").glob("*/000.png"))[:3]
    inputs = []
    for name in ["a", "b"]:  # the same file under two folders: same stem, same score
        (tmp_path / name / "x").mkdir(parents=True)
        inputs.append(str(shutil.copy(src[0], tmp_path / name / "x" / "000.png")))
    inputs += [str(p) for p in src[1:]]
    sizes = []
    real = Detector.predict

    def spy(self, images, class_ids=None):
        sizes.append(images.shape[0])
        return real(self, images, class_ids)

    monkeypatch.setattr(Detector, "predict", spy)
    out = tmp_path / "png"
    assert cli.main(["predict", *inputs, "--db", str(db), "--k", "20", "--out", str(out), "--batch-size", "2"]) == 0
    assert sizes == [2, 2] and max(sizes) <= 2  # 4 inputs, never more than a batch at once
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 4 and sum(p.startswith("x_000_score") for p in pngs) == 2
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip() and not ln.startswith("wrote")]
    assert len(lines) == 4 and all(ln.split()[1] in ("brick", "grass", "gravel") for ln in lines)


def _copy_class(root, cls, dest, good=True):
    import shutil

    shutil.copytree(root / cls, dest, ignore=None if good else shutil.ignore_patterns("good"))
    return dest


def test_eval_refuses_classes_the_database_lacks(tiny_dataset, tmp_path, capsys):
    root, db = tiny_dataset
    _copy_class(root, "brick", tmp_path / "other" / "carpet")
    base = ["eval", "--data", str(tmp_path / "other"), "--db", str(db), "--k", "20"]
    fails(base, capsys, 2, r"no templates of the test classes \['carpet'\].*--route-unknown-classes")
    assert cli.main([*base, "--route-unknown-classes"]) == 0
    assert "carpet" in capsys.readouterr().out
    img = str(next((root / "brick" / "test" / "good").glob("*.png")))
    fails(
        ["predict", img, "--db", str(db), "--out", str(tmp_path / "png"), "--class", "carpet"],
        capsys,
        2,
        "--class must be a class of the database",
    )
    assert (
        cli.main(["predict", img, "--db", str(db), "--k", "20", "--out", str(tmp_path / "png"), "--class", "brick"])
        == 0
    )
    assert capsys.readouterr().out.split()[1] == "brick"


def test_eval_of_a_class_without_normal_images_is_nan_with_a_warning(tiny_dataset, tmp_path, capsys):
    root, db = tiny_dataset
    _copy_class(root, "brick", tmp_path / "bad_only" / "brick", good=False)
    out = tmp_path / "m.json"
    assert (
        cli.main(["eval", "--data", str(tmp_path / "bad_only"), "--db", str(db), "--k", "20", "--out", str(out)]) == 0
    )
    assert "warning: class 'brick' has no normal test image" in capsys.readouterr().err
    row = json.loads(out.read_text().replace("NaN", "null"))["brick"]
    assert row["I-AUROC"] is None and row["I-AP"] is None and row["I-F1max"] is None


def test_a_second_run_into_a_run_folder_needs_resume_or_overwrite(tiny_dataset, trained, tmp_path, capsys):
    import shutil

    root, db = tiny_dataset
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    args = ["train", "--data", str(root), "--db", str(db), "--out", str(run), "--epochs", "1", "--k", "20"]
    fails([*args, "--nprobe", "3"], capsys, 2, r"holds another run \(last.pt, best.pt\)")
    fails(
        [*args, "--nprobe", "4", "--val-fraction", "0.2", "--resume"],
        capsys,
        2,
        r"these differ: .*nprobe: 3 in last.pt, 4 now",
    )


def test_pickled_checkpoints_run_no_code_through_any_entry_point(tiny_dataset, tmp_path, capsys):
    """The payload sits in the history of an otherwise valid old-format checkpoint: eval once printed a
    normal table with exit code 0. Every entry point refuses the file unread."""
    import torch

    from tests.detect.test_checkpoints import Payload, legacy_state

    root, db = tiny_dataset
    sentinel = tmp_path / "PWNED"
    evil = tmp_path / "best.pt"
    history = {"epochs": [], "step_loss": [], "best_epoch": 1, "best_metric": Payload(sentinel)}
    torch.save(legacy_state(history=history), evil)
    old = r"old-format \(pickled\) filter checkpoint"
    fails(["eval", "--data", str(root), "--db", str(db), "--filter", str(evil)], capsys, 2, old)
    img = str(next((root / "brick" / "test" / "good").glob("*.png")))
    fails(["predict", img, "--db", str(db), "--filter", str(evil), "--out", str(tmp_path / "png")], capsys, 2, old)
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(evil.read_bytes())
    args = ["train", "--data", str(root), "--db", str(db), "--out", str(run), "--epochs", "2", "--k", "20", "--resume"]
    fails(args, capsys, 2, old)
    fails(["convert-checkpoint", str(evil), str(tmp_path / "new.pt")], capsys, 2, "cannot be converted")
    assert not sentinel.exists(), "the payload ran"


def test_demo_never_deletes_what_a_hostile_embedded_json_names(tmp_path, capsys, monkeypatch):
    pytest.importorskip("skimage")
    from raid_fast.app import demo
    from raid_fast.data import make_embedded_dataset

    out = tmp_path / "demo"
    out.mkdir()
    (out / demo.MARKER).write_text("{}")  # a folder an earlier demo wrote
    data = make_embedded_dataset(out / "data", image_size=64)
    victims = [tmp_path / "victim", out / "victim"]
    for v in victims:
        (v / "keep").mkdir(parents=True)
        (v / "keep" / "precious.txt").write_text("do not delete")
    record = json.loads((data / "embedded.json").read_text())
    record["params"]["classes"] += [str(tmp_path / "victim"), "../victim", "../../victim"]
    (data / "embedded.json").write_text(json.dumps(record))

    def stop(*args, **kwargs):
        raise RuntimeError("stopped after the dataset step")

    monkeypatch.setattr(demo, "build_database", stop)
    fails(["demo", "--out", str(out), "--image-size", "64"], capsys, 1, "stopped after the dataset step")
    for v in victims:
        assert (v / "keep" / "precious.txt").read_text() == "do not delete"
    # a folder the demo did not write is refused as its output folder
    foreign = tmp_path / "foreign"
    (foreign / "mine").mkdir(parents=True)
    fails(["demo", "--out", str(foreign)], capsys, 2, "holds files the demo did not write")


def test_export_round_trips_with_equal_maps(tiny_dataset, trained, tmp_path, capsys):
    """`raid-fast export` writes the database, backbone and trained filter as one file; the loaded
    file's maps equal the eager detector's on the embedded data."""
    import torch

    import raid_fast
    from raid_fast.app.pipelines import detector_from_database
    from raid_fast.data import load_datasets

    root, db = tiny_dataset
    out = tmp_path / "detector.pt2"
    args = ["export", "--db", str(db), "--filter", str(trained / "best.pt"), "--out", str(out), "--batch-size", "2"]
    assert cli.main([*args, "--package", "program"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    det, _ = detector_from_database(db, "cpu", trained / "best.pt")
    test = load_datasets([root], split="test", image_size=64)
    images = torch.stack([test[i]["image"] for i in (0, len(test) - 1)])
    want = det.predict(images)
    got = raid_fast.load_exported(out)(images)
    torch.testing.assert_close(got.pixel_map, want.pixel_map, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.score, want.score, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.class_ids, want.class_ids)
    fails([*args[:-2], "--out", str(tmp_path)], capsys, 2, "--out")
