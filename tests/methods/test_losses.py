"""Each loss against a slow loop written from the paper's formula: values and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from methods.losses import (barlow_twins_loss, byol_loss, dino_loss, mae_loss, moco_loss, negative_cosine_loss,
                            nt_xent_loss, patchify, swav_loss, vicreg_loss)


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


def negative_cosine_reference(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam eq. 1: D(p, z) = -p/|p| . z/|z| per row, mean."""
    return -sum(_cos(p[i], z[i]) for i in range(p.size(0))) / p.size(0)


def _standardise(x: torch.Tensor, unbiased: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Column means and variances, one column and one sample at a time."""
    n, d = x.shape
    means = torch.stack([sum(x[b, j] for b in range(n)) / n for j in range(d)])
    var = torch.stack([sum((x[b, j] - means[j]) ** 2 for b in range(n)) / (n - 1 if unbiased else n)
                       for j in range(d)])
    return means, var


def barlow_twins_reference(z1: torch.Tensor, z2: torch.Tensor, lambd: float) -> torch.Tensor:
    """Barlow Twins eq. 1/2: C_ij = sum_b zn1_bi zn2_bj / N, zn standardised with the biased var."""
    n, d = z1.shape
    m1, v1 = _standardise(z1, unbiased=False)
    m2, v2 = _standardise(z2, unbiased=False)
    zn1 = (z1 - m1) / torch.sqrt(v1 + 1e-5)
    zn2 = (z2 - m2) / torch.sqrt(v2 + 1e-5)
    loss = z1.new_zeros(())
    for i in range(d):
        for j in range(d):
            c = sum(zn1[b, i] * zn2[b, j] for b in range(n)) / n
            loss = loss + ((1 - c) ** 2 if i == j else lambd * c ** 2)
    return loss


def vicreg_reference(z1: torch.Tensor, z2: torch.Tensor, lam: float, mu: float, nu: float) -> torch.Tensor:
    """VICReg as the official `main_vicreg.py` (VICReg.forward): invariance the mean over n*d entries,
    `std_loss = mean(relu(1 - std_x)) / 2 + mean(relu(1 - std_y)) / 2` (the two branches averaged)."""
    n, d = z1.shape
    sim = sum(((z1[b] - z2[b]) ** 2).sum() for b in range(n)) / (n * d)

    def v(z: torch.Tensor) -> torch.Tensor:
        _, var = _standardise(z, unbiased=True)
        return sum(torch.clamp(1 - torch.sqrt(var[j] + 1e-4), min=0) for j in range(d)) / d

    def c(z: torch.Tensor) -> torch.Tensor:
        means, _ = _standardise(z, unbiased=True)
        total = z.new_zeros(())
        for i in range(d):
            for j in range(d):
                if i != j:
                    cov = sum((z[b, i] - means[i]) * (z[b, j] - means[j]) for b in range(n)) / (n - 1)
                    total = total + cov ** 2
        return total / d

    return lam * sim + mu * (v(z1) / 2 + v(z2) / 2) + nu * (c(z1) + c(z2))


def dino_reference(student: list[torch.Tensor], teacher: list[torch.Tensor], center: torch.Tensor,
                   ts: float, tt: float) -> torch.Tensor:
    """DINO eq. 3 / lightly's DINOLoss: H(P_t, P_s) per sample, over pairs with different views."""
    total, terms = student[0].new_zeros(()), 0
    for it, t in enumerate(teacher):
        for iv, s in enumerate(student):
            if iv == it:
                continue
            pair = student[0].new_zeros(())
            for b in range(s.size(0)):
                et = torch.exp((t[b].detach() - center) / tt)
                pt = et / et.sum()
                log_ps = s[b] / ts - torch.log(torch.exp(s[b] / ts).sum())
                pair = pair - (pt * log_ps).sum()
            total = total + pair / s.size(0)
            terms += 1
    return total / terms


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


@pytest.mark.parametrize("n,d", [(1, 3), (5, 8)])
def test_negative_cosine_loss_matches_reference_and_leaves_detaching_to_the_caller(n: int, d: int) -> None:
    p, z = _leaves((n, d), (n, d), seed=300 + n)
    rp, rz = (t.detach().clone().requires_grad_() for t in (p, z))
    loss = negative_cosine_loss(p, z)
    ref = negative_cosine_reference(rp, rz)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(p.grad, rp.grad)
    torch.testing.assert_close(z.grad, rz.grad)  # z gets a gradient: SimSiam detaches it itself
    torch.testing.assert_close(negative_cosine_loss(z, 2 * z), -torch.ones((), dtype=torch.float64))


@pytest.mark.parametrize("n,d", [(2, 3), (6, 5)])
@pytest.mark.parametrize("lambd", [0.0051, 0.5])
def test_barlow_twins_loss_matches_reference(n: int, d: int, lambd: float) -> None:
    z1, z2 = _leaves((n, d), (n, d), seed=400 + n)
    r1, r2 = (t.detach().clone().requires_grad_() for t in (z1, z2))
    loss = barlow_twins_loss(3 * z1 + 1, z2, lambd=lambd)  # scale and shift: BN must undo them
    ref = barlow_twins_reference(3 * r1 + 1, r2, lambd)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(z1.grad, r1.grad)
    torch.testing.assert_close(z2.grad, r2.grad)


def test_barlow_twins_loss_is_near_zero_for_identical_decorrelated_views() -> None:
    # Two identical views whose dimensions are uncorrelated: C = I up to the BN eps.
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    assert barlow_twins_loss(z, z.clone()).item() < 1e-8


@pytest.mark.parametrize("n,d", [(2, 3), (7, 4)])
@pytest.mark.parametrize("weights", [(25.0, 25.0, 1.0), (1.0, 5.0, 0.5)])
def test_vicreg_loss_matches_reference(n: int, d: int, weights: tuple[float, float, float]) -> None:
    z1, z2 = _leaves((n, d), (n, d), seed=500 + n)
    r1, r2 = (t.detach().clone().requires_grad_() for t in (z1, z2))
    # 0.3 * z: the std falls under 1 in most dimensions, so the hinge of v is active.
    loss = vicreg_loss(0.3 * z1, z2, *weights)
    ref = vicreg_reference(0.3 * r1, r2, *weights)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(z1.grad, r1.grad)
    torch.testing.assert_close(z2.grad, r2.grad)


@pytest.mark.parametrize("n_local", [0, 2])
@pytest.mark.parametrize("temps", [(0.1, 0.04), (0.2, 0.07)])
def test_dino_loss_matches_reference(n_local: int, temps: tuple[float, float]) -> None:
    n, k = 3, 6
    student = _leaves(*[(n, k)] * (2 + n_local), seed=600 + n_local)
    teacher = _leaves((n, k), (n, k), seed=700)
    center = torch.randn(1, k, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref_student = [s.detach().clone().requires_grad_() for s in student]
    loss = dino_loss(student, teacher, center, *temps)
    ref = dino_reference(ref_student, [t.detach() for t in teacher], center[0], *temps)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for s, r in zip(student, ref_student):
        torch.testing.assert_close(s.grad, r.grad)
    assert all(t.grad is None for t in teacher)  # stop-gradient on the teacher is inside dino_loss


def test_dino_loss_leaves_out_a_views_pair_with_itself() -> None:
    # Two global views only: the loss is the mean of the two cross pairs, never (view i, view i).
    a = torch.tensor([[4.0, 0.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 4.0, 0.0]], dtype=torch.float64)
    center = torch.zeros(1, 3, dtype=torch.float64)
    cross = dino_loss([a, b], [a, b], center)
    same = dino_loss([a, b], [b, a], center)  # each student view now matches the OTHER teacher view
    assert same.item() < 0.01 < cross.item()


def swav_reference(scores: list[torch.Tensor], n_global: int, queue: list[torch.Tensor] | None, t: float,
                   iters: int, eps: float) -> torch.Tensor:
    """The official main_swav.py train step, one process: `distributed_sinkhorn` on [queue; out] and
    the codes of the last bs rows; subloss over every other crop / (nmb_crops - 1), / len(crops_for_assign)."""

    def distributed_sinkhorn(out: torch.Tensor) -> torch.Tensor:
        q = torch.exp(out / eps).t()
        b, k = q.shape[1], q.shape[0]
        q /= torch.sum(q)
        for _ in range(iters):
            q /= torch.sum(q, dim=1, keepdim=True)
            q /= k
            q /= torch.sum(q, dim=0, keepdim=True)
            q /= b
        q *= b
        return q.t()

    bs, loss = scores[0].size(0), scores[0].new_zeros(())
    for crop_id in range(n_global):
        with torch.no_grad():
            out = scores[crop_id].detach()
            if queue is not None:
                out = torch.cat((queue[crop_id], out))
            q = distributed_sinkhorn(out)[-bs:]
        subloss = scores[0].new_zeros(())
        for v in [v for v in range(len(scores)) if v != crop_id]:
            x = scores[v] / t
            subloss = subloss - torch.mean(torch.sum(q * torch.log_softmax(x, dim=1), dim=1))
        loss = loss + subloss / (len(scores) - 1)
    return loss / n_global


def patchify_reference(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """models_mae.py `patchify`, written out one patch at a time."""
    n, c, h, w = imgs.shape
    rows = []
    for b in range(n):
        patches = []
        for i in range(h // p):
            for j in range(w // p):
                patch = imgs[b, :, i * p:(i + 1) * p, j * p:(j + 1) * p]  # [c, p, p]
                patches.append(torch.stack([patch[:, y, x] for y in range(p) for x in range(p)]).flatten())
        rows.append(torch.stack(patches))
    return torch.stack(rows)


def mae_reference(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, p: int, norm_pix: bool) -> torch.Tensor:
    """models_mae.py `forward_loss`."""
    target = patchify_reference(imgs, p)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.e-6) ** .5
    loss = (pred - target) ** 2
    loss = loss.mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


@pytest.mark.parametrize("n_local", [0, 3])
@pytest.mark.parametrize("with_queue", [False, True])
@pytest.mark.parametrize("params", [(0.1, 3, 0.05), (0.2, 5, 0.1)])
def test_swav_loss_matches_main_swav(n_local: int, with_queue: bool, params: tuple[float, int, float]) -> None:
    n, k = 6, 7
    raw = _leaves(*[(n, k)] * (2 + n_local), seed=800 + n_local)
    scores = [torch.tanh(s) for s in raw]  # scores of unit vectors lie in [-1, 1]
    queue = [torch.tanh(q.detach()) for q in _leaves((10, k), (10, k), seed=900)] if with_queue else None
    ref_raw = [s.detach().clone().requires_grad_() for s in raw]
    loss = swav_loss(scores[:2], scores[2:], queue, *params)
    ref = swav_reference([torch.tanh(s) for s in ref_raw], 2, queue, *params)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for s, r in zip(raw, ref_raw):
        torch.testing.assert_close(s.grad, r.grad)


def test_sinkhorn_codes_are_a_balanced_assignment() -> None:
    from methods.losses import sinkhorn

    scores = torch.tanh(_leaves((12, 4), seed=3)[0].detach())
    q = sinkhorn(scores, iterations=100, epsilon=0.5)  # a softer problem converges in few iterations
    torch.testing.assert_close(q.sum(dim=1), torch.ones(12, dtype=torch.float64))  # a distribution per sample
    torch.testing.assert_close(q.sum(dim=0), torch.full((4,), 3.0, dtype=torch.float64), atol=1e-4, rtol=0)


@pytest.mark.parametrize("size,p", [((8, 8), 4), ((6, 9), 3)])
def test_patchify_matches_models_mae_order(size: tuple[int, int], p: int) -> None:
    imgs = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(patchify(imgs, p), patchify_reference(imgs, p))
    with pytest.raises(ValueError, match="not a multiple of the patch size 5"):
        patchify(imgs, 5)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_loss_matches_forward_loss(norm_pix: bool) -> None:
    g = torch.Generator().manual_seed(5)
    imgs = torch.randn(3, 3, 8, 8, generator=g, dtype=torch.float64)
    (pred,) = _leaves((3, 4, 48), seed=6)
    ref_pred = pred.detach().clone().requires_grad_()
    mask = (torch.rand(3, 4, generator=g) < 0.75).double()
    mask[0, 0] = 1.0
    loss = mae_loss(pred, patchify(imgs, 4), mask, norm_pix=norm_pix)
    ref = mae_reference(imgs, ref_pred, mask, 4, norm_pix)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(pred.grad, ref_pred.grad)
    assert torch.all(pred.grad[mask == 0] == 0)  # visible patches are not in the loss
