"""Every entry of METHODS learns on a fixed batch; every encoder has the promised output shape."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from methods import ENCODERS, METHODS, build_encoder, prepare_for_distributed, restore_batchnorm
from methods.batchnorm import GlobalBatchNorm, convert_to_global_bn
from methods.diagnostics import DIAGNOSTICS

SMALL = {  # paper widths are far too big for a CPU test; the structure is the same
    "simclr": {"hidden_dim": 64},
    "moco": {"hidden_dim": 64, "queue_size": 256, "momentum": 0.99},
    "byol": {"hidden_dim": 64, "projection_dim": 32},
    "simsiam": {"hidden_dim": 64, "projection_dim": 32, "predictor_hidden_dim": 16},
    "barlow_twins": {"hidden_dim": 64, "projection_dim": 32},
    "vicreg": {"hidden_dim": 64, "projection_dim": 32},
    # A constant teacher temperature: with the warm-up the target itself softens over the 8 steps
    # and the loss on a fixed batch rises whatever the student learns.
    "dino": {"hidden_dim": 64, "bottleneck_dim": 16, "projection_dim": 128, "warmup_teacher_temp_fraction": 0.0},
    "swav": {"hidden_dim": 64, "projection_dim": 32, "num_prototypes": 64},
    "mae": {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2},
}
TINY_VIT = {"patch_size": 4, "depth": 2, "embed_dim": 64, "num_heads": 2}  # ViT-Tiny/4's shape, CPU-sized
# (method, encoder name, encoder args): every method on the ConvNet (MAE only on a ViT), DINO also on a ViT.
CASES = [(name, "convnet", {}) for name in sorted(METHODS) if name != "mae"] + [
    ("mae", "vit_tiny", TINY_VIT), ("dino", "vit_tiny", TINY_VIT)]
CASE_IDS = [f"{name}-{enc}" for name, enc, _ in CASES]
EXTRA = {"dino": {"teacher_temp"}}  # method-specific diagnostics next to the shared ones


def _batch(n: int = 16, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=g)
    return x + 0.1 * torch.randn(x.shape, generator=g), x + 0.1 * torch.randn(x.shape, generator=g)


def _loss(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor) -> float:
    """The loss against the same negatives / targets each time (MoCo's queue, DINO's center are put
    back as they were)."""
    saved = {k: v.clone() for k, v in model.named_buffers() if k.startswith(("queue", "center"))}
    torch.manual_seed(1)  # same shuffle-BN order, same MAE masks
    loss = model(x1, x2)["loss"].item()
    for k, v in saved.items():
        getattr(model, k).copy_(v)
    return loss


def test_every_method_has_a_case() -> None:
    assert {name for name, _, _ in CASES} == set(METHODS)


@pytest.mark.parametrize("name,encoder,encoder_args", CASES, ids=CASE_IDS)
def test_method_forward_returns_loss_and_detached_diagnostics(name: str, encoder: str, encoder_args: dict) -> None:
    torch.manual_seed(0)
    model = METHODS[name](build_encoder(encoder, **encoder_args), **SMALL[name])
    out = model(*_batch(8))
    assert set(out) == {"loss", *DIAGNOSTICS, *EXTRA.get(name, ())}
    assert out["loss"].ndim == 0 and out["loss"].requires_grad
    assert all(out[k].ndim == 0 and not out[k].requires_grad for k in out if k != "loss")
    assert model.encoder.output_dim == (256 if encoder == "convnet" else 64)
    assert prepare_for_distributed(model) is model  # one process: nothing to change


@pytest.mark.parametrize("name,encoder,encoder_args", CASES, ids=CASE_IDS)
def test_a_few_optimizer_steps_lower_the_loss(name: str, encoder: str, encoder_args: dict) -> None:
    torch.manual_seed(0)
    model = METHODS[name](build_encoder(encoder, **encoder_args), **SMALL[name])
    x1, x2 = _batch()
    # ViTs want smaller steps: DINO's ViT at 0.05 (SGD, momentum 0.9) overshoots within 8 steps.
    lr = {"convnet": 0.05}.get(encoder, 0.01 if name == "mae" else 0.001)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    before = _loss(model, x1, x2)
    initial_queue = {k: v.clone() for k, v in model.named_buffers() if k.startswith(("queue", "center"))}
    for step in range(8):
        loss = model(x1, x2)["loss"]
        # On a fixed batch MoCo's queue soon holds this very batch's keys, so the negatives become
        # copies of the positives; keep the negatives fixed to see the queries learn. Likewise DINO's
        # center: centring softens the targets as it moves, which raises the loss on a fixed batch.
        for k, v in initial_queue.items():
            getattr(model, k).copy_(v)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if hasattr(model, "update_momentum"):
            model.update_momentum((step + 1) / 8)
    after = _loss(model, x1, x2)
    assert after < 0.9 * before, (before, after)


@pytest.mark.parametrize("name,cifar_stem,size,dim", [
    ("convnet", False, 16, 256), ("convnet", False, 32, 256), ("convnet", False, 64, 256),
    ("resnet18", False, 32, 512), ("resnet18", True, 32, 512),
    ("resnet50", False, 32, 2048), ("resnet50", True, 16, 2048),
])
def test_encoder_output_shapes(name: str, cifar_stem: bool, size: int, dim: int) -> None:
    enc = build_encoder(name, cifar_stem=cifar_stem).eval()
    with torch.no_grad():
        out = enc(torch.randn(2, 3, size, size))
    assert enc.output_dim == dim and out.shape == (2, dim)
    if name != "convnet":
        assert isinstance(enc.maxpool, nn.Identity) == cifar_stem
        assert enc.conv1.kernel_size == ((3, 3) if cifar_stem else (7, 7))
        assert enc.conv1.stride == ((1, 1) if cifar_stem else (2, 2))


def test_unknown_encoder_names_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="resnet51.*convnet, resnet18, resnet50"):
        build_encoder("resnet51")
    assert ENCODERS == ("convnet", "resnet18", "resnet50", "vit_tiny", "vit_small", "vit_base")


def test_global_batchnorm_is_plain_batchnorm_in_one_process_and_converts_back() -> None:
    torch.manual_seed(0)
    enc = build_encoder("convnet")
    x = torch.randn(6, 3, 16, 16)
    enc(x)  # move running stats away from their initial values
    converted = convert_to_global_bn(copy.deepcopy(enc))
    assert sum(isinstance(m, GlobalBatchNorm) for m in converted.modules()) == 4
    torch.testing.assert_close(converted(x), enc(x))  # training mode: batch statistics
    torch.testing.assert_close(converted.state_dict(), enc.state_dict())
    restored = restore_batchnorm(converted)
    assert not any(isinstance(m, GlobalBatchNorm) for m in restored.modules())
    assert all(type(m) is nn.BatchNorm2d for m in restored.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    enc.eval(), restored.eval()
    torch.testing.assert_close(restored(x), enc(x))
