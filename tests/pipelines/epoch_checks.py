"""Shared by the two-worker loader tests (`test_stream.py`, `test_memory.py`): shipping a test's
train loop to Ray Train workers, and what every loader owes its workers each epoch."""

from __future__ import annotations

import sys


def pickle_by_value(module_name: str) -> None:
    """Ray Train workers cannot import a test file by name (pytest put its folder on sys.path only
    in this process): ship the module's train loop and constants by value instead."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[module_name])


def assert_each_image_once_per_epoch_with_new_views(per_rank: list[dict[str, list]], ids: list[str]) -> None:
    """`per_rank[r][epoch]`: the (image id, view checksum) pairs rank r trained on in that epoch, in order.

    Asserts, for the first two epochs: every image exactly once across the ranks, the same number
    on every rank (DDP needs equal steps), new views for all but a couple of images, and a new order.
    """
    epochs = sorted(per_rank[0])[:2]
    views: dict[str, dict[str, float]] = {}
    for epoch in epochs:
        got = sorted(i for seen in per_rank for i, _ in seen[epoch])
        assert got == sorted(ids), f"epoch {epoch}: not every image exactly once"
        assert [len(seen[epoch]) for seen in per_rank] == [len(ids) // len(per_rank)] * len(per_rank)
        views[epoch] = {i: s for seen in per_rank for i, s in seen[epoch]}
    first, second = epochs
    same = sum(abs(views[first][i] - views[second][i]) < 1e-3 for i in ids)
    assert same <= 2, f"{same} of {len(ids)} images got the same view in both epochs"
    # The shuffle changes each epoch: rank 0's order differs between the two.
    assert [i for i, _ in per_rank[0][first]] != [i for i, _ in per_rank[0][second]]
