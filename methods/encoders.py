"""Backbones: a small ConvNet for CPU runs and tests, torchvision ResNet-18/50 with a CIFAR stem.

Every encoder maps float [B, 3, H, W] (normalised RGB) to [B, output_dim] features and exposes
`output_dim` and `min_input_size`: the smallest height and width it is meant for, its total stride
(the last feature map is then 1x1; below it the deeper layers see little but padding). Registered
encoders state it as the minimum of the images they take (`orchestrator.encoder_input`). The CIFAR stem follows SimCLR (Chen et al. 2020, app. B.9): "we replace the first
7x7 Conv of stride 2 with 3x3 Conv of stride 1, and also remove the first max pooling operation".
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

ENCODERS: tuple[str, ...] = ("convnet", "resnet18", "resnet50")


class ConvNet(nn.Module):
    """Four 3x3 conv-BN-ReLU blocks of stride 2 (32-64-128-256 channels), global average pool.

    Sized for CPU: ~2,000 SimCLR training views/s at 32x32 on 2 cores when the machine is idle
    (`benchmarks/encoder_throughput.py`). A stride-1 first layer would be ~5x slower on CPU.
    Inputs of any size from 16x16 (its total stride) up work: adaptive pooling.
    """

    def __init__(self, widths: tuple[int, ...] | list[int] = (32, 64, 128, 256)) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        layers: list[nn.Module] = []
        c_in = 3
        for c_out in widths:
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.output_dim = c_in
        self.min_input_size = 2 ** len(widths)  # one stride-2 conv per block

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.features(x)).flatten(1)  # [B, output_dim]


def _resnet(name: str, cifar_stem: bool) -> nn.Module:
    import torchvision  # here, not at the top: ConvNet users (tests, DDP workers) skip its import

    model = getattr(torchvision.models, name)(weights=None)
    if cifar_stem:
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    model.output_dim = model.fc.in_features  # 512 (ResNet-18) or 2048 (ResNet-50)
    # Total stride: layers 2-4 halve the size (8); the ImageNet stem adds a stride-2 conv and max-pool.
    model.min_input_size = 8 if cifar_stem else 32
    model.fc = nn.Identity()
    return model


def build_encoder(name: str, cifar_stem: bool = False, **kwargs: Any) -> nn.Module:
    """Build a randomly initialised encoder by name.

    Args:
        name: one of `ENCODERS`: "convnet", "resnet18", "resnet50".
        cifar_stem: ResNets only: 3x3 stride-1 first conv and no max-pool (for 32x32 inputs).
            The ConvNet ignores it.
        **kwargs: the ConvNet's `widths`; JSON values only (they are registered with the encoder).

    Returns:
        An `nn.Module` mapping [B, 3, H, W] to [B, output_dim], with int `output_dim` and
        `min_input_size` attributes, and `build_spec`: these arguments as JSON values.

    Raises:
        ValueError: unknown name; the message lists the allowed names.
    """
    if name == "convnet":
        encoder = ConvNet(**kwargs)
    elif kwargs:
        raise ValueError(f"encoder {name!r} takes no arguments besides cifar_stem; got {', '.join(sorted(kwargs))}")
    elif name in ("resnet18", "resnet50"):
        encoder = _resnet(name, cifar_stem)
    else:
        raise ValueError(f"unknown encoder {name!r}; allowed: {', '.join(ENCODERS)}")
    # What a registered encoder is rebuilt from (JSON values only): the registry never unpickles or
    # deserialises a graph (orchestrator/registry/encoder_files.py).
    encoder.build_spec = {"name": name, "cifar_stem": bool(cifar_stem), "kwargs": dict(kwargs)}
    return encoder
