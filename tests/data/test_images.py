"""Image and mask files in every mode Pillow opens: scaled by their own range, never clipped to 8 bits."""

import numpy as np
import pytest
import torch
from PIL import Image

from raid_fast.data import MVTecDataset, load_image, load_mask

H, W = 12, 10


def _rgb(seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(H, W, 3), dtype=np.uint8)


def _gray16(seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 65536, size=(H, W), dtype=np.uint16)


def _as3(gray: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(gray, dtype=np.float32))[None].expand(3, -1, -1)


def _case(mode: str, tmp_path):
    """(file, expected float32 [3, H, W]) for one Pillow mode."""
    rgb = _rgb()
    if mode == "RGB":
        im, expected = Image.fromarray(rgb), torch.from_numpy(rgb.transpose(2, 0, 1) / 255.0)
    elif mode == "L":
        gray = rgb[..., 0]
        im, expected = Image.fromarray(gray), _as3(gray / 255.0)
    elif mode == "1":
        bits = rgb[..., 0] > 127
        im, expected = Image.fromarray(bits), _as3(bits)
    elif mode == "I;16":
        gray = _gray16()
        im, expected = Image.fromarray(gray), _as3(gray / 65535.0)
    elif mode == "I":
        gray = _gray16().astype(np.int32)
        im, expected = Image.fromarray(gray), _as3(gray / 65535.0)
    elif mode == "F":
        gray = np.random.default_rng(1).random((H, W), dtype=np.float32)
        im, expected = Image.fromarray(gray), _as3(gray)
    elif mode == "P":
        palette = _rgb(2).reshape(-1, 3)[:256]
        index = np.random.default_rng(3).integers(0, len(palette), size=(H, W), dtype=np.uint8)
        im = Image.fromarray(index, mode="P")
        im.putpalette(palette.reshape(-1).tolist())
        expected = torch.from_numpy(palette[index].transpose(2, 0, 1) / 255.0)
    elif mode == "RGBA":
        rgba = np.concatenate([rgb, _rgb(4)[..., :1]], axis=-1)
        im, expected = Image.fromarray(rgba), torch.from_numpy(rgb.transpose(2, 0, 1) / 255.0)
    elif mode == "CMYK":
        cmyk = np.concatenate([rgb, np.zeros((H, W, 1), np.uint8)], axis=-1)  # K = 0: RGB = 255 - CMY
        im, expected = Image.fromarray(cmyk, mode="CMYK"), torch.from_numpy((255 - rgb).transpose(2, 0, 1) / 255.0)
    elif mode == "LA":
        la = np.stack([rgb[..., 0], rgb[..., 1]], axis=-1)
        im, expected = Image.fromarray(la, mode="LA"), _as3(rgb[..., 0] / 255.0)
    else:
        raise AssertionError(mode)
    assert im.mode == mode
    path = tmp_path / f"img_{mode.replace(';', '_')}.{'tif' if mode in ('I', 'F', 'CMYK') else 'png'}"
    im.save(path)
    with Image.open(path) as back:
        assert back.mode == mode, f"{path.name} reopens as {back.mode}"
    return path, expected.float()


MODES = ["1", "L", "I;16", "I", "F", "P", "RGBA", "CMYK", "LA", "RGB"]


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_loads_with_its_own_scaling(mode, tmp_path):
    path, expected = _case(mode, tmp_path)
    image = load_image(path)
    assert image.shape == (3, H, W) and image.dtype == torch.float32
    assert torch.allclose(image, expected, atol=1e-6), (mode, float((image - expected).abs().max()))


