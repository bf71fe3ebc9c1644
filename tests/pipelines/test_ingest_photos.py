"""Ingest of photos as a Ray Data job: bytes kept, sizes as columns, odd formats converted, bad
files skipped, `--max-side`, URIs in and out, kill/resume, a full disk, and the user errors of
issue 22 item 5 (ingest side)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import pipelines.ingest as ingest_mod
from image_files import bomb_png, photo_jpeg
from orchestrator.cli import main as cli
from pipelines import storage
from pipelines.errors import DataError
from pipelines.ingest import IN_PROGRESS, ingest
from pipelines.manifest import MANIFEST, read_manifest, split_files
from tests.tmpfs import mounted_tmpfs


def _rows(folder: str | Path, split: str) -> pa.Table:
    return pa.concat_tables([storage.parquet_file(f).read() for f in split_files(folder, split)])


def _png16(seed: int) -> bytes:
    arr = (np.random.default_rng(seed).integers(0, 65535, size=(40, 50))).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")  # mode I;16: a 16-bit PNG
    return buf.getvalue()


def _cmyk_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("CMYK", (64, 48), (10, 200, 30, 5)).save(buf, format="JPEG")
    return buf.getvalue()


def _gif() -> bytes:
    buf = io.BytesIO()
    frames = [Image.new("P", (30, 20), i) for i in (1, 2)]
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 photo-like JPEGs of mixed sizes (320-640 px) in 2 class folders, plus odd and bad files."""
    root = tmp_path_factory.mktemp("photos") / "field"
    for i in range(24):
        f = root / ("cat" if i % 2 else "dog") / f"p{i:02d}.jpg"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(photo_jpeg(i))
    (root / "cat" / "cmyk.jpg").write_bytes(_cmyk_jpeg())
    (root / "cat" / "deep.png").write_bytes(_png16(1))
    (root / "dog" / "anim.gif").write_bytes(_gif())
    (root / "dog" / "cut.jpg").write_bytes(photo_jpeg(99)[:400])  # truncated
    (root / "dog" / "bomb.png").write_bytes(bomb_png(20000, 20000, idat=b"x" * 64))  # 400 MP declared
    return root


def _check_photos(photos: Path, out: str | Path, m) -> None:
    assert m.classes == ["cat", "dog"] and m.image_format == "mixed" and m.image_size is None
    assert {s["path"] for s in m.skipped} == {"dog/cut.jpg", "dog/bomb.png"}
    assert "too many pixels" in next(s["reason"] for s in m.skipped if s["path"] == "dog/bomb.png")
    assert {c["path"] for c in m.converted} == {"cat/cmyk.jpg", "cat/deep.png", "dog/anim.gif"}
    rows = pa.concat_tables([_rows(out, "train"), _rows(out, "test")])
    assert rows.num_rows == 27 and rows.schema.names[:5] == ["image", "label", "path", "height", "width"]
    for path, image, h, w in zip(*(rows.column(c).to_pylist() for c in ("path", "image", "height", "width"))):
        if path.endswith(".jpg") and "cmyk" not in path:
            assert image == (photos / path).read_bytes()  # JPEG stays JPEG, byte for byte
        with Image.open(io.BytesIO(image)) as im:
            assert (im.height, im.width) == (h, w)
            assert im.mode in ("RGB", "L")


@pytest.mark.slow  # a local Ray
def test_photos_ingested_by_ray_data_tasks(photos: Path, tmp_path: Path, ray_local: None,
                                           monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import ray

    monkeypatch.setattr(ingest_mod, "IN_PROCESS_MAX_IMAGES", 0)  # a small source, on Ray all the same
    monkeypatch.setattr(ingest_mod, "PROGRESS_MIN_IMAGES", 0)
    m = ingest(str(photos), tmp_path / "out", test_fraction=0.25, seed=3)
    _check_photos(photos, tmp_path / "out", m)
    err = capsys.readouterr().err
    # The summary line names the Ray node(s) whose tasks wrote the shards: this cluster's one node.
    node = ray.get_runtime_context().get_node_id()
    assert f"on 1 node(s): {node[:12]}" in err, err
    # The same source in this process (no Ray) gives the same dataset, shard for shard.
    monkeypatch.setattr(ingest_mod, "IN_PROCESS_MAX_IMAGES", 10_000)
    again = ingest(str(photos), tmp_path / "again", test_fraction=0.25, seed=3, progress=False)
    assert again.checksums == m.checksums


def test_max_side_reencodes_only_larger_photos(photos: Path, tmp_path: Path) -> None:
    m = ingest(str(photos), tmp_path / "out", max_side=400, test_fraction=0.0, progress=False)
    rows = _rows(tmp_path / "out", "train")
    sides = [max(h, w) for h, w in zip(rows.column("height").to_pylist(), rows.column("width").to_pylist())]
    assert max(sides) == 400
    resized = {c["path"] for c in m.converted if "--max-side 400" in c["how"]}
    for path, image in zip(rows.column("path").to_pylist(), rows.column("image").to_pylist()):
        if path.endswith(".jpg") and "cmyk" not in path:
            with Image.open(photos / path) as original:
                big = max(original.size) > 400
            assert (path in resized) == big and (image == (photos / path).read_bytes()) == (not big)
            assert image[:2] == b"\xff\xd8"  # still JPEG


def test_killed_ingest_leaves_no_manifest_and_a_rerun_starts_clean(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    # What a SIGKILL between two shards leaves: the marker, a finished shard, a temporary file.
    out.mkdir()
    (out / IN_PROGRESS).write_text("{}")
    (out / "train-00000-of-00002.parquet").write_bytes(b"half a dataset")
    (out / storage.temp_name("train-00001-of-00002.parquet")).write_bytes(b"half a shard")
    with pytest.raises(DataError, match="no manifest.json"):
        read_manifest(out)
    m = ingest(str(photos), out, progress=False)  # no --overwrite needed: these were ours
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, *m.checksums])
    assert read_manifest(out).rows("train") == m.rows("train")
    # Shards without the marker are someone's data: refused without --overwrite, as before.
    other = tmp_path / "other"
    other.mkdir()
    (other / "train-00000-of-00001.parquet").write_bytes(b"not ours")
    with pytest.raises(DataError, match="already holds shards"):
        ingest(str(photos), other, progress=False)


