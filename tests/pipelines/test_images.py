"""Bad input at the data boundary, on real files made with PIL here: images training cannot stack
(animated, 16-bit, palette, CMYK), decompression bombs, manifests that point outside their folder,
tampered shards, and OS errors at ingest."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from orchestrator.cli import main as cli
from pipelines.errors import DataError
from pipelines.images import DEFAULT_MAX_IMAGE_PIXELS, TooManyPixels, decode_rgb, header_size
from pipelines.ingest import ingest
from pipelines.manifest import read_manifest, split_files
from pipelines.images import decode_batch
from pipelines.memory import load_split
from tests.image_files import bomb_png


def _photo(seed: int, size: tuple[int, int] = (24, 32)) -> Image.Image:
    """A smooth RGB image (JPEG-friendly), different per seed."""
    h, w = size
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    arr = np.stack([(x * rng.uniform(2, 8) + y * rng.uniform(2, 8) + rng.uniform(0, 255)) % 256
                    for _ in range(3)], axis=-1)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def _awkward_images(folder: Path) -> dict[str, str]:
    """Write one file of each kind training could not stack as it came; returns name -> why."""
    folder.mkdir(parents=True, exist_ok=True)
    frames = [_photo(i).convert("P") for i in range(3)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=50)
    grey16 = (np.linspace(0, 65535, 24 * 32).reshape(24, 32)).astype(np.uint16)
    Image.fromarray(grey16).save(folder / "deep.png")  # mode I;16: a 16-bit PNG
    _photo(5).convert("P").save(folder / "palette.png")
    _photo(6).convert("CMYK").save(folder / "cmyk.jpg")
    _photo(7).save(folder / "plain.jpg")
    _photo(8).save(folder / "plain.png")
    return {"animated.gif": "animated GIF (3 frames)", "deep.png": "16-bit PNG", "palette.png": "P PNG",
            "cmyk.jpg": "CMYK JPEG"}


def test_awkward_images_are_normalised_at_ingest_and_decode_into_one_batch(tmp_path: Path) -> None:
    expect = _awkward_images(tmp_path / "src")
    # What the stored bytes used to do: torchvision decodes them into shapes and dtypes that break a batch.
    with pytest.raises(DataError, match="not 8-bit"):
        decode_rgb((tmp_path / "src" / "deep.png").read_bytes())

    m = ingest(str(tmp_path / "src"), tmp_path / "out", test_fraction=0.0, progress=False)
    assert m.rows("train") == 6 and m.skipped == [] and m.classes == []
    how = {c["path"]: c["how"] for c in m.converted}
    assert set(how) == set(expect)  # the plain JPEG and PNG are kept byte for byte
    for name, why in expect.items():
        assert how[name].startswith(why), how
    assert how["deep.png"].endswith("8-bit L PNG") and how["cmyk.jpg"].endswith("8-bit RGB JPEG")
    table = pq.read_table(split_files(tmp_path / "out", "train")[0])
    stored = dict(zip(table.column("path").to_pylist(), table.column("image").to_pylist()))
    assert stored["plain.jpg"] == (tmp_path / "src" / "plain.jpg").read_bytes()
    deep = np.asarray(Image.open(io.BytesIO(stored["deep.png"])))
    assert deep.dtype == np.uint8 and deep.min() == 0 and deep.max() == 255  # scaled, not clipped
    gif = np.asarray(Image.open(io.BytesIO(stored["animated.gif"])).convert("RGB")).astype(int)
    first = np.asarray(Image.open(tmp_path / "src" / "animated.gif").convert("RGB")).astype(int)
    assert np.abs(gif - first).max() == 0  # the first frame, losslessly

    # The whole split decodes into one uint8 batch, as a training batch does.
    images, labels = load_split(tmp_path / "out", "train", image_size=16)
    assert images.shape == (6, 3, 16, 16) and str(images.dtype) == "torch.uint8"
    assert labels.tolist() == [-1] * 6


def test_pixel_limit_refuses_before_decoding(tmp_path: Path) -> None:
    # Garbage where the pixels should be: a decode would fail with a decode error; the limit
    # refuses the image first, from its header.
    fake = bomb_png(300, 200, idat=b"not deflate data")
    assert header_size(fake) == (200, 300)
    with pytest.raises(TooManyPixels, match="300x200 = 60,000 pixels, more than data.max_image_pixels = 50,000"):
        decode_rgb(fake, max_pixels=50_000)
    with pytest.raises(TooManyPixels, match="shard-x: a.png: 300x200"):
        decode_batch([fake], 32, max_pixels=50_000, paths=["shard-x: a.png"])
    # Under the limit it is a corrupt PNG: torchvision 0.29's decode_png crashes the process on
    # this IDAT ("libpng error: IDAT: incorrect header check", then SIGSEGV), so training, embed and
    # evaluate decode everything but JPEG with PIL: one line, as for any corrupt image in a shard
    # edited after ingest.
    with pytest.raises(DataError, match="cannot decode image"):
        decode_rgb(fake)
    with pytest.raises(DataError, match="shard-x: a.png: cannot decode image"):
        decode_batch([fake], 32, paths=["shard-x: a.png"])

    src = tmp_path / "src"
    src.mkdir()
    (src / "big.png").write_bytes(fake)
    for i in range(3):
        _photo(i).save(src / f"ok{i}.jpg")
    m = ingest(str(src), tmp_path / "out", test_fraction=0.0, progress=False, max_image_pixels=50_000)
    assert m.rows("train") == 3 and m.max_image_pixels == 50_000 and m.largest_image == [24, 32]
    assert [s["path"] for s in m.skipped] == ["big.png"]
    assert m.skipped[0]["reason"].startswith("too many pixels: 300x200 = 60,000 pixels, more than --max-image-pixels")
    m = ingest(str(src), tmp_path / "out2", test_fraction=0.0, progress=False, max_image_pixels=60_000)
    assert m.skipped[0]["reason"].startswith("corrupt image")  # under the limit: decoded, found broken


def test_a_real_9500_squared_png_is_refused_from_its_header(tmp_path: Path) -> None:
    """PIL only warns at 90M pixels; this 0.1 MB file would take ~90 MB (grey) to decode."""
    bomb = bomb_png(9500, 9500)
    assert len(bomb) < 200_000
    with pytest.warns(Image.DecompressionBombWarning):  # PIL's only reaction below 179M pixels
        assert Image.open(io.BytesIO(bomb)).size == (9500, 9500)  # a valid PNG header
    start = time.perf_counter()
    with pytest.raises(TooManyPixels, match="9500x9500 = 90,250,000 pixels"):
        decode_rgb(bomb)  # the default data.max_image_pixels
    assert time.perf_counter() - start < 0.5  # refused from the header; a decode takes seconds
    src = tmp_path / "src"
    src.mkdir()
    (src / "bomb.png").write_bytes(bomb)
    _photo(1).save(src / "ok.png")
    assert cli(["ingest", str(src), str(tmp_path / "out"), "--quiet", "--test-fraction", "0"]) == 0
    m = read_manifest(tmp_path / "out")
    assert m.rows("train") == 1 and m.max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS
    assert m.skipped[0]["path"] == "bomb.png" and "9500x9500" in m.skipped[0]["reason"]


@pytest.fixture()
def small_dataset(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    for i in range(12):
        (src / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        _photo(i).save(src / "ab"[i % 2] / f"{i}.png")
    ingest(str(src), tmp_path / "data", test_fraction=0.25, progress=False)
    return tmp_path / "data"


@pytest.mark.parametrize("name", ["../x.parquet", "/etc/passwd", "sub/../../x.parquet"])
def test_manifest_shard_names_must_stay_inside_the_folder(small_dataset: Path, name: str,
                                                          capsys: pytest.CaptureFixture) -> None:
    path = small_dataset / "manifest.json"
    raw = json.loads(path.read_text())
    raw["splits"]["test"]["files"] = [name]
    path.write_text(json.dumps(raw))
    with pytest.raises(DataError) as e:
        read_manifest(small_dataset)
    msg = str(e.value)
    assert msg.startswith(f"{path}: splits.test.files[0] = {name!r}: shard names must be relative") and "\n" not in msg
    # The registry's embed reads every split: the same one line, exit 2.
    assert cli(["registry", "--tracking-uri", "sqlite:///nowhere.db", "embed", "m@champion",
                str(small_dataset), str(small_dataset.parent / "e.parquet")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"selfsup registry: error: {msg}"


def test_a_tampered_shard_is_refused_by_its_sha256(small_dataset: Path) -> None:
    m = read_manifest(small_dataset)
    shard = small_dataset / m.splits["train"].files[0]
    assert len(load_split(small_dataset, "train")[1]) == 8  # reads fine (and is now known good)
    table = pq.read_table(shard)
    labels = table.column("label").to_pylist()
    labels[0] = 1 - labels[0]  # one label flipped: a valid Parquet file with other contents
    pq.write_table(table.set_column(1, "label", __import__("pyarrow").array(labels)), shard)
    for read in (lambda: load_split(small_dataset, "train"), lambda: split_files(small_dataset, "train")):
        with pytest.raises(DataError, match=rf"^{shard}: sha256 \w+\.\.\. does not match \w+\.\.\. recorded in "):
            read()


def test_unwritable_out_is_one_line_exit_2(capsys: pytest.CaptureFixture) -> None:
    assert cli(["ingest", "demo", "/proc/x", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "selfsup ingest: error: cannot read or write /proc/x: No such file or directory"


def _damaged_jpegs(count: int) -> list[bytes]:
    """JPEGs damaged the ways files get damaged: cut short, bytes flipped or zeroed in the scan,
    stray markers, no end marker, trailing junk (six kinds, `count` sources each)."""
    import random

    from pipelines.photos import photo_jpeg

    rng = random.Random(0)
    out = []
    for seed in range(count):
        good = photo_jpeg(seed, min_side=64, max_side=96)
        for kind in range(6):
            b = bytearray(good)
            i = rng.randrange(len(b) // 3, len(b) - 60)  # inside the scan, past the headers
            if kind == 0:
                b = b[:i]
            elif kind == 1:
                for j in rng.sample(range(i, len(b) - 2), 5):
                    b[j] = rng.randrange(256)
            elif kind == 2:
                b[i:i + 50] = bytes(50)
            elif kind == 3:
                b[i:i + 2] = bytes([0xFF, rng.choice([0xD0, 0xD9, 0xC4, 0x01])])
            elif kind == 4:
                b = b[:-2]
            else:
                b += b"junk" * 10
            out.append(bytes(b))
    return out


def test_ingest_keeps_a_jpeg_exactly_when_trainings_decoder_reads_it() -> None:
    """Ingest checks a JPEG with simplejpeg's strict decode and falls back to training's decoder
    (torchvision) only when that refuses: the JPEGs it keeps must be the ones `decode_rgb` reads,
    and every JPEG the strict decode passes must read with torchvision and with PIL."""
    from pipelines.images import _strict_jpeg_shape, normalise

    strict_passed = refused = 0
    for data in _damaged_jpegs(40):
        try:
            trained = tuple(decode_rgb(data).shape)
        except DataError:
            trained = None
        try:
            kept = normalise(data)
        except Exception:  # noqa: BLE001 - ingest lists any error as a corrupt image
            kept = None
        assert (kept is None) == (trained is None), "ingest and training disagree about a damaged JPEG"
        if _strict_jpeg_shape(data) is not None:
            strict_passed += 1
            assert trained == _strict_jpeg_shape(data)
            with Image.open(io.BytesIO(data)) as im:
                im.load()
        refused += trained is None
    assert strict_passed and refused and strict_passed + refused < 240  # all three outcomes occurred
