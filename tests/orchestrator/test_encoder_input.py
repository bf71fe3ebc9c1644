"""The registered encoders' input contract: any-size export and one-line input errors.

The export here is the one `mlflow.pytorch.log_model(serialization_format="pt2")` does for
`orchestrator.tracking.register_encoder` (`Dim.AUTO` on the signature's -1 dimensions), inside
`size_oblivious()`; the exported program must match eager exactly from the stated minimum up.
"""

from __future__ import annotations

import pytest
import torch
from torch.export import Dim, export

from methods.encoders import build_encoder
from orchestrator.encoder_input import EncoderInput, exportable, parse_size, size_oblivious
from orchestrator.errors import UserError


@pytest.mark.parametrize("name, cifar_stem, trained, minimum", [
    ("convnet", False, 28, 16), ("resnet18", True, 32, 8), ("resnet18", False, 32, 32)])
def test_exported_encoder_takes_any_size_from_its_minimum(name: str, cifar_stem: bool, trained: int,
                                                          minimum: int) -> None:
    torch.manual_seed(0)
    encoder = build_encoder(name, cifar_stem=cifar_stem).eval()
    assert encoder.min_input_size == minimum
    with size_oblivious(), torch.no_grad():
        program = export(exportable(encoder, minimum), (torch.randn(2, 3, trained, trained),),
                         dynamic_shapes=({0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO},))
    model = program.module()
    with torch.no_grad():
        for shape in [(1, 3, trained, trained), (3, 3, 40, 36), (2, 3, minimum, minimum), (2, 3, minimum, 45)]:
            x = torch.randn(*shape)
            torch.testing.assert_close(model(x), encoder(x), rtol=1e-5, atol=1e-5)
        # Below the minimum the program itself refuses (torch's guard; selfsup checks first).
        with pytest.raises(Exception, match="Guard failed"):
            model(torch.randn(2, 3, minimum - 1, minimum))


def test_check_gives_one_line_errors() -> None:
    spec = EncoderInput(min_size=16, image_size=28)
    spec.check((5, 3, 16, 40), "models:/m/1", dtype=torch.float32)
    cases = [((5, 1, 28, 28), torch.float32, "models:/m/1 takes 3-channel (RGB) images; got 1 channel "),
             ((5, 3, 15, 28), torch.float32, "models:/m/1 takes images of at least 16x16 pixels; got 15x28"),
             ((3, 28, 28), torch.float32, "takes a batch of images [B, 3, H, W]; got a tensor of shape [3, 28, 28]"),
             ((5, 3, 28, 28), torch.uint8, "takes float images")]
    for shape, dtype, message in cases:
        with pytest.raises(UserError) as e:
            spec.check(shape, "models:/m/1", dtype=dtype)
        assert message in str(e.value) and "\n" not in str(e.value)


def test_contract_from_tags_or_an_old_fixed_size_signature() -> None:
    spec = EncoderInput(min_size=16, image_size=28)
    assert EncoderInput.of(spec.tags(), [-1, 3, -1, -1]) == spec
    old = EncoderInput.of({"method": "simclr"}, [-1, 3, 28, 28])  # registered before any-size export
    assert old.fixed and old.image_size == 28
    with pytest.raises(UserError, match="takes 28x28 images only"):
        old.check((2, 3, 32, 32), "models:/m/1")
    assert "any height and width >= 16 (trained at 28x28)" in spec.describe()


def test_parse_size() -> None:
    assert parse_size("40x36") == (40, 36) and parse_size("32") == (32, 32)
    for bad in ("0", "a", "3x4x5", "-2"):
        with pytest.raises(UserError, match="--image-size"):
            parse_size(bad)
