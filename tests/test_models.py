from __future__ import annotations

import pytest
import torch
from torchvision.models.resnet import BasicBlock, Bottleneck

from resnet_edge.training.models import MODELS, count_macs, count_parameters, create_model

EXPECTED_PARAMS = {  # 1 input channel, 10 classes
    "resnet8": 77_754, "resnet14": 174_970, "resnet20": 272_186,
    "resnet18": 11_175_370, "resnet34": 21_283_530, "resnet50": 23_522_250,
    "resnet101": 42_514_378, "resnet152": 58_158_026,
}


@pytest.mark.parametrize("name", list(MODELS))
def test_shape_and_parameters(name):
    model = create_model(name).eval()
    with torch.no_grad():
        out = model(torch.rand(3, 1, 28, 28))
    assert out.shape == (3, 10)
    assert count_parameters(model) == EXPECTED_PARAMS[name]


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_imagenet_family_is_torchvisions_network_with_a_1_channel_stem_and_10_classes(name):
    """Derived from torchvision, not from our own table: the same tensors of the same shapes, except the
    stem's input channels (3 -> 1), the classifier's outputs (1000 -> 10) and Normalize's two buffers."""
    import torchvision

    reference = getattr(torchvision.models, name)()  # the published network: resnet18 has 11,689,512
    ours = create_model(name)
    theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert mine.keys() - theirs.keys() == {"normalize.mean", "normalize.std"} and theirs.keys() <= mine.keys()
    changed = {k for k in theirs if mine[k] != theirs[k]}
    assert changed == {"conv1.weight", "fc.weight", "fc.bias"}, changed
    assert mine["conv1.weight"] == (64, 1, 7, 7) and mine["fc.weight"][0] == mine["fc.bias"][0] == 10
    features = reference.fc.in_features  # 512 (BasicBlock) or 2048 (Bottleneck)
    published = count_parameters(reference)
    assert count_parameters(ours) == published - 2 * 64 * 7 * 7 - (1000 - 10) * (features + 1)


def test_architecture_follows_the_paper():
    r18, r50, r8 = create_model("resnet18").eval(), create_model("resnet50"), create_model("resnet8")
    assert r18.conv1.kernel_size == (7, 7) and r18.conv1.stride == (2, 2) and r18.conv1.in_channels == 1
    assert r18.maxpool.kernel_size == 3
    assert all(isinstance(b, BasicBlock) for b in r18.layer1) and all(isinstance(b, Bottleneck) for b in r50.layer1)
    assert [r18.layer1[0].conv1.out_channels, r18.layer4[0].conv1.out_channels] == [64, 512]
    # 1x1 projection shortcut where the shape changes, identity where it does not
    assert r18.layer2[0].downsample[0].kernel_size == (1, 1) and r18.layer1[0].downsample is None
    assert r8.conv1.kernel_size == (3, 3) and [r8.layer1[0].conv1.out_channels, r8.layer3[0].conv1.out_channels] == [16, 64]
    with torch.no_grad():
        assert r18.forward_features(torch.rand(1, 1, 28, 28)).shape == (1, 512, 1, 1)


def test_macs_counts_convolutions():
    # resnet8 at 28x28: stem 16*9*784 + stage 1 (2 convs 16->16 at 28x28) dominate; ~9.3 M
    assert 9.0e6 < count_macs(create_model("resnet8")) < 9.6e6
