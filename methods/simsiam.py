"""SimSiam (Chen & He 2021, "Exploring Simple Siamese Representation Learning").
Pattern: facebookresearch/simsiam `simsiam/builder.py`."""

from __future__ import annotations

from torch import Tensor, nn

from methods.diagnostics import embedding_diagnostics
from methods.heads import simsiam_predictor, simsiam_projector
from methods.losses import negative_cosine_loss


class SimSiam(nn.Module):
    """Encoder + projector f, predictor h; symmetric negative cosine with a stop-gradient (eq. 4).

    Args:
        encoder: backbone with `output_dim`.
        projection_dim: output of f (paper: 2048).
        hidden_dim: hidden width of f (paper: 2048).
        predictor_hidden_dim: bottleneck of h (paper: 512).

    No momentum network: the stop-gradient alone prevents collapse (sec. 4.1). Each view goes
    through the network on its own, as the reference code does, so BatchNorm statistics are per
    view. With several workers `methods.prepare_for_distributed` makes BN global (`sync_batchnorm`),
    as the paper's SyncBN. Departure: the paper keeps the predictor's learning rate fixed (no cosine
    decay); here every parameter follows the one schedule of `orchestrator.training`.
    """

    sync_batchnorm = True  # read by methods.prepare_for_distributed
    augment_preset = "moco_v2"  # the reference code's augmentation is MoCo v2's

    def __init__(self, encoder: nn.Module, *, projection_dim: int = 2048, hidden_dim: int = 2048,
                 predictor_hidden_dim: int = 512) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = simsiam_projector(int(encoder.output_dim), hidden_dim, projection_dim)
        self.predictor = simsiam_predictor(projection_dim, predictor_hidden_dim)

    def forward(self, x1: Tensor, x2: Tensor) -> dict[str, Tensor]:
        """x1, x2: [n, 3, H, W]. L = D(p1, stopgrad(z2))/2 + D(p2, stopgrad(z1))/2."""
        z1 = self.projector(self.encoder(x1))  # [n, projection_dim]
        z2 = self.projector(self.encoder(x2))
        p1, p2 = self.predictor(z1), self.predictor(z2)  # [n, projection_dim]
        loss = 0.5 * (negative_cosine_loss(p1, z2.detach()) + negative_cosine_loss(p2, z1.detach()))
        return {"loss": loss, **embedding_diagnostics(z1, z2)}
