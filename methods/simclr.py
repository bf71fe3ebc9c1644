"""SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations")."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from methods.diagnostics import embedding_diagnostics
from methods.heads import simclr_projector
from methods.losses import nt_xent_loss


class SimCLR(nn.Module):
    """Encoder f, projector g, NT-Xent on the two views' projections.

    Args:
        encoder: backbone with `output_dim` (`methods.encoders.build_encoder`).
        projection_dim: output of g (paper: 128).
        hidden_dim: hidden width of g; None means encoder.output_dim (paper: 2048 for ResNet-50).
        temperature: NT-Xent temperature (paper's CIFAR-10 setting: 0.5).

    BatchNorm: both views go through the encoder as one batch, so single-process statistics are
    the paper's global BN. With several workers call `methods.prepare_for_distributed(model)`
    (`sync_batchnorm = True`), which makes every BN layer all-reduce its statistics.
    """

    sync_batchnorm = True  # read by methods.prepare_for_distributed
    augment_preset = "simclr"  # pipelines.augment.PRESETS key

    def __init__(self, encoder: nn.Module, *, projection_dim: int = 128,
                 hidden_dim: int | None = None, temperature: float = 0.5) -> None:
        super().__init__()
        self.encoder = encoder
        feat_dim = int(encoder.output_dim)
        self.projector = simclr_projector(feat_dim, hidden_dim or feat_dim, projection_dim)
        self.temperature = temperature

    def forward(self, x1: Tensor, x2: Tensor) -> dict[str, Tensor]:
        """x1, x2: [n, 3, H, W] two views of the same n images. Returns loss + diagnostics."""
        n = x1.size(0)
        z = self.projector(self.encoder(torch.cat([x1, x2])))  # [2n, projection_dim]
        z1, z2 = z[:n], z[n:]
        loss = nt_xent_loss(z1, z2, temperature=self.temperature)
        return {"loss": loss, **embedding_diagnostics(z1, z2)}
