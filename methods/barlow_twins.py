"""Barlow Twins (Zbontar et al. 2021, "Barlow Twins: Self-Supervised Learning via Redundancy
Reduction"). Pattern: facebookresearch/barlowtwins `main.py` (class BarlowTwins)."""

from __future__ import annotations

from torch import Tensor, nn

from methods.diagnostics import embedding_diagnostics
from methods.heads import three_layer_projector
from methods.losses import barlow_twins_loss


class BarlowTwins(nn.Module):
    """Encoder + 3-layer projector; the two views' cross-correlation is pushed to the identity.

    Args:
        encoder: backbone with `output_dim`.
        projection_dim: projector output; None = 4 x encoder.output_dim.
        hidden_dim: projector hidden width; None = 4 x encoder.output_dim.
        lambd: weight of the off-diagonal term (paper: 5e-3; reference code: 0.0051).

    Widths: the paper uses 8192 for ResNet-50's 2048 features; "4 x the encoder's features" is
    that, 2048 for ResNet-18 (solo-learn's CIFAR recipe) and 1024 for the CPU ConvNet, where 8192
    would make the projector 500x the encoder.

    Each view goes through the network on its own, as the reference code does. The loss
    batch-normalises over every worker's samples (`methods.losses.barlow_twins_loss`), and
    `methods.prepare_for_distributed` makes the projector's BN global (`sync_batchnorm`), as the
    reference code's SyncBatchNorm.
    """

    sync_batchnorm = True  # read by methods.prepare_for_distributed
    augment_preset = "byol"  # paper sec. 3 / app.: BYOL's augmentations

    def __init__(self, encoder: nn.Module, *, projection_dim: int | None = None,
                 hidden_dim: int | None = None, lambd: float = 0.0051) -> None:
        super().__init__()
        self.encoder = encoder
        feat_dim = int(encoder.output_dim)
        self.projector = three_layer_projector(feat_dim, hidden_dim or 4 * feat_dim,
                                               projection_dim or 4 * feat_dim, hidden_bias=False)
        self.lambd = lambd

    def forward(self, x1: Tensor, x2: Tensor) -> dict[str, Tensor]:
        """x1, x2: [n, 3, H, W]. Returns the loss of eq. 1 on the projections + diagnostics."""
        z1 = self.projector(self.encoder(x1))  # [n, projection_dim]
        z2 = self.projector(self.encoder(x2))
        loss = barlow_twins_loss(z1, z2, lambd=self.lambd)
        return {"loss": loss, **embedding_diagnostics(z1, z2)}
