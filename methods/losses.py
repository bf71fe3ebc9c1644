"""Losses: SimCLR's NT-Xent, MoCo's InfoNCE with a queue, BYOL's normalised regression.

All three L2-normalise their inputs, so callers pass raw projections.
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
