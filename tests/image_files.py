"""Image files the tests write themselves: a decompression bomb (a valid PNG, built without PIL)."""

from __future__ import annotations

import struct
import zlib


def bomb_png(width: int, height: int, idat: bytes | None = None) -> bytes:
    """A real 8-bit grey PNG of width x height zeros: a few hundred KB that decode to width*height bytes.

    `idat` replaces the compressed pixels (e.g. with garbage: then any decode attempt fails)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    if idat is None:
        z = zlib.compressobj(9)
        row = b"\x00" * (width + 1)  # filter byte + pixels
        parts = [z.compress(row * 500) for _ in range(height // 500)]
        parts += [z.compress(row * (height % 500)), z.flush()]
        idat = b"".join(parts)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def photo_jpeg(seed: int, *, min_side: int = 320, max_side: int = 640, quality: int = 90) -> bytes:
    """A photo-like JPEG of a random size between min_side and max_side px on each side: smooth
    colour fields (a few upscaled random pixels) plus sensor-like noise, as a camera's would be."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
    base = Image.fromarray(rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    noisy = np.clip(np.asarray(base, dtype=np.int16) + rng.normal(0, 8, size=(h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
