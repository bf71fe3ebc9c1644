"""BYOL (Grill et al. 2020, "Bootstrap Your Own Latent")."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from methods.diagnostics import embedding_diagnostics
from methods.heads import byol_predictor, byol_projector
from methods.losses import byol_loss
from methods.momentum import ema_update, frozen_copy
from methods.schedules import cosine_schedule


class BYOL(nn.Module):
    """Online encoder + projector + predictor; target encoder + projector updated by EMA only.

    Args:
        encoder: backbone with `output_dim`; the online encoder, `self.encoder`.
        projection_dim: projector/predictor output (paper: 256).
        hidden_dim: projector/predictor hidden width (paper: 4096).
        momentum: base target decay tau_base (paper: 0.996); tau rises to 1 on a cosine schedule.

    The target is NOT updated in `forward` (the seed article's defect): the training loop calls
    `update_momentum(progress)` after each optimiser step. BatchNorm: both views form one batch;
    with several workers `methods.prepare_for_distributed` makes BN global (`sync_batchnorm`),
    as BYOL's batch statistics span all devices.
    """

    sync_batchnorm = True  # read by methods.prepare_for_distributed
    augment_preset = "byol"  # pipelines.augment.PRESETS key

    def __init__(self, encoder: nn.Module, *, projection_dim: int = 256, hidden_dim: int = 4096,
                 momentum: float = 0.996) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = byol_projector(int(encoder.output_dim), hidden_dim, projection_dim)
        self.predictor = byol_predictor(projection_dim, hidden_dim)
        self.encoder_target = frozen_copy(self.encoder)
        self.projector_target = frozen_copy(self.projector)
        self.base_momentum = momentum
        self.momentum = momentum  # current tau, set by update_momentum

    def forward(self, x1: Tensor, x2: Tensor) -> dict[str, Tensor]:
        """x1, x2: [n, 3, H, W]. Loss = L(p1, z2') + L(p2, z1'), the paper's symmetrised sum (eq. 2)."""
        n = x1.size(0)
        x = torch.cat([x1, x2])
        z_online = self.projector(self.encoder(x))  # [2n, projection_dim]
        p = self.predictor(z_online)  # [2n, projection_dim]
        with torch.no_grad():
            z_target = self.projector_target(self.encoder_target(x))  # [2n, projection_dim]
        loss = byol_loss(p[:n], z_target[n:]) + byol_loss(p[n:], z_target[:n])
        return {"loss": loss, **embedding_diagnostics(z_online[:n], z_online[n:])}

    @torch.no_grad()
    def update_momentum(self, progress: float) -> None:
        """Set tau = 1 - (1 - tau_base)(cos(pi progress) + 1)/2 and EMA the target with it.

        Args:
            progress: step / total_steps in [0, 1], after the optimiser step of that step.
        """
        self.momentum = cosine_schedule(progress, 1.0, self.base_momentum, 1.0)
        ema_update(self.encoder_target, self.encoder, self.momentum)
        ema_update(self.projector_target, self.projector, self.momentum)
