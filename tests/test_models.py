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


def test_resnet18_is_about_11_17_million():
    assert 11.17e6 <= count_parameters(create_model("resnet18")) < 11.18e6


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
