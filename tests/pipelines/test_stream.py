"""Streaming: Ray Data into two Ray Train workers (exactly once per epoch, fresh views), load_split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from epoch_checks import assert_each_image_once_per_epoch_with_new_views, pickle_by_value
from pipelines.manifest import read_manifest
from pipelines.images import decode_batch
from pipelines.memory import load_split
from pipelines.stream import dropped_per_epoch, iter_two_view_batches, read_split, steps_per_epoch

BATCH = 16
EPOCHS = 2


def _train_loop(config: dict) -> None:
    """Ray Train worker: two epochs over its shard; writes (path, view checksums) per epoch to a file."""
    import ray.train

    from pipelines.augment import TwoViewAugment

    rank = ray.train.get_context().get_world_rank()
    augment = TwoViewAugment(preset="simclr", size=32, seed=100 + rank)
    shard = ray.train.get_dataset_shard("train")
    seen: dict[str, list] = {}
    for epoch in range(EPOCHS):
        rows = []
        for v1, v2, extra in iter_two_view_batches(shard, batch_size=BATCH, augment=augment,
                                                   device="cpu", augment_on="worker", keep=("path",)):
            assert v1.shape == v2.shape == (BATCH, 3, 32, 32) and v1.dtype == torch.float32
            sums = v1.flatten(1).sum(1).tolist()
            rows += [(str(p), s) for p, s in zip(extra["path"], sums)]
        seen[str(epoch)] = rows
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(seen))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_workers_get_every_image_once_per_epoch_with_new_views(two_worker_run, small_shards: Path) -> None:
    pickle_by_value(__name__)
    manifest = read_manifest(small_shards)
    rows = manifest.rows("train")
    assert rows == 128 and dropped_per_epoch(rows, 2, BATCH) == 0  # so "exactly once" is exact
    per_rank = two_worker_run(_train_loop, "stream-test",
                              datasets={"train": read_split(small_shards, "train", columns=("path",), seed=0)})
    train_paths = pq.read_table([small_shards / f for f in manifest.splits["train"].files][0]).column("path").to_pylist()
    assert len(set(train_paths)) == rows
    assert_each_image_once_per_epoch_with_new_views(per_rank, train_paths)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_augment_in_ray_data_gives_normalised_views_new_each_epoch(ray_local, small_shards: Path) -> None:
    import ray.data

    ds = read_split(small_shards, "test", augment_on="data", preset="simclr", view_size=24,
                    columns=("path",), seed=1, limit=24)
    # The shards are listed once, here, not again every epoch (Ray 2.60's default Parquet reader
    # lists them per execution and starts 32 footer-reading actors each time; pipelines.stream._read_parquet).
    plan, ops = [ds._logical_plan.dag], []
    while plan:
        ops.append(type(plan[-1]).__name__)
        plan.extend(plan.pop().input_dependencies)
    assert "ListFiles" not in ops and "Read" in ops, ops
    assert ray.data.DataContext.get_current().use_datasource_v2  # the caller's own default is left as it was
    epochs = []
    for _ in range(2):
        batches = list(iter_two_view_batches(ds.iterator(), batch_size=8, augment_on="data", keep=("path",)))
        assert len(batches) == 24 // 8
        v1, v2, extra = batches[0]
        assert v1.shape == v2.shape == (8, 3, 24, 24) and v1.dtype == torch.float32
        assert v1.min() < -0.5 and v1.max() > 0.5  # normalised, not 0..1 or 0..255
        epochs.append({p: float(s) for v1, _, ex in batches for p, s in zip(ex["path"], v1.flatten(1).sum(1))})
    # `limit` keeps the same first 24 rows every epoch (it applies before the shuffle).
    first = pq.read_table(small_shards / read_manifest(small_shards).splits["test"].files[0]).column("path")
    assert set(epochs[0]) == set(epochs[1]) == set(first.to_pylist()[:24])
    assert sum(abs(epochs[0][p] - epochs[1][p]) < 1e-3 for p in epochs[0]) <= 1


def test_worker_mode_needs_an_augment(small_shards: Path) -> None:
    with pytest.raises(ValueError, match="augment"):
        next(iter_two_view_batches(iter([]), batch_size=4, augment_on="worker"))


def test_drop_last_arithmetic() -> None:
    # CIFAR-10 train on 2 workers with batch 256 per worker: 97 steps each, 336 images left out.
    assert steps_per_epoch(50_000, 2, 256) == 97
    assert dropped_per_epoch(50_000, 2, 256) == 50_000 - 2 * 97 * 256 == 336
    assert dropped_per_epoch(101, 2, 10) == 101 - 100 == 1  # equal split drops the odd row
    assert dropped_per_epoch(4000, 1, 256) == 4000 - 15 * 256


def test_load_split_decodes_all_rows_in_shard_order(small_shards: Path) -> None:
    images, labels = load_split(small_shards, "test")
    assert images.shape == (32, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and labels.shape == (32,)
    table = pq.read_table(small_shards / read_manifest(small_shards).splits["test"].files[0])
    assert labels.tolist() == table.column("label").to_pylist()
    # Same pixels as PIL's decoder (libjpeg either way; allow tiny IDCT differences).
    import io

    from PIL import Image

    ref = np.asarray(Image.open(io.BytesIO(table.column("image")[5].as_py())).convert("RGB"))
    assert np.abs(images[5].permute(1, 2, 0).numpy().astype(int) - ref.astype(int)).max() <= 2


def test_load_split_limit_is_seeded_stratified_and_resizes(small_shards: Path) -> None:
    a, la = load_split(small_shards, "train", limit=40, image_size=48, seed=3)
    b, lb = load_split(small_shards, "train", limit=40, image_size=48, seed=3)
    c, lc = load_split(small_shards, "train", limit=40, image_size=48, seed=4)
    assert a.shape == (40, 3, 48, 48)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)
    full = torch.bincount(load_split(small_shards, "train")[1], minlength=10).float()
    expected = full * 40 / full.sum()
    assert (torch.bincount(la, minlength=10).float() - expected).abs().max() <= 1.5


def test_decode_images_handles_png_grayscale_and_mixed_sizes() -> None:
    import io

    from PIL import Image

    def png(arr: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        return buf.getvalue()

    gray = np.tile(np.arange(28, dtype=np.uint8) * 9, (28, 1))
    rgb = np.zeros((40, 20, 3), dtype=np.uint8)
    out = decode_batch([png(gray)], None)
    assert out.shape == (1, 3, 28, 28) and torch.equal(out[0, 0], out[0, 2])
    assert torch.equal(out[0, 0], torch.from_numpy(gray))
    assert decode_batch([png(gray), png(rgb)], 32).shape == (2, 3, 32, 32)
    from pipelines.errors import DataError

    with pytest.raises(DataError, match="different sizes"):
        decode_batch([png(gray), png(rgb)], None)
