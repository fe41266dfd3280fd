"""Encoder registry: offline ImageNet weights, frozen features, preprocessing, clear errors."""

from __future__ import annotations

import json
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from showtell.encoders import (
    Encoder,
    Preprocess,
    _load_paired_state_dict,
    create_encoder,
    encoder_info,
    list_encoders,
)
from showtell.errors import ShowtellError

NAMES = ["efficientnet_lite0", "efficientnet_lite2", "efficientnet_lite0+2", "resnet50", "resnet101", "resnet152"]
CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


@pytest.fixture(scope="module")
def lite() -> dict[str, Encoder]:
    return {name: create_encoder(name) for name in ("efficientnet_lite0", "efficientnet_lite2")}


def _batch(enc: Encoder, *arrays: np.ndarray) -> torch.Tensor:
    tf = enc.preprocess.transform()
    return torch.stack([tf(Image.fromarray(a)) for a in arrays])


def _last_stage_prefixes(name: str) -> tuple[str, ...]:
    if name.startswith("resnet"):
        return ("backbone.layer4.",)
    if name == "efficientnet_lite0+2":
        return tuple(f"parts.{i}.{p}" for i in (0, 1) for p in _last_stage_prefixes("efficientnet_lite2"))
    return ("model.blocks.6.", "model.conv_head.", "model.bn2.")


def test_registry_lists_six_encoders_with_their_preprocessing() -> None:
    assert list_encoders() == NAMES
    info = encoder_info("efficientnet_lite2")
    assert info == json.loads(json.dumps(info))
    assert info["feature_dim"] == 1280 and info["offline"] is True
    assert info["preprocess"] == {
        "size": 260, "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0,
    }
    assert encoder_info("efficientnet_lite0")["preprocess"]["size"] == 224
    pair = encoder_info("efficientnet_lite0+2")
    assert pair["feature_dim"] == 2560 and pair["offline"] is True and pair["preprocess"] == info["preprocess"]
    res = encoder_info("resnet50")
    assert res["feature_dim"] == 2048 and res["offline"] is False
    assert res["preprocess"] == {"size": 224, "interpolation": "bilinear", "mean": [0.485, 0.456, 0.406],
                                 "std": [0.229, 0.224, 0.225], "crop_pct": 0.875}


def test_registry_facts_are_the_libraries_and_it_imports_no_training_config() -> None:
    """Size, interpolation, mean and std are timm's pretrained_cfg (EfficientNet-Lite) and torchvision's weight
    transforms (ResNets), the feature size the built network's; the registry does not import showtell.config."""
    import subprocess
    import sys

    import timm
    import torchvision

    for variant in (0, 2):
        cfg = timm.get_pretrained_cfg(f"tf_efficientnet_lite{variant}")
        pre = encoder_info(f"efficientnet_lite{variant}")["preprocess"]
        assert (pre["size"], pre["interpolation"], tuple(pre["mean"]), tuple(pre["std"])) == (
            cfg.input_size[-1], cfg.interpolation, cfg.mean, cfg.std)
    t = torchvision.models.ResNet152_Weights.IMAGENET1K_V1.transforms()
    assert encoder_info("resnet152")["preprocess"]["crop_pct"] == t.crop_size[0] / t.resize_size[0]
    code = "import sys, showtell.encoders; print('showtell.config' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout == "False\n"


def test_unknown_name_lists_available_encoders() -> None:
    for call in (create_encoder, encoder_info):
        with pytest.raises(ShowtellError, match="unknown encoder 'vgg16'; available: efficientnet_lite0, ") as e:
            call("vgg16")
        assert all(name in str(e.value) for name in NAMES)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2"])
