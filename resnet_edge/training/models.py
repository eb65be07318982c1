"""The ResNet family of He et al., "Deep Residual Learning for Image Recognition" (2015), for 1x28x28 digits.

Two families share one interface (``forward_features`` / ``forward_head``, normalization inside the
model so every consumer feeds pixels in [0, 1]):

* ``resnet18`` ... ``resnet152``: the ImageNet networks (7x7 stride-2 stem, 3x3 max-pool, four stages
  that double the channels and halve the size, BasicBlock or Bottleneck, 1x1 projection shortcuts).
  They are torchvision's ``ResNet`` with a 1-channel stem; we reuse its blocks and ``_make_layer``.
* ``resnet8`` / ``resnet14`` / ``resnet20``: the small-image family of the same paper (section 4.2):
  a 3x3 stem and three stages of 16/32/64 channels with n = 1, 2, 3 BasicBlocks each (6n + 2 layers).
  We use projection shortcuts (the paper's option B) where the shape changes, as MLPerf Tiny's ResNet-8
  does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet, conv1x1, conv3x3

from resnet_edge.core.config import ARCHITECTURES, check_arch
from resnet_edge.core.contract import IMAGE_SIZE, MNIST_MEAN, MNIST_STD, NUM_CLASSES

# Every model starts with Normalize, (x - mean) / std with the training set's statistics as buffers
# (MNIST's by default; train.py sets those of a user's --data-dir), so callers pass raw [0, 1]
# intensities. In the ONNX graph it is a Sub and a Div before the first convolution.


class Normalize(nn.Module):
    """(x - mean) / std with the statistics stored as buffers, so they travel with the weights."""

    def __init__(self, mean: float = MNIST_MEAN, std: float = MNIST_STD) -> None:
        super().__init__()
        self.mean: Tensor
        self.std: Tensor
        self.register_buffer("mean", torch.tensor([mean]).view(1, 1, 1, 1))
        self.register_buffer("std", torch.tensor([std]).view(1, 1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class ImageNetResNet(ResNet):
    """torchvision's ResNet with a ``in_chans``-channel stem and normalization in front."""

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: list[int],
        *,
        in_chans: int = 1,
        num_classes: int = NUM_CLASSES,
        zero_init_residual: bool = True,
    ) -> None:
        # zero_init_residual: the last BatchNorm of each block starts at zero, so each block starts as the
        # identity (Goyal et al. 2017, "Accurate, Large Minibatch SGD", section 5.1; torchvision's docs
        # quote +0.2~0.3 % on ImageNet); it also speeds up the short schedules we train with.
        super().__init__(block, layers, num_classes=num_classes, zero_init_residual=zero_init_residual)
        self.normalize = Normalize()
        self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.normalize(x)))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class CompactResNet(nn.Module):
    """The 6n+2-layer small-image ResNet: 3x3 stem, stages of 16/32/64 channels, BasicBlocks."""

    def __init__(
        self,
        blocks_per_stage: int,
        *,
        in_chans: int = 1,
        num_classes: int = NUM_CLASSES,
        widths: tuple[int, int, int] = (16, 32, 64),
        zero_init_residual: bool = True,
    ) -> None:
        super().__init__()
        self.normalize = Normalize()
        self.conv1 = conv3x3(in_chans, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages, inplanes = [], widths[0]
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(self._make_stage(inplanes, width, blocks_per_stage, stride))
            inplanes = width
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    @staticmethod
    def _make_stage(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or inplanes != planes:
            downsample = nn.Sequential(conv1x1(inplanes, planes, stride), nn.BatchNorm2d(planes))
        layers = [BasicBlock(inplanes, planes, stride, downsample)]
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(self.normalize(x))))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def resnet8(**kwargs) -> CompactResNet:
    return CompactResNet(1, **kwargs)


def resnet14(**kwargs) -> CompactResNet:
    return CompactResNet(2, **kwargs)


def resnet20(**kwargs) -> CompactResNet:
    return CompactResNet(3, **kwargs)


def resnet18(**kwargs) -> ImageNetResNet:
    return ImageNetResNet(BasicBlock, [2, 2, 2, 2], **kwargs)


def resnet34(**kwargs) -> ImageNetResNet:
    return ImageNetResNet(BasicBlock, [3, 4, 6, 3], **kwargs)


def resnet50(**kwargs) -> ImageNetResNet:
    return ImageNetResNet(Bottleneck, [3, 4, 6, 3], **kwargs)


def resnet101(**kwargs) -> ImageNetResNet:
    return ImageNetResNet(Bottleneck, [3, 4, 23, 3], **kwargs)


def resnet152(**kwargs) -> ImageNetResNet:
    return ImageNetResNet(Bottleneck, [3, 8, 36, 3], **kwargs)


@dataclass(frozen=True)
class ModelSpec:
    builder: Callable[..., nn.Module]
    family: str  # "compact" (28x28-native) or "imagenet"


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet8": resnet8,
    "resnet14": resnet14,
    "resnet20": resnet20,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
    "resnet152": resnet152,
}
# The names and families are config.ARCHITECTURES (torch-free, so options are checked without torch).
MODELS: dict[str, ModelSpec] = {name: ModelSpec(_BUILDERS[name], family) for name, family in ARCHITECTURES.items()}


def create_model(name: str, *, mean: float = MNIST_MEAN, std: float = MNIST_STD, **kwargs) -> nn.Module:
    """Build a model by name, with the input statistics in its Normalize layer."""
    model = MODELS[check_arch(name)].builder(**kwargs)
    normalize = model.get_submodule("normalize")
    assert isinstance(normalize, Normalize)
    normalize.mean.fill_(mean)
    normalize.std.fill_(std)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, image_size: int = IMAGE_SIZE, in_chans: int = 1) -> int:
    """Multiply-accumulates of one forward pass at 1 x in_chans x image_size x image_size, as
    torch.utils.flop_counter counts them (convolutions and matrix products; FLOPs = 2 x MACs)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, in_chans, image_size, image_size))
    model.train(was_training)
    return counter.get_total_flops() // 2
