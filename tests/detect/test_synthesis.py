"""Synthetic anomalies: Perlin masks, the numpy augmentations, sources, and the synthesizer."""

import numpy as np
import pytest
import torch

from raid_fast.detect.augment import AUGMENTATIONS, augment
from raid_fast.detect.perlin import foreground_mask, perlin_mask, perlin_noise
from raid_fast.detect.synthesis import AnomalySynthesizer, structure_source


def _textured(h=64, w=64, seed=0):
    """A smooth-but-varied uint8 [H, W, 3] image (gradients plus noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([yy * 200 / h, xx * 200 / w, (yy + xx) * 100 / (h + w)], -1) + 30
    return np.clip(base + rng.normal(0, 10, size=base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("shape", [(64, 64), (50, 70)], ids=["64x64", "50x70"])
def test_perlin_mask_binary_and_seeded(shape):
    a = perlin_mask(shape, np.random.default_rng(3))
    b = perlin_mask(shape, np.random.default_rng(3))
    c = perlin_mask(shape, np.random.default_rng(4))
    assert a.shape == shape and a.dtype == np.float32
    assert set(np.unique(a).tolist()) <= {0.0, 1.0}
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_perlin_noise_any_shape_rotated_and_bounded():
    rng = np.random.default_rng(0)
    for res, angle in [((1, 1), 0.0), ((4, 8), 33.0), ((32, 2), -90.0)]:
        n = perlin_noise((37, 53), res, rng, angle)
        assert n.shape == (37, 53)
        assert np.isfinite(n).all() and np.abs(n).max() <= 1.5
        assert n.std() > 0


def test_perlin_coverage_decreases_with_threshold():
    means = {t: [] for t in (0.0, 0.3, 0.5)}
    for seed in range(20):
        masks = {t: perlin_mask((64, 64), np.random.default_rng(seed), threshold=t) for t in means}
        # same draws, higher threshold: a subset
        assert np.all(masks[0.3] <= masks[0.0]) and np.all(masks[0.5] <= masks[0.3])
        for t, m in masks.items():
            means[t].append(m.mean())
    cov = [np.mean(means[t]) for t in (0.0, 0.3, 0.5)]
    assert cov[0] > cov[1] > cov[2] > 0
    assert 0.3 < cov[0] < 0.7


def test_perlin_mask_foreground_multiply():
    fg = np.zeros((64, 64), bool)
    fg[:, :32] = True
    for seed in range(5):
        m = perlin_mask((64, 64), np.random.default_rng(seed), threshold=0.0, foreground=fg)
        assert m[:, 32:].sum() == 0
    with pytest.raises(ValueError, match="foreground"):
        perlin_mask((64, 64), np.random.default_rng(0), foreground=fg[:10])


def test_foreground_mask_otsu_modes():
    img = np.full((32, 32, 3), 20, np.uint8)
    img[8:24, 8:24] = 220
    bright = foreground_mask(img, "bright")
    assert bright[8:24, 8:24].all() and bright.sum() == 256
    np.testing.assert_array_equal(foreground_mask(img, "dark"), ~bright)
    assert foreground_mask(img, None).all()
    with pytest.raises(ValueError, match="mode"):
        foreground_mask(img, "middle")


@pytest.mark.parametrize("name", list(AUGMENTATIONS))
def test_each_augmentation_keeps_shape_dtype_and_is_seeded(name):
    img = _textured(40, 56)
    a = AUGMENTATIONS[name](img, np.random.default_rng(1))
    b = AUGMENTATIONS[name](img, np.random.default_rng(1))
    assert a.shape == img.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)


def test_equalize_and_autocontrast_match_pil():
    from PIL import Image, ImageOps

    img = _textured(48, 48, seed=2)
    ours = AUGMENTATIONS["equalize"](img, np.random.default_rng(0))
    np.testing.assert_array_equal(ours, np.asarray(ImageOps.equalize(Image.fromarray(img))))

    class FixedCutoff:
        def integers(self, lo, hi):
            return 5

    ours = AUGMENTATIONS["autocontrast"](img, FixedCutoff())
    ref = np.asarray(ImageOps.autocontrast(Image.fromarray(img), cutoff=5)).astype(int)
    # PIL rounds its lookup table slightly differently
    assert np.abs(ours.astype(int) - ref).max() <= 1


def test_augment_draws_distinct_ops():
    img = _textured()
    out = augment(img, np.random.default_rng(0))
    assert out.shape == img.shape and out.dtype == np.uint8 and out is not img
    np.testing.assert_array_equal(out, augment(img, np.random.default_rng(0)))
    np.testing.assert_array_equal(augment(img, np.random.default_rng(0), n_ops=0), img)


def test_structure_source_is_a_block_shuffle_of_the_augmented_image():
    img = _textured(64, 64)
    aug = augment(img, np.random.default_rng(9))
    out = structure_source(img, np.random.default_rng(9), grid=8)

    def blocks(x):
        b = x.reshape(8, 8, 8, 8, 3).transpose(0, 2, 1, 3, 4).reshape(64, -1)
        return sorted(map(bytes, b))

    assert blocks(out) == blocks(aug)
    assert not np.array_equal(out, aug)


def test_synthesizer_deterministic_by_seed_and_index():
    img = _textured()
    s1, s2 = AnomalySynthesizer(p_normal=0.0, seed=5), AnomalySynthesizer(p_normal=0.0, seed=5)
    for i in range(4):
        a, ma = s1(img, i)
        b, mb = s2(img, i)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(ma, mb)
    a, _ = s1(img, 0)
    c, _ = AnomalySynthesizer(p_normal=0.0, seed=6)(img, 0)
    assert not np.array_equal(a, c)
    # a Generator, and the internal stream, are reproducible too
    g1, g2 = s1(img, np.random.default_rng(1)), s2(img, np.random.default_rng(1))
    np.testing.assert_array_equal(g1[0], g2[0])
    t1, t2 = AnomalySynthesizer(seed=3), AnomalySynthesizer(seed=3)
    for _ in range(3):
        np.testing.assert_array_equal(t1(img)[0], t2(img)[0])


def test_normal_samples_unchanged_with_zero_mask():
    img = _textured()
    s = AnomalySynthesizer(p_normal=1.0, seed=0)
    out, mask = s(img, 0)
    np.testing.assert_array_equal(out, img)
    assert out is not img and mask.shape == (64, 64) and mask.sum() == 0
    x = torch.from_numpy(img).permute(2, 0, 1).float() / 255
    out_t, mask_t = s(x, 1)
    assert torch.equal(out_t, x) and isinstance(mask_t, torch.Tensor) and mask_t.sum() == 0
    # about half of the samples stay normal at the default p_normal
    default = AnomalySynthesizer(seed=0)
    n_normal = sum(default(img, i)[1].sum() == 0 for i in range(200))
    assert 70 < n_normal < 130


@pytest.mark.parametrize("layout", ["u8_numpy", "float_numpy", "float_torch", "u8_torch"])
def test_mask_is_exactly_the_blended_pixels(layout):
    s = AnomalySynthesizer(p_normal=0.0, seed=1)
    changed_fraction = []
    for i in range(12):
        img = _textured(64, 64, seed=i)
        if layout == "u8_numpy":
            x = img
        elif layout == "u8_torch":
            x = torch.from_numpy(img)
        elif layout == "float_numpy":
            x = (img.transpose(2, 0, 1) / 255.0).astype(np.float32)
        else:
            x = torch.from_numpy(img).permute(2, 0, 1).float() / 255
        out, mask = s(x, i)
        out_np = out.numpy() if isinstance(out, torch.Tensor) else out
        x_np = x.numpy() if isinstance(x, torch.Tensor) else x
        m = (mask.numpy() if isinstance(mask, torch.Tensor) else mask) > 0
        assert type(out) is type(x) and out_np.dtype == x_np.dtype and out_np.shape == x_np.shape
        assert set(np.unique(m.astype(np.float32)).tolist()) <= {0.0, 1.0}
        chan_axis = -1 if x_np.dtype == np.uint8 else 0
        diff = (out_np != x_np).any(chan_axis)  # [H, W]
        # outside the mask: bit-identical; inside: changed unless the source equals the image there
        assert not diff[~m].any()
        if m.sum():
            changed_fraction.append(diff[m].mean())
    assert len(changed_fraction) >= 8
    assert np.mean(changed_fraction) > 0.9


def test_texture_folder_is_used(tmp_path):
    from PIL import Image

    colours = {"red": (255, 0, 0), "blue": (0, 0, 255)}
    for name, c in colours.items():
        sub = tmp_path / name
        sub.mkdir()
        Image.fromarray(np.full((20, 30, 3), c, np.uint8)).save(sub / f"{name}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    s = AnomalySynthesizer(p_normal=0.0, p_texture=1.0, texture_dir=tmp_path, augment_texture=False, seed=0)
    assert len(s.textures) == 2
    img = np.full((48, 48, 3), 128, np.uint8)
    seen = set()
    for i in range(16):
        out, mask = s(img, i)
        m = mask > 0
        if not m.any():
            continue
        px = out[m].astype(int)  # [P, 3]
        # out = beta * 128 + (1 - beta) * colour with one beta per sample, beta in [0, 0.8]
        if (px[:, 0] > 128).all():
            assert (px[:, 2] < 128).all() and (px[:, 1] == px[:, 2]).all()
            # (1 - beta) >= 0.2 of the way from 128 to 255
            assert (px[:, 0] >= 153).all()
            seen.add("red")
        else:
            assert (px[:, 2] > 128).all() and (px[:, 0] < 128).all() and (px[:, 0] == px[:, 1]).all()
            seen.add("blue")
    assert seen == {"red", "blue"}
    # without a folder the texture source falls back to an augmented copy of the (grey) image
    fallback = AnomalySynthesizer(p_normal=0.0, p_texture=1.0, seed=0)
    assert fallback.textures == []
    out, mask = fallback(img, 0)
    assert out.shape == img.shape


def test_synthesizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        AnomalySynthesizer(texture_dir=tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no image"):
        AnomalySynthesizer(texture_dir=tmp_path)
    with pytest.raises(ValueError, match="p_normal"):
        AnomalySynthesizer(p_normal=1.5)
    s = AnomalySynthesizer()
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        s(np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        s(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(TypeError, match="dtype"):
        s(np.zeros((8, 8, 3), np.int32))


def test_synthesizer_foreground_restricts_mask():
    img = np.full((64, 64, 3), 20, np.uint8)
    img[:, 32:] = 230
    s = AnomalySynthesizer(p_normal=0.0, threshold=0.0, seed=0)
    for i in range(5):
        out, mask = s(img, i, foreground="bright")
        assert mask[:, :32].sum() == 0
        np.testing.assert_array_equal(out[:, :32], img[:, :32])
