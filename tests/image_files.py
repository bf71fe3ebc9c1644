"""Image files the tests write themselves: a decompression bomb (a valid PNG, built without PIL)."""

from __future__ import annotations

import struct
import zlib

from pipelines.photos import photo_jpeg  # noqa: F401  (the tests' photos; one maker for tests and benchmarks)


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
