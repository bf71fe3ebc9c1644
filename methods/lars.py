"""LARS (You et al. 2017, "Large Batch Training of Convolutional Networks") as SimCLR and BYOL use it.

Follows SimCLR's `lars_optimizer.py`: for an adapted parameter w with gradient g,
    u = g + wd * w;  trust = eta * ||w|| / ||u|| (1 when either norm is 0);
    v <- momentum * v + lr * trust * u;  w <- w - v.
Biases and BatchNorm parameters are excluded from both the trust ratio and weight decay (SimCLR
app. B.1, BYOL app. C): they get plain momentum SGD. Build the groups with `lars_param_groups`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


def lars_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two parameter groups: weights (adapted, decayed) and biases/norm params (excluded).

    A parameter with fewer than 2 dimensions is a bias or a norm scale/shift. Parameters that take
    no gradient (MoCo/BYOL target networks) are left out.
    """
    adapted, excluded = [], []
    for p in model.parameters():
        if p.requires_grad:
            (adapted if p.ndim >= 2 else excluded).append(p)
    return [{"params": adapted, "weight_decay": weight_decay, "lars_exclude": False},
            {"params": excluded, "weight_decay": 0.0, "lars_exclude": True}]


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling with momentum.

    Args:
        params: parameters or groups; a group with `lars_exclude=True` skips adaptation and decay.
        lr: base learning rate (SimCLR: 0.3 x batch/256; BYOL: 0.2 x batch/256).
        momentum: 0.9 in both papers.
        weight_decay: default for groups that do not set it (SimCLR 1e-6, BYOL 1.5e-6).
        trust_coefficient: eta (0.001).
    """

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.9,
                 weight_decay: float = 0.0, trust_coefficient: float = 0.001, foreach: bool = True) -> None:
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, lars_exclude=False)
        super().__init__(params, defaults)
        self.foreach = foreach

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One update of every parameter with a gradient.

        With ``foreach`` (the default) each group is a handful of multi-tensor kernels
        (``torch._foreach_*``: the norms, trust ratios, momentum and update of all its parameters
        at once) instead of ~8 small kernels per parameter; ``foreach=False`` is the per-parameter
        loop, the reference the tests compare it with. Same arithmetic, same values.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.foreach:
            for group in self.param_groups:
                self._foreach_group(group)
            return loss
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                scale = group["lr"]
                if not group["lars_exclude"]:
                    if group["weight_decay"] != 0:
                        update = update.add(p, alpha=group["weight_decay"])
                    w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    trust = torch.where((w_norm > 0) & (u_norm > 0),
                                        group["trust_coefficient"] * w_norm / u_norm,
                                        torch.ones_like(w_norm))
                    update = update * trust
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(update, alpha=scale)
                p.sub_(buf)
        return loss

    def _foreach_group(self, group: dict[str, Any]) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            bufs.append(state["momentum_buffer"])
        updates: list[torch.Tensor] | tuple[torch.Tensor, ...] = grads
        if not group["lars_exclude"]:
            if group["weight_decay"] != 0:
                updates = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            w = torch.stack(torch._foreach_norm(params))  # [P]: every parameter's norm at once
            u = torch.stack(torch._foreach_norm(updates))
            trust = torch.where((w > 0) & (u > 0), group["trust_coefficient"] * w / u, torch.ones_like(w))
            updates = torch._foreach_mul(updates, list(trust.unbind()))
        torch._foreach_mul_(bufs, group["momentum"])
        torch._foreach_add_(bufs, updates, alpha=group["lr"])
        torch._foreach_sub_(params, bufs)