def test_offline_weights_are_imagenet_weights(lite: dict[str, Encoder], name: str) -> None:
    enc = lite[name]
    with torch.inference_mode():
        probs = enc.classify(_batch(enc, skdata.chelsea(), skdata.coffee())).softmax(-1)
    cat_top5, coffee_top5 = probs.topk(5).indices.tolist()
    assert CAT_CLASSES & set(cat_top5), cat_top5
    assert cat_top5[0] == 285  # Egyptian cat
    assert coffee_top5[0] == ESPRESSO and not CAT_CLASSES & set(coffee_top5), coffee_top5
    assert probs[1, ESPRESSO] > 0.8
    assert probs[0, list(CAT_CLASSES)].sum() > 0.6


def test_paired_encoder_gives_both_networks_features_side_by_side(lite: dict[str, Encoder]) -> None:
    pair = create_encoder("efficientnet_lite0+2")
    x = _batch(pair, skdata.chelsea(), skdata.coffee())  # 260 x 260: both networks see the same pixels
    with torch.inference_mode():
        feats = pair(x)
        expected = torch.cat([lite["efficientnet_lite0"](x), lite["efficientnet_lite2"](x)], dim=-1)
        assert torch.allclose(feats, expected, atol=1e-5)
        assert torch.equal(pair.classify(x), lite["efficientnet_lite2"].classify(x))


