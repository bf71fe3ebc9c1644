"""Schedules and LARS."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from methods.lars import LARS, lars_param_groups
from methods.schedules import cosine_schedule, warmup_cosine


def test_cosine_schedule_endpoints_and_midpoint() -> None:
    assert cosine_schedule(0, 100, 0.996, 1.0) == pytest.approx(0.996)
    assert cosine_schedule(50, 100, 0.996, 1.0) == pytest.approx(0.998)
    assert cosine_schedule(100, 100, 0.996, 1.0) == pytest.approx(1.0)
    assert cosine_schedule(150, 100, 0.996, 1.0) == pytest.approx(1.0)


def test_warmup_cosine() -> None:
    values = [warmup_cosine(s, 110, 10, 1.0, 0.0) for s in range(111)]
    assert values[0] == pytest.approx(0.1)
    assert values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0)
    assert values[60] == pytest.approx(0.5)
    assert values[110] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(values[9:], values[10:]))


def test_lars_groups_exclude_biases_and_norms() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    groups = lars_param_groups(model, weight_decay=1e-6)
    assert [p.shape for p in groups[0]["params"]] == [(3, 4), (2, 3)]
    assert len(groups[1]["params"]) == 4 and groups[1]["lars_exclude"] and groups[1]["weight_decay"] == 0


def test_lars_step_matches_formula() -> None:
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(5, 4))
    b = nn.Parameter(torch.randn(5))
    opt = LARS([{"params": [w], "weight_decay": 0.1, "lars_exclude": False},
                {"params": [b], "weight_decay": 0.0, "lars_exclude": True}],
               lr=0.5, momentum=0.9, trust_coefficient=0.001)
    w0, b0 = w.detach().clone(), b.detach().clone()
    w.grad, b.grad = torch.randn(5, 4), torch.randn(5)
    opt.step()
    u = w.grad + 0.1 * w0
    trust = 0.001 * w0.norm() / u.norm()
    torch.testing.assert_close(w.detach(), w0 - 0.5 * trust * u)
    torch.testing.assert_close(b.detach(), b0 - 0.5 * b.grad)
    opt.step()  # momentum: v = 0.9 v + lr * trust * u
    u2 = w.grad + 0.1 * (w0 - 0.5 * trust * u)
    w1 = w0 - 0.5 * trust * u
    trust2 = 0.001 * w1.norm() / u2.norm()
    torch.testing.assert_close(w.detach(), w1 - (0.9 * 0.5 * trust * u + 0.5 * trust2 * u2))


def test_foreach_lars_equals_the_per_parameter_loop() -> None:
    """The multi-tensor step (the default) gives the per-parameter loop's weights and momentum
    buffers over several steps of a ResNet-18 (zero-norm weights and a parameter without a
    gradient included), to float32 rounding."""
    from methods.encoders import build_encoder

    torch.manual_seed(0)
    loop_model = build_encoder("resnet18", cifar_stem=True)
    with torch.no_grad():
        loop_model.layer1[0].conv1.weight.zero_()  # ||w|| = 0: trust 1
    fast_model = copy.deepcopy(loop_model)
    start = copy.deepcopy(loop_model)
    loop = LARS(lars_param_groups(loop_model, 1e-4), lr=0.3, momentum=0.9, trust_coefficient=0.02, foreach=False)
    fast = LARS(lars_param_groups(fast_model, 1e-4), lr=0.3, momentum=0.9, trust_coefficient=0.02)
    assert fast.foreach and not loop.foreach
    x = torch.randn(4, 3, 32, 32)
    for step in range(3):
        for model, opt in ((loop_model, loop), (fast_model, fast)):
            opt.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            if step == 1:
                next(model.parameters()).grad = None  # a parameter without a gradient is skipped
            opt.step()
    for p, q in zip(loop_model.parameters(), fast_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(fast.state[q]["momentum_buffer"], loop.state[p]["momentum_buffer"],
                                   rtol=1e-5, atol=1e-7)
    moved = [not torch.equal(p, q) for p, q in zip(loop_model.parameters(), start.parameters())]
    assert sum(moved) > 0.9 * len(moved)  # the steps did update the weights
