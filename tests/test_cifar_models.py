"""The CIFAR model zoo (CRD/RepDistiller architectures): exact parameter counts, feature
conventions, input normalisation, initialisation, registry."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from kdbench.api import EMBEDDING, FEATURES, PREACT_FEATURES, KDBenchError, Problem
from kdbench.registry import Registry, make_plugin_manager
from kdbench_plugins.models import cifar
from kdbench_plugins.models.cifar import ARCHS, CIFAR100_MEAN, CIFAR100_STD, CifarFactory, CifarOptions

PROBLEM = Problem("classification", 100)
ALL = frozenset({FEATURES, PREACT_FEATURES, EMBEDDING})

# RepDistiller's models with num_classes=100 (the numbers its tables report)
PARAMS = {
    "resnet8": 83_892, "resnet14": 181_108, "resnet20": 278_324, "resnet32": 472_756,
    "resnet44": 667_188, "resnet56": 861_620, "resnet110": 1_736_564,
    "resnet8x4": 1_233_540, "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916, "wrn_16_2": 703_284, "wrn_40_1": 569_780, "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028, "vgg13": 9_462_180,
}  # fmt: skip
CHANNELS = {
    **{a: [16, 16, 32, 64] for a in ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "wrn_16_1", "wrn_40_1")},
    "resnet8x4": [32, 64, 128, 256], "resnet32x4": [32, 64, 128, 256],
    "wrn_16_2": [16, 32, 64, 128], "wrn_40_2": [16, 32, 64, 128],
    "vgg8": [64, 128, 256, 512, 512], "vgg13": [64, 128, 256, 512, 512],
}  # fmt: skip
SIDES = {4: [32, 32, 16, 8], 5: [32, 16, 8, 4, 4]}  # feature map sizes for 32x32 inputs


def build(arch: str, seed: int = 0, **options) -> cifar.CifarNet:
    torch.manual_seed(seed)
    return CifarFactory().build(CifarOptions(arch=arch, **options), PROBLEM)


def images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_every_arch_is_listed_with_its_count():
    assert set(ARCHS) == set(PARAMS)


@pytest.mark.parametrize("arch", sorted(PARAMS))
def test_parameter_count_matches_repdistiller(arch):
    model = build(arch)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[arch]


@pytest.mark.parametrize("arch", sorted(PARAMS))
def test_outputs_shapes_and_describe(arch):
    model = build(arch).eval()
    with torch.no_grad():
        out = model({"pixel_values": images()}, need=ALL)
    info = model.describe()
    assert info == {"arch": arch, "feature_channels": CHANNELS[arch], "embedding_dim": CHANNELS[arch][-1]}
    assert out.logits.shape == (2, 100)
    assert len(out.features) == len(out.preact_features) == len(CHANNELS[arch])
    sides = SIDES[len(CHANNELS[arch])]
    for f, p, c, s in zip(out.features, out.preact_features, CHANNELS[arch], sides):
        assert f.shape == p.shape == (2, c, s, s)
    assert out.embedding.shape == (2, info["embedding_dim"])
    # the head reads the embedding
    torch.testing.assert_close(out.logits, model.head(out.embedding))


def test_plain_forward_computes_only_logits():
    model = build("resnet8")
    out = model({"pixel_values": images()})
    assert out.features is None and out.preact_features is None and out.embedding is None
    assert model.capabilities == frozenset({"logits", "features", "preact_features", "embedding"})
    assert model.family == "cnn"


@pytest.mark.parametrize("arch", ["resnet8", "resnet8x4", "vgg8"])
def test_post_activation_features_are_relu_of_preact(arch):
    model = build(arch).train()  # train mode: BN uses batch statistics, values are spread around 0
    out = model({"pixel_values": images(4)}, need=ALL)
    for f, p in zip(out.features, out.preact_features):
        torch.testing.assert_close(f, F.relu(p), rtol=0, atol=0)
        assert (p < 0).float().mean() > 0.1  # the preact maps really are negative somewhere
    # the embedding is the spatial mean of the last stage's output
    torch.testing.assert_close(out.embedding, out.features[-1].mean(dim=(2, 3)))


def test_wrn_preact_is_the_bn_the_next_relu_reads():
    model = build("wrn_16_2").eval()  # eval: BN is a fixed affine map we can re-apply
    with torch.no_grad():
        out = model({"pixel_values": images(3)}, need=ALL)
        f, p = out.features, out.preact_features
        torch.testing.assert_close(p[0], f[0])  # the stem has no BN
        torch.testing.assert_close(p[1], model.stages[1][0].bn1(f[1]))
        torch.testing.assert_close(p[2], model.stages[2][0].bn1(f[2]))
        torch.testing.assert_close(p[3], model.final_bn(f[3]))
    torch.testing.assert_close(out.embedding, F.relu(p[3]).mean(dim=(2, 3)))
    # WRN's stage outputs are residual sums without a ReLU: they have negative values
    assert all((x < 0).any() for x in f[1:])


def test_uint8_inputs_are_scaled_and_normalised_inside():
    model = build("resnet8").eval()
    x = images(3)
    mean, std = torch.tensor(CIFAR100_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR100_STD).view(1, 3, 1, 1)
    by_hand = (x.double() / 255.0 - mean.double()) / std.double()
    with torch.no_grad():
        from_uint8 = model({"pixel_values": x}).logits
        from_float = model({"pixel_values": by_hand.float()}).logits
    torch.testing.assert_close(from_uint8, from_float, rtol=1e-5, atol=1e-5)
    # options change the statistics; they are not saved in checkpoints
    other = build("resnet8", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)).eval()
    assert torch.equal(other.mean.flatten(), torch.zeros(3))
    assert "mean" not in model.state_dict() and "std" not in model.state_dict()


def test_deterministic_given_seed_and_functional_call():
    a, b, c = build("wrn_16_1", seed=0), build("wrn_16_1", seed=0), build("wrn_16_1", seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.stem.weight, c.stem.weight)
    a.eval()
    x = {"pixel_values": images()}
    params = {k: v.detach().clone() for k, v in a.named_parameters()}
    with torch.no_grad():
        torch.testing.assert_close(functional_call(a, (params, dict(a.named_buffers())), (x,)).logits, a(x).logits)


@pytest.mark.parametrize("arch", ["resnet8", "wrn_16_1", "vgg8"])
def test_initialisation_follows_repdistiller(arch):
    model = build(arch)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    biggest = max(convs, key=lambda m: m.weight.numel())
    fan_out = biggest.out_channels * biggest.kernel_size[0] * biggest.kernel_size[1]
    # He-normal on fan-out: std sqrt(2 / fan_out), within 3% on >=9k samples
    assert biggest.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.03)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in bns)
    if arch == "vgg8":
        assert model.head.weight.std().item() == pytest.approx(0.01, rel=0.03)
        assert all(torch.all(m.bias == 0) for m in convs)
    if arch != "resnet8":
        assert torch.all(model.head.bias == 0)


def test_depth_must_fit_the_family():
    with pytest.raises(ValueError, match="6n\\+2"):
        cifar.CifarResNet("x", CifarOptions(arch="resnet8"), 10, depth=10, widths=(16, 16, 32, 64))
    with pytest.raises(ValueError, match="6n\\+4"):
        cifar.CifarWRN("x", CifarOptions(arch="wrn_16_1"), 10, depth=18, widen=1)


def test_options_and_encode():
    with pytest.raises(ValueError, match="resnet8x4"):
        CifarOptions(arch="resnet9")
    factory = CifarFactory()
    opts = CifarOptions(arch="resnet8")
    raw = images(5).numpy()
    enc = factory.encode(opts, {"image": raw, "label": [0] * 5}, None)
    assert enc["pixel_values"].dtype == torch.uint8 and torch.equal(enc["pixel_values"], torch.from_numpy(raw))
    batch = factory.collate(enc, torch.tensor([4, 1]))
    assert torch.equal(batch["pixel_values"], torch.from_numpy(raw[[4, 1]]))
    with pytest.raises(KDBenchError, match="RGB"):
        factory.encode(opts, {"image": raw[:, :1], "label": [0] * 5}, None)
    assert factory.encoder_id(opts) == "image-uint8"
    # a regression head has one output
    assert factory.build(opts, Problem("regression", 1)).head.out_features == 1


def test_registered_as_a_plugin():
    pm, broken = make_plugin_manager()
    if not pm.is_registered(cifar):
        pm.register(cifar)
    reg = Registry(pm, broken)
    assert reg.model("cifar") is CifarFactory
    assert CifarFactory.modality == "image"
