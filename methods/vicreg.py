"""VICReg (Bardes, Ponce & LeCun 2022, "VICReg: Variance-Invariance-Covariance Regularization for
Self-Supervised Learning"). Pattern: facebookresearch/vicreg `main_vicreg.py` (class VICReg)."""

from __future__ import annotations

from torch import Tensor, nn

from methods.diagnostics import embedding_diagnostics
from methods.heads import three_layer_projector
from methods.losses import vicreg_loss


class VICReg(nn.Module):
    """Encoder + 3-layer expander; invariance, variance and covariance terms on the expansions.

    Args:
        encoder: backbone with `output_dim`.
        projection_dim: expander output; None = 4 x encoder.output_dim (see `BarlowTwins`: 8192
            for ResNet-50, the paper's).
        hidden_dim: expander hidden width; None = 4 x encoder.output_dim.
        sim_weight: lambda, invariance (paper: 25).
        var_weight: mu, variance (paper: 25).
        cov_weight: nu, covariance (paper: 1).

    Each view goes through the network on its own, as the reference code does; BN is global with
    several workers (`sync_batchnorm`), and the variance/covariance terms span every worker's
    samples (`methods.losses.vicreg_loss`).
    """

    sync_batchnorm = True  # read by methods.prepare_for_distributed
    augment_preset = "byol"  # paper app. C.1: BYOL's augmentations

    def __init__(self, encoder: nn.Module, *, projection_dim: int | None = None,
                 hidden_dim: int | None = None, sim_weight: float = 25.0, var_weight: float = 25.0,
                 cov_weight: float = 1.0) -> None:
        super().__init__()
        self.encoder = encoder
        feat_dim = int(encoder.output_dim)
        self.projector = three_layer_projector(feat_dim, hidden_dim or 4 * feat_dim,
                                               projection_dim or 4 * feat_dim, hidden_bias=True)
        self.sim_weight, self.var_weight, self.cov_weight = sim_weight, var_weight, cov_weight

    def forward(self, x1: Tensor, x2: Tensor) -> dict[str, Tensor]:
        """x1, x2: [n, 3, H, W]. Returns the loss of eq. 6 (variance terms averaged, as main_vicreg.py) + diagnostics."""
        z1 = self.projector(self.encoder(x1))  # [n, projection_dim]
        z2 = self.projector(self.encoder(x2))
        loss = vicreg_loss(z1, z2, sim_weight=self.sim_weight, var_weight=self.var_weight,
                           cov_weight=self.cov_weight)
        return {"loss": loss, **embedding_diagnostics(z1, z2)}
