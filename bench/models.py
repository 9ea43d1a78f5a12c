"""Models for the benches and the Fashion-MNIST test, written in plain torch.

- :func:`resnet18`: ResNet-18 in torchvision's layout (BasicBlock, [2, 2, 2, 2],
  1000 classes, BatchNorm), random weights from a fixed seed.  Its BatchNorm
  running statistics are estimated from a few random-normal batches, so every BN
  layer normalises the activations it really sees: the network neither explodes
  nor collapses to constants, and its activation ranges look like a trained
  network's (which is what INT8 calibration and timing need).  No weights are
  downloaded.
- :func:`export_resnet18`: that model exported with :func:`dlopt.export`.
- :class:`FashionCNN`: three Conv-BN-ReLU blocks with max-pooling and a small
  classifier head, ~100k parameters, for 1x28x28 inputs.
- :class:`FashionResNet`: a residual CNN for 1x28x28 images (the pruning bench).
- :func:`write_host_target`: a dlopt target file for "this host, these backends".

torch is imported when this module is (it is only used by benches and tests).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

IMAGE_SHAPE = (3, 224, 224)


def _conv3x3(inplanes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(inplanes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the (downsampled) input, then ReLU."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet for BasicBlock: the same module names, so state dicts line up."""

    def __init__(self, layers: tuple[int, int, int, int] = (2, 2, 2, 2), num_classes: int = 1000) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * BasicBlock.expansion, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(_conv1x1(self.inplanes, planes * BasicBlock.expansion, stride),
                                       nn.BatchNorm2d(planes * BasicBlock.expansion))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * BasicBlock.expansion
        layers += [BasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - names the ONNX input
        x = self.maxpool(self.relu(self.bn1(self.conv1(input))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _estimate_bn_statistics(model: nn.Module, generator: torch.Generator, batches: int, batch_size: int) -> None:
    """Replace every BN layer's running mean/var by the statistics of random-normal images.

    ``momentum=None`` makes BatchNorm keep a cumulative average over the batches
    instead of an exponential one.  Only BN buffers change (no gradients, no optimiser).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(batch_size, *IMAGE_SHAPE, generator=generator))
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
    model.eval()


def resnet18(seed: int = 0, *, num_classes: int = 1000, bn_batches: int = 4, bn_batch_size: int = 8) -> ResNet:
    """A ResNet-18 in eval mode with seeded random weights and data-estimated BN statistics.

    BN scales and shifts are drawn around torchvision's (1, 0) so that the folded
    Conv weights differ per channel, as in a trained network; the running
    statistics then come from ``bn_batches`` x ``bn_batch_size`` random-normal images.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # nn.init draws from the global generator
        model = ResNet((2, 2, 2, 2), num_classes)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.empty(m.num_features).uniform_(0.5, 1.5, generator=generator))
                m.bias.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
        # torchvision leaves the fc layer at PyTorch's default init; draw it from our seed instead.
        bound = 1 / model.fc.in_features ** 0.5
        model.fc.weight.copy_(torch.empty_like(model.fc.weight).uniform_(-bound, bound, generator=generator))
        model.fc.bias.copy_(torch.empty_like(model.fc.bias).uniform_(-bound, bound, generator=generator))
    _estimate_bn_statistics(model, generator, bn_batches, bn_batch_size)
    return model


def export_resnet18(path: str | Path, batch: int = 1, *, seed: int = 0, dynamic_batch: bool = False) -> Path:
    """Export :func:`resnet18` to ``path`` (input ``input``: batch x 3 x 224 x 224, output ``logits``)."""
    import dlopt

    model = resnet18(seed)
    example = torch.randn(batch, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(seed + 1))
    axes = {"input": {0: "batch"}} if dynamic_batch else None
    # ResNet-18's logits reach ~10, where fp32 reordering in ORT vs torch exceeds atol=1e-5.
    return dlopt.export(model, example, path, dynamic_axes=axes, input_names=["input"],
                        output_names=["logits"], atol=1e-4)


class FashionCNN(nn.Module):
    """Three Conv-BN-ReLU + MaxPool blocks (28 -> 14 -> 7 -> 3) and a two-layer head: ~99k parameters.

    Most parameters sit in the cheap Linear head; the convolutions are kept narrow
    (16/32/64 channels, ~2M multiply-adds per image) so that training on two CPU
    cores takes seconds per epoch.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True), nn.MaxPool2d(2)]

        self.features = nn.Sequential(*block(1, 16), *block(16, 32), *block(32, 64))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 3 * 3, 128), nn.ReLU(inplace=True),
                                        nn.Linear(128, num_classes))

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - names the ONNX input
        return self.classifier(self.features(input))


class FashionResNet(nn.Module):
    """A residual CNN for 1x28x28 images: a stem and three stages of two BasicBlocks.

    Widths ``width``, 2x and 4x; each stage halves the resolution (28 -> 14 -> 7 -> 4),
    its first block with a 1x1 downsample, so every stage has a residual Add whose two
    inputs must keep the same channels when pruned.  width=32: ~0.7M parameters,
    ~22M multiply-adds per image.
    """

    def __init__(self, width: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv3x3(1, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        stages, inplanes = [], width
        for planes in (width, 2 * width, 4 * width):
            down = nn.Sequential(_conv1x1(inplanes, planes, 2), nn.BatchNorm2d(planes))
            stages.append(nn.Sequential(BasicBlock(inplanes, planes, 2, down), BasicBlock(planes, planes)))
            inplanes = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - names the ONNX input
        x = self.layer3(self.layer2(self.layer1(self.stem(input))))
        return self.fc(torch.flatten(self.pool(x), 1))


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())



def write_host_target(folder: str | Path, backends: tuple[str, ...] = ("ort",)) -> tuple[str, Path]:
    """A ``dlopt.toml`` in ``folder`` with one target: this machine, with only ``backends``.

    The ``cpu`` preset builds every CPU backend (ONNX Runtime, OpenVINO, TVM) and
    may choose any; tests about ONNX Runtime's QDQ model, and benches that should
    not spend minutes timing an untuned TVM build, compile for this target instead.
    Returns ``(target name, path)`` for ``dlopt.compile(target=..., targets_file=...)``.
    """
    import platform

    machine = platform.machine().lower()
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    name = "host-" + "-".join(backends)
    path = Path(folder) / "dlopt.toml"
    path.write_text(f"""[targets.{name}]
description = "this host's CPU with {', '.join(backends)} only"
device = "cpu"
arch = "{arch}"
triple = "{arch}-linux-gnu"
backends = [{', '.join(f'"{b}"' for b in backends)}]
precisions = ["fp32", "fp16", "int8"]
host_native = true
""")
    return name, path
