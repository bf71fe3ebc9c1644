"""Decode one batch of encoded images on every core of this process, and make its two views.

Photos (images not all at the training size) take another road through `decode_and_augment`: each
view is cut from its whole photo (`cut_views`, crop boxes drawn against the photo's own size,
JPEGs decoded at a reduced scale), see docs/design.md, "Photos". What follows is the same-size path.

`pipelines.images.decode_batch` decodes on the calling thread: torchvision's `decode_jpeg` takes
a list but loops over it in Python, one image after the other (~25-30 us per 32x32 CIFAR-10 JPEG
on the 2-core machine, more than the ~18 us the numba kernel takes for both views). The decoders
release the GIL while they work, so `decode_batch_threaded` cuts the batch into chunks, decodes them on a
thread pool and joins them; `decode_and_augment` then hands the uint8 batch to the augmenter,
whose CPU kernel splits the rows over as many threads. One Python thread calling
`decode_and_augment` in a plain loop so keeps every core busy, instead of running its own threads
over their own batches (`benchmarks/pipeline_throughput.py` has both).

Same output as the one-thread path, whatever the thread count: each image is decoded on its own
by `decode_batch` (chunk by chunk), and `TwoViewAugment` draws every parameter for the whole
batch on the calling thread before the rows are split (`tests/pipelines/test_decode.py`).

Threads: `torch.get_num_threads()` by default, the core budget PyTorch gives this process (a Ray
Data task sets it to 1, and then nothing is split). The pool's threads run their PyTorch ops on
one intra-op thread: two levels of threads on two cores only wait for each other.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipelines.errors import DataError
from pipelines.images import DEFAULT_MAX_IMAGE_PIXELS, check_pixels, header_size
from pipelines.images import decode_batch

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


def decode_batch_threaded(images: Sequence[Any], image_size: int | None = None, *, threads: int | None = None) -> torch.Tensor:
    """`decode_batch(images, image_size)` with the batch's images decoded on `threads` threads.

    Args:
        images: encoded JPEG / PNG (or any format torchvision reads) bytes, one per image.
        image_size: as in `decode_batch`: resize (shorter side) and centre-crop to this square
            size; None keeps the size (then all images must have one size).
        threads: threads to decode on; default `torch.get_num_threads()`.

    Returns:
        uint8 `[N, 3, H, W]`, equal to `decode_batch(images, image_size)`.

    Raises:
        DataError: as `decode_batch` (images of different sizes and no `image_size`).
    """
    n = len(images)
    threads = _threads(threads)
    chunks = min(threads * _CHUNKS_PER_THREAD, n // _CHUNK)
    if threads == 1 or chunks < 2:
        return decode_batch(images, image_size)
    bounds = [n * k // chunks for k in range(chunks + 1)]
    # decode_batch silences torchvision's deprecation and torch's read-only-buffer warnings with
    # `warnings.catch_warnings`, which saves and restores the process-wide filters: run on several
    # threads at once, one thread's restore undoes another's, and filters were left changed after
    # the call. Silenced here once, around all of them, they restore to this state and then to the
    # caller's. (Other Python threads still see the silenced filters meanwhile.)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        parts = list(_executor(threads).map(lambda k: decode_batch(images[bounds[k]:bounds[k + 1]], image_size),
                                            range(chunks)))
    if len({tuple(p.shape[1:]) for p in parts}) > 1:
        return decode_batch(images, image_size)  # sizes differ between chunks: its error names them
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a 1.5 MB copy is not worth forking OpenMP threads (they wait for busy cores)
    try:
        return torch.cat(parts)
    finally:
        torch.set_num_threads(before)


def decode_and_augment(images: Sequence[Any], augment: Any, *, image_size: int | None = None,
                       threads: int | None = None,
                       max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[torch.Tensor, ...]:
    """Two views of one batch of encoded images, decoded and augmented on `threads` threads.

    Two paths, chosen from the image headers:

    * every image already `image_size` square (or, with `image_size=None`, all of one size: CIFAR,
      MNIST): decoded once at that size and handed to `augment` whole, which crops each view from
      it. Equal to `augment(decode_batch(images, image_size))` for the same augmenter state,
      whatever `threads` is.
    * photos (mixed sizes, or a size other than `image_size`): each view is cut from its whole
      photo (`cut_views`: box drawn against the photo's own width and height, JPEG decoded at the
      smallest libjpeg scale that keeps the box at least the view's side), then
      `augment.augment_cropped` flips, jitters, blurs and solarizes the uint8 crops batched.
      `augment` must then be a `TwoViewAugment`.

    Args:
        images: encoded bytes, one per image.
        augment: `pipelines.augment.TwoViewAugment` on CPU (or, for same-size images only, any
            callable uint8 `[B, 3, H, W]` -> (view1, view2)); it splits its rows over
            `torch.get_num_threads()` threads, set to `threads` for this call.
        image_size: the training size: the side the global views are cut at from photos; None
            lets the augmenter's size decide.
        threads: default `torch.get_num_threads()`.
        max_pixels: photos whose header declares more pixels are refused before decoding.

    Returns:
        `(view1, view2)`, float32 `[N, 3, S, S]` each (then DINO's local crops, when `augment`
        makes them).

    Raises:
        DataError: an image over `max_pixels` or that does not decode; photos with an augmenter
            that cannot take crops.

    Example:
        >>> aug = TwoViewAugment("simclr", size=32, seed=0)
        >>> for start in range(0, len(encoded), 512):
        ...     v1, v2 = decode_and_augment(encoded[start:start + 512], aug)
    """
    threads = _threads(threads)
    sizes = [header_size(data) for data in images]
    if _decoded_once(sizes, image_size):
        batch = decode_batch_threaded(images, image_size, threads=threads)
        with _intra_op_threads(threads), torch.no_grad():
            return augment(batch)
    if not hasattr(augment, "augment_cropped"):
        raise DataError("images of other sizes than the training size need a TwoViewAugment "
                        "(views are cut from each whole photo); got " + type(augment).__name__)
    for k, size in enumerate(sizes):
        try:
            check_pixels(size, max_pixels, "data.max_image_pixels")
        except DataError as e:
            raise type(e)(f"image {k} of the batch: {e}") from None
    sides = augment.view_sizes()
    if image_size is not None:
        sides = [image_size, image_size] + sides[2:]
    heights = torch.tensor([h for h, _ in sizes], dtype=torch.int64)
    widths = torch.tensor([w for _, w in sizes], dtype=torch.int64)
    boxes = [b.numpy() for b in augment.crop_boxes(heights, widths)]
    crops = [np.empty((len(images), 3, side, side), np.uint8) for side in sides]

    def cut(k: int) -> None:
        for view, array in zip(cut_views(images[k], [b[k] for b in boxes], sides), crops):
            array[k] = view

    with warnings.catch_warnings():  # PIL's bomb warning: our own `max_pixels` was checked above
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        if threads == 1 or len(images) < 2:
            for k in range(len(images)):
                cut(k)
        else:
            list(_executor(threads).map(cut, range(len(images))))
    with _intra_op_threads(threads), torch.no_grad():
        return augment.augment_cropped([torch.from_numpy(c) for c in crops])


def _decoded_once(sizes: list[tuple[int, int]], image_size: int | None) -> bool:
    """True when the images can be decoded as they are into one batch: all one size, and that size
    the training size (`image_size` square) when one is given."""
    if not sizes:
        return True
    if len(set(sizes)) > 1:
        return False
    return image_size is None or sizes[0] == (image_size, image_size)


@contextlib.contextmanager
def _intra_op_threads(threads: int) -> Iterator[None]:
    before = torch.get_num_threads()
    if before != threads:
        torch.set_num_threads(threads)  # the calling thread's setting only; restored below
    try:
        yield
    finally:
        if before != threads:
            torch.set_num_threads(before)


def reduced_scale(boxes: Sequence[Sequence[int]], sides: Sequence[int]) -> int:
    """The largest libjpeg DCT scale-down (8, 4, 2 or 1) that leaves every crop box (top, left,
    height, width) at least its view's side in both directions."""
    for scale in (8, 4, 2):
        if all(min(int(b[2]), int(b[3])) >= scale * side for b, side in zip(boxes, sides)):
            return scale
    return 1


def cut_views(data: bytes, boxes: Sequence[Sequence[int]], sides: Sequence[int]) -> list[np.ndarray]:
    """Cut each box out of one encoded photo and resize it to its side: uint8 `[3, side, side]` each.

    Boxes are (top, left, height, width) in the photo's full-resolution pixels. A JPEG is decoded
    once at the smallest scale (`reduced_scale`: 1/2, 1/4, 1/8, libjpeg-turbo's DCT scaling through
    `simplejpeg`'s `min_height`/`min_width`) that still keeps every box at least its side; each box
    is then resized from that decode (PIL bilinear with antialiasing, the box scaled to the reduced
    decode's pixels). The views equal torchvision's `resized_crop` of the full decode to within
    interpolation error (`tests/pipelines/test_photo_views.py`). Other formats (PNG, WebP, GIF) and
    JPEGs simplejpeg refuses (CMYK from an old ingest) go through PIL. Both release the GIL.

    Why simplejpeg over PIL's `draft`: the same libjpeg-turbo scaled decode; the decode alone ran
    at 2.1x PIL's (`benchmarks/photo_pipeline.py`'s decoder line), the whole `cut_views` at 1.1-1.4x
    on 3x-sized photos and equal at 320-640 px (docs/design.md, "Photos").

    Raises:
        DataError: the bytes do not decode.
    """
    import simplejpeg

    rgb: Image.Image | None = None
    if bytes(data[:2]) == b"\xff\xd8":
        try:
            height, width = header_size(data)
            scale = reduced_scale(boxes, sides)
            rgb = Image.fromarray(simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=-(-height // scale),
                                                         min_width=-(-width // scale)))
        except (ValueError, DataError):  # simplejpeg refuses it (e.g. CMYK): PIL below names what is wrong
            rgb = None
    if rgb is None:
        try:
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
                rgb = im.convert("RGB") if im.mode != "RGB" else im
                rgb.load()
        except Exception as e:  # PIL raises OSError, SyntaxError, ... for a corrupt file
            raise DataError(f"cannot decode image ({type(e).__name__}: {e})") from None
    fx, fy = rgb.width / width, rgb.height / height
    out = []
    for (top, left, h, w), side in zip(boxes, sides):
        box = (float(left) * fx, float(top) * fy, float(left + w) * fx, float(top + h) * fy)
        view = rgb.resize((side, side), Image.Resampling.BILINEAR, box=box)
        out.append(np.asarray(view).transpose(2, 0, 1))
    return out
