"""MoCo v2 (He et al. 2020, "Momentum Contrast"; Chen et al. 2020, "Improved Baselines with Momentum
Contrastive Learning"). Pattern: facebookresearch/moco `moco/builder.py`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods import dist
from methods.diagnostics import embedding_diagnostics
from methods.heads import moco_projector
from methods.losses import moco_loss
from methods.momentum import ema_update, frozen_copy


class MoCo(nn.Module):
    """Query encoder + MLP head, momentum key encoder + head, a FIFO queue of negative keys.

    Args:
        encoder: backbone with `output_dim`; it is the query encoder and `self.encoder`.
        projection_dim: key/query dimension (paper: 128).
        hidden_dim: MLP hidden width (MoCo v2: 2048).
        queue_size: K, number of negative keys (paper: 65,536). Any size works: writes wrap around.
        temperature: T (MoCo v2: 0.2).
        momentum: m of the key encoder's EMA, constant (paper: 0.999).
        shuffle_bn_groups: total number of BatchNorm groups per step across all workers (see below;
            the paper's 8 GPUs give 8). Not in the paper's code as an argument.

    Shuffle-BN (paper sec. 3.3): the query and its positive key must not get their BatchNorm
    statistics from the same subset of images, or the model recognises the current batch's key
    among the queue's by its statistics ("cheats"). The keys' images are gathered from every
    worker, permuted with one random order shared by all ranks, split among workers, encoded,
    gathered back and un-shuffled. Departure: the paper has one BN group per GPU; here each worker
    also splits its queries and its shuffled keys into ceil(shuffle_bn_groups / world_size) chunks
    (at least 2 images each) with their own statistics, like the official MoCo CIFAR-10 demo's
    SplitBatchNorm. So a single process still has 8 groups and does not leak, and 8 GPUs reduce to
    the paper's scheme. MoCo is therefore left alone by `methods.prepare_for_distributed`.

    The key encoder is updated only by `update_momentum`, which the training loop calls after each
    optimiser step (equivalent to the reference's update at the start of the next forward).
    """

    sync_batchnorm = False  # shuffle-BN instead; read by methods.prepare_for_distributed
    augment_preset = "moco_v2"  # pipelines.augment.PRESETS key

    def __init__(self, encoder: nn.Module, *, projection_dim: int = 128, hidden_dim: int = 2048,
                 queue_size: int = 65536, temperature: float = 0.2, momentum: float = 0.999,
                 shuffle_bn_groups: int = 8) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = moco_projector(int(encoder.output_dim), hidden_dim, projection_dim)
        self.encoder_momentum = frozen_copy(self.encoder)
        self.projector_momentum = frozen_copy(self.projector)
        self.temperature = temperature
        self.momentum = momentum
        self.shuffle_bn_groups = shuffle_bn_groups
        # Persistent buffers: they are part of state_dict and survive a checkpoint.
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, projection_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.queue: Tensor
        self.queue_ptr: Tensor

    def _splits(self, n: int) -> int:
        per_worker = math.ceil(self.shuffle_bn_groups / dist.world_size())
        return max(1, min(per_worker, n // 2))

    def _queries(self, x1: Tensor, splits: int) -> Tensor:
        return torch.cat([self.projector(self.encoder(c)) for c in x1.tensor_split(splits)])

    @torch.no_grad()
    def _keys(self, x2: Tensor, splits: int) -> tuple[Tensor, Tensor]:
        """Keys of this worker's x2 ([n, d]) and of every worker's ([world_size * n, d]), normalised."""
        n, world, rank = x2.size(0), dist.world_size(), dist.rank()
        x_all = dist.gather_no_grad(x2)  # [W n, 3, H, W]
        perm = dist.broadcast(torch.randperm(world * n, device=x2.device))  # same on every rank
        x_mine = x_all[perm.view(world, n)[rank]]  # this worker's share of the shuffled batch
        k = torch.cat([self.projector_momentum(self.encoder_momentum(c))
                       for c in x_mine.tensor_split(splits)])
        k_shuffled = dist.gather_no_grad(F.normalize(k, dim=1))  # row j is image perm[j]
        k_all = torch.empty_like(k_shuffled)
        k_all[perm] = k_shuffled  # un-shuffle
        return k_all[rank * n:(rank + 1) * n], k_all

    @torch.no_grad()
    def _enqueue(self, keys: Tensor) -> None:
        """Write `keys` ([b, d], every worker's) after the newest entry; oldest entries are overwritten."""
        size, b, ptr = self.queue.size(0), keys.size(0), int(self.queue_ptr)
        idx = (ptr + torch.arange(b, device=keys.device)) % size
        if b > size:  # only the newest `size` keys fit
            keys, idx = keys[-size:], idx[-size:]
        self.queue[idx] = keys.to(self.queue.dtype)
        self.queue_ptr.fill_((ptr + b) % size)

    def forward(self, x1: Tensor, x2: Tensor) -> dict[str, Tensor]:
        """x1 -> queries, x2 -> keys ([n, 3, H, W] each). Enqueues every worker's keys when training.

        Asymmetric as in MoCo v2 (the symmetrised loss is MoCo v3's).
        """
        splits = self._splits(x1.size(0))
        q = self._queries(x1, splits)  # [n, d]
        k, k_all = self._keys(x2, splits)  # [n, d], [N, d]
        loss = moco_loss(q, k, self.queue, temperature=self.temperature)
        if self.training:
            self._enqueue(k_all)
        return {"loss": loss, **embedding_diagnostics(q, k)}

    @torch.no_grad()
    def update_momentum(self, progress: float) -> None:
        """EMA of the key encoder and head with the constant m (progress is ignored; MoCo's m is fixed)."""
        del progress
        ema_update(self.encoder_momentum, self.encoder, self.momentum)
        ema_update(self.projector_momentum, self.projector, self.momentum)
