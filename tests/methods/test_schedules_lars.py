"""Schedules and LARS."""

from __future__ import annotations

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
