"""Decode one batch of encoded images on every core of this process, and make its two views.

`pipelines.stream.decode_images` decodes on the calling thread: torchvision's `decode_jpeg` takes
a list but loops over it in Python, one image after the other (~25-30 us per 32x32 CIFAR-10 JPEG
on the 2-core machine, more than the ~18 us the numba kernel takes for both views). The decoders
release the GIL while they work, so `decode_batch` cuts the batch into chunks, decodes them on a
thread pool and joins them; `decode_and_augment` then hands the uint8 batch to the augmenter,
whose CPU kernel splits the rows over as many threads. One Python thread calling
`decode_and_augment` in a plain loop so keeps every core busy, instead of running its own threads
over their own batches (`benchmarks/pipeline_throughput.py` has both).

Same output as the one-thread path, whatever the thread count: each image is decoded on its own
by `decode_images` (chunk by chunk), and `TwoViewAugment` draws every parameter for the whole
batch on the calling thread before the rows are split (`tests/pipelines/test_decode.py`).

Threads: `torch.get_num_threads()` by default, the core budget PyTorch gives this process (a Ray
Data task sets it to 1, and then nothing is split). The pool's threads run their PyTorch ops on
one intra-op thread: two levels of threads on two cores only wait for each other.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from pipelines.stream import decode_images

_CHUNK = 32  # images per chunk at least: a chunk costs ~20 us of Python on top of ~1 ms of decoding
_CHUNKS_PER_THREAD = 4  # more chunks than threads: a thread the OS pauses (shared cores) is caught up by the others

_pool: ThreadPoolExecutor | None = None
_pool_pid = 0
_pool_lock = threading.Lock()


def _forget_pool() -> None:  # in a forked child: the parent's pool threads and lock holders are not there
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def _one_thread() -> None:
    torch.set_num_threads(1)


def _executor(threads: int) -> ThreadPoolExecutor:
    """This process's decode pool, at least `threads` wide (a new one after a fork: the parent's
    threads do not exist in the child, and its executor would wait on them forever)."""
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid() or _pool._max_workers < threads:  # type: ignore[attr-defined]
            # Not shut down: another thread may still be submitting to the old pool; its idle
            # threads end when it is garbage-collected.
            _pool = ThreadPoolExecutor(threads, thread_name_prefix="selfsup-decode", initializer=_one_thread)
            _pool_pid = os.getpid()
        return _pool


def _threads(threads: int | None) -> int:
    return max(1, torch.get_num_threads() if threads is None else int(threads))


def decode_batch(images: Sequence[Any], image_size: int | None = None, *, threads: int | None = None) -> torch.Tensor:
    """`decode_images(images, image_size)` with the batch's images decoded on `threads` threads.

    Args:
        images: encoded JPEG / PNG (or any format torchvision reads) bytes, one per image.
        image_size: as in `decode_images`: resize (shorter side) and centre-crop to this square
            size; None keeps the size (then all images must have one size).
        threads: threads to decode on; default `torch.get_num_threads()`.

    Returns:
        uint8 `[N, 3, H, W]`, equal to `decode_images(images, image_size)`.

    Raises:
        DataError: as `decode_images` (images of different sizes and no `image_size`).
    """
    n = len(images)
    threads = _threads(threads)
    chunks = min(threads * _CHUNKS_PER_THREAD, n // _CHUNK)
    if threads == 1 or chunks < 2:
        return decode_images(images, image_size)
    bounds = [n * k // chunks for k in range(chunks + 1)]
    # decode_images silences torchvision's deprecation and torch's read-only-buffer warnings with
    # `warnings.catch_warnings`, which saves and restores the process-wide filters: run on several
    # threads at once, one thread's restore undoes another's, and filters were left changed after
    # the call. Silenced here once, around all of them, they restore to this state and then to the
    # caller's. (Other Python threads still see the silenced filters meanwhile.)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        parts = list(_executor(threads).map(lambda k: decode_images(images[bounds[k]:bounds[k + 1]], image_size),
                                            range(chunks)))
    if len({tuple(p.shape[1:]) for p in parts}) > 1:
        return decode_images(images, image_size)  # sizes differ between chunks: its error names them
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a 1.5 MB copy is not worth forking OpenMP threads (they wait for busy cores)
    try:
        return torch.cat(parts)
    finally:
        torch.set_num_threads(before)


def decode_and_augment(images: Sequence[Any], augment: Any, *, image_size: int | None = None,
                       threads: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Two views of one batch of encoded images, decoded and augmented on `threads` threads.

    Equal to `augment(decode_images(images, image_size))` for the same augmenter state (seed and
    calls so far), whatever `threads` is.

    Args:
        images: encoded bytes, one per image.
        augment: `pipelines.augment.TwoViewAugment` on CPU (or any callable uint8
            `[B, 3, H, W]` -> (view1, view2)); `TwoViewAugment` splits its rows over
            `torch.get_num_threads()` threads, set to `threads` for this call.
        image_size: as in `decode_batch`.
        threads: default `torch.get_num_threads()`.

    Returns:
        `(view1, view2)`, float32 `[N, 3, S, S]` each.

    Example:
        >>> aug = TwoViewAugment("simclr", size=32, seed=0)
        >>> for start in range(0, len(encoded), 512):
        ...     v1, v2 = decode_and_augment(encoded[start:start + 512], aug)
    """
    threads = _threads(threads)
    batch = decode_batch(images, image_size, threads=threads)
    before = torch.get_num_threads()
    if before != threads:
        torch.set_num_threads(threads)  # the calling thread's setting only; restored below
    try:
        with torch.no_grad():
            return augment(batch)
    finally:
        if before != threads:
            torch.set_num_threads(before)
