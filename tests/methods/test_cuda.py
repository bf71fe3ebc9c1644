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


def _views(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 32, 32, generator=g)
    return x + 0.1 * torch.randn(x.shape, generator=g), x + 0.1 * torch.randn(x.shape, generator=g)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_loss_on_cuda_equals_loss_on_cpu_in_float32(name: str) -> None:
    torch.manual_seed(0)
    cpu = METHODS[name](build_encoder("resnet18", cifar_stem=True), **SAME_ON_ANY_DEVICE.get(name, {}))
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


def _queue_kept(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """MoCo's queue and pointer as they are: a repeated batch would otherwise fill the queue with its
    own keys, which then serve as negatives and push the loss up by design."""
    return {k: v.clone() for k, v in model.named_buffers() if k.startswith("queue")}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_bf16_autocast_step_on_cuda_is_finite_and_learns(name: str) -> None:
    torch.manual_seed(0)
    model = METHODS[name](build_encoder("resnet18", cifar_stem=True)).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)  # 0.05 overshoots MoCo here
    x1, x2 = (v.cuda().contiguous(memory_format=torch.channels_last) for v in _views(64))
    queue = _queue_kept(model)
    losses = []
    for _ in range(5):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x1, x2)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        if hasattr(model, "update_momentum"):
            model.update_momentum(0.5)
        for k, v in queue.items():
            getattr(model, k).copy_(v)
        losses.append(loss.item())
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < losses[0]  # the same batch and negatives five times: the loss must go down