@pytest.mark.parametrize("mode", ["I;16", "F", "L"])
def test_resizing_keeps_the_value_range(mode, tmp_path):
    """A constant image stays that constant through the bicubic resize, whatever its bit depth."""
    value = {"I;16": 40000, "F": 0.61, "L": 156}[mode]
    arr = np.full((H, W), value, dtype={"I;16": np.uint16, "F": np.float32, "L": np.uint8}[mode])
    path = tmp_path / f"c.{'tif' if mode == 'F' else 'png'}"
    Image.fromarray(arr).save(path)
    image = load_image(path, (20, 24))
    scale = {"I;16": 65535.0, "F": 1.0, "L": 255.0}[mode]
    assert image.shape == (3, 20, 24)
    assert torch.allclose(image, torch.full_like(image, value / scale), atol=1e-5)


def test_values_that_cannot_be_scaled_are_errors_naming_the_file(tmp_path):
    big = tmp_path / "raw32.tif"
    Image.fromarray(np.full((H, W), 70000, np.int32)).save(big)
    with pytest.raises(ValueError, match=r"raw32.tif' is 32-bit integer \(mode I\) with values in \[70000, 70000\]"):
        load_image(big)
    hdr = tmp_path / "hdr.tif"
    Image.fromarray(np.full((H, W), 3.5, np.float32)).save(hdr)
    with pytest.raises(ValueError, match=r"hdr.tif' is float \(mode F\) with values outside \[0, 1\]"):
        load_image(hdr)


def test_a_truncated_image_names_its_file(tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(_rgb()).save(path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(OSError, match=r"cannot read image '.*cut.png'"):
        load_image(path)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(OSError, match=r"cannot read image '.*junk.png'"):
        load_image(junk)


@pytest.mark.parametrize(
    ("values", "dtype", "ext"),
    [
        ((0, 255), np.uint8, "png"),
        ((0, 1), np.uint8, "png"),
        ((0, 65535), np.uint16, "png"),
        ((0, 1), np.uint16, "png"),
    ],
)
def test_masks_of_every_range_binarise_alike(values, dtype, ext, tmp_path):
    truth = np.zeros((H, W), bool)
    truth[3:7, 2:5] = True
    arr = np.where(truth, values[1], values[0]).astype(dtype)
    path = tmp_path / f"m.{ext}"
    Image.fromarray(arr).save(path)
    mask = load_mask(path)
    assert mask.shape == (1, H, W) and torch.equal(mask[0], torch.from_numpy(truth.astype(np.float32)))


def test_a_16bit_dataset_loads_like_its_8bit_copy(tmp_path):
    """16-bit grayscale is what industrial cameras write: it must not load as solid white."""
    gray8 = [np.random.default_rng(i).integers(0, 256, size=(H, W), dtype=np.uint8) for i in range(3)]
    for depth, convert in (("8", lambda g: g), ("16", lambda g: g.astype(np.uint16) * 257)):
        for i, g in enumerate(gray8):
            split = "train/good" if i < 2 else "test/good"
            folder = tmp_path / depth / "part" / split
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(convert(g)).save(folder / f"{i:03d}.png")
    for split in ("train", "test"):
        a = MVTecDataset(tmp_path / "8", split=split, image_size=None)
        b = MVTecDataset(tmp_path / "16", split=split, image_size=None)
        for i in range(len(a)):
            ia, ib = a[i]["image"], b[i]["image"]
            assert float(ib.std()) > 0.05  # not a solid image
            assert torch.allclose(ia, ib, atol=1e-6), float((ia - ib).abs().max())


def test_textures_load_with_the_image_scaling(tmp_path):
    """--texture-dir textures go through the same loader: a 16-bit texture is not solid white."""
    from raid_fast.detect.synthesis import _load_texture

    gray = _gray16(5) // 2  # values in [0, 32767]: all would clip to 255 as 8 bits
    path = tmp_path / "tex16.png"
    Image.fromarray(gray).save(path)
    tex = _load_texture(str(path), H, W)
    assert tex.shape == (H, W, 3) and tex.dtype == np.uint8
    expected = np.rint(gray / 65535.0 * 255.0)
    assert np.abs(tex[..., 0].astype(float) - expected).max() <= 1 and tex.max() <= 128
