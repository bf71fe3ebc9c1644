"""One encoded image: its size from the header, the pixel limit, ingest's normalisation, training's decode.

Every stored image must decode, with the decoder training uses (`decode_rgb`), into the same
layout: one 8-bit RGB frame `[3, H, W]`. Ingest makes sure of that (`normalise`): a JPEG, PNG or
WebP that already decodes that way is kept byte for byte; anything else is re-encoded once:

  * animated GIF / PNG / WebP -> the first frame (torchvision would decode every frame: `[N, 3, H, W]`);
  * 16-bit PNG -> 8-bit (torchvision decodes it to uint16, which the augmentations refuse);
  * palette (P), CMYK, LA, RGBA, 1-bit, YCbCr, ... -> 8-bit RGB, or 8-bit L when the image is grey
    (`L` and `RGB` both decode to 3 channels: `ImageReadMode.RGB` repeats grey);
  * formats torchvision cannot read (BMP, TIFF, PPM, ...) -> PNG.

Re-encoded images are PNG (lossless), except JPEG sources (e.g. CMYK), which stay JPEG at quality
95 rather than growing 5-10x as PNG. Ingest then decodes the stored bytes once more to prove it:
with `decode_rgb`, or, for a JPEG, with a stricter decoder that accepts only what `decode_rgb` does.

Decompression bombs: a small file can declare a huge image (a 0.39 MB 9500x9500 PNG took 1.5 GB to
decode). The size is read from the header first (`header_size`: a few bytes of PNG/JPEG/GIF/WebP,
no decoding) and an image over `max_pixels` is refused before any pixel is decoded, at ingest
(`selfsup ingest --max-image-pixels`) and at every decode (`data.max_image_pixels`, and
`selfsup registry embed --max-image-pixels`). PIL itself only warns between 89M and 178M pixels.
"""

from __future__ import annotations

import contextlib
import io
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from pipelines.errors import DataError

if TYPE_CHECKING:  # torch is imported where images are decoded: `selfsup --help` stays fast
    import torch

# 64 megapixels: the largest camera photos (61 MP) pass; a decoded RGB image of this size is 192 MB.
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
# PIL format names that torchvision.io decodes; anything else is re-encoded to PNG.
TORCHVISION_FORMATS = {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "WEBP": "webp", "GIF": "gif"}
GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


class TooManyPixels(DataError):
    """An image whose header declares more pixels than the limit (it was not decoded)."""


@dataclass
class Normalised:
    """What ingest stores for one image: its bytes, their format, (height, width), and how it was
    re-encoded ("" when kept byte for byte)."""

    data: bytes
    format: str
    size: tuple[int, int]
    converted: str


def header_size(data: bytes) -> tuple[int, int]:
    """(height, width) from the image header, without decoding pixels.

    PNG, JPEG, GIF and WebP headers are read here (a few bytes; PIL's lazy `Image.open` costs as much
    as decoding a 32x32 image); other formats through `Image.open`, which also reads only the header.

    Raises:
        DataError: the header cannot be read (not an image, or truncated before its size).
    """
    size = _fast_header_size(bytes(data[:64]) if len(data) >= 64 else bytes(data), data)
    if size is not None:
        return size
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                return im.height, im.width
    except Image.DecompressionBombError as e:  # > 2 x PIL's MAX_IMAGE_PIXELS, in its own words
        raise TooManyPixels(str(e)) from None
    except Exception as e:  # PIL raises UnidentifiedImageError, SyntaxError, ... for non-images
        raise DataError(f"not a readable image header ({type(e).__name__}: {e})") from None


