"""Backbones: a small ConvNet for CPU runs and tests, torchvision ResNet-18/50 with a CIFAR stem,
Vision Transformers and any other timm model (`timm:<name>`).

Every encoder maps float [B, 3, H, W] (normalised RGB) to [B, output_dim] features and exposes
`output_dim` and `min_input_size`: the smallest height and width it is meant for, its total stride
(the last feature map is then 1x1; below it the deeper layers see little but padding). Registered
encoders state it as the minimum of the images they take (`orchestrator.encoder_input`). The CIFAR stem follows SimCLR (Chen et al. 2020, app. B.9): "we replace the first
7x7 Conv of stride 2 with 3x3 Conv of stride 1, and also remove the first max pooling operation".
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

ENCODERS: tuple[str, ...] = ("convnet", "resnet18", "resnet50", "vit_tiny", "vit_small", "vit_base")
TIMM_PREFIX = "timm:"  # "timm:<model name>": any timm model, e.g. "timm:convnext_atto"
# The ViT presets: timm's models with the patch size a keyword (16 for 224 px, 4 for 32 px CIFAR).
VIT_PRESETS = {"vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224",
               "vit_base": "vit_base_patch16_224"}
# timm arguments that would fetch or read weights: every encoder here starts from random weights.
# Also what the registry refuses in a stored encoder spec (orchestrator/registry/encoder_files.py).
WEIGHT_ARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict", "checkpoint_path",
               "cache_dir", "features_only", "model_args")


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


class TimmEncoder(nn.Module):
    """A timm model as an encoder: its pooled features (`num_classes=0`, no classifier) are the representation.

    Pattern: lightly's and solo-learn's ViTs, `timm.create_model(name, num_classes=0, ...)`. Always
    randomly initialised (no `pretrained`: nothing is downloaded). Every constructor argument is a
    JSON primitive and all state is in `state_dict()`, so a registered encoder is rebuilt from its
    name and keyword arguments alone (`build_encoder(name, **kwargs)`) and loaded strictly.

    Attributes:
        model: the timm model (a `timm.models.VisionTransformer` for the ViT presets; `methods.mae`
            runs its blocks on the visible patches only).
        output_dim: width of the pooled features.
        min_input_size: the patch size for a ViT, else the model's total stride (`feature_info`).
    """

    def __init__(self, model_name: str, **timm_kwargs: Any) -> None:
        super().__init__()
        import timm  # here: CNN-only runs and DDP test workers skip its import

        self.model = timm.create_model(model_name, pretrained=False, num_classes=0, **timm_kwargs)
        self.output_dim = int(getattr(self.model, "head_hidden_size", None) or self.model.num_features)
        patch_embed = getattr(self.model, "patch_embed", None)
        if patch_embed is not None and hasattr(patch_embed, "patch_size"):
            self.min_input_size = int(patch_embed.patch_size[0])
        else:
            info = getattr(self.model, "feature_info", None) or [{"reduction": 32}]
            self.min_input_size = int(info[-1].get("reduction", 32))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)  # [B, output_dim]


def _check_json_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """An encoder is rebuilt from a JSON spec: only JSON primitives, and never weights to load."""
    for key, value in kwargs.items():
        if key in WEIGHT_ARGS:
            raise ValueError(f"encoder {name!r}: argument {key!r} is not allowed (encoders start from random "
                             "weights; nothing is downloaded)")
        items = value if isinstance(value, (list, tuple)) else [value]
        if not all(v is None or isinstance(v, (bool, int, float, str)) for v in items):
            raise ValueError(f"encoder {name!r}: argument {key}={value!r} must be a JSON number, string, "
                             "boolean, null or a list of those")


def vit_encoder(preset: str, patch_size: int = 16, img_size: int | None = None, **timm_kwargs: Any) -> TimmEncoder:
    """A ViT preset (`VIT_PRESETS`) that takes any input size that is a multiple of its patch.

    Args:
        preset: "vit_tiny" (192-d, 12 blocks, 3 heads), "vit_small" (384, 12, 6), "vit_base" (768, 12, 12).
        patch_size: 16 for 224 px images, 4 for 32 px CIFAR (an 8x8 grid, as solo-learn's CIFAR ViTs).
        img_size: the size the position embeddings are made for; None = 224 for patches >= 8, else 32.
            Other sizes interpolate them (`dynamic_img_size=True`, as DINO's `interpolate_pos_encoding`).
        timm_kwargs: passed to timm (`depth`, `embed_dim`, `num_heads`, `drop_path_rate`, ...).
    """
    if img_size is None:
        img_size = 224 if patch_size >= 8 else 32
    timm_kwargs.setdefault("dynamic_img_size", True)
    return TimmEncoder(VIT_PRESETS[preset], patch_size=patch_size, img_size=img_size, **timm_kwargs)


def representation_encoder(method: nn.Module) -> nn.Module:
    """The backbone a method is evaluated and registered by: its `registered_encoder` attribute's
    submodule (DINO: the teacher's, "encoder_teacher"), else `method.encoder`."""
    return getattr(method, getattr(method, "registered_encoder", "encoder"))


def is_encoder_name(name: str) -> bool:
    """A name `build_encoder` takes: one of `ENCODERS` or "timm:<a model timm knows>"."""
    if name in ENCODERS:
        return True
    if name.startswith(TIMM_PREFIX):
        import timm

        return timm.is_model(name[len(TIMM_PREFIX):])
    return False


def build_encoder(name: str, cifar_stem: bool = False, **kwargs: Any) -> nn.Module:
    """Build a randomly initialised encoder by name.

    Args:
        name: one of `ENCODERS` ("convnet", "resnet18", "resnet50", "vit_tiny", "vit_small",
            "vit_base") or "timm:<model name>" (any timm model, its pooled features).
        cifar_stem: ResNets only: 3x3 stride-1 first conv and no max-pool (for 32x32 inputs).
            The ConvNet and timm models ignore it (a CIFAR ViT takes `patch_size=4`).
        kwargs: JSON primitives only (the encoder is rebuilt from a JSON spec when loaded):
            the ViT presets take `patch_size`, `img_size` and any timm argument; "timm:" names pass
            everything to `timm.create_model`. The ConvNet takes `widths`; the ResNets none.

    Returns:
        An `nn.Module` mapping [B, 3, H, W] to [B, output_dim], with int `output_dim` and
        `min_input_size` attributes, and `build_spec`: `{"name", "cifar_stem", "kwargs"}`, JSON
        values that rebuild it with this function (its weights are its `state_dict()`).

    Raises:
        ValueError: unknown name (the message lists the allowed names), arguments an encoder does
            not take, or arguments that are not JSON primitives.
    """
    _check_json_kwargs(name, kwargs)
    encoder = _build(name, cifar_stem, kwargs)
    # What a registered encoder is rebuilt from (JSON values only): the registry never unpickles or
    # deserialises a graph (orchestrator/registry/encoder_files.py).
    encoder.build_spec = {"name": name, "cifar_stem": bool(cifar_stem), "kwargs": dict(kwargs)}
    return encoder


def _build(name: str, cifar_stem: bool, kwargs: dict[str, Any]) -> nn.Module:
    if name == "convnet" and set(kwargs) <= {"widths"}:
        return ConvNet(**kwargs)
    if name in ("convnet", "resnet18", "resnet50") and kwargs:
        raise ValueError(f"encoder {name!r} takes no arguments{' but widths' if name == 'convnet' else ''}, got "
                         f"{', '.join(sorted(kwargs))} (arguments are for the ViT presets and timm: encoders)")
    if name in ("resnet18", "resnet50"):
        return _resnet(name, cifar_stem)
    if name in VIT_PRESETS:
        return vit_encoder(name, **kwargs)
    if name.startswith(TIMM_PREFIX) and is_encoder_name(name):
        return TimmEncoder(name[len(TIMM_PREFIX):], **kwargs)
    raise ValueError(f"unknown encoder {name!r}; allowed: {', '.join(ENCODERS)} or timm:<a timm model name>")
