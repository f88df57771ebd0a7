"""ResNet with a CBAM attention module in every residual block (Woo et al., ECCV 2018), as the scar seed used it.

Layout as the scar seed's image model: bottleneck blocks [3, 4, 6, 3] (ResNet-50), CBAM on the
residual branch after the last batch norm and before the shortcut add (channel attention from
average- and max-pooled descriptors through one shared MLP with reduction 16, then spatial
attention from the channel max and mean through a 7x7 conv + BN), global average pooling, and
the seed's head ``C-512-64-classes`` with ReLU and dropout 0.5. ``width`` (64 in ResNet-50)
scales every channel count and the head, and ``layers`` the depth, so a small variant can serve
as demo weights. Parameter names follow the seed's ResNet (``layer1.0.conv1``, ``fc1``...), so
its checkpoints load after renaming only the CBAM gates (``tasks.scar.seed_state_dict``).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

EXPANSION = 4


class ChannelGate(nn.Module):
    """Channel attention: sigmoid(MLP(avgpool(x)) + MLP(maxpool(x))), one weight in [0, 1] per channel."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, 1, 1) weights in [0, 1]."""
        logits = self.mlp(x.mean(dim=(2, 3))) + self.mlp(x.amax(dim=(2, 3)))
        return torch.sigmoid(logits)[:, :, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention(x)


class SpatialGate(nn.Module):
    """Spatial attention: sigmoid(BN(conv7x7([max_c(x), mean_c(x)]))), one weight in [0, 1] per position."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=(kernel_size - 1) // 2, bias=False)
        # The reference implementation's BN settings (momentum 0.01), kept so seed weights behave alike.
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) weights in [0, 1]."""
        pooled = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.bn(self.conv(pooled)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention(x)


class CBAM(nn.Module):
    """Channel attention, then spatial attention."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.channel = ChannelGate(channels, reduction)
        self.spatial = SpatialGate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(self.channel(x))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 x4 convolutions with BN, CBAM on the branch, then the shortcut add."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, reduction: int = 16) -> None:
        super().__init__()
        out = planes * EXPANSION
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
        self.cbam = CBAM(out, reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.cbam(self.bn3(self.conv3(out)))
        return self.relu(out + shortcut)


class CBAMResNet(nn.Module):
    """ImageNet-style stem (7x7/2 conv, 3x3/2 max pool), four bottleneck stages with CBAM, the seed's MLP head."""

    def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), width: int = 64, num_classes: int = 4,
                 head: Sequence[int] | None = None, dropout: float = 0.5, reduction: int = 16) -> None:
        super().__init__()
        if len(layers) != 4 or min(layers) < 1 or width < 1:
            raise ValueError(f"CBAM-ResNet needs four stages of >= 1 block and width >= 1, got {list(layers)}, {width}")
        head = list(head) if head is not None else default_head(width)
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = width
        for stage, blocks in enumerate(layers):
            planes = width * 2 ** stage
            stride = 1 if stage == 0 else 2
            stage_blocks = [Bottleneck(inplanes, planes, stride, reduction)]
            inplanes = planes * EXPANSION
            stage_blocks += [Bottleneck(inplanes, planes, 1, reduction) for _ in range(blocks - 1)]
            setattr(self, f"layer{stage + 1}", nn.Sequential(*stage_blocks))
        # The seed pooled with AvgPool2d(7), i.e. global at 224x224; adaptive pooling is the same there
        # and lets a demo card use a smaller input.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        sizes = [inplanes, *head, num_classes]
        for index, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
            setattr(self, f"fc{index}", nn.Linear(n_in, n_out))
        self.n_fc = len(sizes) - 1
        self.drop = nn.Dropout(p=dropout)
        self._initialise()

    def _initialise(self) -> None:
        """The reference initialisation: He (fan-out) convs, BN weight 1 (0 in the spatial gates), zero biases."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 0.0 if name.endswith("spatial.bn") else 1.0)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                if name.startswith("fc"):
                    nn.init.kaiming_normal_(module.weight)
                nn.init.zeros_(module.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H/32, W/32) feature map after the last stage (what Grad-CAM looks at)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        for index in range(1, self.n_fc):
            x = self.drop(self.relu(getattr(self, f"fc{index}")(x)))
        return getattr(self, f"fc{self.n_fc}")(x)


def default_head(width: int) -> list[int]:
    """Hidden sizes of the head: the seed's 512 and 64 at width 64, scaled with the width."""
    return [max(4, 8 * width), max(4, width)]
