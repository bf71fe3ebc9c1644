"""BatchNorm whose statistics span every worker (SimCLR's "global BN"), on CPU and GPU alike.

SimCLR (Chen et al. 2020, sec. B.9 / "Global BN") and BYOL (Grill et al. 2020, app. C) aggregate
BatchNorm mean and variance over all devices, so that a positive pair computed on one device cannot
be recognised by its shared local statistics. `torch.nn.SyncBatchNorm` (torch 2.14) does this only
for CUDA/XPU/HPU inputs: on CPU with gloo its forward raises "SyncBatchNorm expected input tensor
to be on GPU or XPU". `GlobalBatchNorm` is the same computation written with two differentiable
all-reduces (sum -> mean, then sum of squared deviations -> variance), so it runs with gloo on CPU
and with NCCL on GPU. Outside training, or without a process group of 2+ ranks, it is exactly
`BatchNorm{1,2,3}d`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from methods.dist import all_reduce_with_grad, world_size

_PLAIN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm with batch statistics all-reduced over every rank when training distributed."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True, spatial_dims: int = 2) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=True)
        self.spatial_dims = spatial_dims  # 0: BatchNorm1d on [N, C], 2: BatchNorm2d, ...

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:
            return super().forward(x)
        # Statistics in float32 (or wider) under autocast, as BatchNorm and SyncBatchNorm compute
        # them: a bfloat16 sum over a batch keeps ~3 significant digits, and a bfloat16 mean of
        # activations near 100 is off by up to 0.25. The output keeps the input's dtype, as theirs.
        compute = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self._global_forward(x.to(compute)).to(x.dtype)

    def _global_forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.size(1)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, c] + [1] * (x.dim() - 2)
        count = torch.full((1,), x.numel() // c, dtype=x.dtype, device=x.device)
        total = all_reduce_with_grad(torch.cat([x.sum(dims), count]))
        n = total[c]
        mean = total[:c] / n
        centred = x - mean.view(shape)
        var = all_reduce_with_grad((centred * centred).sum(dims)) / n  # biased, as BN normalises
        with torch.no_grad():
            assert self.running_mean is not None and self.running_var is not None
            m = self.momentum if self.momentum is not None else 0.1
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
            self.num_batches_tracked.add_(1)  # type: ignore[operator]
        y = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def _copy_state(dst: _BatchNorm, src: _BatchNorm) -> None:
    like = src.weight if src.weight is not None else src.running_mean
    if like is not None:  # same device and dtype (e.g. a model already made .double())
        dst.to(device=like.device, dtype=like.dtype)
    with torch.no_grad():
        if src.affine:
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
            dst.weight.requires_grad_(src.weight.requires_grad)
            dst.bias.requires_grad_(src.bias.requires_grad)
        if src.track_running_stats:
            dst.running_mean.copy_(src.running_mean)  # type: ignore[union-attr]
            dst.running_var.copy_(src.running_var)  # type: ignore[union-attr]
            dst.num_batches_tracked.copy_(src.num_batches_tracked)  # type: ignore[union-attr]
    dst.train(src.training)


def convert_to_global_bn(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm layer in `module` (in place) by a `GlobalBatchNorm` with its state.

    Returns:
        The module (or the new layer, when `module` itself is a BatchNorm).
    """
    if isinstance(module, _BatchNorm) and not isinstance(module, GlobalBatchNorm):
        spatial = {nn.BatchNorm1d: 0, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}.get(type(module), 2)
        new = GlobalBatchNorm(module.num_features, eps=module.eps,
                              momentum=module.momentum if module.momentum is not None else 0.1,
                              affine=module.affine, spatial_dims=spatial)
        _copy_state(new, module)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_to_global_bn(child))
    return module


def restore_batchnorm(module: nn.Module) -> nn.Module:
    """Inverse of `convert_to_global_bn` (in place): plain `BatchNorm{1,2,3}d` layers again.

    Use it on a deep copy of the encoder before exporting or registering it, so that loading the
    model needs nothing from this package.
    """
    if isinstance(module, GlobalBatchNorm):
        cls = _PLAIN[max(1, module.spatial_dims)]
        new = cls(module.num_features, eps=module.eps, momentum=module.momentum,
                  affine=module.affine)
        _copy_state(new, module)
        return new
    for name, child in module.named_children():
        module.add_module(name, restore_batchnorm(child))
    return module


def prepare_for_distributed(model: nn.Module) -> nn.Module:
    """Apply the method's BatchNorm policy for multi-worker training; call before wrapping in DDP.

    SimCLR and BYOL (`sync_batchnorm = True`): every BN layer, in the online and the target
    networks, becomes a `GlobalBatchNorm` (statistics over all workers, CPU or GPU). MoCo
    (`sync_batchnorm = False`): unchanged, it shuffles BN inside `forward`. A no-op when
    torch.distributed is not initialised or has one rank.
    """
    if world_size() == 1 or not getattr(model, "sync_batchnorm", True):
        return model
    return convert_to_global_bn(model)
