"""DINO's pieces: local crops reach the student only, the center's EMA, the teacher-temperature
warm-up driven by `update_momentum(progress)`, and the teacher's EMA after the optimiser step."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from methods import DINO
from methods.losses import dino_loss


class _Tiny(nn.Module):
    """BN-free, any input size: the student's and teacher's outputs can be recomputed outside."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 6)
        self.output_dim = 6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


def _dino(**kwargs: float) -> DINO:
    torch.manual_seed(0)
    return DINO(_Tiny(), projection_dim=10, hidden_dim=8, bottleneck_dim=4, **kwargs).double()


def _views(n: int, local: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x1, x2 = (torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    return x1, x2, torch.randn(local, n, 3, 4, 4, generator=g, dtype=torch.float64)


def test_loss_pairs_each_teacher_view_with_every_other_student_view_including_local_crops() -> None:
    model = _dino()
    x1, x2, local = _views(3, 2)
    center = model.center.clone()
    out = model(x1, x2, local)
    student = [model.head(model.encoder(v)) for v in (x1, x2, *local)]
    teacher = [model.head_teacher(model.encoder_teacher(v)) for v in (x1, x2)]
    expected = dino_loss(student, teacher, center, student_temp=0.1, teacher_temp=0.04)
    torch.testing.assert_close(out["loss"], expected)
    without_local = model(x1, x2)["loss"]
    assert not torch.allclose(without_local, expected)  # the local crops are in the loss


def test_center_is_an_ema_of_the_teacher_mean_and_moves_only_in_training() -> None:
    model = _dino()
    x1, x2, _ = _views(4, 0)
    model.eval()
    model(x1, x2)
    assert torch.count_nonzero(model.center) == 0
    model.train()
    with torch.no_grad():
        t = torch.cat([model.head_teacher(model.encoder_teacher(v)) for v in (x1, x2)])
    model(x1, x2)
    torch.testing.assert_close(model.center, 0.1 * t.mean(dim=0, keepdim=True))  # 0.9 * 0 + 0.1 * mean
    model(x1, x2)
    torch.testing.assert_close(model.center, 0.19 * t.mean(dim=0, keepdim=True))


@pytest.mark.parametrize("progress,temp", [(0.0, 0.04), (0.15, 0.055), (0.3, 0.07), (0.9, 0.07)])
def test_teacher_temperature_warms_up_with_the_training_progress(progress: float, temp: float) -> None:
    model = _dino()
    model.update_momentum(progress)
    assert model.teacher_temp == pytest.approx(temp)
    assert model(*_views(2, 0)[:2])["teacher_temp"].item() == pytest.approx(temp)


def test_progress_and_center_survive_a_checkpoint() -> None:
    model = _dino()
    model(*_views(4, 1)[:2])
    model.update_momentum(0.2)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    restored = _dino()
    restored.load_state_dict(torch.load(buf, weights_only=True))
    assert restored.teacher_temp == pytest.approx(model.teacher_temp) and restored.teacher_temp > 0.04
    torch.testing.assert_close(restored.center, model.center)


def test_teacher_is_the_ema_of_the_student_and_gets_no_gradient() -> None:
    model = _dino()
    x1, x2, local = _views(4, 2)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    teacher_before = [p.clone() for p in model.head_teacher.parameters()]
    model(x1, x2, local)["loss"].backward()
    assert all(p.grad is None for p in model.head_teacher.parameters())
    opt.step()
    model.update_momentum(0.0)  # lambda = 0.996 at the start
    for t, t0, s in zip(model.head_teacher.parameters(), teacher_before, model.head.parameters()):
        torch.testing.assert_close(t, 0.996 * t0 + 0.004 * s)
    assert model.momentum == pytest.approx(0.996)
    model.update_momentum(1.0)
    assert model.momentum == pytest.approx(1.0)


def _step(model: DINO, epoch: int, lr: float = 0.1) -> dict[str, torch.Tensor]:
    """One training step as `orchestrator.training.train_one_epoch` takes it; the parameters before it."""
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.on_epoch_start(epoch)
    model(*_views(4, 1))["loss"].backward()
    model.before_optimizer_step()
    opt.step()
    return before


def test_last_layer_is_frozen_in_the_first_epoch_only() -> None:
    model = _dino()
    before = _step(model, epoch=0)
    torch.testing.assert_close(model.head.prototypes, before["head.prototypes"])  # frozen
    assert not torch.equal(model.head.mlp[0].weight, before["head.mlp.0.weight"])  # the rest learns
    before = _step(model, epoch=1)
    assert not torch.equal(model.head.prototypes, before["head.prototypes"])


def test_each_parameters_gradient_is_clipped_to_its_own_norm_as_dino_utils() -> None:
    model = _dino(clip_grad=1e-3, freeze_last_layer_epochs=0)
    model.on_epoch_start(0)
    model(*_views(4, 1))["loss"].backward()
    raw = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.before_optimizer_step()
    for k, p in model.named_parameters():
        if k in raw:  # DINO utils.clip_gradients: clip_coef = clip / (norm + 1e-6), applied when < 1
            coef = min(1.0, 1e-3 / (raw[k].norm().item() + 1e-6))
            torch.testing.assert_close(p.grad, raw[k] * coef)
            assert p.grad.norm() <= 1e-3 + 1e-9
    unclipped = _dino(clip_grad=0.0, freeze_last_layer_epochs=0)
    unclipped.on_epoch_start(0)
    unclipped(*_views(4, 1))["loss"].backward()
    grads = {k: p.grad.clone() for k, p in unclipped.named_parameters() if p.grad is not None}
    unclipped.before_optimizer_step()
    assert all(torch.equal(p.grad, grads[k]) for k, p in unclipped.named_parameters() if k in grads)


def test_teacher_backbone_is_registered_and_has_no_stochastic_depth() -> None:
    from methods.encoders import build_encoder, representation_encoder

    vit = build_encoder("vit_tiny", patch_size=4, depth=2, embed_dim=32, num_heads=2, drop_path_rate=0.1)
    model = DINO(vit, projection_dim=16, hidden_dim=16, bottleneck_dim=8)
    assert representation_encoder(model) is model.encoder_teacher
    drops = [m.drop_prob for m in model.encoder.modules() if hasattr(m, "drop_prob")]
    assert drops and max(drops) > 0
    assert all(m.drop_prob == 0 for m in model.encoder_teacher.modules() if hasattr(m, "drop_prob"))
