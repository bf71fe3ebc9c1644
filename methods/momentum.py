"""Exponential moving average of an online network into its momentum (target) copy."""

from __future__ import annotations

import copy

import torch
from torch import nn


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of `module` whose parameters take no gradient (MoCo key / BYOL target network)."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """theta_target <- m * theta_target + (1 - m) * theta_online, for every parameter.

    MoCo (He et al. 2020, eq. 2) and BYOL (Grill et al. 2020, sec. 3.1). Buffers (BatchNorm running
    statistics) are not averaged: the target network computes its own, as in both references.
    """
    targets, onlines = list(target.parameters()), [p.detach() for p in online.parameters()]
    if len(targets) != len(onlines):
        raise ValueError(f"ema_update: target has {len(targets)} parameters, online {len(onlines)}")
    # Two multi-tensor kernels for all parameters, not two per parameter (the same arithmetic).
    torch._foreach_mul_(targets, momentum)
    torch._foreach_add_(targets, onlines, alpha=1.0 - momentum)
