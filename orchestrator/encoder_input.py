"""What a registered encoder takes: float images `[B, C, H, W]` of any height and width from a stated minimum.

Pretraining registers each encoder with this contract (model-version tags, description, MLmodel
metadata); `selfsup registry embed` and `selfsup evaluate` check their input against it before the
model runs, so a wrong input is one clear line (`UserError`, exit 2) instead of torch.export's
`AssertionError: Guard failed: x.size()[2] >= 16`.

The export (mlflow's pt2 format: `torch.export` with `Dim.AUTO` on the signature's -1 dimensions,
here batch, height and width) needs two things from us:
- `size_oblivious()`: without it the exported program specialises every size whose last feature
  map is 1x1 (torch.export's "0/1 specialisation"): the demo ConvNet exported at 28x28 refused
  16x16, and a ResNet-18 with the ImageNet stem exported at 32x32 accepted 32x32 only. It turns on
  torch's experimental `backed_size_oblivious` (torch export tutorial, "Avoiding 0/1
  specialization") during the export. That may diverge from eager where a size-1 dimension
  broadcasts; conv/BN/pool encoders don't broadcast on H or W, and
  tests/orchestrator/test_encoder_input.py compares the exported program with eager at the minimum
  size, for every encoder.
- `exportable`: `torch._check(H >= min)`, which export turns into the program's range constraint, so
  a plain `mlflow.pytorch.load_model` user gets the stated minimum enforced too (as a guard).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.errors import UserError

TAG_CHANNELS = "input_channels"
TAG_MIN_SIZE = "input_min_size"
TAG_IMAGE_SIZE = "image_size"


@dataclass(frozen=True)
class EncoderInput:
    """The input contract of a registered encoder.

    Attributes:
        min_size: smallest height and width (the encoder's `min_input_size`).
        image_size: the side of the square images it was trained on: the size `embed` and
            `evaluate` resize to unless told otherwise.
        channels: 3 (RGB).
        fixed: a version registered before any-size export (static H, W): takes `image_size` only.
    """

    min_size: int
    image_size: int
    channels: int = 3
    fixed: bool = False

    def describe(self) -> str:
        """One sentence for the model version's description."""
        from pipelines.augment import MEAN, STD

        size = (f"exactly {self.image_size}x{self.image_size}" if self.fixed else
                f"any height and width >= {self.min_size} (trained at {self.image_size}x{self.image_size})")
        return (f"float32 [B, {self.channels}, H, W], {size}; RGB scaled to [0, 1], then normalised with "
                f"mean ({', '.join(f'{v:.3f}' for v in MEAN)}) and std ({', '.join(f'{v:.3f}' for v in STD)})")

    def tags(self) -> dict[str, str]:
        return {TAG_CHANNELS: str(self.channels), TAG_MIN_SIZE: str(self.min_size),
                TAG_IMAGE_SIZE: str(self.image_size)}

    @classmethod
    def of(cls, tags: Mapping[str, str], signature_shape: Sequence[int] | None) -> EncoderInput:
        """The contract of a model version from its tags, else (older versions) its signature.

        Raises:
            UserError: neither says what the model takes.
        """
        if TAG_MIN_SIZE in tags and TAG_IMAGE_SIZE in tags:
            return cls(min_size=_int_tag(tags, TAG_MIN_SIZE), image_size=_int_tag(tags, TAG_IMAGE_SIZE),
                       channels=_int_tag(tags, TAG_CHANNELS, 3))
        shape = list(signature_shape or [])
        if len(shape) == 4 and shape[2] > 0 and shape[2] == shape[3]:  # exported with a static size
            return cls(min_size=int(shape[2]), image_size=int(shape[2]), channels=int(shape[1]), fixed=True)
        raise UserError(f"the model's tags and signature do not say what images it takes (signature {shape})")

    def check(self, shape: Sequence[int], model: str, *, dtype: Any = None) -> None:
        """Raise a one-line `UserError` unless `shape` is a batch this model takes.

        Args:
            shape: the input's shape.
            model: how to name the model in the message (its URI).
            dtype: the input's torch dtype, if known (must be floating point).
        """
        shape = tuple(int(s) for s in shape)
        if len(shape) != 4:
            raise UserError(f"{model} takes a batch of images [B, {self.channels}, H, W]; "
                            f"got a tensor of shape {list(shape)}")
        if dtype is not None and not dtype.is_floating_point:
            raise UserError(f"{model} takes float images (normalised, see its description); got {dtype}")
        _, c, h, w = shape
        if c != self.channels:
            raise UserError(f"{model} takes {self.channels}-channel (RGB) images; got {c} channel"
                            f"{'s' if c != 1 else ''} (input shape {list(shape)})")
        if self.fixed and (h, w) != (self.image_size, self.image_size):
            raise UserError(f"{model} takes {self.image_size}x{self.image_size} images only (registered with a "
                            f"fixed size); got {h}x{w}")
        if h < self.min_size or w < self.min_size:
            raise UserError(f"{model} takes images of at least {self.min_size}x{self.min_size} pixels; got {h}x{w}")


# The largest side `--image-size` takes (evaluate, embed): the training cap (`data.image_size`,
# `MAX_IMAGE_SIZE`); every image of a split is decoded at that size, so a typo of an extra zero
# would ask for memory no machine has.
MAX_INPUT_SIDE = 1024


def _int_tag(tags: Mapping[str, str], name: str, default: int | None = None) -> int:
    """A model version's integer tag, or a one-line `UserError` naming the tag and its value."""
    value = tags.get(name, default)
    try:
        number = int(str(value))
    except ValueError:
        number = 0
    if number <= 0 or number > 1_000_000:
        raise UserError(f"the model version's tag {name} = {value!r} is not a positive whole number of pixels "
                        "(or channels); re-tag the version or register it again")
    return number


def check_input_side(h: int, w: int, flag: str = "--image-size") -> None:
    """Refuse (one line) an input size over `MAX_INPUT_SIDE` or under 1."""
    if not (1 <= h <= MAX_INPUT_SIDE and 1 <= w <= MAX_INPUT_SIDE):
        raise UserError(f"{flag} {h}x{w}: each side must be between 1 and {MAX_INPUT_SIDE} pixels")


def parse_size(text: str) -> tuple[int, int]:
    """`"40"` -> (40, 40); `"40x36"` -> (40, 36) (height x width).

    Raises:
        UserError: anything else.
    """
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or any(v <= 0 for v in values):
        raise UserError(f"--image-size {text!r}: give SIZE or HEIGHTxWIDTH in pixels, e.g. 32 or 40x36")
    check_input_side(values[0], values[-1])
    return (values[0], values[-1])


def exportable(encoder: Any, min_size: int) -> Any:
    """The module that is exported: `encoder` behind `torch._check`s of the minimum height and width."""
    import torch
    from torch import nn

    class CheckedEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder
            self.output_dim = encoder.output_dim

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            torch._check(x.shape[2] >= min_size)
            torch._check(x.shape[3] >= min_size)
            return self.encoder(x)

    return CheckedEncoder().eval()


@contextlib.contextmanager
def size_oblivious() -> Iterator[None]:
    """Export without 0/1 specialisation of sizes (see the module docstring)."""
    import torch.fx.experimental._config as fx_config

    with fx_config.patch(backed_size_oblivious=True):
        yield
