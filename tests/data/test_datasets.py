"""MVTec-layout loading, multi-root datasets, k-shot selection and the embedded dataset."""

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raid_fast.data import (
    EMBEDDED_DEFECTS,
    MultiDataset,
    MVTecDataset,
    load_datasets,
    make_embedded_dataset,
    render_defect,
    select_templates,
    texture_crop,
)


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _img(seed: int, h: int = 30, w: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _mask(h: int = 30, w: int = 40) -> np.ndarray:
    """Left half 200 (-> 1), a column of 128 (-> 1), one of 127 and one of 100 (-> 0)."""
    m = np.zeros((h, w), np.uint8)
    m[:, : w // 2] = 200
    m[:, w // 2] = 128
    m[:, w // 2 + 1] = 127
    m[:, w // 2 + 2] = 100
    return m


def _tree(root: Path, n_train: int = 3) -> Path:
    """Two classes: bottle (MVTec mask names), candle (VisA 1cls mask names); stray top-level files."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "license.txt").write_text("CC BY-NC-SA")
    (root / "readme.txt").write_text("stray")
    for ci, c in enumerate(["bottle", "candle"]):
        for i in range(n_train):
            _png(root / c / "train" / "good" / f"{i:03d}.png", _img(100 * ci + i))
        _png(root / c / "test" / "good" / "000.png", _img(100 * ci + 50))
    _png(root / "bottle" / "test" / "broken" / "000.png", _img(7))
    _png(root / "bottle" / "test" / "broken" / "001.png", _img(8))
    _png(root / "bottle" / "ground_truth" / "broken" / "000_mask.png", _mask())
    _png(root / "bottle" / "ground_truth" / "broken" / "001_mask.png", np.zeros((30, 40), np.uint8))
    _png(root / "candle" / "test" / "bad" / "000.png", _img(9))
    _png(root / "candle" / "ground_truth" / "bad" / "000.png", _mask())
    return root


def test_train_split_labels_classes_and_shapes(tmp_path):
    root = _tree(tmp_path / "mvtec")
    ds = MVTecDataset(root, split="train", image_size=32)
    assert ds.classes == ["bottle", "candle"] and len(ds) == 6
    assert ds.labels.tolist() == [0] * 6 and ds.class_ids.tolist() == [0, 0, 0, 1, 1, 1]
    item = ds[4]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["mask"].shape == (1, 32, 32) and item["mask"].sum() == 0
    assert (item["label"], item["class_name"], item["class_id"], item["defect_type"]) == (0, "candle", 1, "good")
    assert item["path"].endswith("candle/train/good/001.png")
    native = MVTecDataset(root, classes=["bottle"], image_size=None)[0]["image"]
    expected = torch.from_numpy(_img(0)).permute(2, 0, 1).float() / 255
    assert torch.equal(native, expected)
    assert MVTecDataset(root, image_size=(24, 40))[0]["image"].shape == (3, 24, 40)


def test_test_split_labels_and_masks(tmp_path):
    root = _tree(tmp_path / "mvtec")
    ds = MVTecDataset(root, split="test", image_size=None)
    types = [(s.class_name, s.defect_type, s.label) for s in ds.samples]
    assert types == [
        ("bottle", "broken", 1),
        ("bottle", "broken", 1),
        ("bottle", "good", 0),
        ("candle", "bad", 1),
        ("candle", "good", 0),
    ]
    expected = torch.from_numpy((_mask() > 127).astype(np.float32))[None]
    m0 = ds[0]["mask"]
    assert m0.shape == (1, 30, 40) and set(m0.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(m0, expected)
    assert ds[1]["mask"].sum() == 0 and ds[1]["label"] == 1
    assert ds[2]["mask"].sum() == 0
    # VisA-style name
    assert ds.samples[3].mask_path.endswith("ground_truth/bad/000.png")
    assert torch.equal(ds[3]["mask"], expected)
    resized = MVTecDataset(root, split="test", image_size=15)[0]["mask"]
    assert resized.shape == (1, 15, 15) and set(resized.unique().tolist()) == {0.0, 1.0}


def test_a_mask_of_another_size_than_its_image_is_an_error(tmp_path):
    root = _tree(tmp_path / "mvtec")
    _png(root / "candle" / "ground_truth" / "bad" / "000.png", _mask().repeat(2, 0).repeat(2, 1))
    ds = MVTecDataset(root, classes=["candle"], split="test", image_size=16)
    with pytest.raises(
        ValueError, match=r"mask '.*ground_truth/bad/000.png' is 60x80 but its image '.*000.png' is 30x40"
    ):
        ds[0]


def test_zero_one_masks_read_like_zero_255_masks(tmp_path):
    root = _tree(tmp_path / "mvtec")
    m255 = MVTecDataset(root, classes=["bottle"], split="test", image_size=None)[0]["mask"]
    assert float(m255.sum()) > 0
    _png(root / "bottle" / "ground_truth" / "broken" / "000_mask.png", (_mask() > 127).astype(np.uint8))
    m01 = MVTecDataset(root, classes=["bottle"], split="test", image_size=None)[0]["mask"]
    assert torch.equal(m01, m255)


def test_missing_root_and_class_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        MVTecDataset(tmp_path / "nowhere")
    root = _tree(tmp_path / "mvtec")
    with pytest.raises(FileNotFoundError, match="screw"):
        MVTecDataset(root, classes=["screw"])
    (root / "cable" / "test" / "good").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"cable.*train.*good"):
        MVTecDataset(root, split="train")
    (root / "cable" / "train" / "good").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"holds no image"):
        MVTecDataset(root, split="train")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("stray")
    with pytest.raises(FileNotFoundError, match="no class folder"):
        MVTecDataset(tmp_path / "empty")
    with pytest.raises(ValueError, match="split"):
        MVTecDataset(root, split="val")
    shutil.rmtree(root / "bottle" / "test")
    with pytest.raises(FileNotFoundError, match=r"bottle.*test"):
        MVTecDataset(root, classes=["bottle"], split="test")


def test_missing_mask_folder_gives_zero_masks_with_a_warning(tmp_path):
    root = _tree(tmp_path / "mvtec")
    _png(root / "bottle" / "test" / "crack" / "000.png", _img(11))
    with pytest.warns(UserWarning, match=r"ground_truth.crack"):
        ds = MVTecDataset(root, classes=["bottle"], split="test", image_size=16)
    i = [s.defect_type for s in ds.samples].index("crack")
    assert ds[i]["label"] == 1 and ds[i]["mask"].sum() == 0 and ds.samples[i].mask_path is None
    with pytest.raises(FileNotFoundError, match=r"ground_truth.crack"):
        MVTecDataset(root, classes=["bottle"], split="test", strict_masks=True)
    # a mask folder without this image's mask: the same, per image
    (root / "bottle" / "ground_truth" / "broken" / "001_mask.png").unlink()
    with pytest.warns(UserWarning, match=r"1 anomalous image"):
        ds = MVTecDataset(root, classes=["bottle"], split="test", image_size=16)
    assert ds.samples[1].mask_path is None and ds[1]["label"] == 1 and ds[1]["mask"].sum() == 0
    with pytest.raises(FileNotFoundError, match=r"001.png"):
        MVTecDataset(root, classes=["bottle"], split="test", strict_masks=True)


def test_multi_dataset_prefixes_clashing_classes(tmp_path):
    a = _tree(tmp_path / "mvtec")
    b = tmp_path / "visa"
    for c in ["bottle", "pcb1"]:
        for i in range(2):
            _png(b / c / "train" / "good" / f"{i}.png", _img(500 + i))
    ds = load_datasets([a, b], split="train", image_size=16)
    assert isinstance(ds, MultiDataset)
    assert ds.classes == ["mvtec/bottle", "candle", "visa/bottle", "pcb1"]
    assert len(ds) == 10 and ds.class_ids.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    item = ds[7]
    assert (item["class_name"], item["class_id"], item["dataset"]) == ("visa/bottle", 2, "visa")
    assert ds[-1]["class_name"] == "pcb1"
    with pytest.raises(IndexError):
        ds[10]
    same_name = MultiDataset([MVTecDataset(a, image_size=8), MVTecDataset(a, image_size=8)])
    assert same_name.classes[0] == "mvtec#0/bottle"
    assert isinstance(load_datasets(a, image_size=8), MVTecDataset)
    assert isinstance(load_datasets([a], image_size=8), MVTecDataset)


def test_select_templates_seeded_nested_and_capped(tmp_path):
    root = _tree(tmp_path / "mvtec", n_train=10)
    ds = MVTecDataset(root, split="train", image_size=8)
    one = select_templates(ds, 1, seed=0)
    two = select_templates(ds, 2, seed=0)
    four = select_templates(ds, 4, seed=0)
    assert one == select_templates(ds, 1, seed=0)
    assert list(four) == ["bottle", "candle"]
    for c in ds.classes:
        assert len(one[c]) == 1 and len(two[c]) == 2 and len(four[c]) == 4
        assert set(one[c]) <= set(two[c]) <= set(four[c])
        assert all(ds.samples[i].class_name == c for i in four[c])
        assert four[c] == sorted(four[c])
    others = [select_templates(ds, 4, seed=s) for s in range(1, 6)]
    assert any(o != four for o in others)
    full = select_templates(ds, None)
    assert full == {"bottle": list(range(10)), "candle": list(range(10, 20))}
    assert select_templates(ds, 50) == full
    capped = select_templates(ds, None, seed=0, max_per_class=3)
    assert all(len(v) == 3 for v in capped.values())
    with pytest.raises(ValueError, match="shots"):
        select_templates(ds, 0)
    # on a test split only normal images are candidates
    test = MVTecDataset(root, split="test", image_size=8)
    assert select_templates(test, None) == {"bottle": [2], "candle": [4]}


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    out = tmp_path_factory.mktemp("embedded")
    t0 = time.perf_counter()
    root = make_embedded_dataset(out, seed=0)
    return root, time.perf_counter() - t0


def test_embedded_layout_and_speed(embedded):
    root, seconds = embedded
    assert seconds < 10.0
    assert (root / "embedded.json").is_file()
    for c in ["brick", "grass", "gravel"]:
        assert len(list((root / c / "train" / "good").glob("*.png"))) == 24
        assert len(list((root / c / "test" / "good").glob("*.png"))) == 12
        assert len(list((root / c / "test" / "good").glob("*_relit.png"))) == 6
        n_bad = 0
        for t in EMBEDDED_DEFECTS:
            imgs = sorted((root / c / "test" / t).glob("*.png"))
            n_bad += len(imgs)
            for p in imgs:
                mask = np.asarray(Image.open(root / c / "ground_truth" / t / f"{p.stem}_mask.png"))
                img = np.asarray(Image.open(p))
                assert img.shape == (128, 128, 3) and mask.shape == (128, 128)
                assert set(np.unique(mask).tolist()) == {0, 255}
            assert len(imgs) == 3, (c, t)  # 18 defective images round-robin over the 6 kinds
        assert n_bad == 18
    train = MVTecDataset(root, split="train", image_size=128)
    test = MVTecDataset(root, split="test", image_size=128)
    assert train.classes == ["brick", "grass", "gravel"] and len(train) == 72
    assert len(test) == 90 and int(test.labels.sum()) == 54
    bad = [i for i in range(len(test)) if test.labels[i] == 1]
    assert all(test[i]["mask"].sum() > 0 for i in bad[:6])
    # a second call with the same parameters reuses the files
    t0 = time.perf_counter()
    assert make_embedded_dataset(root, seed=0) == root
    assert time.perf_counter() - t0 < 0.5


@pytest.mark.parametrize("kind", EMBEDDED_DEFECTS)
def test_render_defect_mask_is_exactly_the_changed_pixels(kind):
    from raid_fast.data.embedded import _texture

    tex, other_tex = _texture("gravel"), _texture("grass")
    for i in range(4):
        rng = np.random.default_rng(i)
        clean = texture_crop(tex, 96, rng)
        other = texture_crop(other_tex, 96, rng)
        img, mask = render_defect(clean, kind, rng, other)
        assert img.shape == clean.shape and img.dtype == np.uint8 and mask.dtype == bool
        changed = (img != clean).any(-1)
        np.testing.assert_array_equal(changed, mask)
        assert 0.003 <= mask.mean() < 0.5


def test_hard_defects_are_subtle():
    """faint: small and a few grey levels off; rescaled: the class's own colours (mean within a few
    levels of the clean crop) at another scale; both still exact masks (the test above)."""
    from raid_fast.data.embedded import HARD_DEFECTS, _texture

    assert set(HARD_DEFECTS) <= set(EMBEDDED_DEFECTS)
    tex = _texture("gravel")
    for i in range(6):
        rng = np.random.default_rng(100 + i)
        clean = texture_crop(tex, 128, rng)
        img, mask = render_defect(clean, "faint", rng)
        step = img.astype(float)[mask] - clean.astype(float)[mask]  # [n, 3]
        assert mask.mean() < 0.03 and 8 <= abs(step.mean()) <= 26 and np.abs(step).max() <= 30
        img, mask = render_defect(clean, "rescaled", rng)
        inside = img[mask].astype(float).mean(0)
        assert np.abs(inside - clean.astype(float).mean((0, 1))).max() < 25


def test_relit_normal_images():
    """Relit normal test images: the same scene (correlated with the unlit crop) under another gain,
    a ramp and a colour cast, well outside the 0.95-1.05 brightness jitter of the training images."""
    from raid_fast.data.embedded import _texture, relight

    tex = _texture("brick")
    for i in range(6):
        rng = np.random.default_rng(i)
        clean = texture_crop(tex, 96, rng)
        lit = relight(clean, rng)
        assert lit.shape == clean.shape and lit.dtype == np.uint8
        gain = lit.astype(float).mean() / clean.astype(float).mean()
        assert gain < 0.9 or gain > 1.1, gain
        assert np.corrcoef(lit.astype(float).ravel(), clean.astype(float).ravel())[0, 1] > 0.9


def test_embedded_deterministic_by_seed(tmp_path):
    kw = dict(image_size=48, n_train=2, n_test_good=1, n_test_bad=4, classes=("brick", "gravel"))
    a = make_embedded_dataset(tmp_path / "a", seed=3, **kw)
    b = make_embedded_dataset(tmp_path / "b", seed=3, **kw)
    c = make_embedded_dataset(tmp_path / "c", seed=4, **kw)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 2 * (2 + 1 + 4 + 4)
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    for f in files:
        np.testing.assert_array_equal(np.asarray(Image.open(a / f)), np.asarray(Image.open(b / f)))
    assert any(not np.array_equal(np.asarray(Image.open(a / f)), np.asarray(Image.open(c / f))) for f in files)
    # other parameters regenerate in place; a foreign class folder is never clobbered
    make_embedded_dataset(tmp_path / "a", seed=5, **kw)
    assert not all(np.array_equal(np.asarray(Image.open(a / f)), np.asarray(Image.open(b / f))) for f in files)
    (tmp_path / "d" / "brick").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="brick"):
        make_embedded_dataset(tmp_path / "d", **kw)


@pytest.mark.parametrize("hostile", ["absolute", "parent", "sibling", "unmarked"])
def test_embedded_never_deletes_what_it_did_not_write(tmp_path, hostile):
    """embedded.json is not trusted: class names in it that point outside the root, or at folders
    the generator did not write, are never deleted."""
    import json

    kw = dict(image_size=32, n_train=1, n_test_good=1, n_test_bad=1, classes=("brick",))
    root = make_embedded_dataset(tmp_path / "out" / "data", **kw)
    victim = tmp_path / "victim"
    (victim / "keep").mkdir(parents=True)
    (victim / "keep" / "precious.txt").write_text("do not delete")
    names = {
        "absolute": str(victim),
        "parent": "../../victim",
        "sibling": "../victim",
        "unmarked": "victim",
    }
    if hostile == "sibling":
        victim = tmp_path / "out" / "victim"
        shutil.copytree(tmp_path / "victim", victim)
    if hostile == "unmarked":
        victim = root / "victim"
        shutil.copytree(tmp_path / "victim", victim)
    record = json.loads((root / "embedded.json").read_text())
    record["params"]["classes"] = ["brick", names[hostile]]
    (root / "embedded.json").write_text(json.dumps(record))
    make_embedded_dataset(root, seed=1, **kw)  # other parameters: regenerates its own folders
    assert (victim / "keep" / "precious.txt").read_text() == "do not delete"
    assert (root / "brick" / "train" / "good" / "000.png").is_file()
    with pytest.raises(ValueError, match="classes must be plain folder names"):
        make_embedded_dataset(root, classes=("../victim",), **{k: v for k, v in kw.items() if k != "classes"})
