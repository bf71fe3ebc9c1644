"""SwAV's prototypes (normalised, frozen in the first epoch) and queue (used from a set epoch, once
full); MAE's encoder sees only the visible patches and the registered encoder is the ViT unmasked."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import methods.mae
from methods import MAE, SwAV, build_encoder
from methods.encoders import representation_encoder
from methods.losses import swav_loss

TINY_VIT = {"patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}


def _swav(**kwargs: int) -> SwAV:
    torch.manual_seed(0)
    return SwAV(build_encoder("convnet"), hidden_dim=16, projection_dim=8, num_prototypes=6, **kwargs).double()


def _views(n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, 3, 16, 16, generator=g, dtype=torch.float64) for _ in range(2))  # type: ignore[return-value]


def test_swav_prototypes_are_normalised_at_each_forward_and_score_every_crop() -> None:
    model = _swav()
    with torch.no_grad():
        model.prototypes.weight.mul_(3.0)
    x1, x2 = _views()
    local = torch.randn(2, 4, 3, 16, 16, dtype=torch.float64)
    out = model(x1, x2, local)
    torch.testing.assert_close(model.prototypes.weight.norm(dim=1), torch.ones(6, dtype=torch.float64))
    z = [F.normalize(model.projector(model.encoder(v)), dim=1) for v in (torch.cat([x1, x2]), local.flatten(0, 1))]
    high, low = list(model.prototypes(z[0]).split(4)), list(model.prototypes(z[1]).split(4))
    torch.testing.assert_close(out["loss"], swav_loss(high, low))


def test_swav_prototypes_take_no_step_in_the_first_epoch() -> None:
    model = _swav(freeze_prototypes_epochs=1)
    for epoch, frozen in [(0, True), (1, False)]:
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        model.on_epoch_start(epoch)
        model(*_views(seed=epoch))["loss"].backward()
        model.before_optimizer_step()
        before = model.prototypes.weight.detach().clone()
        head_before = model.projector[0].weight.detach().clone()
        opt.step()
        assert torch.equal(model.prototypes.weight, before) == frozen
        assert not torch.equal(model.projector[0].weight, head_before)
        opt.zero_grad()


def test_swav_queue_starts_at_its_epoch_and_is_used_once_full() -> None:
    model = _swav(queue_length=8, queue_start_epoch=1)
    model.on_epoch_start(0)
    model(*_views())
    assert not model.queue.any()  # before queue_start_epoch: not filled
    model.on_epoch_start(1)
    x1, x2 = _views(seed=1)
    model(x1, x2)
    assert model.queue[:, :4].any() and not model.queue[:, 4:].any()  # half full: not used yet
    assert model._queue_scores() is None
    model(*_views(seed=2))
    assert model.queue[:, -1].any()
    queue = model.queue.clone()
    out = model(x1, x2)  # full: the queue's scores join the codes
    z = F.normalize(model.projector(model.encoder(torch.cat([x1, x2]))), dim=1)
    high = list(model.prototypes(z).split(4))
    expected = swav_loss(high, [], [model.prototypes(q) for q in queue])
    torch.testing.assert_close(out["loss"], expected)
    assert not torch.allclose(out["loss"], swav_loss(high, []))
    torch.testing.assert_close(model.queue[:, :4], z.detach().view(2, 4, -1))  # newest first


def _mae() -> MAE:
    torch.manual_seed(0)
    return MAE(build_encoder("vit_tiny", **TINY_VIT), decoder_dim=16, decoder_depth=1, decoder_heads=2)


def test_mae_encoder_sees_only_the_visible_patches(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _mae()
    seen: list[int] = []
    model.encoder.model.blocks[0].register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    images = torch.randn(3, 3, 16, 16)
    latent, mask, ids_restore, grid = model.forward_encoder(images)
    assert grid == (4, 4) and mask.shape == (3, 16)
    assert seen == [1 + 4]  # the class token + 25% of the 16 patches
    assert torch.all(mask.sum(dim=1) == 12)  # 75% masked, per sample
    assert not torch.equal(mask[0], mask[1])  # per-sample masks
    # The visible patches alone decide the latent: with the same masks, changing a masked patch's
    # pixels changes nothing.
    noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(1))
    original = methods.mae.random_masking
    monkeypatch.setattr(methods.mae, "random_masking", lambda n, length, r, d: original(n, length, r, d, noise=noise))
    a = model.forward_encoder(images)
    hidden = int(torch.nonzero(a[1][0])[0])
    row, col = divmod(hidden, 4)
    changed = images.clone()
    changed[0, :, 4 * row:4 * row + 4, 4 * col:4 * col + 4] += 5.0
    b = model.forward_encoder(changed)
    torch.testing.assert_close(a[0], b[0])
    visible = int(torch.nonzero(a[1][0] == 0)[0])
    row, col = divmod(visible, 4)
    changed[0, :, 4 * row:4 * row + 4, 4 * col:4 * col + 4] += 5.0
    assert not torch.allclose(model.forward_encoder(changed)[0], a[0])  # a visible one does


def test_mae_registers_the_unmasked_vit_and_refuses_a_cnn() -> None:
    model = _mae()
    assert representation_encoder(model) is model.encoder
    assert model.encoder(torch.randn(2, 3, 24, 24)).shape == (2, 32)  # every patch, any multiple of 4
    with pytest.raises(ValueError, match="MAE needs a ViT encoder"):
        MAE(build_encoder("convnet"))
