"""kNN and linear probe: perfect on a separable set, about chance on shuffled labels."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from methods.evaluate import extract_features, knn_accuracy, linear_probe

CLASSES = 10


def _blobs(n_per_class: int, seed: int, spread: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES, 32, generator=torch.Generator().manual_seed(0)) * 3
    labels = torch.arange(CLASSES).repeat_interleave(n_per_class)
    feats = centres[labels] + spread * torch.randn(len(labels), 32, generator=g)
    return feats, labels


def test_knn_is_perfect_on_separable_features() -> None:
    train, test = _blobs(50, 1), _blobs(20, 2)
    acc = knn_accuracy(*train, *test, k=200, temperature=0.1)  # k > bank size: clipped to 500
    assert acc == {"top1": 1.0, "top5": 1.0}


def _shuffled(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features that carry no label information (labels drawn independently of them)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 32, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def test_knn_is_near_chance_on_shuffled_labels() -> None:
    acc = knn_accuracy(*_shuffled(2000, 1), *_shuffled(1000, 2), k=200, chunk_size=64)
    assert 0.06 < acc["top1"] < 0.14  # chance is 0.1
    assert 0.44 < acc["top5"] < 0.56  # chance is 0.5


def test_knn_weights_votes_by_similarity() -> None:
    # One very close neighbour of class 1 outweighs two far ones of class 0.
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([1, 0, 0])
    query = torch.tensor([[1.0, 0.2]])
    assert knn_accuracy(train, labels, query, torch.tensor([1]), k=3, temperature=0.1)["top1"] == 1.0
    assert knn_accuracy(train, labels, query, torch.tensor([0]), k=3, temperature=100.0)["top1"] == 1.0


def test_linear_probe_perfect_on_separable_and_chance_on_shuffled() -> None:
    (x_train, y_train), (x_test, y_test) = _blobs(50, 1, spread=1.0), _blobs(30, 2, spread=1.0)
    separable = linear_probe(x_train, y_train, x_test, y_test, epochs=20)
    assert separable["top1"] == 1.0 and separable["top5"] == 1.0
    (x_train, y_train), (x_test, y_test) = _shuffled(2000, 1), _shuffled(1000, 2)
    result = linear_probe(x_train, y_train, x_test, y_test, epochs=20)
    assert 0.06 < result["top1"] < 0.14  # chance is 0.1
    assert 0.40 < result["top5"] < 0.60 and result["top5"] >= result["top1"]  # chance is 0.5
    assert linear_probe(x_train, y_train, x_test, y_test, epochs=20) == result  # deterministic


def test_extract_features_runs_in_eval_mode_without_grad_and_restores_mode() -> None:
    enc = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    enc.train()
    images = torch.randn(10, 3, 8, 8)
    feats = extract_features(enc, images, batch_size=3)
    assert feats.shape == (10, 4) and not feats.requires_grad
    assert enc.training
    assert int(enc[1].num_batches_tracked) == 0  # eval mode: running stats untouched
    enc.eval()
    with torch.no_grad():
        torch.testing.assert_close(feats, enc(images))


@pytest.mark.parametrize("k", [1, 5])
def test_knn_top5_covers_top1(k: int) -> None:
    (x_train, y_train), (x_test, y_test) = _blobs(20, 4, spread=3.0), _blobs(10, 5, spread=3.0)
    acc = knn_accuracy(x_train, y_train, x_test, y_test, k=k)
    assert acc["top5"] >= acc["top1"]


def test_fine_tune_trains_a_copy_of_the_encoder_end_to_end() -> None:
    from methods.encoders import build_encoder
    from methods.evaluate import fine_tune

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    # Two classes that survive crops and flips: a red or a blue tint under noise.
    labels = torch.arange(96) % 2
    images = torch.randn(96, 3, 16, 16, generator=g)
    images[labels == 0, 0] += 0.5
    images[labels == 1, 2] += 0.5
    encoder = build_encoder("vit_tiny", patch_size=4, depth=1, embed_dim=32, num_heads=2)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    r = fine_tune(encoder, images[:64], labels[:64], images[64:], labels[64:], epochs=6, lr=1e-3, batch_size=16)
    assert r["train_top1"] > 0.8 and r["top1"] > 0.8, r
    assert r["top5"] == 1.0  # two classes: the top 2 hold every label
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in before.items())  # the original is kept
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        fine_tune(encoder, images, labels, images, labels, epochs=0)
