"""The ViT presets and `timm:<name>` encoders: output shapes, any input size that is a multiple of the
patch, JSON-only arguments, and a rebuild from (name, kwargs) + state_dict (the safe load path's contract)."""

from __future__ import annotations

import json

import pytest
import torch

from methods.encoders import ENCODERS, build_encoder

TINY_VIT = {"patch_size": 4, "depth": 2, "embed_dim": 64, "num_heads": 2}  # ViT-Tiny/4's shape, CPU-sized


@pytest.mark.parametrize("name,kwargs,sizes,dim,minimum", [
    ("vit_tiny", TINY_VIT, [32, 16, 48], 64, 4),
    ("vit_small", {"patch_size": 16, "depth": 1}, [224, 64], 384, 16),
    ("timm:resnet10t", {}, [32, 64], 512, 32),
])
def test_timm_encoders_take_every_size_their_patch_or_stride_allows(name: str, kwargs: dict, sizes: list[int],
                                                                     dim: int, minimum: int) -> None:
    torch.manual_seed(0)
    enc = build_encoder(name, **kwargs).eval()
    assert (enc.output_dim, enc.min_input_size) == (dim, minimum)
    with torch.no_grad():
        for size in sizes:
            assert enc(torch.randn(2, 3, size, size)).shape == (2, dim)
    assert not any(p.abs().sum() == 0 for n, p in enc.named_parameters() if n.endswith("weight") and p.ndim > 1)


def test_vit_presets_have_the_papers_widths_and_default_grid() -> None:
    with torch.device("meta"):  # no memory: only the shapes
        tiny, small, base = (build_encoder(n, patch_size=16) for n in ("vit_tiny", "vit_small", "vit_base"))
        cifar = build_encoder("vit_tiny", patch_size=4)
    assert (tiny.output_dim, small.output_dim, base.output_dim) == (192, 384, 768)
    assert len(tiny.model.blocks) == 12 and tiny.model.patch_embed.grid_size == (14, 14)
    assert cifar.model.patch_embed.grid_size == (8, 8) and cifar.model.dynamic_img_size
    assert set(ENCODERS) >= {"convnet", "resnet18", "resnet50", "vit_tiny", "vit_small", "vit_base"}


def test_encoder_rebuilds_from_its_json_spec_and_state_dict() -> None:
    torch.manual_seed(0)
    enc = build_encoder("vit_tiny", **TINY_VIT).eval()
    spec = json.loads(json.dumps(enc.build_spec))  # what a registry stores
    assert spec == {"name": "vit_tiny", "cifar_stem": False, "kwargs": TINY_VIT}
    torch.manual_seed(1)
    rebuilt = build_encoder(spec["name"], cifar_stem=spec["cifar_stem"], **spec["kwargs"]).eval()
    rebuilt.load_state_dict(enc.state_dict(), strict=True)
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), enc(x))


@pytest.mark.parametrize("name,kwargs,message", [
    ("vit_tiny", {"pretrained": True}, "'pretrained' is not allowed"),
    ("timm:resnet10t", {"checkpoint_path": "/tmp/x.pt"}, "'checkpoint_path' is not allowed"),
    ("vit_tiny", {"act_layer": torch.nn.GELU}, "must be a JSON"),
    ("resnet18", {"patch_size": 4}, "takes no arguments"),
    ("timm:no_such_model", {}, "unknown encoder 'timm:no_such_model'"),
])
def test_encoder_arguments_are_json_and_never_weights(name: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_encoder(name, **kwargs)
