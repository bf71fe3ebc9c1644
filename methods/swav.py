"""SwAV (Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster
Assignments"). Pattern: facebookresearch/swav `main_swav.py` (train step, queue, prototype freeze)
and `src/resnet50.py` (projection head, prototypes)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods.diagnostics import embedding_diagnostics
from methods.losses import swav_loss


class SwAV(nn.Module):
    """Encoder + projection head + prototypes; swapped prediction of Sinkhorn codes across crops.

    Args:
        encoder: backbone with `output_dim`.
        projection_dim: the L2-normalised embedding (paper: 128).
        hidden_dim: the projection head's hidden width (paper: 2048).
        num_prototypes: K, a linear layer without bias on the embedding (paper: 3000).
        temperature: tau of the swapped prediction (paper: 0.1).
        sinkhorn_iterations: 3 (paper). sinkhorn_epsilon: 0.05 (paper).
        queue_length: features kept from earlier batches per global crop and worker, used only in the
            codes (main_swav.py `--queue_length`, 3840 in its small-batch recipe; 0 = no queue).
        queue_start_epoch: the queue is used from this epoch on (counted from 0; `--epoch_queue_starts` 15).
        freeze_prototypes_epochs: the prototypes take no step for this many epochs (main_swav.py
            `--freeze_prototypes_niters` 313, one epoch at its batch size).

    Views: `forward(x1, x2, local_views)` takes the 2 global crops and optionally local crops
    [V, n, 3, h, w] (multi-crop, as DINO's); the same prototypes score every crop. The prototypes
    are L2-normalised in place at the start of each training forward (main_swav.py does so at the
    start of each iteration), which is the same as after each optimiser step. The codes are computed
    over every worker's samples (`methods.losses.sinkhorn`). The queue is a per-worker buffer, as
    the reference's per-rank queue file (a resumed run gets rank 0's queue on every rank). The
    training loop calls `on_epoch_start(epoch)` and `before_optimizer_step()` (the prototype freeze).
    As the reference, the queue joins the codes once its last slot is filled. Departures: the
    prototypes are frozen for whole epochs (`freeze_prototypes_niters` counts iterations; its 313
    is one ImageNet epoch at batch 4096); the crops are `pipelines.augment`'s (SimCLR's global
    crops, 0.08-1, not 0.14-1; DINO's local-crop scale 0.05-0.4, not 0.05-0.14). BatchNorm is
    global with several workers (`sync_batchnorm`), as the reference's SyncBN.
    """

    sync_batchnorm = True  # read by methods.prepare_for_distributed
    augment_preset = "simclr"  # SwAV's colour distortion and blur are SimCLR's (strength 1.0)

    def __init__(self, encoder: nn.Module, *, projection_dim: int = 128, hidden_dim: int = 2048,
                 num_prototypes: int = 3000, temperature: float = 0.1, sinkhorn_iterations: int = 3,
                 sinkhorn_epsilon: float = 0.05, queue_length: int = 0, queue_start_epoch: int = 15,
                 freeze_prototypes_epochs: int = 1) -> None:
        super().__init__()
        self.encoder = encoder
        feat_dim = int(encoder.output_dim)
        self.projector = nn.Sequential(  # src/resnet50.py: Linear, BN1d, ReLU, Linear
            nn.Linear(feat_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, projection_dim))
        self.prototypes = nn.Linear(projection_dim, num_prototypes, bias=False)
        self.temperature = temperature
        self.sinkhorn_iterations, self.sinkhorn_epsilon = sinkhorn_iterations, sinkhorn_epsilon
        self.queue_start_epoch = queue_start_epoch
        self.freeze_prototypes_epochs = freeze_prototypes_epochs
        self.epoch = 0  # set by on_epoch_start
        # [2 global crops, queue_length, projection_dim]; a row of zeros is a slot not yet filled.
        self.register_buffer("queue", torch.zeros(2, queue_length, projection_dim))
        self.queue: Tensor

    def forward(self, x1: Tensor, x2: Tensor, local_views: Tensor | None = None) -> dict[str, Tensor]:
        """x1, x2: [n, 3, H, W] global crops; local_views: [V, n, 3, h, w] or None."""
        if self.training:
            with torch.no_grad():  # main_swav.py: "normalize the prototypes" before each iteration
                self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        n = x1.size(0)
        z_global = F.normalize(self.projector(self.encoder(torch.cat([x1, x2]))), dim=1)  # [2n, d]
        high = list(self.prototypes(z_global).split(n))  # 2 x [n, K]
        low: list[Tensor] = []
        if local_views is not None and local_views.size(0) > 0:
            z_local = F.normalize(self.projector(self.encoder(local_views.flatten(0, 1))), dim=1)  # [V n, d]
            low = list(self.prototypes(z_local).split(n))
        queue_scores = self._queue_scores() if self.training else None
        loss = swav_loss(high, low, queue_scores, temperature=self.temperature,
                         sinkhorn_iterations=self.sinkhorn_iterations, sinkhorn_epsilon=self.sinkhorn_epsilon)
        if self.training and self.queue.size(1) > 0 and self.epoch >= self.queue_start_epoch:
            self._enqueue(z_global.detach().split(n))
        return {"loss": loss, **embedding_diagnostics(z_global[:n], z_global[n:])}

    def _queue_scores(self) -> list[Tensor] | None:
        """The queued features' scores against the current prototypes, once the queue is full."""
        if self.queue.size(1) == 0 or self.epoch < self.queue_start_epoch or not bool(self.queue[:, -1].any()):
            return None
        with torch.no_grad():  # the codes only: no gradient (swav_loss detaches them too)
            return [self.prototypes(q) for q in self.queue]  # 2 x [Q, K]

    @torch.no_grad()
    def _enqueue(self, z: tuple[Tensor, ...]) -> None:
        """main_swav.py: shift the queue by the batch and put this batch's embeddings first."""
        n = min(z[0].size(0), self.queue.size(1))
        for i in range(2):
            self.queue[i, n:] = self.queue[i, :-n].clone()
            self.queue[i, :n] = z[i][:n].to(self.queue.dtype)

    def on_epoch_start(self, epoch: int) -> None:
        """Called by the training loop before each epoch; `epoch` counts from 0."""
        self.epoch = epoch

    def before_optimizer_step(self) -> None:
        """main_swav.py: "cancel gradients for the prototypes" while they are frozen."""
        if self.epoch < self.freeze_prototypes_epochs:
            self.prototypes.weight.grad = None
