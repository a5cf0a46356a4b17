"""Small fx-traceable nets, each exercising one coupling pattern the dependency pass must get right."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "ConcatNet",
    "DepthwiseNet",
    "FlattenLinearNet",
    "FunctionalNet",
    "GroupedNet",
    "ResidualNet",
    "SENet",
    "SplitNet",
    "TOY_MODELS",
]


def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class ResidualNet(nn.Module):
    """Residual adds: an identity block (stream coupled across two adds) and a downsampling block."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _cbr(3, 16)
        self.b1 = nn.Sequential(_cbr(16, 16), nn.Conv2d(16, 16, 3, 1, 1), nn.BatchNorm2d(16))
        self.b2 = nn.Sequential(_cbr(16, 32, stride=2), nn.Conv2d(32, 32, 3, 1, 1), nn.BatchNorm2d(32))
        self.down = nn.Sequential(nn.Conv2d(16, 32, 1, 2), nn.BatchNorm2d(32))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.relu(x + self.b1(x))
        x = torch.relu(self.b2(x) + self.down(x))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(torch.flatten(x, 1))


class ConcatNet(nn.Module):
    """Channel concat (DenseNet-style) feeding a conv; concat offsets must land on the right columns."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _cbr(3, 12)
        self.a = _cbr(12, 8)
        self.b = _cbr(20, 8)
        self.trans = nn.Sequential(nn.BatchNorm2d(28), nn.ReLU(), nn.Conv2d(28, 16, 1), nn.AvgPool2d(2))
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([x, self.a(x)], 1)
        x = torch.cat((x, self.b(x)), dim=1)
        x = self.trans(x)
        return self.head(x.mean((2, 3)))


class FlattenLinearNet(nn.Module):
    """VGG-style: conv features, flatten, and a linear whose columns are channel x H x W blocks."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(_cbr(3, 8), nn.MaxPool2d(2), _cbr(8, 16), nn.AdaptiveAvgPool2d((4, 4)))
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 16, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class DepthwiseNet(nn.Module):
    """MobileNetV2 inverted residual (expand, depthwise, project, add) and a depthwise multiplier of 2."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _cbr(3, 16)
        self.expand = _cbr(16, 48, k=1)
        self.dw = _cbr(48, 48, groups=48)
        self.project = nn.Sequential(nn.Conv2d(48, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.dw2 = nn.Conv2d(16, 32, 3, 1, 1, groups=16)  # channel multiplier 2
        self.bn = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.project(self.dw(self.expand(x)))
        x = F.relu6(self.bn(self.dw2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, (1, 1)).flatten(1))


class GroupedNet(nn.Module):
    """Grouped convs (ResNeXt-style, groups=4) inside a residual block."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _cbr(3, 32)
        self.g1 = _cbr(32, 32, groups=4)
        self.g2 = nn.Sequential(nn.Conv2d(32, 64, 3, 1, 1, groups=4), nn.BatchNorm2d(64), nn.ReLU())
        self.pw = nn.Conv2d(64, 32, 1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.pw(self.g2(self.g1(x)))
        return self.fc(x.mean(dim=(2, 3)))


class SENet(nn.Module):
    """Squeeze-and-excitation: a gate of shape N x C x 1 x 1 broadcast-multiplied into the features."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _cbr(3, 24)
        self.conv = _cbr(24, 32)
        self.fc1 = nn.Conv2d(32, 8, 1)
        self.fc2 = nn.Linear(8, 32)
        self.out = nn.Conv2d(32, 16, 1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.stem(x))
        s = F.adaptive_avg_pool2d(x, 1)
        s = F.relu(self.fc1(s)).flatten(1)
        gate = torch.sigmoid(self.fc2(s)).view(-1, 32, 1, 1)
        x = x * gate
        x = F.relu(self.out(x))
        return self.fc(x.mean((2, 3)))


class SplitNet(nn.Module):
    """split / chunk / slicing of the channel dim, and a cat that re-joins the pieces in another order."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _cbr(3, 32)
        self.left = _cbr(16, 16)
        self.right = _cbr(8, 8)
        self.mix = nn.Conv2d(40, 24, 1)
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        a, b = torch.split(x, 16, dim=1)
        c, d = b.chunk(2, 1)
        y = torch.cat([self.right(d), self.left(a), c, x[:, 8:16]], 1)
        return self.fc(F.relu(self.mix(y)).mean((2, 3)))


class FunctionalNet(nn.Module):
    """Functional forms with parameters read by get_attr, a depthwise F.conv2d whose ``groups`` literal must
    change, a per-channel scale parameter, and ``view`` with a literal feature count."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(16, 3, 3, 3) * 0.3)
        self.b1 = nn.Parameter(torch.randn(16) * 0.1)
        self.w_dw = nn.Parameter(torch.randn(16, 1, 3, 3) * 0.3)
        self.scale = nn.Parameter(torch.rand(1, 16, 1, 1) + 0.5)
        self.register_buffer("rm", torch.randn(16) * 0.1)
        self.register_buffer("rv", torch.rand(16) + 0.5)
        self.gamma = nn.Parameter(torch.rand(16) + 0.5)
        self.w2 = nn.Parameter(torch.randn(24, 16, 1, 1) * 0.3)
        self.lin_w = nn.Parameter(torch.randn(num_classes, 24 * 4 * 4) * 0.05)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.w1, self.b1, 1, 1)
        x = F.batch_norm(x, self.rm, self.rv, self.gamma, None, False, 0.1, 1e-5)  # type: ignore[arg-type]
        x = x.relu()
        x = F.conv2d(x, self.w_dw, None, 1, 1, 1, 16) * self.scale
        x = F.conv2d(torch.sigmoid(x), self.w2)
        x = F.adaptive_max_pool2d(x, 4)
        x = x.view(x.size(0), 24 * 4 * 4)
        return F.linear(x, self.lin_w)


TOY_MODELS: dict[str, type[nn.Module]] = {
    "residual": ResidualNet,
    "concat": ConcatNet,
    "flatten_linear": FlattenLinearNet,
    "depthwise": DepthwiseNet,
    "grouped": GroupedNet,
    "se": SENet,
    "split": SplitNet,
    "functional": FunctionalNet,
}
