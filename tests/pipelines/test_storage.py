"""pipelines.storage: local folders and object-store URIs through one layer; a dataset ingested into
S3 (a real `moto_server` on 127.0.0.1) reads back with both loaders' readers."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from pipelines import storage


def test_uris_stay_strings_and_local_paths_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert storage.is_uri("s3://b/x") and storage.is_uri("gs://b") and not storage.is_uri("runs")
    assert not storage.is_uri("file:///tmp/x")
    assert storage.absolute("s3://b/runs/") == "s3://b/runs"  # never Path("s3://b").resolve()
    assert storage.absolute("runs") == str(tmp_path / "runs")
    assert storage.join("s3://b/runs", "demo-1", "rec.json") == "s3://b/runs/demo-1/rec.json"
    assert storage.name("s3://b/runs/demo-1") == "demo-1" and storage.parent("s3://b/runs/demo-1") == "s3://b/runs"
    assert storage.with_scheme_of("s3://b/sweeps", "b/sweeps/t/checkpoint_0") == "s3://b/sweeps/t/checkpoint_0"
    assert storage.with_scheme_of(str(tmp_path), "/x/y") == "/x/y"


def test_local_files_write_read_list(tmp_path: Path) -> None:
    d = str(tmp_path / "a")
    assert storage.list_names(d) == [] and not storage.exists(d)
    storage.write_text(storage.join(d, "r.json"), "{}")
    storage.write_text(storage.join(d, "sub", "x"), "1")
    assert storage.list_names(d) == ["r.json", "sub"] and storage.is_dir(d) and storage.is_file(storage.join(d, "r.json"))
    assert storage.read_text(storage.join(d, "r.json")) == "{}"
    assert not list(Path(d).glob(".*tmp*")), "no temporary file left behind"
    storage.delete_file(storage.join(d, "r.json"))
    assert not storage.exists(storage.join(d, "r.json"))


@pytest.mark.slow  # a moto_server
def test_s3_records_and_listing(s3_bucket: str) -> None:
    d = storage.join(s3_bucket, "runs")
    assert storage.list_names(d) == [] and not storage.exists(d)
    storage.write_text(storage.join(d, "demo-1", "selfsup-run.json"), '{"status": "running"}')
    assert storage.list_names(d) == ["demo-1"] and storage.is_dir(storage.join(d, "demo-1"))
    assert storage.read_text(storage.join(d, "demo-1", "selfsup-run.json")) == '{"status": "running"}'


@pytest.mark.slow  # a moto_server
def test_ingest_into_s3_writes_manifest_last_and_reads_back(s3_bucket: str, cifar10_dir: Path, tmp_path: Path) -> None:
    from pipelines.errors import DataError
    from pipelines.ingest import ingest
    from pipelines.manifest import MANIFEST, read_manifest, split_files
    from pipelines.memory import load_split
    from shard_testdata import write_cifar_slice

    source = write_cifar_slice(cifar10_dir, tmp_path / "source", train_rows=64, test_rows=32)
    out = storage.join(s3_bucket, "cifar-slice")
    m = ingest(str(source), out, progress=False)
    names = storage.list_names(out)
    assert MANIFEST in names and all(f in names for s in m.splits.values() for f in s.files)
    assert not [n for n in names if n.startswith(".")], "nothing staged is left in the bucket"
    assert read_manifest(out).splits["test"].rows == 32
    assert all(f.startswith("s3://") for f in split_files(out, "test"))
    images, labels = load_split(out, "test", limit=20)
    assert images.shape == (20, 3, 32, 32) and len(labels) == 20
    with pytest.raises(DataError, match="already holds a dataset"):
        ingest(str(source), out, progress=False)


@pytest.mark.slow  # a moto_server
def test_ingest_from_an_s3_prefix_into_s3(s3_bucket: str, tmp_path: Path) -> None:
    """SOURCE a URI prefix (class folders of photo-like JPEGs): listed in one request, read by the
    shard writers from the bucket, written straight to the bucket (nothing staged locally)."""
    from image_files import photo_jpeg
    from pipelines.ingest import ingest
    from pipelines.manifest import read_manifest, split_files

    src = storage.join(s3_bucket, "photo-src")
    sent = {}
    for i in range(10):
        rel = f"{'cat' if i % 2 else 'dog'}/{i}.jpg"
        sent[rel] = photo_jpeg(i, min_side=48, max_side=96)
        storage.write_bytes(storage.join(src, rel), sent[rel])
    storage.write_text(storage.join(src, "README.txt"), "not an image")
    out = storage.join(s3_bucket, "photo-ds")
    m = ingest(src, out, test_fraction=0.2, progress=False)
    assert m.classes == ["cat", "dog"] and (m.rows("train"), m.rows("test")) == (8, 2) and m.source == src
    rows = [r for s in ("train", "test") for f in split_files(out, s) for r in storage.parquet_file(f).read().to_pylist()]
    assert {r["path"]: r["image"] for r in rows} == sent  # byte for byte
    assert all(r["height"] >= 48 and r["width"] >= 48 for r in rows)
    assert read_manifest(out).checksums == m.checksums
    assert not [n for n in storage.list_names(out) if n.startswith(".")], "no marker or temporary object left"


def test_temporary_names_differ_per_host_process_and_call(tmp_path: Path) -> None:
    """Two hosts on one shared mount can have the same pid: host, pid and random bits in the name."""
    a, b = storage.temp_name("selfsup-run.json"), storage.temp_name("selfsup-run.json")
    host = "".join(ch for ch in socket.gethostname() if ch.isalnum() or ch == "-")
    assert a != b and host[:8] in a and f"-{os.getpid()}-" in a
    assert storage.is_temp_name(a) and not storage.is_temp_name("selfsup-run.json")
    # A write that fails part-way (here: not bytes) leaves the old file and no temporary file.
    target = tmp_path / "r.json"
    storage.write_text(target, "old")
    with pytest.raises(TypeError):
        storage.write_bytes(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.json"]