@pytest.mark.parametrize("name", NAMES)
def test_features_shape_dtype_and_frozen(lite: dict[str, Encoder], name: str) -> None:
    enc = lite[name] if name in lite else create_encoder(name, pretrained=False)
    assert enc.name == name and enc.preprocess == Preprocess.from_dict(encoder_info(name)["preprocess"])
    x = _batch(enc, skdata.chelsea(), skdata.coffee())
    with torch.inference_mode():
        feats = enc(x)
    assert feats.shape == (2, enc.feature_dim) == (2, encoder_info(name)["feature_dim"])
    assert feats.dtype == torch.float32 and torch.isfinite(feats).all()
    assert not torch.allclose(feats[0], feats[1])
    assert not enc.training
    assert not any(p.requires_grad for p in enc.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_feature_map_is_the_grid_whose_mean_is_the_pooled_vector(lite: dict[str, Encoder], name: str) -> None:
    enc = lite[name] if name in lite else create_encoder(name, pretrained=False)
    info = encoder_info(name)
    x = _batch(enc, skdata.chelsea(), skdata.coffee())
    with torch.inference_mode():
        grid, pooled = enc.feature_map(x), enc(x)
    # Lite0 at 224 px: 7 x 7 x 1280; Lite2 (and the pair) at 260 px: 9 x 9; ResNets at 224: 7 x 7 x 2048
    side = {"efficientnet_lite0": 7, "efficientnet_lite2": 9, "efficientnet_lite0+2": 9}.get(name, 7)
    assert info["grid"] == side
    assert grid.shape == (2, side * side, info["feature_dim"]) and grid.dtype == torch.float32
    assert torch.allclose(grid.mean(1), pooled, atol=1e-4)
    assert not torch.allclose(grid[0, 0], grid[0, -1])  # positions differ: a real map, not a broadcast vector


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet50"])
def test_train_mode_keeps_frozen_batchnorm_in_eval(name: str) -> None:
    enc = create_encoder(name, pretrained=name == "efficientnet_lite0")
    x = _batch(enc, skdata.chelsea())
    with torch.no_grad():
        eval_out = enc(x)
        enc.train()
        train_out = enc(x)
    assert enc.training
    assert torch.equal(eval_out, train_out)
    bns = [m for m in enc.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)


@pytest.mark.parametrize("name", ["efficientnet_lite2", "efficientnet_lite0+2", "resnet50"])
def test_fine_tune_unfreezes_exactly_the_last_stage(name: str) -> None:
    enc = create_encoder(name, pretrained=False, fine_tune=True)
    prefixes = _last_stage_prefixes(name)
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    expected = {n for n, _ in enc.named_parameters() if n.startswith(prefixes)}
    assert trainable == expected
    assert 0 < len(expected) < len(list(enc.parameters()))
    # classifier head stays frozen
    assert not any("classifier" in n or n.startswith("fc.") for n in trainable)

    enc.train()
    for n, m in enc.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert m.training == (n + ".").startswith(prefixes), n
    x = torch.randn(2, 3, 64, 64)
    enc(x).sum().backward()
    assert all((p.grad is not None) == (n in expected) for n, p in enc.named_parameters())

    enc.set_fine_tune(False)
    assert not any(p.requires_grad for p in enc.parameters())
    assert not any(m.training for m in enc.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_preprocess_round_trip_and_validation() -> None:
    pre = Preprocess(size=224, interpolation="bilinear", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                     crop_pct=0.875)
    d = json.loads(json.dumps(pre.to_dict()))
    assert Preprocess.from_dict(d) == pre
    assert Preprocess.from_dict({k: v for k, v in d.items() if k != "crop_pct"}).crop_pct == 1.0
    with pytest.raises(ShowtellError, match="interpolation"):
        Preprocess.from_dict({**d, "interpolation": "lanczos"})
    with pytest.raises(ShowtellError, match="size"):
        Preprocess.from_dict({k: v for k, v in d.items() if k != "size"})


def test_transforms_eval_deterministic_train_random() -> None:
    pre = Preprocess.from_dict(encoder_info("resnet50")["preprocess"])
    img = Image.fromarray(skdata.astronaut()).resize((400, 300))
    eval_tf, train_tf = pre.transform(), pre.transform(train=True)
    a, b = eval_tf(img), eval_tf(img)
    assert a.shape == (3, 224, 224) and a.dtype == torch.float32 and torch.equal(a, b)
    assert eval_tf(img.convert("L")).shape == (3, 224, 224)
    torch.manual_seed(0)
    outs = [train_tf(img) for _ in range(6)]
    assert all(o.shape == (3, 224, 224) for o in outs)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("name", ["efficientnet_lite2", "resnet50"])  # bicubic no crop; bilinear with a crop
def test_uint8_pixels_normalized_later_are_the_eval_transform_bit_for_bit(name: str) -> None:
    pre = Preprocess.from_dict(encoder_info(name)["preprocess"])
    rng = np.random.default_rng(0)
    images = [Image.fromarray(skdata.astronaut()).resize((400, 300)), Image.fromarray(skdata.camera()),
              Image.fromarray(rng.integers(0, 256, (13, 700, 3), dtype=np.uint8)).convert("RGBA")]
    pixels = torch.stack([pre.pixels()(img) for img in images])
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 3, pre.size, pre.size)
    assert torch.equal(pre.normalize(pixels), torch.stack([pre.transform()(img) for img in images]))


def test_eval_transform_with_crop_pct_one_keeps_the_whole_photo() -> None:
    pre = Preprocess.from_dict(encoder_info("efficientnet_lite2")["preprocess"])
    img = Image.fromarray(skdata.chelsea()).resize((260, 260))
    expected = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255 * 2 - 1
    assert torch.allclose(pre.transform()(img), expected, atol=1e-6)


def test_resnet_without_network_names_offline_encoders(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))  # no cached weights
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(ShowtellError) as e:
        create_encoder("resnet50", pretrained=True)
    msg = str(e.value)
    assert "\n" not in msg and "could not download" in msg
    assert "efficientnet_lite0" in msg and "efficientnet_lite2" in msg


def test_mismatched_weights_file_names_the_first_bad_pair(tmp_path) -> None:
    enc = create_encoder("efficientnet_lite0", pretrained=False)
    sd = dict(enc.model.state_dict())
    keys = list(sd)
    sd[keys[6]] = torch.zeros(7, 1, 3, 3)  # blocks.0.0.conv_dw.weight has shape (32, 1, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(ShowtellError, match=r"blocks\.0\.0\.conv_dw\.weight \(7, 1, 3, 3\) vs .*\(32, 1, 3, 3\)"):
        _load_paired_state_dict(enc.model, path)
