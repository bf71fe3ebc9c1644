"""MoCo's queue (FIFO, wrap-around, checkpoint round trip) and the momentum targets of MoCo and BYOL."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from methods import BYOL, MoCo


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 6), nn.BatchNorm1d(6))
        self.output_dim = 6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _moco(queue_size: int) -> MoCo:
    torch.manual_seed(0)
    return MoCo(_Tiny(), projection_dim=4, hidden_dim=8, queue_size=queue_size)


def _byol() -> BYOL:
    torch.manual_seed(0)
    return BYOL(_Tiny(), projection_dim=4, hidden_dim=8)


def _views(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 4, 4, generator=g), torch.randn(n, 3, 4, 4, generator=g)


@pytest.mark.parametrize("queue_size,batch", [(5, 2), (6, 3), (4, 7)])
def test_queue_is_fifo_and_wraps_around(queue_size: int, batch: int) -> None:
    moco = _moco(queue_size)
    initial = moco.queue.clone()
    written: list[torch.Tensor] = []
    for step in range(4):
        keys = torch.full((batch, 4), float(step)) + torch.arange(batch)[:, None] / 10
        moco._enqueue(keys)
        written.extend(keys)
        total = len(written)
        assert int(moco.queue_ptr) == total % queue_size
        # Reading the ring from the pointer gives the oldest surviving entry first.
        ring = torch.roll(moco.queue, -int(moco.queue_ptr), dims=0)
        expected = ([initial[(total + i) % queue_size] for i in range(queue_size - total)]
                    + written[-queue_size:])
        torch.testing.assert_close(ring, torch.stack(expected[-queue_size:]))


def test_forward_enqueues_its_keys_only_in_training() -> None:
    moco = _moco(16)
    x1, x2 = _views(4, 1)
    moco.eval()
    before = moco.queue.clone()
    moco(x1, x2)
    torch.testing.assert_close(moco.queue, before)
    moco.train()
    moco(x1, x2)
    assert int(moco.queue_ptr) == 4
    assert not torch.allclose(moco.queue[:4], before[:4])
    torch.testing.assert_close(moco.queue[:4].norm(dim=1), torch.ones(4))  # normalised keys


def test_queue_and_pointer_survive_state_dict_round_trip() -> None:
    moco = _moco(16)
    moco(*_views(4, 2))
    buf = io.BytesIO()
    torch.save(moco.state_dict(), buf)
    buf.seek(0)
    restored = _moco(16)
    assert not torch.equal(restored.queue, moco.queue)
    restored.load_state_dict(torch.load(buf, weights_only=True))
    torch.testing.assert_close(restored.queue, moco.queue)
    assert int(restored.queue_ptr) == 4


def _targets(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    if isinstance(model, MoCo):
        return [(model.encoder_momentum, model.encoder), (model.projector_momentum, model.projector)]
    assert isinstance(model, BYOL)
    return [(model.encoder_target, model.encoder), (model.projector_target, model.projector)]


@pytest.mark.parametrize("make", [lambda: _moco(16), _byol], ids=["moco", "byol"])
def test_targets_get_no_gradient_and_follow_ema_exactly(make) -> None:  # type: ignore[no-untyped-def]
    model = make()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in range(3):
        out = model(*_views(6, 10 + step))
        opt.zero_grad()
        out["loss"].backward()
        for target, _ in _targets(model):
            assert all(not p.requires_grad and p.grad is None for p in target.parameters())
        opt.step()
        before = [[p.clone() for p in t.parameters()] for t, _ in _targets(model)]
        progress = (step + 1) / 3
        model.update_momentum(progress)
        m = model.momentum
        if isinstance(model, BYOL):
            assert m == pytest.approx(1 - (1 - 0.996) * (math.cos(math.pi * progress) + 1) / 2)
        else:
            assert m == 0.999
        for (target, online), old in zip(_targets(model), before):
            for p_t, p_o, p_old in zip(target.parameters(), online.parameters(), old):
                torch.testing.assert_close(p_t, m * p_old + (1 - m) * p_o, rtol=0, atol=1e-7)


def test_byol_forward_does_not_touch_the_target() -> None:
    model = _byol()
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)  # online and target now differ
    before = [p.clone() for p in model.encoder_target.parameters()]
    model(*_views(4, 3))
    for p, q in zip(model.encoder_target.parameters(), before):
        assert torch.equal(p, q)


def test_byol_tau_schedule_endpoints() -> None:
    model = _byol()
    model.update_momentum(0.0)
    assert model.momentum == pytest.approx(0.996)
    model.update_momentum(0.5)
    assert model.momentum == pytest.approx(0.998)
    model.update_momentum(1.0)
    assert model.momentum == pytest.approx(1.0)
    # tau = 1 leaves the target where it is.
    before = [p.clone() for p in model.encoder_target.parameters()]
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    model.update_momentum(1.0)
    for p, q in zip(model.encoder_target.parameters(), before):
        assert torch.equal(p, q)
