"""``cifar``: the CIFAR networks of the CRD / RepDistiller benchmark.

Tian, Krishnan, Isola. "Contrastive Representation Distillation." ICLR 2020
(arXiv:1910.10699); architectures as in its RepDistiller code, after He et al. 2016
(ResNet), Zagoruyko & Komodakis 2016 (WRN) and Simonyan & Zisserman 2015 (VGG, with BN).

Option ``arch`` picks one of (parameters with 100 classes):

* ``resnet8/14/20/32/44/56/110`` (83,892 ... 1,736,564), ``resnet8x4`` (1,233,540),
  ``resnet32x4`` (7,433,860): post-activation basic blocks, 3 stages;
* ``wrn_16_1``, ``wrn_16_2``, ``wrn_40_1``, ``wrn_40_2`` (180,916 ... 2,255,156):
  pre-activation wide basic blocks, 3 stages, no dropout;
* ``vgg8``, ``vgg13`` (3,965,028 and 9,462,180): conv-BN-ReLU stages, no FC layers
  but the classifier.

Inputs are ``pixel_values`` (B, 3, H, W), 32x32 for CIFAR: uint8 images are scaled to
[0, 1] and normalised with ``mean``/``std`` (default: the CIFAR-100 training statistics)
inside the model, so batches travel to the device as uint8; float inputs are taken as
already normalised. The head reads the global average of the last map (RepDistiller's
``AvgPool2d(8)`` on 32x32 inputs).

Feature conventions (RepDistiller's ``is_feat`` list without its last, pooled entry, which
is ``embedding`` here):

* ``features``: the stem output, then the output of each stage. ResNet and VGG end their
  stages with a ReLU; WRN is a pre-activation network whose stage outputs are residual
  sums with no ReLU, and these sums are its features (as in RepDistiller).
* ``preact_features``: the same maps before the ReLU that follows them: for ResNet/VGG the
  tensor whose ReLU is the feature (so ``relu(preact) == feature``; for the stem, the BN
  output); for WRN the BN output that the next ReLU reads (the next stage's first BN, the
  final BN for the last stage), i.e. RepDistiller's ``preact=True`` maps, taken from the
  forward pass itself instead of re-running the BN. WRN's stem has no BN: its preact is
  the stem output.
* ``embedding``: the pooled vector fed to the classifier, (B, D).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kdbench.api import (
    EMBEDDING,
    FEATURES,
    LOGITS,
    PREACT_FEATURES,
    Encoded,
    Examples,
    KDBenchError,
    KDModel,
    ModelFactory,
    ModelFacts,
    ModelOutput,
    Objective,
    Options,
    Problem,
)
from kdbench.hookspecs import hookimpl

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)  # RepDistiller's normalisation
CIFAR100_STD = (0.2675, 0.2565, 0.2761)

_THIN, _X4 = (16, 16, 32, 64), (32, 64, 128, 256)
_VGG8 = ((64,), (128,), (256,), (512,), (512,))
_VGG13 = ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512))

#: arch name -> (family, constructor arguments).
ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    **{f"resnet{d}": ("resnet", {"depth": d, "widths": _THIN}) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": ("resnet", {"depth": 8, "widths": _X4}),
    "resnet32x4": ("resnet", {"depth": 32, "widths": _X4}),
    **{f"wrn_{d}_{k}": ("wrn", {"depth": d, "widen": k}) for d in (16, 40) for k in (1, 2)},
    "vgg8": ("vgg", {"stages": _VGG8}),
    "vgg13": ("vgg", {"stages": _VGG13}),
}

ArchName = Literal[tuple(ARCHS)]  # type: ignore[valid-type]


class CifarOptions(Options):
    arch: ArchName = Field(description="architecture name, e.g. resnet32x4, wrn_40_2, vgg13")  # type: ignore[valid-type]
    mean: tuple[float, float, float] = Field(CIFAR100_MEAN, description="per-channel mean of [0,1] pixels")
    std: tuple[float, float, float] = Field(CIFAR100_STD, description="per-channel std of [0,1] pixels")


def _conv3x3(c_in: int, c_out: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)


# --------------------------------------------------------------------------- blocks


class ResidualBlock(nn.Module):
    """Post-activation basic block: relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)).
    Returns (output, the sum before its ReLU)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(c_in, c_out, stride), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = _conv3x3(c_out, c_out), nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = F.relu(self.bn1(self.conv1(x)))
        pre = self.bn2(self.conv2(h)) + (x if self.shortcut is None else self.shortcut(x))
        return F.relu(pre), pre


