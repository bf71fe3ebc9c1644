"""Every method on a CUDA device: the same loss as on CPU, and a finite bf16 training step.

Skipped where there is no GPU (CI); `benchmarks/gpu_check.sh` runs them on a GPU machine.
"""

from __future__ import annotations

import copy

import pytest
import torch

from methods import METHODS, build_encoder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")

# One BN group for MoCo's shuffle-BN: its permutation comes from the device's own generator, which
# differs between CPU and CUDA; with one group the permutation cannot change the batch statistics.
SAME_ON_ANY_DEVICE = {"moco": {"shuffle_bn_groups": 1}}


def _encoder(name: str) -> torch.nn.Module:
    """A ResNet-18 CIFAR stem; MAE's ViT-Tiny/4 (it masks ViT patches)."""
    if name == "mae":
        return build_encoder("vit_tiny", patch_size=4)
    return build_encoder("resnet18", cifar_stem=True)


@pytest.fixture(autouse=True)
def _same_mae_masks_on_any_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """MAE's masks from CPU noise: CUDA's generator draws other numbers than the CPU's for one seed."""
    import methods.mae

    original = methods.mae.random_masking

    def masking(n: int, length: int, mask_ratio: float, device: torch.device) -> object:
        noise = torch.rand(n, length, generator=torch.Generator().manual_seed(n * length)).to(device)
        return original(n, length, mask_ratio, device, noise=noise)

    monkeypatch.setattr(methods.mae, "random_masking", masking)


def _views(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 32, 32, generator=g)
    return x + 0.1 * torch.randn(x.shape, generator=g), x + 0.1 * torch.randn(x.shape, generator=g)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_loss_on_cuda_equals_loss_on_cpu_in_float32(name: str) -> None:
    torch.manual_seed(0)
    cpu = METHODS[name](_encoder(name), **SAME_ON_ANY_DEVICE.get(name, {}))
    gpu = copy.deepcopy(cpu).cuda()
    x1, x2 = _views()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # float32 on both sides
    try:
        with torch.no_grad():
            expected = cpu(x1, x2)["loss"].item()
            got = gpu(x1.cuda(), x2.cuda())["loss"].item()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    assert got == pytest.approx(expected, rel=1e-3, abs=1e-4)


def _loss_and_grad(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], bf16: bool) -> tuple[float, torch.Tensor]:
    """Loss and flattened parameter gradient of one step on a copy (MoCo's queue, DINO's center stay put)."""
    model = copy.deepcopy(model)
    torch.manual_seed(1)  # the same shuffle-BN permutation for both
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        loss = model(*inputs)["loss"]
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("name", sorted(METHODS))
def test_bf16_autocast_step_matches_float32(name: str) -> None:
    """The training step's precision on a GPU: bf16 autocast (as the worker loop runs it) gives the
    float32 loss to 2% and a gradient pointing nearly the same way, all finite. A loss computed in bf16
    (Barlow Twins' cross-correlation once was) shows here first."""
    torch.manual_seed(0)
    model = METHODS[name](_encoder(name)).cuda().to(memory_format=torch.channels_last)
    x1, x2 = (v.cuda().contiguous(memory_format=torch.channels_last) for v in _views(64))
    inputs: tuple[torch.Tensor, ...] = (x1, x2)
    if name in ("dino", "swav"):  # with two local crops, as multi-crop training feeds it
        inputs += (torch.nn.functional.interpolate(torch.stack([x1, x2]).flatten(0, 1), size=16).view(2, 64, 3, 16, 16),)
    loss32, grad32 = _loss_and_grad(model, inputs, bf16=False)
    loss16, grad16 = _loss_and_grad(model, inputs, bf16=True)
    assert torch.isfinite(grad16).all() and torch.isfinite(torch.tensor(loss16))
    assert loss16 == pytest.approx(loss32, rel=2e-2, abs=1e-3)
    # bf16 rounding alone turns a ResNet-18's first gradient by 0.91-0.94 cosine (SimCLR, SimSiam,
    # VICReg, ... on the H200); a broken path (NaN, overflow, a sign or a term lost) falls far below.
    assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0).item() > 0.85
