"""A training split decoded once and held in memory: the data path for datasets that fit (`data.loader=memory`).

Why: streaming the shards through Ray Data re-reads, re-shuffles and re-decodes the whole split
every epoch in Ray tasks that share the workers' cores. For a split that fits in memory that work
is the same every epoch: on the 2-core machine it cost 8-17 s per epoch of the 256-image demo
sweep trial and ~4 s per 10,000 CIFAR-10 images, against ~0.2 s to decode them once (see
`benchmarks/overhead.py`). Small-image sets are small decoded: CIFAR-10's 50,000 training images
are 154 MB as uint8 (3 x 32 x 32 bytes each).

How: the driver decodes the split once (`load_split`, threaded) and puts the uint8 array into Ray's
object store; every worker on a node maps that one copy (zero-copy, read-only shared memory), and
in a sweep every trial reuses the copy the sweep driver made. Each epoch every rank draws the same
seeded permutation of all rows (seed, epoch), cut into global batches, and takes its part of each:
a new global order every epoch, every image at most once per epoch across the workers, exactly
`dropped_per_epoch` left out (the same count as the streaming path: a different random set each
epoch), and global batch i holds the same images whatever the number of workers (an elastic run
resized between epochs sees the batches an unresized one would). Views are made on the worker's device; on a
GPU the whole uint8 split is copied to the device once and batches are gathered there.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.errors import DataError
from pipelines import storage
from pipelines.images import DEFAULT_MAX_IMAGE_PIXELS, check_pixels, decode_batch, header_size
from pipelines.manifest import read_manifest, split_files
from pipelines.stream import decoded_once, steps_per_epoch, two_views


@dataclass
class DecodedSplit:
    """uint8 images `[N, 3, S, S]` and int64 labels `[N]` (numpy: what the object store maps zero-copy)."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def nbytes(self) -> int:
        return int(self.images.nbytes + self.labels.nbytes)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The images as a tensor without a copy (read-only shared memory when mapped from the
        object store: only ever read) and the labels as a tensor of their own."""
        with warnings.catch_warnings():  # torch warns about non-writable arrays
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(np.asarray(self.images)), torch.from_numpy(np.array(self.labels))


@dataclass
class EncodedSplit:
    """Photos as stored (encoded bytes, any sizes) and int64 labels `[N]`: the memory loader's split
    for photos, whose views are cut from each whole photo every epoch (a fixed-size decode would
    lose what lies outside its centre crop)."""

    images: list[bytes]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def nbytes(self) -> int:
        return int(sum(len(b) for b in self.images) + self.labels.nbytes)


def training_split(folder: str | Path, split: str, *, image_size: int | None = None, limit: int | None = None,
                   threads: int = 2, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> DecodedSplit | EncodedSplit:
    """The memory loader's training split (its first `limit` rows): decoded once when every image is
    already the training size (`pipelines.stream.decoded_once`: CIFAR, MNIST), else kept encoded."""
    if decoded_once(read_manifest(folder).image_size, image_size):
        return decode_split(folder, split, image_size=image_size, limit=limit, threads=threads, max_pixels=max_pixels)
    images, labels = load_encoded(folder, split, limit=limit, first=True)
    for k, data in enumerate(images):  # refused here, before training starts, as the decoded path does
        try:
            check_pixels(header_size(data), max_pixels, "data.max_image_pixels")
        except DataError as e:
            raise type(e)(f"{split} image {k}: {e}") from None
    return EncodedSplit(images, labels)


def decoded_bytes(rows: int, image_size: int) -> int:
    """Bytes of `rows` decoded RGB images of `image_size`^2 (uint8) with their labels."""
    return rows * (3 * image_size * image_size + 8)


def split_rows(folder: str | Path, split: str, limit: int | None = None) -> int:
    """Rows of a split per the manifest, at most `limit`."""
    rows = read_manifest(folder).rows(split)
    return min(rows, limit) if limit is not None else rows


def decode_split(folder: str | Path, split: str, *, image_size: int | None = None, limit: int | None = None,
                 stratified: bool = False, seed: int = 0, threads: int = 2,
                 max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, resize: int | None = None) -> DecodedSplit:
    """Decode a split (or its first `limit` rows; with `stratified`, a seeded per-class subset) in
    this process, refusing images over `max_pixels` before decoding them; images not already
    `image_size` square go through the evaluation transform (`pipelines.images.eval_transform`,
    shorter side to `resize`)."""
    images, labels = load_split(folder, split, limit=limit, image_size=image_size, seed=seed,
                                first=not stratified, threads=threads, max_pixels=max_pixels, resize=resize)
    return DecodedSplit(images.numpy(), labels.numpy())


def epoch_indices(rows: int, world_size: int, rank: int, batch_size: int, *, seed: int, epoch: int) -> np.ndarray:
    """This rank's row indices for one epoch: its part of each global batch of a global permutation.

    Every rank computes the same permutation from (seed, epoch), so the parts never overlap; a
    resumed epoch replays the same order. Global batch i is `order[i*B:(i+1)*B]` with
    B = `world_size * batch_size`, whatever `world_size` is, and rank r takes its r-th
    `batch_size` of it: the global batches do not depend on the world size.

    Args:
        rows: images in the split.
        world_size, rank: this worker's place in the group.
        batch_size: images per batch on this worker.
        seed, epoch: the run seed and the epoch (1-based).

    Returns:
        int64 `[steps_per_epoch(rows, world_size, batch_size) * batch_size]`, batch after batch.
    """
    steps = steps_per_epoch(rows, world_size, batch_size)
    order = np.random.default_rng([seed, epoch]).permutation(rows)[:steps * world_size * batch_size]
    return order.reshape(steps, world_size, batch_size)[:, rank].reshape(-1)


class MemoryBatches:
    """Two-view batches from a `DecodedSplit` (or an `EncodedSplit` of photos) on one worker
    (`data.loader=memory`).

    Args:
        split: the decoded split (as `ray.get` returns it: read-only shared memory), or photos as
            stored, each batch's views then cut from the whole photos (`pipelines.decode`).
        device: where batches are gathered and augmented. On CUDA the uint8 split is copied to the
            device once (if it takes at most `gpu_fraction` of the free device memory; else each
            batch is gathered on the host and copied).
    """

    def __init__(self, split: DecodedSplit | EncodedSplit, device: torch.device | str = "cpu",
                 gpu_fraction: float = 0.5) -> None:
        self.device = torch.device(device)
        self.rows = len(split)
        self.encoded: np.ndarray | None = None
        if isinstance(split, EncodedSplit):  # photos: cut and augmented on this CPU, batch by batch
            self.encoded = np.empty(len(split.images), dtype=object)
            self.encoded[:] = split.images
            return
        host, _ = split.tensors()
        self.images = host
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            if host.numel() <= gpu_fraction * free:
                self.images = host.to(self.device)

    def epoch(self, indices: np.ndarray, *, batch_size: int, augment: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield `(view1, view2)` on the device for consecutive `batch_size` slices of `indices`
        (then DINO's local crops, when `augment` makes them)."""
        if self.encoded is not None:
            for start in range(0, len(indices) - batch_size + 1, batch_size):
                yield two_views(self.encoded[indices[start:start + batch_size]], augment, self.device)
            return
        index = torch.from_numpy(np.ascontiguousarray(indices, dtype=np.int64))
        if self.images.device != index.device:
            index = index.to(self.images.device)
        for start in range(0, len(index) - batch_size + 1, batch_size):
            batch = self.images.index_select(0, index[start:start + batch_size])
            with torch.no_grad():
                views = augment(batch.to(self.device, non_blocking=True))
            yield views  # outside no_grad: a generator suspended inside it would leak the mode