class WideBlock(nn.Module):
    """Pre-activation wide basic block: conv(relu(bn(conv(relu(bn(x)))))) + shortcut.
    The shortcut is x itself, or a 1x1 conv of relu(bn(x)) when the width or stride
    changes. Returns (output, bn1(x)): the normalised input before its ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c_in), _conv3x3(c_in, c_out, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(c_out), _conv3x3(c_out, c_out)
        self.shortcut: nn.Module | None = None
        if c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pre_in = self.bn1(x)
        h = F.relu(pre_in)
        out = self.conv2(F.relu(self.bn2(self.conv1(h))))
        return out + (x if self.shortcut is None else self.shortcut(h)), pre_in


# --------------------------------------------------------------------------- networks


class CifarNet(KDModel):
    """Common input handling and head; subclasses implement :meth:`body`."""

    capabilities = frozenset({LOGITS, FEATURES, PREACT_FEATURES, EMBEDDING})
    family = "cnn"

    def __init__(self, arch: str, options: CifarOptions):
        super().__init__()
        self.arch = arch
        # non-persistent: checkpoints hold weights only; the options rebuild these
        self.register_buffer("mean", torch.tensor(options.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(options.std).view(1, 3, 1, 1), persistent=False)
        self.feature_channels: list[int] = []

    def body(self, x: Tensor) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """(features, preact features, the last post-activation map that is pooled)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"arch": self.arch, "feature_channels": list(self.feature_channels), "embedding_dim": self.head.in_features}

    def forward(self, inputs: dict[str, Tensor], need: frozenset[str] = frozenset()) -> ModelOutput:
        x = inputs["pixel_values"]
        if x.dtype == torch.uint8:
            x = (x.float() / 255.0 - self.mean) / self.std
        feats, preacts, last = self.body(x)
        emb = last.mean(dim=(2, 3))
        return ModelOutput(
            logits=self.head(emb),
            features=tuple(feats) if FEATURES in need else None,
            preact_features=tuple(preacts) if PREACT_FEATURES in need else None,
            embedding=emb if EMBEDDING in need else None,
        )

    def _init_convs(self) -> None:
        """RepDistiller's initialisation: He-normal (fan-out) convs, BN scale 1 / shift 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


class CifarResNet(CifarNet):
    """ResNet-(6n+2): a 3x3 stem then 3 stages of n basic blocks (strides 1, 2, 2)."""

    def __init__(self, arch: str, options: CifarOptions, num_outputs: int, depth: int, widths: tuple[int, ...]):
        super().__init__(arch, options)
        if (depth - 2) % 6:
            raise ValueError(f"ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(_conv3x3(3, widths[0]), nn.BatchNorm2d(widths[0]))
        stages, c_in = [], widths[0]
        for i, c in enumerate(widths[1:]):
            stride = 1 if i == 0 else 2
            stages.append(nn.ModuleList(ResidualBlock(c_in if j == 0 else c, c, stride if j == 0 else 1) for j in range(n)))
            c_in = c
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(c_in, num_outputs)
        self.feature_channels = list(widths)
        self._init_convs()

    def body(self, x: Tensor) -> tuple[list[Tensor], list[Tensor], Tensor]:
        pre = self.stem(x)
        x = F.relu(pre)
        feats, preacts = [x], [pre]
        for stage in self.stages:
            for block in stage:
                x, pre = block(x)
            feats.append(x)
            preacts.append(pre)
        return feats, preacts, x


class CifarWRN(CifarNet):
    """WRN-d-k: a 3x3 stem, 3 stages of (d-4)/6 wide blocks of widths 16k, 32k, 64k
    (strides 1, 2, 2), then BN-ReLU before pooling."""

    def __init__(self, arch: str, options: CifarOptions, num_outputs: int, depth: int, widen: int):
        super().__init__(arch, options)
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.stem = _conv3x3(3, widths[0])
        stages, c_in = [], widths[0]
        for i, c in enumerate(widths[1:]):
            stride = 1 if i == 0 else 2
            stages.append(nn.ModuleList(WideBlock(c_in if j == 0 else c, c, stride if j == 0 else 1) for j in range(n)))
            c_in = c
        self.stages = nn.ModuleList(stages)
        self.final_bn = nn.BatchNorm2d(c_in)
        self.head = nn.Linear(c_in, num_outputs)
        self.feature_channels = list(widths)
        self._init_convs()
        nn.init.zeros_(self.head.bias)

    def body(self, x: Tensor) -> tuple[list[Tensor], list[Tensor], Tensor]:
        x = self.stem(x)
        feats, preacts = [x], [x]
        for stage in self.stages:
            for j, block in enumerate(stage):
                x, pre_in = block(x)
                if j == 0 and len(feats) > 1:  # the BN about to activate the previous stage's output
                    preacts.append(pre_in)
            feats.append(x)
        pre = self.final_bn(x)
        preacts.append(pre)
        return feats, preacts, F.relu(pre)


class CifarVGG(CifarNet):
    """VGG with BN, no FC layers: 5 stages of conv3x3-BN-ReLU, 2x2 max-pool after the
    first three (32 -> 4 pixels), global average pooling, a linear classifier."""

    def __init__(self, arch: str, options: CifarOptions, num_outputs: int, stages: tuple[tuple[int, ...], ...]):
        super().__init__(arch, options)
        blocks, c_in = [], 3
        for widths in stages:
            layers: list[nn.Module] = []
            for c in widths:
                layers += [_conv3x3(c_in, c, bias=True), nn.BatchNorm2d(c), nn.ReLU()]
                c_in = c
            blocks.append(nn.Sequential(*layers[:-1]))  # the stage's last ReLU is applied in body()
        self.stages = nn.ModuleList(blocks)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(c_in, num_outputs)
        self.feature_channels = [s[-1] for s in stages]
        self._init_convs()
        nn.init.normal_(self.head.weight, 0.0, 0.01)
        nn.init.zeros_(self.head.bias)

    def body(self, x: Tensor) -> tuple[list[Tensor], list[Tensor], Tensor]:
        feats, preacts = [], []
        for i, stage in enumerate(self.stages):
            if 0 < i < 4:
                x = self.pool(x)
            pre = stage(x)
            x = F.relu(pre)
            feats.append(x)
            preacts.append(pre)
        return feats, preacts, x


_CONSTRUCTORS: dict[str, type[CifarNet]] = {"resnet": CifarResNet, "wrn": CifarWRN, "vgg": CifarVGG}


class CifarFactory(ModelFactory):
    name = "cifar"
    description = "CRD/RepDistiller CIFAR networks: resnet8..110, resnet8x4/32x4, wrn_16/40_1/2, vgg8/13 (BN)."
    modality = "image"
    Options = CifarOptions
    capabilities = CifarNet.capabilities
    family = CifarNet.family

    def build(self, options: CifarOptions, objective: Objective | Problem) -> CifarNet:
        family, kwargs = ARCHS[options.arch]
        num_outputs = objective.num_outputs()
        return _CONSTRUCTORS[family](options.arch, options, num_outputs, **kwargs)

    def encode(self, options: CifarOptions, examples: Examples, max_length: int | None) -> Encoded:
        images = torch.as_tensor(examples["image"])
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise KDBenchError(
                f"cifar models read uint8 RGB images (N, 3, H, W); this task gives {images.dtype} {tuple(images.shape)}"
            )
        return {"pixel_values": images}

    def encoder_id(self, options: CifarOptions) -> str:
        return "image-uint8"  # the same bytes as the 'cnn' family: teachers and students may mix

    def inspect(self, options: CifarOptions) -> ModelFacts:
        """Its feature maps, from the network built on the meta device (shapes, no memory),
        so ``kdbench validate`` refuses a feature index beyond them."""
        with torch.device("meta"):
            facts = self.build(options, Problem("classification", 2)).describe()
        return ModelFacts(f"cifar {options.arch}", self.family, self.capabilities, self.encoder_id(options), facts)


@hookimpl
def kdbench_models() -> list[type[ModelFactory]]:
    return [CifarFactory]
