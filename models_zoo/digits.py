"""Real data that ships with scikit-learn (``load_digits``), upsampled to 32x32, and small CNNs that train
on it from scratch in about a minute on 2 CPU cores: the bench and quick-start setting.

The split and every seed are fixed, so accuracies are reproducible run to run.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "DIGITS_MODELS",
    "Digits",
    "DenseNetSmall",
    "MobileNetV2Small",
    "ResNet20",
    "batches",
    "evaluate",
    "load_digits_32",
    "train",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Digits:
    """Train/test tensors: images ``N x 3 x 32 x 32`` (standardised), labels ``N`` (0-9)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_32(seed: int = 0, test_fraction: float = 0.25) -> Digits:
    """scikit-learn's 1,797 8x8 digits, bilinearly upsampled to 32x32, 3 channels, stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    y = torch.tensor(d.target, dtype=torch.long)
    idx = torch.arange(len(y)).numpy()
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=y.numpy())
    mean, std = x[tr].mean(), x[tr].std()
    x = (x - mean) / std
    return Digits(x[tr], y[tr], x[te], y[te])


def batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches in order, or shuffled with ``seed``."""
    order = (
        torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        if seed is not None
        else torch.arange(len(x))
    )
    for i in range(0, len(x), batch_size):
        j = order[i : i + batch_size]
        yield x[j], y[j]


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512
) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) in eval mode; restores the model's mode."""
    was = model.training
    model.eval()
    correct, loss = 0, 0.0
    for xb, yb in batches(x, y, batch_size):
        out = model(xb)
        loss += F.cross_entropy(out, yb, reduction="sum").item()
        correct += int((out.argmax(1) == yb).sum())
    model.train(was)
    return correct / len(y), loss / len(y)


def train(
    model: nn.Module,
    data: Digits,
    epochs: int = 15,
    lr: float = 0.05,
    weight_decay: float = 5e-4,
    batch_size: int = 64,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
    *,
    penalty: Callable[[nn.Module], torch.Tensor] | None = None,
    after_backward: Callable[[nn.Module], None] | None = None,
    after_step: Callable[[], None] | None = None,
    start_epoch: int = 0,
) -> nn.Module:
    """SGD with momentum and cosine decay, in place; returns the model in eval mode.

    ``progress(epoch, loss)`` is called after every epoch with the epoch's mean training loss (e.g. to advance
    a progress bar). Hooks for training-time pruning: ``penalty(model)`` is added to every step's loss
    (``fxprune.penalty``); ``after_backward(model)`` runs between the backward pass and the optimizer step
    (e.g. Torch-Pruning's ``pruner.regularize``, which edits gradients); ``after_step()`` after each
    optimizer step (e.g. ``GroupPenalty.step``). ``start_epoch``: train epochs ``start_epoch..epochs-1``
    only, with the learning rate and the batch order those epochs have in a run from epoch 0 (to train a
    model pruned after ``start_epoch`` epochs on to the same end; the optimizer's momentum starts afresh).
    """
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    per_epoch = (len(data.x_train) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * per_epoch, pct_start=0.15
    )
    if start_epoch:
        with warnings.catch_warnings():  # the schedule moved on without optimizer steps, on purpose
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(start_epoch * per_epoch):
                sched.step()
    t = time.perf_counter()
    model.train()
    for epoch in range(start_epoch, epochs):
        total = 0.0
        for xb, yb in batches(data.x_train, data.y_train, batch_size, seed=seed * 1000 + epoch):
            opt.zero_grad(set_to_none=True)
            ce = F.cross_entropy(model(xb), yb)
            loss = ce if penalty is None else ce + penalty(model)
            loss.backward()
            if after_backward is not None:
                after_backward(model)
            opt.step()
            sched.step()
            if after_step is not None:
                after_step()
            total += float(ce.detach()) * len(xb)
        if progress is not None:
            progress(epoch, total / len(data.x_train))
    model.eval()
    log.info("trained %s for %d epochs in %.1fs", type(model).__name__, epochs, time.perf_counter() - t)
    return model


def _cbr(
    cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: type[nn.Module] = nn.ReLU
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), act()
    )


class _Basic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _cbr(cin, cout, stride=stride)
        self.conv2 = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.short = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(self.conv1(x)) + self.short(x))


class ResNet20(nn.Module):
    """ResNet-20 (He et al., CIFAR variant): 3 stages of 3 basic blocks, widths 16/32/64."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        w = [width, 2 * width, 4 * width]
        self.stem = _cbr(3, w[0])
        layers: list[nn.Module] = []
        cin = w[0]
        for i, c in enumerate(w):
            for j in range(3):
                layers.append(_Basic(cin, c, 2 if (j == 0 and i > 0) else 1))
                cin = c
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


class _Inverted(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.block = nn.Sequential(
            _cbr(cin, mid, k=1, act=nn.ReLU6),
            _cbr(mid, mid, stride=stride, groups=mid, act=nn.ReLU6),
            nn.Conv2d(mid, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_res else self.block(x)


class MobileNetV2Small(nn.Module):
    """MobileNetV2-style: depthwise separable inverted residuals with linear bottlenecks."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        cfg = [(16, 1, 1, 1), (24, 2, 2, 4), (32, 2, 2, 4), (64, 2, 2, 4), (96, 1, 1, 4)]  # c, n, s, t
        self.stem = _cbr(3, 16, act=nn.ReLU6)
        blocks: list[nn.Module] = []
        cin = 16
        for c, n, s, t in cfg:
            for i in range(n):
                blocks.append(_Inverted(cin, c, s if i == 0 else 1, t))
                cin = c
        self.blocks = nn.Sequential(*blocks)
        self.head = _cbr(cin, 256, k=1, act=nn.ReLU6)
        self.fc = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class _DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, 4 * growth, 1, bias=False),
            nn.BatchNorm2d(4 * growth), nn.ReLU(), nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], 1)


class DenseNetSmall(nn.Module):
    """DenseNet-BC-style: 3 dense blocks of 4 layers (growth 12) joined by 1x1-conv transitions."""

    def __init__(self, num_classes: int = 10, growth: int = 12) -> None:
        super().__init__()
        c = 2 * growth
        self.stem = nn.Conv2d(3, c, 3, 1, 1, bias=False)
        stages: list[nn.Module] = []
        for b in range(3):
            layers: list[nn.Module] = []
            for _ in range(4):
                layers.append(_DenseLayer(c, growth))
                c += growth
            stages.append(nn.Sequential(*layers))
            if b < 2:
                out = c // 2
                stages.append(
                    nn.Sequential(
                        nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, out, 1, bias=False), nn.AvgPool2d(2)
                    )
                )
                c = out
        self.features = nn.Sequential(*stages, nn.BatchNorm2d(c), nn.ReLU())
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.features(self.stem(x)), 1).flatten(1))


DIGITS_MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet20": ResNet20,
    "mobilenetv2": MobileNetV2Small,
    "densenet": DenseNetSmall,
}
