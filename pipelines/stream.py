"""Streaming a shard folder into training: Ray Data for Ray Train workers, plain pyarrow for evaluation.

Data flow of one epoch (`read_split` builds it lazily; each epoch runs it again):

    read_parquet (encoded bytes) -> random_shuffle (of the small encoded rows, new order each epoch)
      -> decode in batches (torchvision.io, RGB uint8, resized if asked)
      -> [augment_on="data": TwoViewAugment inside Ray Data, columns view1/view2]
      -> Ray Train's streaming_split (get_dataset_shard) -> `iter_two_view_batches` on each worker
      -> [augment_on="worker": TwoViewAugment on the worker's device]

Column layout: `image` is uint8 `[N, 3, H, W]` (channels first, as torchvision decodes and as
`TwoViewAugment` takes it, so no permute on the worker), `label` int64 `[N]`, and with
`augment_on="data"` `view1`/`view2` float32 `[N, 3, S, S]` normalised instead of `image`.

Exactly once per epoch: `random_shuffle` permutes the whole split each epoch, and Ray Train's
`streaming_split(world_size, equal=True)` hands every row to one worker. To keep DDP ranks in
step, `equal=True` drops up to `world_size - 1` rows and `drop_last=True` then drops each worker's
last partial batch: `dropped_per_epoch(rows, world_size, batch_size)` says how many (a different
random set each epoch, so no image is left out for good).

2 cores: Ray Data must get CPUs next to the Train workers (docs/design.md, "Data"): the driver declares
`ray.init(num_cpus=4)`, the workers take 1 CPU each, and every Ray Data stage here is capped at
`concurrency` tasks (default 2).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from pipelines import storage
from pipelines.errors import DataError
from pipelines.images import DEFAULT_MAX_IMAGE_PIXELS, check_pixels, decode_batch, header_size
from pipelines.manifest import read_manifest, split_files

if TYPE_CHECKING:
    import ray.data

AugmentOn = Literal["worker", "data"]
# CPU default, measured with benchmarks/augment_placement.py (2 cores, 2 Train workers x 1 CPU,
# batch 256, small ConvNet step, CIFAR-10): a tie within the noise of a shared machine (load
# average 20-50): medians 351 (worker) vs 332 (data) views/s in one run, 0.49x in another.
# "worker" wins the tie: it ships uint8 images through the object store instead of two float
# views (8x fewer bytes), its views are seedable, and it is the same code path as on a GPU.
CPU_AUGMENT_ON: AugmentOn = "worker"


def default_augment_on(device: torch.device | str) -> AugmentOn:
    """Where augmentation runs by default: on the worker's GPU when it has one; on CPU, the
    placement measured faster on the 2-core machine (`CPU_AUGMENT_ON`)."""
    return "worker" if torch.device(device).type == "cuda" else CPU_AUGMENT_ON


# ---------------------------------------------------------------------------------------------
# Decoding in Ray Data's tasks


def _decode_batch(batch: dict[str, np.ndarray], image_size: int | None,
                  max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, keep_path: bool = True) -> dict[str, np.ndarray]:
    """Ray Data `map_batches` fn: encoded `image` column -> uint8 `[N, 3, H, W]`.

    The `path` column names a bad image in the error; it is dropped here unless asked for.
    """
    torch.set_num_threads(1)  # one Ray Data task = one CPU
    out = dict(batch)
    paths = list(batch["path"]) if "path" in batch else None
    if not keep_path:
        out.pop("path", None)
    out["image"] = decode_batch(list(batch["image"]), image_size, max_pixels=max_pixels, paths=paths).numpy()
    out["label"] = batch["label"].astype(np.int64)
    return out


@functools.lru_cache(maxsize=4)
def _augmenter(preset: str, size: int) -> Any:
    from pipelines.augment import TwoViewAugment

    return TwoViewAugment(preset=preset, size=size, seed=None)  # fresh random views every call


def _keep_encoded(batch: dict[str, np.ndarray], max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
                  keep_path: bool = True) -> dict[str, np.ndarray]:
    """Ray Data `map_batches` fn for photos: the `image` column stays encoded (each view is cut from
    its whole photo where the batch is augmented, `pipelines.decode.decode_and_augment`); headers
    are checked against `max_pixels` here, naming the bad image's `path`."""
    out = dict(batch)
    paths = list(batch["path"]) if "path" in batch else None
    for k, data in enumerate(batch["image"]):
        try:
            check_pixels(header_size(data), max_pixels, "data.max_image_pixels")
        except DataError as e:
            raise type(e)(f"{paths[k] if paths else f'image {k} of the batch'}: {e}") from None
    if not keep_path:
        out.pop("path", None)
    out["label"] = batch["label"].astype(np.int64)
    return out


