"""Tests for nrd_dist.models: registry, output shapes, parameter counts against the
reference architectures, PreAct block structure, random init and gradients."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nrd_dist.models import MODELS, PreActBlock, build_model

ARCHS = ("small_cnn", "preact_resnet18", "preact_resnet34", "resnet50")


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def preact_param_count(num_blocks, num_classes, in_channels=3, final_bn=True):
    """Parameter count of the CIFAR PreAct ResNet, from the architecture's definition
    (kuangliu/pytorch-cifar PreActResNet; ``final_bn`` adds the bn -> relu before the
    pooling that the GJS code and He et al. (2016) put after the last block)."""
    bn = lambda c: 2 * c  # noqa: E731  (weight + bias)
    conv = lambda cin, cout, k: cin * cout * k * k  # noqa: E731  (no bias)
    total = conv(in_channels, 64, 3)
    in_planes = 64
    for planes, blocks, stride in zip((64, 128, 256, 512), num_blocks, (1, 2, 2, 2)):
        for s in [stride] + [1] * (blocks - 1):
            total += bn(in_planes) + conv(in_planes, planes, 3) + bn(planes) + conv(planes, planes, 3)
            if s != 1 or in_planes != planes:
                total += conv(in_planes, planes, 1)  # 1x1 projection, no BN
            in_planes = planes
    if final_bn:
        total += bn(512)
    return total + 512 * num_classes + num_classes


# ----------------------------------------------------------------------------- registry


def test_registry_and_unknown_arch():
    assert set(ARCHS) <= set(MODELS)
    with pytest.raises(ValueError, match=r"model\.arch") as info:
        build_model("resnet18_typo", num_classes=10)
    assert "resnet18_typo" in str(info.value)


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    "arch,num_classes,in_channels,side",
    [
        ("small_cnn", 10, 1, 28),
        ("small_cnn", 7, 3, 32),
        ("preact_resnet18", 100, 3, 32),
        ("preact_resnet34", 100, 3, 32),
        ("preact_resnet18", 10, 1, 28),
        ("resnet50", 50, 3, 64),
        ("resnet50", 50, 1, 64),
    ],
)
def test_forward_shapes(arch, num_classes, in_channels, side):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=num_classes, in_channels=in_channels)
    x = torch.randn(2, in_channels, side, side)
    for mode in (True, False):  # train (batch statistics) and eval (running statistics)
        model.train(mode)
        with torch.no_grad():
            out = model(x)
        assert out.shape == (2, num_classes)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_wrong_in_channels_is_rejected():
    model = build_model("resnet50", num_classes=5, in_channels=1)
    with pytest.raises(RuntimeError):
        model(torch.randn(1, 3, 64, 64))


# ----------------------------------------------------------------------------- parameter counts


def test_param_count_formula_reproduces_the_published_numbers():
    # kuangliu/pytorch-cifar PreActResNet18 (10 classes, no final BN): 11,171,146.
    assert preact_param_count([2, 2, 2, 2], 10, final_bn=False) == 11_171_146


@pytest.mark.parametrize(
    "arch,blocks,reference",
    [
        ("preact_resnet18", [2, 2, 2, 2], 11_171_146),
        ("preact_resnet34", [3, 4, 6, 3], 21_282_122),
    ],
)
def test_preact_param_counts(arch, blocks, reference):
    model = build_model(arch, num_classes=10)
    count = n_params(model)
    # Exactly the PreAct ResNet with 1x1 no-BN projection shortcuts and a final
    # bn -> relu before pooling (the final BN adds 1,024 parameters).
    assert count == preact_param_count(blocks, 10, final_bn=True)
    assert abs(count - reference) / reference < 0.01
    assert n_params(build_model(arch, num_classes=100)) == preact_param_count(blocks, 100)
    assert n_params(build_model(arch, num_classes=10, in_channels=1)) == preact_param_count(blocks, 10, 1)


def test_exact_preact_counts():
    assert n_params(build_model("preact_resnet18", 10)) == 11_172_170
    assert n_params(build_model("preact_resnet34", 10)) == 21_280_330


def test_resnet50_param_counts():
    assert n_params(build_model("resnet50", num_classes=1000)) == 25_557_032  # torchvision's
    # Only the head depends on the class count, only the stem on the input channels.
    assert n_params(build_model("resnet50", num_classes=50)) == 25_557_032 - 950 * 2049
    assert n_params(build_model("resnet50", num_classes=1000, in_channels=1)) == 25_557_032 - 2 * 64 * 49


# ----------------------------------------------------------------------------- PreAct structure


@pytest.mark.parametrize("arch,blocks", [("preact_resnet18", [2, 2, 2, 2]), ("preact_resnet34", [3, 4, 6, 3])])
def test_preact_structure(arch, blocks):
    model = build_model(arch, num_classes=10)
    assert isinstance(model.conv1, nn.Conv2d) and model.conv1.kernel_size == (3, 3)
    assert model.conv1.stride == (1, 1)  # CIFAR stem: no downsampling, no max-pool
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    stages = [model.layer1, model.layer2, model.layer3, model.layer4]
    assert [len(s) for s in stages] == blocks
    for i, stage in enumerate(stages):
        for j, block in enumerate(stage):
            assert isinstance(block, PreActBlock)
            if i > 0 and j == 0:  # downsampling: 1x1 strided conv, no BN, no bias
                sc = block.shortcut
                assert isinstance(sc, nn.Conv2d) and sc.kernel_size == (1, 1) and sc.stride == (2, 2)
                assert sc.bias is None
            else:
                assert block.shortcut is None
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert n_bn == 2 * sum(blocks) + 1  # two per block + the final one


def test_preact_block_forward_matches_reference():
    torch.manual_seed(0)
    for block in (PreActBlock(64, 128, stride=2), PreActBlock(64, 64, stride=1)):
        for bn in (block.bn1, block.bn2):  # non-trivial BN so any misplaced BN shows
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.5, 0.5)
        block.eval()
        x = torch.randn(2, 64, 8, 8)
        pre = F.relu(block.bn1(x))
        out = block.conv2(F.relu(block.bn2(block.conv1(pre))))
        # The projection sees the pre-activated input; the identity shortcut the raw input.
        expected = out + (block.shortcut(pre) if block.shortcut is not None else x)
        with torch.no_grad():
            torch.testing.assert_close(block(x), expected)


def test_preact_head_is_bn_relu_pool_linear():
    torch.manual_seed(0)
    model = build_model("preact_resnet18", num_classes=10).eval()
    with torch.no_grad():
        model.bn.bias.fill_(-0.3)  # so the ReLU clips something
        model.bn.running_mean.uniform_(-0.2, 0.2)
    seen = {}
    model.layer4.register_forward_hook(lambda m, i, o: seen.__setitem__("trunk", o))
    model.linear.register_forward_hook(lambda m, i, o: seen.__setitem__("features", i[0]))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        trunk = seen["trunk"]
        assert trunk.shape == (2, 512, 4, 4)
        features = F.relu(model.bn(trunk)).mean(dim=(2, 3))
        torch.testing.assert_close(seen["features"], features)
        torch.testing.assert_close(logits, model.linear(features))
    assert (seen["features"] >= 0).all() and (seen["features"] == 0).any()


# ----------------------------------------------------------------------------- init, gradients


@pytest.mark.parametrize("arch", ARCHS)
def test_random_init_not_pretrained(arch):
    in_ch = 1 if arch == "small_cnn" else 3
    torch.manual_seed(0)
    a = build_model(arch, num_classes=10, in_channels=in_ch)
    b = build_model(arch, num_classes=10, in_channels=in_ch)
    torch.manual_seed(0)
    c = build_model(arch, num_classes=10, in_channels=in_ch)
    wa = [p for p in a.parameters() if p.dim() > 1]
    wb = [p for p in b.parameters() if p.dim() > 1]
    wc = [p for p in c.parameters() if p.dim() > 1]
    # Every weight tensor differs between two builds (fresh random init, no loaded weights)...
    assert all(not torch.equal(x, y) for x, y in zip(wa, wb))
    # ...and the init follows torch's RNG.
    assert all(torch.equal(x, y) for x, y in zip(wa, wc))


@pytest.mark.parametrize(
    "arch,num_classes,in_channels,side",
    [
        ("small_cnn", 10, 1, 28),
        ("preact_resnet18", 10, 3, 32),
        ("preact_resnet34", 100, 3, 16),  # 16 px keeps it fast; layer4 is still 2x2
        ("resnet50", 50, 3, 64),
    ],
)
def test_backward_gives_finite_grads_everywhere(arch, num_classes, in_channels, side):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=num_classes, in_channels=in_channels).train()
    x = torch.randn(2, in_channels, side, side)
    y = torch.randint(num_classes, (2,))
    F.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
    # Some gradient is non-zero in the stem and in the head.
    first, last = list(model.parameters())[0], list(model.parameters())[-1]
    assert first.grad.abs().sum() > 0 and last.grad.abs().sum() > 0


def test_small_cnn_hidden_units_cannot_all_die():
    """The sweep's v1 small_cnn (no BatchNorm before the hidden ReLU) lost every hidden unit
    at 60-80% label noise: once all pre-activations are negative no gradient reaches them
    again and the network predicts a constant. Pushed into exactly that state (every
    pre-activation negative), the hidden layer must still be active on part of each
    training batch and every unit must still get a gradient."""
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1).train()
    hidden = next(m for m in model.modules() if isinstance(m, nn.Linear))
    with torch.no_grad():
        hidden.weight.copy_(-hidden.weight.abs())  # its inputs are >= 0 (after ReLU and pooling)
    layers = list(model)
    x = torch.rand(64, 1, 28, 28)
    assert (nn.Sequential(*layers[: layers.index(hidden) + 1])(x) <= 0).all()
    active = nn.Sequential(*layers[:-1])(x) > 0  # everything but the classifier
    assert active.any(0).all(), f"{int((~active.any(0)).sum())} hidden units dead on the whole batch"
    F.cross_entropy(model(x), torch.randint(0, 10, (64,))).backward()
    assert (hidden.weight.grad.abs().sum(1) > 0).all()