def _fast_header_size(head: bytes, data: bytes) -> tuple[int, int] | None:
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        w, h = struct.unpack(">II", head[16:24])
        return h, w
    if head[:6] in (b"GIF87a", b"GIF89a"):
        w, h = struct.unpack("<HH", head[6:10])
        return h, w
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP" and len(head) >= 30:
        chunk = head[12:16]
        if chunk == b"VP8X":
            w = int.from_bytes(head[24:27], "little") + 1
            h = int.from_bytes(head[27:30], "little") + 1
            return h, w
        if chunk == b"VP8L":
            bits = int.from_bytes(head[21:25], "little")
            return ((bits >> 14) & 0x3FFF) + 1, (bits & 0x3FFF) + 1
        if chunk == b"VP8 ":
            w, h = struct.unpack("<HH", head[26:30])
            return h & 0x3FFF, w & 0x3FFF
        return None
    if head[:2] == b"\xff\xd8":
        return _jpeg_size(data)
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """Walk the JPEG markers up to the first SOFn (frame header: precision, height, width)."""
    view = memoryview(data)
    i, n = 2, len(view)
    while i + 9 < n:
        if view[i] != 0xFF:
            return None
        marker = view[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _JPEG_SOF:
            h, w = struct.unpack(">HH", view[i + 5:i + 9])
            return h, w
        if 0xD0 <= marker <= 0xD9 or marker == 0x01:  # markers without a length
            i += 2
            continue
        i += 2 + struct.unpack(">H", view[i + 2:i + 4])[0]
    return None


def check_pixels(size: tuple[int, int], max_pixels: int | None, setting: str) -> None:
    """Refuse an image of `size` (h, w) over `max_pixels`; `setting` names the knob that sets it."""
    h, w = size
    if max_pixels is not None and h * w > max_pixels:
        raise TooManyPixels(f"{w}x{h} = {h * w:,} pixels, more than {setting} = {max_pixels:,} "
                            "(refused before decoding)")


# ---------------------------------------------------------------------------------------------
# Ingest


def normalise(data: bytes, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
              setting: str = "--max-image-pixels") -> Normalised:
    """Check one source image and return what to store: kept byte for byte, or re-encoded (module doc).

    Raises:
        TooManyPixels: over `max_pixels` (read from the header; nothing decoded).
        Exception: PIL's or torchvision's error for a corrupt or truncated file (ingest lists it).
    """
    check_pixels(header_size(data), max_pixels, setting)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit was checked
        with Image.open(io.BytesIO(data)) as im:
            check_pixels((im.height, im.width), max_pixels, setting)  # formats the header reader skips
            how = _why_convert(im, data)
            if not how and im.format == "JPEG":
                # Kept byte for byte: the strict decode below is the one full decode it needs;
                # PIL's as well would halve ingest's speed.
                out = Normalised(data, "jpeg", (im.height, im.width), "")
            else:
                im.load()  # the first frame; a truncated file raises here ("image file is truncated")
                out = (Normalised(data, TORCHVISION_FORMATS[str(im.format)], (im.height, im.width), "") if not how
                       else _reencode(im, how))
    shape = _strict_jpeg_shape(out.data) if out.format == "jpeg" else None
    if shape is None:
        shape = tuple(decode_rgb(out.data, max_pixels=max_pixels, setting=setting).shape)  # what training does
    if tuple(shape[-2:]) != out.size:
        raise DataError(f"decodes to {shape}, not {out.size}")
    return out


def _strict_jpeg_shape(data: bytes) -> tuple[int, int, int] | None:
    """The `(3, H, W)` of a JPEG that libjpeg-turbo decodes without even a warning (simplejpeg,
    `strict=True`), else None: the caller then decodes it with training's decoder to decide.

    Why it is enough: a JPEG that decodes strictly decodes with torchvision's `decode_jpeg` (the
    same libjpeg-turbo, which raises only on its fatal errors) and with PIL's; `tests/pipelines/
    test_images.py` checks both on damaged JPEGs. It decodes at 1/8 scale: every marker and every
    entropy-coded bit is still read (that is where damage shows), only the inverse DCT is smaller,
    which made the check 1.4x faster on 320-640 px photos. simplejpeg loads in milliseconds where
    torch takes seconds, in every fresh Ray worker of a cluster ingest (docs/design.md, "Photos").
    """
    import simplejpeg

    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        small = simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True, min_height=1, min_width=1)
    except ValueError:
        return None
    if small.shape[:2] != (-(-height // 8), -(-width // 8)):  # libjpeg's 1/8 scale rounds up
        return None
    return (3, height, width)


def _why_convert(im: Image.Image, data: bytes) -> str:
    """Why `im` cannot be stored as it is ("" if it can): what training's decoder would get wrong."""
    fmt, mode, frames = im.format or "?", im.mode, int(getattr(im, "n_frames", 1) or 1)
    if fmt not in TORCHVISION_FORMATS:
        return f"{fmt} (not decodable by torchvision)"
    if frames > 1:
        return f"animated {fmt} ({frames} frames): first frame"
    if fmt == "GIF":
        return "GIF (palette)"
    if fmt == "PNG":
        depth, colour = data[24], data[25]  # IHDR: bit depth, colour type (0 grey, 2 RGB)
        if depth != 8:
            return f"{depth}-bit PNG"
        if colour not in (0, 2):
            return f"{mode} PNG"
        return ""
    if mode not in ("L", "RGB") or (fmt == "WEBP" and mode != "RGB"):
        return f"{mode} {fmt}"
    return ""


def _reencode(im: Image.Image, how: str) -> Normalised:
    grey = im.mode in GREY_MODES
    if im.mode.startswith("I") or im.mode == "F":
        arr = np.asarray(im)
        if im.mode == "F" and arr.size and float(arr.max()) <= 1.0:
            arr = arr * 255.0
        elif arr.size and float(arr.max()) > 255:  # 16-bit values (PIL opens 16-bit grey as I;16 or I)
            arr = arr / 257.0
        frame = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    else:
        frame = im.convert("L" if grey else "RGB")
    jpeg = im.format in ("JPEG", "MPO")
    buf = io.BytesIO()
    if jpeg:  # a lossy source stays lossy, once more at high quality, instead of a 5-10x larger PNG
        frame.save(buf, format="JPEG", quality=95)
    else:
        frame.save(buf, format="PNG")
    fmt = "jpeg" if jpeg else "png"
    return Normalised(buf.getvalue(), fmt, (frame.height, frame.width),
                      f"{how} -> 8-bit {frame.mode} {fmt.upper()}")


# ---------------------------------------------------------------------------------------------
# Training, evaluation, embedding


def decode_rgb(data: bytes, *, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, image_size: int | None = None,
               setting: str = "data.max_image_pixels", resize: int | None = None) -> torch.Tensor:
    """Decode one stored image into uint8 RGB `[3, H, W]`, refusing it first if it has too many pixels.

    With `image_size`, an image of another size goes through `eval_transform` (shorter side resized
    to `resize`, default `image_size * 256/224`, then the centre crop) right after its decode.

    Raises:
        TooManyPixels: the header declares more than `max_pixels` (`setting` names the knob).
        DataError: the bytes do not decode to one 8-bit image.
    """
    check_pixels(header_size(data), max_pixels, setting)
    with _quiet_decoders():
        img = _decode(data)
    if image_size is not None and tuple(img.shape[-2:]) != (image_size, image_size):
        img = eval_transform(img[None], image_size, resize)[0]
    return img


def decode_batch(images: list[bytes], image_size: int | None = None, *,
                 max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, paths: list[str] | None = None,
                 setting: str = "data.max_image_pixels", resize: int | None = None) -> torch.Tensor:
    """Decode a batch into uint8 RGB `[N, 3, S, S]` (`decode_rgb` for each, with the same checks;
    images not already `image_size` square through `eval_transform` with `resize`).

    Every header is checked against `max_pixels` before anything is decoded. Images already of the
    final size are decoded together (JPEGs in one `decode_jpeg` call: decoding 5,000 CIFAR-10 JPEGs
    one by one took 1.25 s against 0.44 s batched, 1 thread on the shared 2-core machine); an image that needs resizing is resized right after
    its own decode, so the batch never holds several full-size decodes.

    Raises:
        TooManyPixels / DataError: as `decode_rgb`, the message starting with the image's `paths`
            entry; or images of different sizes and no `image_size`.
    """
    def where(i: int) -> str:
        return paths[i] if paths is not None else f"image {i} of the batch"

    sizes = []
    for i, data in enumerate(images):
        try:
            size = header_size(data)
            check_pixels(size, max_pixels, setting)
        except DataError as e:
            raise type(e)(f"{where(i)}: {e}") from None
        sizes.append(size)
    if image_size is None and len(set(sizes)) > 1:
        raise DataError(f"images have different sizes ({', '.join(f'{h}x{w}' for h, w in sorted(set(sizes))[:3])}, ...); "
                        "set an image size (data.image_size) to resize them to")
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    final = (image_size, image_size) if image_size is not None else (sizes[0] if sizes else (0, 0))
    decoded: list[torch.Tensor | None] = [None] * len(images)
    with _quiet_decoders():
        jpegs = [i for i, data in enumerate(images) if sizes[i] == final and bytes(data[:2]) == b"\xff\xd8"]
        if jpegs:
            try:
                batch = decode_jpeg([torch.frombuffer(images[i], dtype=torch.uint8) for i in jpegs], mode=ImageReadMode.RGB)
                for i, img in zip(jpegs, batch):
                    decoded[i] = img
            except RuntimeError:
                pass  # one bad JPEG fails the whole call: decode one by one below, to name it
        for i, data in enumerate(images):
            if decoded[i] is None:
                try:
                    img = _decode(data)
                except DataError as e:
                    raise DataError(f"{where(i)}: {e}") from None
                if tuple(img.shape[-2:]) != final:
                    if image_size is None:
                        raise DataError(f"{where(i)}: decodes to {tuple(img.shape)}, not the {final} its header says")
                    img = eval_transform(img[None], image_size, resize)[0]
                decoded[i] = img
    if not images:
        return torch.empty(0, 3, image_size or 0, image_size or 0, dtype=torch.uint8)
    return torch.stack(decoded)  # type: ignore[arg-type]


@contextlib.contextmanager
def _quiet_decoders() -> Iterator[None]:
    """torchvision 0.29 marks its decoders deprecated in favour of TorchCodec; they still are the
    decoders this design asks for. Arrow's buffers are read-only: torch warns. Both are noise here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        yield


def _decode(data: bytes) -> torch.Tensor:
    """Decode one image to uint8 `[3, H, W]` (callers silence the decoders' warnings).

    JPEGs through torchvision's libjpeg-turbo, which raises on truncated or corrupt data; anything
    else through PIL: torchvision 0.29's `decode_png` crashes the process (SIGSEGV after a libpng
    error) on a corrupt PNG, and a shard can be edited after ingest checked it (its sha256 along).
    """
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    if bytes(data[:2]) == b"\xff\xd8":
        try:
            return decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError as e:
            raise DataError(f"cannot decode image ({str(e).strip().splitlines()[0]})") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode not in ("L", "RGB", "P", "LA", "RGBA", "1", "PA"):
                raise DataError(f"decodes to {im.mode}, not 8-bit; ingest the source again "
                                "(`selfsup ingest --overwrite` converts it)")
            im.seek(0)  # an animated GIF from a dataset ingested before normalisation: first frame
            rgb = np.asarray(im.convert("RGB"))
    except DataError:
        raise
    except Exception as e:  # PIL's error for a corrupt or truncated file  # noqa: BLE001
        raise DataError(f"cannot decode image ({type(e).__name__}: {str(e).strip()[:120]})") from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


EVAL_RESIZE_RATIO = 256 / 224  # ImageNet's evaluation protocol: Resize(256) + CenterCrop(224)


def eval_resize(size: int, resize: int | None = None) -> int:
    """The shorter side an image is resized to before its centre crop of `size`: `resize` when given,
    else `round(size * 256 / 224)` (256 at 224, 37 at 32)."""
    return int(resize) if resize is not None else round(size * EVAL_RESIZE_RATIO)


def eval_transform(x: torch.Tensor, size: int, resize: int | None = None) -> torch.Tensor:
    """The evaluation transform (kNN, linear probe, `selfsup evaluate`, `registry embed`): uint8
    `[N, C, H, W]` -> shorter side resized to `eval_resize(size, resize)` (bilinear, antialiased,
    aspect kept), then the centre `size` x `size` crop; torchvision's `Resize(r)` + `CenterCrop(size)`.

    Images already `size` x `size` never come here (callers pass them through as they are): the
    CIFAR convention evaluates the native 32 px image whole, so CIFAR and the MNIST demo at their
    native size are unchanged by the 256/224 default.
    """
    from torchvision.transforms.v2 import functional as F

    x = F.resize(x, [eval_resize(size, resize)], antialias=True)
    return F.center_crop(x, [size, size])
