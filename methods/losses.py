"""Losses: SimCLR's NT-Xent, MoCo's InfoNCE with a queue, BYOL's normalised regression, SimSiam's
negative cosine, Barlow Twins' cross-correlation, VICReg's three terms, DINO's cross-entropy, SwAV's
swapped prediction with Sinkhorn-Knopp codes and MAE's reconstruction of the masked patches.

Callers pass raw projections: each loss normalises (or batch-normalises) what its paper does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from methods import dist


def nt_xent_loss(z1: Tensor, z2: Tensor, temperature: float = 0.5, gather: bool = True) -> Tensor:
    """NT-Xent, SimCLR eq. 1 (Chen et al. 2020):

    l(i, j) = -log exp(sim(z_i, z_j)/t) / sum_{k != i} exp(sim(z_i, z_k)/t), sim = cosine.

    Every view is an anchor (2N anchors for N pairs); its own similarity is masked out of the
    denominator (the seed article's version neither normalised nor masked, so self-similarity
    dominated). With torch.distributed initialised and `gather=True`, the candidates are the
    2N views of all workers, gathered with a gradient-correct all-gather (`methods.dist`); the
    anchors are this worker's 2n views and the loss is their mean. Under DDP, whose gradient
    averaging over ranks turns per-rank means into the global mean, the parameter gradients equal
    those of one process on the concatenated batch. Every rank must pass the same n.

    Args:
        z1: [n, d] projections of the first views on this worker.
        z2: [n, d] projections of the second views, row i the positive of z1's row i.
        temperature: t in eq. 1 (paper: 0.5 at batch 4096 in the CIFAR experiments; 0.1-0.5).
        gather: take negatives from every worker when distributed.

    Returns:
        Scalar loss.
    """
    n = z1.size(0)
    z1 = F.normalize(z1, dim=1)
    z2 = F.normalize(z2, dim=1)
    if gather and dist.world_size() > 1:
        c1, c2 = dist.gather_with_grad(z1), dist.gather_with_grad(z2)  # [N, d] each
        offset = dist.rank() * n
    else:
        c1, c2, offset = z1, z2, 0
    big_n = c1.size(0)
    candidates = torch.cat([c1, c2])  # [2N, d]
    anchors = torch.cat([z1, z2])  # [2n, d]
    logits = anchors @ candidates.T / temperature  # [2n, 2N]
    local = torch.arange(n, device=z1.device) + offset  # anchors' global row in c1 (or c2)
    self_idx = torch.cat([local, local + big_n])
    pos_idx = torch.cat([local + big_n, local])
    rows = torch.arange(2 * n, device=z1.device)
    logits[rows, self_idx] = float("-inf")  # mask each anchor's similarity with itself
    return F.cross_entropy(logits, pos_idx)


def moco_loss(q: Tensor, k: Tensor, queue: Tensor, temperature: float = 0.2) -> Tensor:
    """MoCo's InfoNCE (He et al. 2020, eq. 1; T = 0.2 in MoCo v2):

    L_q = -log exp(q.k+/T) / (exp(q.k+/T) + sum_{k- in queue} exp(q.k-/T)).

    Args:
        q: [n, d] queries (gradient flows through them).
        k: [n, d] positive keys from the momentum encoder; detached here.
        queue: [K, d] negative keys, one per row; detached here.
        temperature: T.

    Returns:
        Scalar loss, mean over the n queries. q, k and the queue rows are L2-normalised here
        (MoCo normalises them in the model; doing it here makes the loss self-contained).
    """
    q = F.normalize(q, dim=1)
    k = F.normalize(k.detach(), dim=1)
    queue = F.normalize(queue.detach().clone(), dim=1)
    l_pos = (q * k).sum(dim=1, keepdim=True)  # [n, 1]
    l_neg = q @ queue.T  # [n, K]
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    labels = torch.zeros(q.size(0), dtype=torch.long, device=q.device)  # positive is column 0
    return F.cross_entropy(logits, labels)


def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """BYOL's normalised regression loss, one direction (Grill et al. 2020, eq. 2):

    L = mean_i ||p_i/|p_i| - z_i/|z_i| ||^2 = mean_i (2 - 2 cos(p_i, z_i)).

    Args:
        p: [n, d] online predictions.
        z: [n, d] target projections. Detached HERE (BYOL's stop-gradient), so callers need not.

    Returns:
        Scalar loss in [0, 4]. BYOL sums it over both view orders (`methods.byol.BYOL`).
    """
    return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=1)).mean()


def negative_cosine_loss(p: Tensor, z: Tensor) -> Tensor:
    """SimSiam's D(p, z) = -cos(p, z), mean over the batch (Chen & He 2021, eq. 1).

    Unlike `byol_loss`, z is NOT detached here: the stop-gradient is part of SimSiam's symmetric
    loss (eq. 3/4), which the method writes out (`methods.simsiam.SimSiam`), as lightly's
    `NegativeCosineSimilarity` leaves it to the caller.

    Args:
        p: [n, d] predictions.
        z: [n, d] projections.

    Returns:
        Scalar in [-1, 1].
    """
    return -F.cosine_similarity(p, z, dim=1).mean()


def _gather_both(z1: Tensor, z2: Tensor, gather: bool) -> tuple[Tensor, Tensor]:
    """Every worker's rows (gradient-correct, `methods.dist`) when distributed and asked, else as is,
    at least in float32: the statistics below sum thousands of squares, which bfloat16 (8 bits of mantissa,
    what autocast gives a matmul) rounds badly; a Barlow Twins loss of 191.71 came out as 192.0."""
    wide = torch.promote_types(z1.dtype, torch.float32)  # float64 stays float64
    z1, z2 = z1.to(wide), z2.to(wide)
    if gather and dist.world_size() > 1:
        return dist.gather_with_grad(z1), dist.gather_with_grad(z2)
    return z1, z2


def barlow_twins_loss(z1: Tensor, z2: Tensor, lambd: float = 0.0051, gather: bool = True) -> Tensor:
    """Barlow Twins (Zbontar et al. 2021, eq. 1 and 2):

    L = sum_i (1 - C_ii)^2 + lambd * sum_i sum_{j != i} C_ij^2,
    C_ij = sum_b zn1_{b,i} zn2_{b,j} / N, zn = z batch-normalised per dimension (mean 0, biased
    variance 1, eps 1e-5 as `nn.BatchNorm1d(affine=False)` in the reference code).

    With torch.distributed initialised and `gather=True`, the normalisation statistics and C are
    over the N samples of ALL workers (the reference code gets the same from SyncBatchNorm and an
    all-reduce of C): both projections are gathered with the gradient-correct all-gather, so every
    rank computes the same global loss, and under DDP (which averages the ranks' gradients) the
    parameter gradients equal those of one process on the concatenated batch.

    Args:
        z1: [n, d] projections of the first views on this worker.
        z2: [n, d] projections of the second views (row i pairs with z1's row i).
        lambd: weight of the redundancy-reduction term (paper: 5e-3; reference code's default
            0.0051). Departure from solo-learn: no `scale_loss` factor (its CIFAR recipe uses 0.1).
        gather: normalise and correlate over every worker's samples when distributed.

    Returns:
        Scalar loss.
    """
    z1, z2 = _gather_both(z1, z2, gather)  # [N, d] each, float32
    big_n = z1.size(0)
    with torch.autocast(z1.device.type, enabled=False):
        zn1 = F.batch_norm(z1, None, None, training=True)  # biased variance, no affine
        zn2 = F.batch_norm(z2, None, None, training=True)
        c = zn1.T @ zn2 / big_n  # [d, d] cross-correlation
        on_diag = (torch.diagonal(c) - 1).pow(2).sum()
        off_diag = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on_diag + lambd * off_diag


def vicreg_loss(z1: Tensor, z2: Tensor, sim_weight: float = 25.0, var_weight: float = 25.0,
                cov_weight: float = 1.0, gather: bool = True) -> Tensor:
    """VICReg (Bardes et al. 2022, eq. 1-6):

    L = lambda s(Z, Z') + mu [v(Z) + v(Z')] / 2 + nu [c(Z) + c(Z')],
    s = mean squared error over all n*d entries (the reference code's `F.mse_loss`; eq. 5 writes
    the per-sample sum over dimensions, i.e. d times this), v(Z) = mean_j max(0, 1 - sqrt(Var(z_j)
    + 1e-4)) with the unbiased variance, c(Z) = sum_{i != j} Cov(Z)_ij^2 / d with
    Cov = (Z - mean)^T (Z - mean) / (N - 1).

    The two variance terms are AVERAGED, as the official `main_vicreg.py`
    (`std_loss = mean(relu(1 - std_x)) / 2 + mean(relu(1 - std_y)) / 2`) and lightly's `VICRegLoss`;
    the paper's eq. 6 writes their sum. The 25 / 25 / 1 defaults were tuned with the average.

    With torch.distributed initialised and `gather=True`, all three terms are computed on the
    gathered global batch (the reference code gathers for variance and covariance; the invariance
    mean over the global batch equals the DDP average of the per-worker means), so every rank
    computes the same loss and DDP's gradients equal one process on the concatenated batch.

    Args:
        z1: [n, d] projections (the paper's expander outputs) of the first views.
        z2: [n, d] of the second views.
        sim_weight: lambda (paper: 25). var_weight: mu (25). cov_weight: nu (1).
        gather: variance and covariance over every worker's samples when distributed.

    Returns:
        Scalar loss.
    """
    z1, z2 = _gather_both(z1, z2, gather)  # [N, d] each, float32
    with torch.autocast(z1.device.type, enabled=False):
        invariance = F.mse_loss(z1, z2)
        variance = (_vicreg_variance(z1) + _vicreg_variance(z2)) / 2  # main_vicreg.py's std_loss
        covariance = _vicreg_covariance(z1) + _vicreg_covariance(z2)
    return sim_weight * invariance + var_weight * variance + cov_weight * covariance


def _vicreg_variance(z: Tensor, eps: float = 1e-4) -> Tensor:
    std = torch.sqrt(z.var(dim=0) + eps)  # [d], unbiased
    return F.relu(1 - std).mean()


def _vicreg_covariance(z: Tensor) -> Tensor:
    n, d = z.shape
    centred = z - z.mean(dim=0)
    cov = centred.T @ centred / (n - 1)  # [d, d]
    return (cov.pow(2).sum() - torch.diagonal(cov).pow(2).sum()) / d


def dino_loss(student_out: list[Tensor], teacher_out: list[Tensor], center: Tensor,
              student_temp: float = 0.1, teacher_temp: float = 0.04) -> Tensor:
    """DINO's cross-entropy between teacher and student views (Caron et al. 2021, eq. 3 and Alg. 1):

    L = mean over pairs (t, s), t a teacher (global) view and s a DIFFERENT student view, of
    mean_b sum_k -P_t[b, k] log P_s[b, k], with P_t = softmax((g_t - center) / teacher_temp) and
    P_s = softmax(g_s / student_temp). As the reference `DINOLoss` and lightly's `DINOLoss`: the
    student list holds the global views first, in the teacher's order, so student view i and
    teacher view i are the same crop and that pair is left out.

    The teacher side is detached here (DINO's stop-gradient). The center is not updated here: the
    method does it after the loss (`methods.dino.DINO`).

    Args:
        student_out: V tensors [n, K], the student's outputs for every view (globals first).
        teacher_out: G tensors [n, K], the teacher's outputs for the global views (G <= V).
        center: [1, K] or [K], the running mean of the teacher's outputs.
        student_temp: tau_s (paper: 0.1).
        teacher_temp: tau_t at this step (paper: 0.04, or a warm-up 0.04 -> 0.07).

    Returns:
        Scalar loss.
    """
    log_p_student = [F.log_softmax(s / student_temp, dim=-1) for s in student_out]
    total, terms = student_out[0].new_zeros(()), 0
    for it, t in enumerate(teacher_out):
        p_teacher = F.softmax((t.detach() - center) / teacher_temp, dim=-1)  # [n, K]
        for iv, log_p in enumerate(log_p_student):
            if iv == it:
                continue
            total = total + (-p_teacher * log_p).sum(dim=-1).mean()
            terms += 1
    return total / max(terms, 1)


@torch.no_grad()
def sinkhorn(scores: Tensor, iterations: int = 3, epsilon: float = 0.05, gather: bool = True) -> Tensor:
    """SwAV's Sinkhorn-Knopp codes, as the official `main_swav.py` `distributed_sinkhorn`.

    Q = exp(scores / epsilon)^T [K, B], then alternately rows (prototypes) to total 1/K and columns
    (samples) to total 1/B. With torch.distributed initialised and `gather=True`, the sums run over
    every worker's samples (all-reduce), so the codes are those of the global batch.

    Args:
        scores: [n, K] prototype scores of this worker's samples (and its queue, if any).

    Returns:
        [n, K] codes, each row summing to 1.
    """
    world = dist.world_size() if gather else 1
    with torch.autocast(scores.device.type, enabled=False):
        q = torch.exp(scores.to(torch.promote_types(scores.dtype, torch.float32)) / epsilon).T  # [K, n]
        big_b, k = q.size(1) * world, q.size(0)
        total = q.sum()
        if world > 1:
            torch.distributed.all_reduce(total)
        q = q / total
        for _ in range(iterations):
            rows = q.sum(dim=1, keepdim=True)  # [K, 1]
            if world > 1:
                torch.distributed.all_reduce(rows)
            q = q / rows / k
            q = q / q.sum(dim=0, keepdim=True) / big_b
        return (q * big_b).T


def swav_loss(high_res: list[Tensor], low_res: list[Tensor], queue: list[Tensor] | None = None,
              temperature: float = 0.1, sinkhorn_iterations: int = 3, sinkhorn_epsilon: float = 0.05,
              gather: bool = True) -> Tensor:
    """SwAV's swapped prediction (Caron et al. 2020, eq. 1-3; the official `main_swav.py` train step).

    For each high-resolution (global) crop i: codes q_i = Sinkhorn(scores_i [+ queue_i]) (no
    gradient), then the cross-entropy -sum_k q_i log softmax(scores_v / temperature) of every OTHER
    crop v (global and low-resolution) is averaged over those V - 1 crops; the result is averaged
    over the crops i. In one process equal to lightly's `SwaVLoss(temperature, sinkhorn_iterations,
    sinkhorn_epsilon)(high_res, low_res, queue)`. With torch.distributed and `gather=True` the codes
    are computed over the global batch (`sinkhorn`), and under DDP the gradients equal one process
    on the concatenated batch.

    Args:
        high_res: G tensors [n, K]: prototype scores of the global crops (features and prototypes L2-normalised).
        low_res: tensors [n, K] of the local crops (may be empty).
        queue: G tensors [Q, K]: the scores of queued features of earlier batches, one queue per
            global crop, used only for the codes; None = no queue.
        temperature: tau of the softmax (paper: 0.1).
        sinkhorn_iterations: 3 (paper). sinkhorn_epsilon: 0.05 (paper).
        gather: Sinkhorn over every worker's samples when distributed.

    Returns:
        Scalar loss.
    """
    n_crops = len(high_res) + len(low_res)
    loss = high_res[0].new_zeros(())
    for i, scores in enumerate(high_res):
        with torch.no_grad():
            out = scores.detach()
            if queue is not None:
                out = torch.cat([out, queue[i].detach()])
            q = sinkhorn(out, sinkhorn_iterations, sinkhorn_epsilon, gather=gather)[:scores.size(0)]  # [n, K]
        sub = loss.new_zeros(())
        for v, other in enumerate([*high_res, *low_res]):
            if v != i:
                sub = sub - (q * F.log_softmax(other / temperature, dim=1)).sum(dim=1).mean()
        loss = loss + sub / (n_crops - 1)
    return loss / len(high_res)


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """[B, C, H, W] -> [B, N, patch_size**2 * C], as the official MAE `models_mae.py` `patchify`:
    patches in row-major order, each flattened as (row in patch, column in patch, channel).

    H and W must be multiples of `patch_size` (they need not be equal: N = H/p * W/p).
    """
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"patchify: image size {h}x{w} is not a multiple of the patch size {p}")
    x = images.reshape(b, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def mae_loss(pred: Tensor, patches: Tensor, mask: Tensor, norm_pix: bool = True) -> Tensor:
    """MAE's reconstruction loss (He et al. 2022, sec. 3), as the official `forward_loss`.

    Mean squared error per patch, averaged over the MASKED patches only; with `norm_pix` the
    targets are each patch's pixels normalised by its own mean and variance (unbiased, eps 1e-6).

    Args:
        pred: [B, N, P] the decoder's prediction of every patch.
        patches: [B, N, P] the image's patches (`patchify`).
        mask: [B, N], 1 where a patch was masked (hidden from the encoder), 0 where visible.
        norm_pix: per-patch normalised targets (the paper's default for its best results).

    Returns:
        Scalar loss.
    """
    target = patches
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(dim=-1)  # [B, N]
    return (per_patch * mask).sum() / mask.sum()