def is_encoded(images: np.ndarray) -> bool:
    """True for a batch's `image` column of encoded photos (objects: bytes), False for decoded uint8."""
    return images.dtype == object


def two_views(images: np.ndarray, augment: Any, device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """The views of one batch's `image` column on `device`: decoded uint8 `[B, 3, H, W]` goes to the
    device and is augmented there; encoded photos are cut and augmented on this CPU
    (`pipelines.decode.decode_and_augment`), then moved."""
    device = torch.device(device)
    with torch.no_grad():
        if is_encoded(images):
            from pipelines.decode import decode_and_augment

            return tuple(v.to(device, non_blocking=True) for v in decode_and_augment(list(images), augment))
        return augment(_tensor(images).to(device, non_blocking=True))


def _augment_batch(batch: dict[str, np.ndarray], preset: str, size: int) -> dict[str, np.ndarray]:
    """Ray Data `map_batches` fn: `image` (uint8 or encoded photos) -> float `view1`, `view2` (the
    `image` column is dropped)."""
    torch.set_num_threads(1)
    out = {k: v for k, v in batch.items() if k != "image"}
    v1, v2 = two_views(batch["image"], _augmenter(preset, size))[:2]
    out["view1"], out["view2"] = v1.numpy(), v2.numpy()
    return out


# ---------------------------------------------------------------------------------------------
# Ray Data


def read_split(folder: str | Path, split: str = "train", *, image_size: int | None = None,
               shuffle: bool = True, seed: int | None = None, augment_on: AugmentOn = "worker",
               preset: str = "simclr", view_size: int | None = None, concurrency: int = 2,
               num_cpus: float = 1.0, batch_size: int = 256,
               columns: Sequence[str] = ("image", "label"), limit: int | None = None,
               max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> ray.data.Dataset:
    """A lazy Ray Data dataset over one split of a shard folder (`selfsup ingest` output).

    Pass it to `TorchTrainer(datasets={"train": ...})`; each worker then reads its part with
    `iter_two_view_batches(ray.train.get_dataset_shard("train"), ...)`. Lazy on purpose: every
    epoch re-runs the shuffle, the decode and (with `augment_on="data"`) the augmentation, so each
    epoch has a new order and new views.

    Args:
        folder: the shard folder (has `manifest.json`): a local path or a URI (`pipelines.storage`).
        split: `train` or `test`.
        image_size: the training size. When every image is already this size (or, with None, all
            of one size), rows are decoded once here into uint8 batches; photos of other or mixed
            sizes stay encoded in the `image` column and each view is cut from the whole photo
            where the batch is augmented (`two_views`). Default: the manifest's square size, else
            an error.
        shuffle: a full `random_shuffle` of the (still encoded) rows, new each epoch.
        seed: makes the shuffle order reproducible (still different every epoch); None = random.
        augment_on: "worker" yields uint8 `image` for the worker to augment on its device; "data"
            runs `TwoViewAugment(preset, view_size)` here and yields float `view1`/`view2`.
        preset: augmentation preset for `augment_on="data"`.
        view_size: view resolution for `augment_on="data"` (default: the image size).
        concurrency: at most this many tasks per Ray Data stage (2 keeps a 2-core machine live).
        num_cpus: CPUs each decode/augment task asks for.
        batch_size: rows per decode/augment task call.
        columns: shard columns to carry; add `"path"` to follow single images through.
        limit: use only the first `limit` rows of the split (the same rows every epoch; ingest
            stores rows in mixed class order). Applied before the shuffle: a `.limit()` on the
            returned dataset would instead take a different random subset each epoch.
        max_pixels: refuse (DataError naming the image's path) an image whose header declares more
            pixels, before decoding it (`data.max_image_pixels`).

    Returns:
        The dataset, columns `image` uint8 `[N, 3, H, W]` (or `view1`, `view2` float32
        `[N, 3, S, S]`), `label` int64, and any extra `columns`.

    Raises:
        DataError: no manifest, unknown split, or mixed image sizes without `image_size`.
    """
    from ray.data import TaskPoolStrategy

    if augment_on not in ("worker", "data"):
        raise DataError(f"augment_on {augment_on!r} is not allowed; allowed: 'worker', 'data'")
    manifest = read_manifest(folder)
    files = split_files(folder, split)
    size = _training_size(folder, manifest.image_size, image_size)
    cols = list(dict.fromkeys(["image", "label", "path", *columns]))  # path: to name a bad image
    ds = _shuffled_rows(files, cols, concurrency=concurrency, limit=limit, shuffle=shuffle, seed=seed)
    common = {"max_pixels": max_pixels, "keep_path": "path" in columns}
    if decoded_once(manifest.image_size, size):
        ds = ds.map_batches(_decode_batch, fn_kwargs={"image_size": size, **common}, batch_size=batch_size,
                            batch_format="numpy", compute=TaskPoolStrategy(size=concurrency), num_cpus=num_cpus)
    else:  # photos: kept encoded, each view cut from its whole photo where the batch is augmented
        ds = ds.map_batches(_keep_encoded, fn_kwargs=common, batch_size=batch_size,
                            batch_format="numpy", compute=TaskPoolStrategy(size=concurrency), num_cpus=num_cpus)
    if augment_on == "data":
        ds = ds.map_batches(_augment_batch, fn_kwargs={"preset": preset, "size": view_size or size},
                            batch_size=batch_size, batch_format="numpy",
                            compute=TaskPoolStrategy(size=concurrency), num_cpus=num_cpus)
    return ds


def decoded_once(manifest_size: Sequence[int] | None, image_size: int | None) -> bool:
    """True when a split's images can be decoded as they are into fixed-size batches: every image
    of one size (the manifest says which) and that size the training size (CIFAR, MNIST). Photos of
    mixed sizes, or of another size than `image_size`, stay encoded: each view is cut from the
    whole photo (`pipelines.decode.decode_and_augment`)."""
    if manifest_size is None:
        return False
    return image_size is None or tuple(manifest_size) == (image_size, image_size)


def _training_size(folder: str | Path, manifest_size: Sequence[int] | None, image_size: int | None) -> int | None:
    """`image_size`, else the manifest's square size; photos of mixed sizes need one."""
    size = image_size or (manifest_size[0] if manifest_size and manifest_size[0] == manifest_size[1] else None)
    if size is None and manifest_size is None:
        raise DataError(f"images in {folder} have different sizes; set an image size (data.image_size)")
    return size


def _shuffled_rows(files: list[str], columns: list[str], *, concurrency: int, limit: int | None,
                   shuffle: bool, seed: int | None) -> ray.data.Dataset:
    """The encoded rows (`columns`) of a split's `files`, the first `limit`, shuffled (seeded when
    `seed` is given)."""
    from ray.data import RandomSeedConfig

    # A dataset in an object store: the read tasks, on any node, get the store's filesystem object.
    filesystem, paths = storage.filesystem_and_paths(files)
    ds = _read_parquet(paths, columns, concurrency, filesystem)
    if limit is not None:
        ds = ds.limit(limit)
    if shuffle:
        # Shuffle the encoded rows (~1-3 KB each), not decoded or augmented ones (4-25x larger).
        ds = ds.random_shuffle(seed=None if seed is None else RandomSeedConfig(seed=seed, reseed_after_execution=True))
    return ds


def _read_parquet(files: list[str], columns: list[str], concurrency: int, filesystem: Any = None) -> ray.data.Dataset:
    """`ray.data.read_parquet` through Ray Data's V1 Parquet datasource.

    Ray 2.60's default V2 datasource lists the files again on every execution, i.e. every epoch of a
    lazy dataset, and its footer indexer starts `RAY_DATA_PARQUET_FOOTER_NUM_ACTORS` (32) actor
    processes for it each time. On this project's 2-core machine that was 7.4 s of a 2,048-image
    demo epoch's 8 s read (`ds.stats()`: ListFiles 7.4 s wall, 0.16 s CPU); V1 reads the footers
    once, here: 0.36 s against 8.31 s per read of the demo's 4,000 images
    (`benchmarks/stream_read.py`). The flag is
    read when the dataset is built, so it is switched for this call only: a caller's own
    `read_parquet` keeps Ray's default. V1 samples a few files here (Ray tasks) with a progress
    bar of its own, kept off the terminal the same way.
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    before = ctx.use_datasource_v2, ctx.enable_progress_bars
    ctx.use_datasource_v2, ctx.enable_progress_bars = False, False
    try:
        return ray.data.read_parquet(files, columns=columns, concurrency=concurrency, filesystem=filesystem)
    finally:
        ctx.use_datasource_v2, ctx.enable_progress_bars = before


def steps_per_epoch(rows: int, world_size: int, batch_size: int) -> int:
    """Optimizer steps per epoch on every worker: equal shards, then full batches only."""
    return (rows // world_size) // batch_size


def dropped_per_epoch(rows: int, world_size: int, batch_size: int) -> int:
    """Images left out of one epoch by the equal split plus `drop_last` (a new random set each epoch)."""
    return rows - world_size * batch_size * steps_per_epoch(rows, world_size, batch_size)


def iter_two_view_batches(shard: Any, *, batch_size: int, augment: Any = None,
                          device: torch.device | str = "cpu", augment_on: AugmentOn = "worker",
                          keep: Sequence[str] = (), prefetch_batches: int = 2,
                          ) -> Iterator[tuple[torch.Tensor, ...]]:
    """Two-view batches for one epoch, inside a Ray Train worker.

    Call once per epoch with `ray.train.get_dataset_shard("train")` (a `DataIterator`). Batches are
    full (`drop_last=True`), so every rank makes the same number of steps, see `steps_per_epoch`.

    Args:
        shard: the worker's `DataIterator` over a `read_split` dataset.
        batch_size: images per batch on this worker.
        augment: `TwoViewAugment` (or any callable uint8 `[B, 3, H, W]` -> (view1, view2)),
            applied on `device`; required for `augment_on="worker"`, ignored for "data".
        device: where the views go (the worker's GPU or "cpu").
        augment_on: must match the `read_split` that made the dataset.
        keep: extra columns (e.g. `("label", "path")`) to yield as a third item, a dict of numpy arrays.
        prefetch_batches: batches Ray Data prepares ahead.

    Yields:
        `(view1, view2)` float `[batch_size, 3, S, S]` on `device`, then DINO's local crops
        `[V, batch_size, 3, s, s]` when the augmenter makes them, then a dict of the `keep` columns.
    """
    device = torch.device(device)
    if augment_on == "worker" and augment is None:
        raise ValueError("augment_on='worker' needs an augment callable (pipelines.augment.TwoViewAugment)")
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True,
                                    prefetch_batches=prefetch_batches):
        if augment_on == "worker":
            if "image" not in batch:
                raise ValueError("augment_on='worker' but the batches have no 'image' column; "
                                 "build the dataset with read_split(..., augment_on='worker')")
            v1, v2, *local = two_views(batch["image"], augment, device)
        else:
            if "view1" not in batch:
                raise ValueError("augment_on='data' but the batches have no 'view1' column; "
                                 "build the dataset with read_split(..., augment_on='data')")
            v1 = _tensor(batch["view1"]).to(device, non_blocking=True)
            v2 = _tensor(batch["view2"]).to(device, non_blocking=True)
            local = []
        if keep:
            yield v1, v2, *local, {k: batch[k] for k in keep}
        else:
            yield v1, v2, *local


def _tensor(array: np.ndarray) -> torch.Tensor:
    """numpy -> torch without torch's read-only warning (Ray Data hands out read-only arrays)."""
    array = np.ascontiguousarray(array)
    return torch.from_numpy(array if array.flags.writeable else array.copy())
