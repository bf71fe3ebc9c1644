"""DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers").
Pattern: facebookresearch/dino `main_dino.py` (DINOLoss, MultiCropWrapper, the training step)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from methods import dist
from methods.diagnostics import embedding_diagnostics
from methods.heads import DINOHead
from methods.losses import dino_loss
from methods.momentum import ema_update, frozen_copy
from methods.schedules import cosine_schedule


class DINO(nn.Module):
    """Student encoder + head; teacher = their EMA; centred, sharpened teacher targets; multi-crop.

    Args:
        encoder: backbone with `output_dim`; the student's, `self.encoder`.
        projection_dim: K, the number of prototypes the head scores (paper: 65,536).
        hidden_dim: the head MLP's width (paper: 2048).
        bottleneck_dim: the head's L2-normalised bottleneck (paper: 256).
        student_temp: tau_s (paper: 0.1).
        teacher_temp: tau_t after the warm-up (paper, sec. 3.1 / app.: 0.04 rising to 0.07).
        warmup_teacher_temp: tau_t at the start (0.04).
        warmup_teacher_temp_fraction: share of training over which tau_t rises linearly. The
            paper warms up over 30 epochs; the fraction 0.3 is that for its 100-epoch runs. It is
            driven by the progress `update_momentum(progress)` receives, so no epoch count is needed.
        center_momentum: m of the center's EMA (paper: 0.9).
        momentum: base teacher EMA rate lambda (paper: 0.996), cosine to 1 as BYOL's.
        freeze_last_layer_epochs: the prototypes (the head's last layer) take no step for this many
            epochs (main_dino.py `--freeze_last_layer 1`: "helps optimization" early on).
        clip_grad: each parameter's gradient norm is clipped to this (main_dino.py `--clip_grad 3.0`,
            `utils.clip_gradients`: per parameter, not the global norm); 0 = no clipping.

    Views: `forward(x1, x2, local_views)` takes the two global crops and optionally the local
    crops as one tensor [V, n, 3, h, w] (`pipelines.augment.TwoViewAugment(local_crops=V)` makes
    them). The teacher sees the global crops only; the student sees all; the loss pairs each
    teacher view with every student view but its own (`methods.losses.dino_loss`). As the
    reference's MultiCropWrapper, crops of one resolution share one forward pass.

    The teacher is updated only by `update_momentum`, after each optimiser step (as BYOL's
    target). The center and the training progress (which fixes tau_t) are persistent buffers: a
    resumed run continues with the same targets. As main_dino.py's training step, the training
    loop calls `on_epoch_start(epoch)` and, between backward and the optimiser step,
    `before_optimizer_step()`: gradient clipping, then the last layer's gradients dropped during
    the first `freeze_last_layer_epochs` (`cancel_gradients_last_layer`). The teacher's backbone is
    the one evaluated and registered (`registered_encoder`), as the paper evaluates the teacher;
    the teacher has no stochastic depth (main_dino.py builds it without `drop_path_rate`).
    The optimiser (AdamW, weight decay on a cosine 0.04 -> 0.4 with `optim.weight_decay_end`,
    LR warm-up) is the config's (`configs/*-dino-vit*.yaml`). Departure: the LR decays to 0, not
    to main_dino.py's `min_lr` 1e-6. BatchNorm (ResNet encoders) is global with several workers
    (`sync_batchnorm`), as the reference converts ResNets to SyncBatchNorm.
    """

    sync_batchnorm = True  # read by methods.prepare_for_distributed
    augment_preset = "dino"  # 2 global crops (blur 1.0 / 0.1, solarize 0 / 0.2) + local crops
    registered_encoder = "encoder_teacher"  # read by methods.encoders.representation_encoder

    def __init__(self, encoder: nn.Module, *, projection_dim: int = 65536, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, student_temp: float = 0.1, teacher_temp: float = 0.07,
                 warmup_teacher_temp: float = 0.04, warmup_teacher_temp_fraction: float = 0.3,
                 center_momentum: float = 0.9, momentum: float = 0.996, freeze_last_layer_epochs: int = 1,
                 clip_grad: float = 3.0) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = DINOHead(int(encoder.output_dim), hidden_dim, bottleneck_dim, projection_dim)
        self.encoder_teacher = frozen_copy(self.encoder)
        for m in self.encoder_teacher.modules():  # timm's DropPath: the reference's teacher has none
            if hasattr(m, "drop_prob"):
                m.drop_prob = 0.0
        self.head_teacher = frozen_copy(self.head)
        self.freeze_last_layer_epochs = freeze_last_layer_epochs
        self.clip_grad = clip_grad
        self.epoch = 0  # epochs completed before this one, set by on_epoch_start
        self.student_temp = student_temp
        self.final_teacher_temp = teacher_temp
        self.warmup_teacher_temp = warmup_teacher_temp
        self.warmup_teacher_temp_fraction = warmup_teacher_temp_fraction
        self.center_momentum = center_momentum
        self.base_momentum = momentum
        self.momentum = momentum  # current lambda, set by update_momentum
        self.register_buffer("center", torch.zeros(1, projection_dim))
        self.register_buffer("progress", torch.zeros((), dtype=torch.float64))
        self.center: Tensor
        self.progress: Tensor

    @property
    def teacher_temp(self) -> float:
        """tau_t now: linear from `warmup_teacher_temp` to `teacher_temp` over the warm-up share."""
        if self.warmup_teacher_temp_fraction <= 0:
            return self.final_teacher_temp
        t = min(1.0, float(self.progress) / self.warmup_teacher_temp_fraction)
        return self.warmup_teacher_temp + t * (self.final_teacher_temp - self.warmup_teacher_temp)

    def forward(self, x1: Tensor, x2: Tensor, local_views: Tensor | None = None) -> dict[str, Tensor]:
        """x1, x2: [n, 3, H, W] global crops; local_views: [V, n, 3, h, w] or None."""
        n = x1.size(0)
        global_views = torch.cat([x1, x2])  # [2n, 3, H, W]
        s_global = self.head(self.encoder(global_views))  # [2n, K]
        student = list(s_global.split(n))
        if local_views is not None and local_views.size(0) > 0:
            s_local = self.head(self.encoder(local_views.flatten(0, 1)))  # [V n, K]
            student += list(s_local.split(n))
        with torch.no_grad():
            t_global = self.head_teacher(self.encoder_teacher(global_views))  # [2n, K]
        temp = self.teacher_temp
        loss = dino_loss(student, list(t_global.split(n)), self.center,
                         student_temp=self.student_temp, teacher_temp=temp)
        if self.training:
            self._update_center(t_global)
        return {"loss": loss, **embedding_diagnostics(s_global[:n], s_global[n:]),
                "teacher_temp": loss.new_tensor(temp).detach()}

    @torch.no_grad()
    def _update_center(self, teacher: Tensor) -> None:
        """center <- m center + (1 - m) mean of every worker's teacher outputs (reference `update_center`)."""
        total = torch.cat([teacher.float().sum(dim=0, keepdim=True),
                           torch.full((1, 1), teacher.size(0), dtype=torch.float32, device=teacher.device)], dim=1)
        total = dist.all_reduce_with_grad(total)  # [1, K + 1]: sums and the global count
        batch_center = total[:, :-1] / total[:, -1:]
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)

    def on_epoch_start(self, epoch: int) -> None:
        """Called by the training loop before each epoch; `epoch` counts from 0."""
        self.epoch = epoch

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """main_dino.py between `loss.backward()` and `optimizer.step()`: clip, then freeze the last layer."""
        if self.clip_grad > 0:
            clip_gradients(self, self.clip_grad)
        if self.epoch < self.freeze_last_layer_epochs:
            self.head.prototypes.grad = None  # AdamW/SGD skip a parameter without a gradient

    @torch.no_grad()
    def update_momentum(self, progress: float) -> None:
        """Record the progress (for tau_t) and EMA the teacher with lambda = 1 - (1 - lambda_base)(cos(pi p) + 1)/2.

        Args:
            progress: step / total_steps in [0, 1], after the optimiser step of that step.
        """
        self.progress.fill_(progress)
        self.momentum = cosine_schedule(progress, 1.0, self.base_momentum, 1.0)
        ema_update(self.encoder_teacher, self.encoder, self.momentum)
        ema_update(self.head_teacher, self.head, self.momentum)


@torch.no_grad()
def clip_gradients(model: nn.Module, clip: float) -> None:
    """DINO's `utils.clip_gradients`: scale each parameter's gradient to norm at most `clip`, one at a time."""
    for p in model.parameters():
        if p.grad is not None:
            coef = clip / (p.grad.norm(2) + 1e-6)
            p.grad.mul_(coef.clamp(max=1.0))