# ---------------------------------------------------------------------------------------------
# Decoded in this process, no Ray: kNN evaluation, embedding, this loader


def load_split(folder: str | Path, split: str = "test", *, limit: int | None = None,
               image_size: int | None = None, seed: int = 0, first: bool = False,
               threads: int = 1, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
               resize: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a whole split (or a subset) in this process: kNN evaluation, embedding, the memory loader.

    Args:
        folder: the shard folder.
        split: `train` or `test`.
        limit: at most this many images. By default a seeded subset that keeps each class's share
            (stratified), returned in shard order; with `first=True` the first `limit` rows (as
            `read_split(limit=...)` and `data.limit`). None = all.
        image_size: as in `read_split` (default: the manifest's size); images of another size go
            through the evaluation transform (`pipelines.images.decode_batch`, with `resize`).
        seed: seed of the stratified subset.
        first: take the first `limit` rows instead of a stratified subset.
        threads: decode row groups on this many threads (torchvision's decoders release the GIL).
        max_pixels: refuse an image whose header declares more pixels, before decoding it.

    Returns:
        images uint8 `[N, 3, H, W]` and labels int64 `[N]`.
    """
    manifest = read_manifest(folder)
    jobs, selected = _row_groups(folder, split, limit=limit, seed=seed, first=first)
    size = image_size or (manifest.image_size[0] if manifest.image_size else None)

    def decode(job: tuple[str, int, np.ndarray]) -> torch.Tensor:
        f, g, rows = job
        t = storage.parquet_file(f).read_row_group(g, columns=["image", "path"])
        images, paths = t.column("image").to_pylist(), t.column("path").to_pylist()
        return decode_batch([images[i] for i in rows], size, max_pixels=max_pixels,
                             paths=[f"{storage.name(f)}: {paths[i]}" for i in rows], resize=resize)

    if threads > 1 and len(jobs) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as pool:
            chunks = list(pool.map(decode, jobs))
    else:
        chunks = [decode(j) for j in jobs]
    if not chunks:
        return torch.empty(0, 3, size or 0, size or 0, dtype=torch.uint8), torch.from_numpy(selected)
    return torch.cat(chunks), torch.from_numpy(selected)


def load_encoded(folder: str | Path, split: str = "train", *, limit: int | None = None, seed: int = 0,
                 first: bool = False) -> tuple[list[bytes], np.ndarray]:
    """A split's (or subset's, as in `load_split`) encoded images as stored, and int64 labels: what
    the memory loader keeps for photos, whose views are cut from the whole photo every epoch."""
    jobs, labels = _row_groups(folder, split, limit=limit, seed=seed, first=first)
    images: list[bytes] = []
    for f, g, rows in jobs:
        column = storage.parquet_file(f).read_row_group(g, columns=["image"]).column("image").to_pylist()
        images += [column[i] for i in rows]
    return images, labels


def _row_groups(folder: str | Path, split: str, *, limit: int | None, seed: int,
                first: bool) -> tuple[list[tuple[str, int, np.ndarray]], np.ndarray]:
    """The split's rows to read, as (file, row group, rows in it) in shard order, and their labels:
    all rows, the first `limit` (`first`), or a seeded stratified subset of `limit`."""
    files = split_files(folder, split)
    labels = np.concatenate([storage.parquet_file(f).read(columns=["label"]).column("label").to_numpy()
                             for f in files]).astype(np.int64)
    keep = None
    if limit is not None and limit < len(labels):
        keep = np.arange(limit) if first else _stratified_subset(labels, limit, seed)
    jobs: list[tuple[str, int, np.ndarray]] = []
    start = 0
    for f in files:
        meta = storage.parquet_file(f).metadata
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            rows = np.arange(n) if keep is None else keep[(keep >= start) & (keep < start + n)] - start
            if len(rows):
                jobs.append((f, g, rows))
            start += n
    return jobs, (labels if keep is None else labels[keep])


def _stratified_subset(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Sorted row indices of a seeded subset of `limit` rows with each class's share kept."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    # Rank every row within its class (in the random order), as a fraction of the class size;
    # taking the rows with the smallest fractions gives each class ~limit * its share.
    frac = np.empty(len(labels))
    for c in np.unique(labels):
        members = order[labels[order] == c]
        frac[members] = (np.arange(len(members)) + rng.random()) / len(members)
    chosen = np.argsort(frac, kind="stable")[:limit]
    return np.sort(chosen)