def test_overwrite_keeps_the_old_dataset_until_the_new_is_complete(photos: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    old = ingest(str(photos), out, seed=1, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = ingest_mod._write_shard
    seen: list[set[str]] = []

    def write_then_look(job, records, tick=None):
        result = real(job, records, tick)
        seen.append({p.name for p in out.iterdir()})
        # While the new shards are written the old manifest and every old shard are still there.
        assert read_manifest(out).checksums == old.checksums
        return result

    monkeypatch.setattr(ingest_mod, "_write_shard", write_then_look)
    new = ingest(str(photos), out, seed=2, overwrite=True, progress=False)
    assert seen and all(set(old.checksums) <= names for names in seen)
    assert not set(new.checksums) & set(old.checksums), "new shards never take an old shard's name"
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, *new.checksums])
    assert read_manifest(out).seed == 2 and before  # the old shards were removed only at the end


@pytest.fixture()
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs mounted under the test's temp folder (root only), unmounted after."""
    with mounted_tmpfs(tmp_path / "disk", "1m") as mnt:
        yield mnt


def test_full_disk_loses_nothing_stored_and_leaves_no_temp_file(photos: Path, tmp_path: Path, tiny_disk: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    # A record write that does not fit: the old record stays whole, no temporary file is left.
    record = tiny_disk / "rec" / "selfsup-run.json"
    storage.write_text(record, json.dumps({"status": "running"}))
    with pytest.raises(OSError) as e:
        storage.write_bytes(record, b"x" * (2 << 20))
    assert e.value.errno == 28  # ENOSPC
    assert json.loads(record.read_text()) == {"status": "running"}
    assert not [p for p in record.parent.iterdir() if storage.is_temp_name(p.name)]
    # A dataset that fits, then an --overwrite with one that does not (24 photos of ~40 KB each).
    small = tmp_path / "small"
    for f in sorted((photos / "cat").glob("p0*.jpg"))[:3]:
        (small / "cat").mkdir(parents=True, exist_ok=True)
        (small / "cat" / f.name).write_bytes(f.read_bytes())
    out = tiny_disk / "data"
    old = ingest(str(small), out, test_fraction=0.0, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert cli(["ingest", str(photos), str(out), "--overwrite", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing lost, nothing left
    assert read_manifest(out).checksums == old.checksums and _rows(out, "train").num_rows == 3


def _parquet(path: Path, labels: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image": [photo_jpeg(i, min_side=32, max_side=40) for i in range(len(labels))],
                             "label": labels}), path)
    return path


@pytest.mark.parametrize("case", ["huge-label", "seed", "shard-name-dot"])
def test_bad_input_is_one_line_exit_2(case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    if case == "huge-label":  # would have built 10**12 class names
        args = ["ingest", str(_parquet(tmp_path / "src" / "d.parquet", [0, 10**12])), str(tmp_path / "out")]
        named = "1000000000000"
    elif case == "seed":
        args = ["ingest", str(_parquet(tmp_path / "src" / "d.parquet", [0, 1])), str(tmp_path / "out"),
                "--seed", "-1"]
        named = "--seed -1"
    else:
        data = tmp_path / "data"
        ingest(str(_parquet(tmp_path / "src" / "d.parquet", [0, 1, 0, 1, 0])), data, progress=False)
        m = json.loads((data / MANIFEST).read_text())
        m["splits"]["train"]["files"] = ["."]
        (data / MANIFEST).write_text(json.dumps(m))
        args = ["registry", "embed", "some-model", str(data), str(tmp_path / "e.parquet")]
        named = "'.'"
    capsys.readouterr()
    assert cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "e.parquet").exists()
