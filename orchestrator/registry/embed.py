"""`embed`: embeddings of every image in a folder or shard folder, written to a Parquet file.

The encoder loads through `orchestrator.registry.safe_load.load_encoder`; images from a plain folder
are made safe as ingest makes them (`pipelines.images`) before torchvision decodes them. The source
and the output file may each be a local path or an object-store URI (`pipelines.storage`): a URI is
never turned into a local path.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.errors import UserError
from orchestrator.registry.safe_load import LoadedEncoder, load_encoder
from pipelines import storage
from pipelines.errors import DataError
from pipelines.images import DEFAULT_MAX_IMAGE_PIXELS, TooManyPixels, decode_rgb, eval_transform, normalise
from pipelines.manifest import MANIFEST, read_manifest, split_files

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def embed(model_ref: str, source: str | Path, out: str | Path, *, tracking_uri: str | None = None,
          batch_size: int = 256, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
          image_size: tuple[int, int] | None = None) -> int:
    """Write embeddings of every image in `source` to the Parquet file `out`.

    Args:
        model_ref: `models:/NAME@ALIAS`, `models:/NAME/VERSION`, or the same without `models:/`.
        source: a shard folder (with `manifest.json`; every split) or an image folder
            (`.jpg/.jpeg/.png`, class sub-folders give the label, else -1).
        out: Parquet file with columns `path`, `label`, `embedding` (list<float32>).
        tracking_uri: see `resolve_tracking_uri`.
        batch_size: images per forward pass.
        max_pixels: refuse an image whose header declares more pixels, before decoding it.
        image_size: (H, W) every image is resized to; None: the model's training size.

    Returns:
        The number of rows written.

    Raises:
        UserError: bad source, unknown model, or an `image_size` the model does not take.
    """
    src = storage.absolute(source)
    _check_source(src, source)  # before any model loads
    model = load_encoder(model_ref, tracking_uri=tracking_uri)
    size = model.input_size(image_size)
    # The output appears only once complete: a local temporary name, fsynced and renamed, or one
    # object upload (`storage.open_output`); a failure leaves nothing behind.
    with storage.open_output(storage.absolute(out)) as sink:
        return _write_embeddings(model, _iter_source(src, batch_size, max_pixels), size, max_pixels, sink)


def _check_source(src: str, source: str | Path) -> None:
    """A shard folder with a readable manifest, or a folder (or URI prefix) with images; else `UserError`."""
    if storage.is_file(storage.join(src, MANIFEST)):
        read_manifest(src)  # a bad manifest (shard names outside the folder) is told before any model loads
        return
    if not storage.is_uri(src) and not Path(src).is_dir():
        raise UserError(f"{source}: not a folder; embed takes an image folder or a shard folder (a path or a URI)")
    if not _image_folder_items(src)[0]:
        raise UserError(f"{source}: no shard folder (manifest.json) and no "
                        f"{'/'.join(IMAGE_SUFFIXES)} images found")


def _write_embeddings(model: LoadedEncoder, batches: Iterator[tuple[list[bytes], list[int], list[str]]],
                      size: tuple[int, int], max_pixels: int | None, sink: IO[bytes]) -> int:
    """Embed each batch and write the rows as Parquet to the stream `sink`; the number of rows."""
    # Here, not at the top: `selfsup registry list/show/best/promote` import this package and never
    # need torch (about 2 s to import).
    import torch

    writer = None
    rows = 0
    try:
        with torch.inference_mode():
            for images, labels, paths in batches:
                feats = model(_decode(images, size, paths, max_pixels)).reshape(len(images), -1).float().numpy()
                dim = feats.shape[1]
                table = pa.table({
                    "path": pa.array(paths, pa.string()),
                    "label": pa.array(labels, pa.int64()),
                    "embedding": pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), dim),
                })
                if writer is None:
                    writer = pq.ParquetWriter(sink, table.schema)
                writer.write_table(table)
                rows += len(paths)
    finally:
        if writer is not None:
            writer.close()
    return rows


def _image_folder_items(source: str) -> tuple[list[str], list[int]]:
    """Image files under `source` as paths relative to it with `/` (never leaving it: a local
    symlink out of it is not followed), and their class index (first sub-folder), or -1."""
    if storage.is_uri(source):
        files = [rel for rel, _ in storage.list_files(source) if PurePosixPath(rel).suffix.lower() in IMAGE_SUFFIXES]
    else:
        local = Path(source)
        root = local.resolve()
        files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*")
                       if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and p.resolve().is_relative_to(root))
    parts = [PurePosixPath(f).parts for f in files]
    classes = sorted({p[0] for p in parts if len(p) > 1})
    index = {c: i for i, c in enumerate(classes)}
    return files, [index[p[0]] if len(p) > 1 else -1 for p in parts]


def _iter_source(source: str, batch_size: int, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
                 ) -> Iterator[tuple[list[bytes], list[int], list[str]]]:
    """Yield (encoded image bytes list, labels, paths) batches from a shard or image folder."""
    if storage.is_file(storage.join(source, MANIFEST)):
        for split in read_manifest(source).splits:
            for f in split_files(source, split, allow_empty=True):  # names and sha256 checked
                pf = storage.parquet_file(f)
                for batch in pf.iter_batches(batch_size=batch_size, columns=["image", "label", "path"]):
                    d = batch.to_pydict()
                    yield d["image"], d["label"], [f"{split}:{p}" for p in d["path"]]
        return
    files, labels = _image_folder_items(source)
    for i in range(0, len(files), batch_size):
        chunk = files[i:i + batch_size]
        yield [_checked_file(rel, source, max_pixels) for rel in chunk], labels[i:i + batch_size], chunk


def _checked_file(rel: str, source: str, max_pixels: int | None) -> bytes:
    """An image file of a plain folder, made safe for torchvision as ingest makes it.

    Not just the pixel limit: torchvision 0.29's PNG decoder crashes the process (SIGSEGV) on a
    corrupt IDAT, so a file that has not been through ingest is first decoded with PIL (and an
    animated, 16-bit, palette or CMYK image re-encoded to 8-bit), `pipelines.images.normalise`.
    """
    try:
        data = storage.read_bytes(storage.join(source, rel))
    except OSError as e:
        raise UserError(f"{rel}: cannot read ({e.strerror or e})") from None
    try:
        return normalise(data, max_pixels, "--max-image-pixels").data
    except TooManyPixels as e:
        raise UserError(f"{rel}: {e}") from None
    except Exception as e:  # PIL: UnidentifiedImageError, OSError (truncated), SyntaxError, ...
        raise UserError(f"{rel}: cannot decode image ({e})") from None


def _decode(images: list[bytes], size: tuple[int, int], paths: list[str], max_pixels: int | None) -> Any:
    """uint8 bytes -> normalised float [B, 3, H, W] (the model input convention).

    Each image's header is checked against `max_pixels` before it is decoded (the source may be any
    folder of images: a decompression bomb is refused, not decoded), and each is brought to `size`
    right after its own decode: for a square size by the evaluation transform
    (`pipelines.images.eval_transform`: shorter side to size * 256/224, centre crop).
    """
    # Here, not at the top: see `_write_embeddings` (pipelines.augment imports torch too).
    import torch
    import torch.nn.functional as F

    from pipelines.augment import MEAN, STD

    out = []
    for data, path in zip(images, paths):
        try:
            img = decode_rgb(bytearray(data), max_pixels=max_pixels, setting="--max-image-pixels")
        except DataError as e:
            raise UserError(f"{path}: {e}") from None
        if tuple(img.shape[-2:]) != size and size[0] == size[1]:  # the evaluation transform, as kNN and evaluate
            img = eval_transform(img[None], size[0])[0]
        x = img.float().div_(255.0).unsqueeze(0)
        if tuple(x.shape[-2:]) != size:  # a non-square size asked for: stretched to it
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        out.append(x)
    x = torch.cat(out)
    mean = torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std
