"""Detached scalars every method reports next to its loss.

Alignment and uniformity are Wang & Isola 2020 (eq. 4 and 5, alpha = 2, t = 2) on L2-normalised
embeddings; `z_std` is the mean per-dimension std of the normalised embeddings (BYOL/SimSiam's
collapse indicator: 1/sqrt(d) when spread out, 0 when collapsed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DIAGNOSTICS: tuple[str, ...] = ("pos_sim", "neg_sim", "alignment", "uniformity", "z_std")


@torch.no_grad()
def embedding_diagnostics(z1: Tensor, z2: Tensor) -> dict[str, Tensor]:
    """Diagnostics of two views' embeddings (this worker's rows only).

    Args:
        z1: [n, d] embeddings of the first views.
        z2: [n, d] embeddings of the second views; row i is the positive of z1's row i.

    Returns:
        dict with the detached scalars named in `DIAGNOSTICS`: mean cosine of positive pairs
        (`pos_sim`), mean cosine between different images across the views (`neg_sim`),
        `alignment` (mean squared distance of positives), `uniformity` (log mean exp(-2 d^2) over
        distinct pairs within z1), `z_std`.
    """
    z1 = F.normalize(z1.detach().float(), dim=1)
    z2 = F.normalize(z2.detach().float(), dim=1)
    n = z1.size(0)
    sim = z1 @ z2.T  # [n, n]
    pos = sim.diagonal().mean()
    off = ~torch.eye(n, dtype=torch.bool, device=z1.device)
    neg = sim[off].mean() if n > 1 else torch.zeros((), device=z1.device)
    alignment = (z1 - z2).pow(2).sum(dim=1).mean()
    sq = torch.cdist(z1, z1).pow(2)[off]
    uniformity = sq.mul(-2).exp().mean().log() if n > 1 else torch.zeros((), device=z1.device)
    z_std = z1.std(dim=0).mean() if n > 1 else torch.zeros((), device=z1.device)
    return {"pos_sim": pos, "neg_sim": neg, "alignment": alignment, "uniformity": uniformity,
            "z_std": z_std}
