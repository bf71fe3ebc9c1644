"""Each loss against a slow loop written from the paper's formula: values and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from methods.losses import byol_loss, moco_loss, nt_xent_loss


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum() / (a.norm() * b.norm())


def nt_xent_reference(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """SimCLR eq. 1, one anchor at a time: 2N anchors, k != i in the denominator."""
    z = torch.cat([z1, z2])
    n2 = z.size(0)
    total = z.new_zeros(())
    for i in range(n2):
        j = (i + n2 // 2) % n2
        num = torch.exp(_cos(z[i], z[j]) / t)
        den = sum(torch.exp(_cos(z[i], z[k]) / t) for k in range(n2) if k != i)
        total = total - torch.log(num / den)
    return total / n2


def moco_reference(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, t: float) -> torch.Tensor:
    """MoCo eq. 1, one query at a time."""
    total = q.new_zeros(())
    for i in range(q.size(0)):
        pos = torch.exp(_cos(q[i], k[i]) / t)
        neg = sum(torch.exp(_cos(q[i], queue[j]) / t) for j in range(queue.size(0)))
        total = total - torch.log(pos / (pos + neg))
    return total / q.size(0)


def byol_reference(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL eq. 2: || p/|p| - z/|z| ||^2 per row, mean."""
    total = p.new_zeros(())
    for i in range(p.size(0)):
        total = total + ((p[i] / p[i].norm() - z[i] / z[i].norm()) ** 2).sum()
    return total / p.size(0)


def _leaves(*shapes: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes]


@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("temperature", [0.07, 0.2, 0.5, 1.0])
def test_nt_xent_matches_reference(n: int, temperature: float) -> None:
    z1, z2 = _leaves((n, 5), (n, 5), seed=n)
    r1, r2 = (z.detach().clone().requires_grad_() for z in (z1, z2))
    loss = nt_xent_loss(z1, z2, temperature=temperature)
    ref = nt_xent_reference(r1, r2, temperature)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(z1.grad, r1.grad)
    torch.testing.assert_close(z2.grad, r2.grad)


def test_nt_xent_masks_self_similarity_and_normalises() -> None:
    # Perfectly aligned, well separated pairs: with the diagonal masked the loss is near its floor;
    # the seed article's unmasked version would put exp(1/t) of the anchor itself in the denominator.
    z = torch.eye(4, dtype=torch.float64) * 10.0  # large norms: normalisation must undo them
    loss = nt_xent_loss(z, z.clone(), temperature=0.1)
    floor = -math.log(math.exp(10) / (math.exp(10) + 6 * math.exp(0)))
    assert loss.item() == pytest.approx(floor, rel=1e-9)


@pytest.mark.parametrize("n,queue_len", [(1, 3), (4, 16), (6, 7)])
@pytest.mark.parametrize("temperature", [0.07, 0.2, 1.0])
def test_moco_loss_matches_reference(n: int, queue_len: int, temperature: float) -> None:
    q, k, queue = _leaves((n, 6), (n, 6), (queue_len, 6), seed=100 + n)
    rq = q.detach().clone().requires_grad_()
    loss = moco_loss(q, k, queue, temperature=temperature)
    ref = moco_reference(rq, k.detach(), queue.detach(), temperature)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(q.grad, rq.grad)
    assert k.grad is None and queue.grad is None  # keys and queue are constants


@pytest.mark.parametrize("n,d", [(1, 3), (5, 8), (16, 32)])
def test_byol_loss_matches_reference(n: int, d: int) -> None:
    p, z = _leaves((n, d), (n, d), seed=200 + n)
    rp = p.detach().clone().requires_grad_()
    loss = byol_loss(p, z)
    ref = byol_reference(rp, z.detach())
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(p.grad, rp.grad)
    assert z.grad is None  # stop-gradient on the target is inside byol_loss
    torch.testing.assert_close(byol_loss(z, 3 * z), torch.zeros((), dtype=torch.float64))
