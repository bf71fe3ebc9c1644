"""Decode + augment of one batch spread over threads: the same images and views as on one thread."""

from __future__ import annotations

import io
import multiprocessing

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.augment import TwoViewAugment
from pipelines.decode import decode_and_augment, decode_batch_threaded
from pipelines.errors import DataError
from pipelines.images import decode_batch

_THREADS = torch.get_num_threads()


@pytest.fixture(scope="module")
def jpegs(cifar10_dir) -> list[bytes]:
    """300 real CIFAR-10 JPEGs (not a multiple of the chunk size)."""
    table = pq.read_table(cifar10_dir / "test-00000-of-00001.parquet", columns=["image"]).slice(0, 300)
    return table.column("image").to_pylist()


def _encode(array: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def mixed(jpegs) -> list[bytes]:
    """CIFAR JPEGs interleaved with PNG, grayscale JPEG / PNG and other sizes, as a shard may hold."""
    rng = np.random.default_rng(0)
    out = []
    for k, data in enumerate(jpegs[:160]):
        kind = k % 5
        if kind == 0:
            out.append(data)
            continue
        rgb = decode_batch([data])[0].permute(1, 2, 0).numpy()
        if kind == 1:
            out.append(_encode(rgb, "PNG"))
        elif kind == 2:
            out.append(_encode(rgb.mean(axis=2).astype(np.uint8), "JPEG"))  # one-channel JPEG
        elif kind == 3:
            out.append(_encode(rgb[..., 0].copy(), "PNG"))  # one-channel PNG
        else:
            out.append(_encode(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8), "PNG"))  # another size
    return out


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_threaded_decode_equals_one_thread(jpegs, mixed, threads) -> None:
    assert torch.equal(decode_batch_threaded(jpegs, threads=threads), decode_batch(jpegs))
    assert torch.equal(decode_batch_threaded(jpegs[:70], 24, threads=threads), decode_batch(jpegs[:70], 24))
    out = decode_batch_threaded(mixed, 32, threads=threads)  # PNG, grayscale and 40x36 images brought to 32x32
    assert out.shape == (len(mixed), 3, 32, 32) and out.dtype == torch.uint8
    assert torch.equal(out, decode_batch(mixed, 32))
    gray = out[2::5]
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])  # gray -> 3 equal channels


def test_decode_batch_small_and_empty(jpegs) -> None:
    assert torch.equal(decode_batch_threaded(jpegs[:5], threads=4), decode_batch(jpegs[:5]))  # too few to split
    assert decode_batch_threaded([], threads=2).shape == decode_batch([]).shape


@pytest.mark.parametrize("threads", [1, 2])
def test_mixed_sizes_without_a_size_name_the_sizes(jpegs, mixed, threads) -> None:
    images = jpegs[:100] + mixed[4:5]  # one 40x36 image in the last chunk
    with pytest.raises(DataError, match="different sizes"):
        decode_batch_threaded(images, threads=threads)


@pytest.mark.parametrize("preset", ["simclr", "byol"])
def test_views_do_not_depend_on_threads(jpegs, mixed, preset) -> None:
    """Same seed, same views: on 1, 2, 3 or 8 threads, and as the unthreaded
    `augment(decode_batch(...))`, over successive calls (the parameter stream stays in step)."""
    def views(threads: int | None) -> list[torch.Tensor]:
        aug = TwoViewAugment(preset, 32, seed=21)
        out = []
        # `mixed` without its 40x36 images: all at the training size, the decoded-once path (photos
        # of other sizes are cut from the whole photo instead: tests/pipelines/test_photo_views.py)
        same_size = [data for k, data in enumerate(mixed) if k % 5 != 4]
        for images, size in ((jpegs, 32), (same_size, 32), (jpegs[:100], None)):  # None: size from the first chunk
            if threads is None:
                with torch.no_grad():
                    out += list(aug(decode_batch(images, size)))
            else:
                out += list(decode_and_augment(images, aug, image_size=size, threads=threads))
        return out

    reference = views(None)
    for threads in (1, 2, 3, 8):
        got = views(threads)
        assert all(torch.equal(a, b) for a, b in zip(got, reference)), threads
    assert reference[0].shape == (len(jpegs), 3, 32, 32) and not torch.equal(reference[0], reference[1])


def test_thread_settings_are_restored(jpegs) -> None:
    aug = TwoViewAugment("simclr", 32, seed=0)
    torch.set_num_threads(2)
    try:
        aug(decode_batch(jpegs[:200]))  # draws its parameters on one thread, then restores
        assert torch.get_num_threads() == 2
        decode_and_augment(jpegs, aug, threads=3)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(_THREADS)


def test_warning_filters_are_left_as_they_were(jpegs) -> None:
    """decode_batch' catch_warnings on several threads at once used to leave the process-wide
    filters changed (one thread's restore undid another's) and let warnings through."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        before = list(warnings.filters)
        for _ in range(20):
            decode_batch_threaded(jpegs, threads=4)
        assert list(warnings.filters) == before
    assert not caught


def test_callers_on_several_threads_share_the_pool(jpegs) -> None:
    """Python threads that ask for different widths at once (the pool is replaced by a wider one
    meanwhile) all get their batches."""
    from concurrent.futures import ThreadPoolExecutor

    expected = decode_batch(jpegs)
    with ThreadPoolExecutor(3) as callers:
        results = list(callers.map(lambda t: decode_batch_threaded(jpegs, threads=t), [2, 3, 5, 2, 7, 3]))
    assert all(torch.equal(r, expected) for r in results)


def _decode_and_augment_in_child(images: list[bytes], aug: TwoViewAugment, queue: multiprocessing.Queue) -> None:
    queue.put(decode_and_augment(images, aug, threads=2)[0].shape)


def test_a_forked_child_gets_its_own_pools(jpegs) -> None:
    """A forked child (a DataLoader worker) has none of its parent's pool threads, the decode pool's
    or the augmenter's: it must make its own, not wait on them (it hung before)."""
    aug = TwoViewAugment("simclr", 32, seed=0)
    decode_and_augment(jpegs, aug, threads=2)  # both of the parent's pools exist now
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_decode_and_augment_in_child, args=(jpegs, aug, queue))
    child.start()
    try:
        assert queue.get(timeout=120) == (len(jpegs), 3, 32, 32)
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
