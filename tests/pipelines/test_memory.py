"""The memory loader: a split decoded once, shuffled by index each epoch, shared through Ray's object store."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from epoch_checks import assert_each_image_once_per_epoch_with_new_views, pickle_by_value
from pipelines.memory import DecodedSplit, MemoryBatches, decode_split, decoded_bytes, epoch_indices, split_rows
from pipelines.memory import load_split
from pipelines.stream import dropped_per_epoch, steps_per_epoch

BATCH = 16
EPOCHS = 2


def _digest(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


@pytest.mark.parametrize(("rows", "world", "batch"), [(128, 2, 16), (101, 2, 10), (4000, 1, 256), (50_000, 4, 128)])
def test_epoch_indices_partition_a_new_permutation_every_epoch(rows, world, batch) -> None:
    per_epoch = []
    for epoch in (1, 2):
        parts = [epoch_indices(rows, world, r, batch, seed=0, epoch=epoch) for r in range(world)]
        assert {len(p) for p in parts} == {steps_per_epoch(rows, world, batch) * batch}  # same steps on every rank
        together = np.concatenate(parts)
        assert len(np.unique(together)) == len(together)  # no image twice in an epoch
        assert rows - len(together) == dropped_per_epoch(rows, world, batch)  # as many left out as streaming
        assert together.min() >= 0 and together.max() < rows
        per_epoch.append(together)
    assert not np.array_equal(per_epoch[0], per_epoch[1])  # a new order each epoch
    again = np.concatenate([epoch_indices(rows, world, r, batch, seed=0, epoch=2) for r in range(world)])
    assert np.array_equal(again, per_epoch[1])  # a resumed epoch replays its order
    other_seed = np.concatenate([epoch_indices(rows, world, r, batch, seed=1, epoch=2) for r in range(world)])
    assert not np.array_equal(other_seed, per_epoch[1])


def test_decode_split_first_rows_and_stratified(small_shards: Path) -> None:
    full = decode_split(small_shards, "train")
    assert full.images.shape == (128, 3, 32, 32) and full.images.dtype == np.uint8 and full.labels.dtype == np.int64
    assert full.nbytes == decoded_bytes(128, 32) == split_rows(small_shards, "train") * (3 * 32 * 32 + 8)
    first = decode_split(small_shards, "train", limit=40, threads=2)
    assert np.array_equal(first.images, full.images[:40]) and np.array_equal(first.labels, full.labels[:40])
    strat_x, strat_y = load_split(small_shards, "train", limit=40, seed=0)  # what the kNN probe decodes
    strat = decode_split(small_shards, "train", limit=40, stratified=True)
    assert np.array_equal(strat.images, strat_x.numpy()) and np.array_equal(strat.labels, strat_y.numpy())
    assert split_rows(small_shards, "train", 1000) == 128 and split_rows(small_shards, "test", 10) == 10


def test_memory_batches_gather_the_epoch_indices(small_shards: Path) -> None:
    split = decode_split(small_shards, "train")
    split.images.setflags(write=False)  # as the object store hands it out
    loader = MemoryBatches(split, "cpu")
    indices = epoch_indices(len(split), 2, 1, BATCH, seed=3, epoch=1)
    raw = list(loader.epoch(indices, batch_size=BATCH, augment=lambda x: (x, x.flip(-1))))
    assert len(raw) == len(indices) // BATCH
    for k, (a, b) in enumerate(raw):
        assert torch.equal(a, torch.from_numpy(split.images[indices[k * BATCH:(k + 1) * BATCH]]))
        assert torch.equal(b, a.flip(-1))
    from pipelines.augment import TwoViewAugment

    views = list(loader.epoch(indices, batch_size=BATCH, augment=TwoViewAugment("simclr", 32, seed=0)))
    assert all(v1.shape == v2.shape == (BATCH, 3, 32, 32) and v1.dtype == torch.float32 for v1, v2 in views)
    assert torch.is_grad_enabled()  # the generator makes views under no_grad and leaves the mode alone


def _train_loop(config: dict) -> None:
    """Ray Train worker: two epochs from the object store; writes (image digest, view checksum) per epoch."""
    import ray
    import ray.train

    from pipelines.augment import TwoViewAugment

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    split = ray.get(config["ref"])
    assert not split.images.flags.writeable  # mapped from the object store, not a private copy
    loader = MemoryBatches(split, "cpu")
    seen: dict[str, list] = {}
    for epoch in range(1, EPOCHS + 1):
        indices = epoch_indices(len(split), world, rank, BATCH, seed=0, epoch=epoch)
        augment = TwoViewAugment("simclr", size=32, seed=100 * epoch + rank)
        raw = loader.epoch(indices, batch_size=BATCH, augment=lambda x: (x, x))
        views = loader.epoch(indices, batch_size=BATCH, augment=augment)
        rows = []
        for (images, _), (v1, _) in zip(raw, views):
            rows += [(_digest(im.numpy()), float(s)) for im, s in zip(images, v1.flatten(1).sum(1))]
        seen[str(epoch)] = rows
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(seen))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_workers_get_every_image_once_per_epoch_from_the_object_store(two_worker_run, small_shards: Path) -> None:
    import ray

    pickle_by_value(__name__)
    split = decode_split(small_shards, "train")
    rows = len(split)
    assert rows == 128 and dropped_per_epoch(rows, 2, BATCH) == 0  # so "exactly once" is exact
    digests = sorted(_digest(im) for im in split.images)
    assert len(set(digests)) == rows  # the images are distinct, so digests identify them
    per_rank = two_worker_run(_train_loop, "memory-test", config={"ref": ray.put(split)})
    assert_each_image_once_per_epoch_with_new_views(per_rank, digests)


def test_decoded_split_is_plain_numpy() -> None:
    s = DecodedSplit(np.zeros((3, 3, 4, 4), np.uint8), np.arange(3))
    assert len(s) == 3 and s.nbytes == 3 * 48 + 3 * 8
