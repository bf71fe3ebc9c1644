"""Where selfsup reads and writes: a local folder or an object-store URI, through one layer (pyarrow.fs).

A location is a string: a local path (made absolute with `absolute`) or a URI that pyarrow
understands (`s3://BUCKET/prefix`, `gs://...`, `abfs://...`; S3-compatible stores through the usual
`AWS_ENDPOINT_URL`). URIs stay strings end to end: `Path("s3://b/x").resolve()` would turn one into
a local folder named `s3:/b/x`. Ray Train and Tune take the same strings as `storage_path`, so
checkpoints, run records, sweep records, manifests and shards all live where the user said.

Object stores have no rename and no folders: a write of one object is atomic, a "folder" exists
when an object lies under its prefix. Local writes go to a temporary name and are renamed, so a
reader never sees half a file in either case. Callers write the file that makes a thing valid
(a manifest, a record) last.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import uuid
import re
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pyarrow.fs as pafs

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")


def is_uri(location: str | Path) -> bool:
    """Whether `location` is a URI of another filesystem than this machine's (`file://` is local)."""
    m = _SCHEME.match(str(location))
    return m is not None and m.group(1).lower() != "file"


def absolute(location: str | Path) -> str:
    """A URI unchanged; a local path (or `file://` URI) made absolute (`~` expanded)."""
    s = str(location)
    if is_uri(s):
        return s.rstrip("/")
    if s.startswith("file://"):
        s = s[len("file://"):]
    return str(Path(s).expanduser().resolve())


def join(base: str | Path, *parts: str) -> str:
    """`base/part/...` for a URI or a local path."""
    if is_uri(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


def name(location: str | Path) -> str:
    """The last component of a location (a run's or sweep's name)."""
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def parent(location: str | Path) -> str:
    """The location one level up."""
    if is_uri(location):
        return str(location).rstrip("/").rsplit("/", 1)[0]
    return str(Path(location).parent)


@functools.lru_cache(maxsize=16)
def _remote_fs(root: str, endpoint: str | None) -> pafs.FileSystem:
    """One filesystem object per `scheme://bucket` and endpoint (S3's resolves the bucket's region
    once); pyarrow reads `AWS_ENDPOINT_URL` when it makes one, so a changed endpoint needs another."""
    fs, _ = pafs.FileSystem.from_uri(root)
    return fs


def resolve(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a location (pyarrow's `FileSystem.from_uri`)."""
    s = str(location)
    m = _SCHEME.match(s)
    if m is None or m.group(1).lower() == "file":
        return pafs.LocalFileSystem(), absolute(s)
    scheme, rest = m.group(1), m.group(2)
    bucket = rest.split("/", 1)[0]
    return _remote_fs(f"{scheme}://{bucket}", os.environ.get("AWS_ENDPOINT_URL")), rest.rstrip("/")


def with_scheme_of(like: str | Path, path: str) -> str:
    """`path` as a location of the same filesystem as `like`: Ray's `Checkpoint.path` on S3 is
    `bucket/prefix/...` without the scheme; this puts `s3://` back."""
    m = _SCHEME.match(str(like))
    if m is None or m.group(1).lower() == "file" or _SCHEME.match(path):
        return path
    return f"{m.group(1)}://{path.lstrip('/')}"


def _info(location: str | Path) -> pafs.FileInfo:
    fs, path = resolve(location)
    return fs.get_file_info(path)


def exists(location: str | Path) -> bool:
    return _info(location).type != pafs.FileType.NotFound


def is_file(location: str | Path) -> bool:
    return _info(location).type == pafs.FileType.File


def is_dir(location: str | Path) -> bool:
    return _info(location).type == pafs.FileType.Directory


def list_names(location: str | Path) -> list[str]:
    """The names directly under a folder (files and sub-folders), sorted; [] if there is none."""
    fs, path = resolve(location)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    except (NotADirectoryError, FileNotFoundError):
        return []
    return sorted(i.base_name for i in infos)


def list_files(location: str | Path) -> list[tuple[str, int]]:
    """Every file under a folder, recursively, as (path relative to it with `/`, size), sorted.

    One paginated listing on an object store (no request per file). Local folders: see
    `pipelines.ingest`, which walks them itself to keep symlinks inside SOURCE.
    """
    fs, path = resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True))
    base = path.rstrip("/") + "/"
    return sorted((i.path[len(base):] if i.path.startswith(base) else i.base_name, int(i.size or 0))
                  for i in infos if i.type == pafs.FileType.File)


def makedirs(location: str | Path) -> None:
    """Create a folder and its parents (a no-op on object stores, whose folders are prefixes)."""
    fs, path = resolve(location)
    if isinstance(fs, pafs.LocalFileSystem):
        Path(path).mkdir(parents=True, exist_ok=True)  # Python's OSError: its errno and filename, no wrapping


def read_bytes(location: str | Path) -> bytes:
    fs, path = resolve(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(location: str | Path) -> str:
    return read_bytes(location).decode("utf-8")


def temp_name(final_name: str) -> str:
    """A hidden temporary name beside `final_name`, unique across hosts sharing a mount: host, process
    id and random bits (a process id alone repeats on two hosts of one NFS/EFS folder)."""
    host = re.sub(r"[^A-Za-z0-9-]", "", socket.gethostname())[:32] or "host"
    return f".{final_name}.tmp-{host}-{os.getpid()}-{secrets.token_hex(4)}"


def is_temp_name(file_name: str) -> bool:
    """Whether a file name is one `temp_name` makes (what a killed writer may have left)."""
    return file_name.startswith(".") and ".tmp-" in file_name


@contextlib.contextmanager
def open_output(location: str | Path) -> Iterator[IO[bytes]]:
    """A binary stream that becomes the file at `location` only when the block ends without error.

    Local: written under a `temp_name` beside it, flushed and fsynced, then renamed over it (the
    rename is atomic; the fsync makes the bytes durable before the name points at them). On any
    error (a full disk included) the temporary file is removed and the error raised: nothing
    half-written is left and a file already at `location` is untouched. Object store: one upload,
    which the store shows only once complete; a failed one is deleted.
    """
    fs, path = resolve(location)
    if not isinstance(fs, pafs.LocalFileSystem):
        f = fs.open_output_stream(path)
        try:
            yield f  # type: ignore[misc]
        except BaseException:
            # pyarrow has no abort: closing completes the upload, so the object is deleted again.
            try:
                f.close()
            finally:
                delete_file(location)
            raise
        f.close()
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.parent / temp_name(p.name)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(p.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (its directory entry); not every filesystem allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(location: str | Path, data: bytes) -> None:
    """Write a whole file, atomically and durably (`open_output`): a local file through a temporary
    name, fsync and a rename, an object in one upload (object stores never show half an object)."""
    with open_output(location) as f:
        f.write(data)


def write_text(location: str | Path, text: str) -> None:
    write_bytes(location, text.encode("utf-8"))


def delete_file(location: str | Path) -> None:
    """Remove one file if it is there."""
    fs, path = resolve(location)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def delete_tree(location: str | Path) -> None:
    """Remove a folder (a URI prefix) and everything under it, if it is there."""
    fs, path = resolve(location)
    try:
        fs.delete_dir(path)
    except FileNotFoundError:
        pass


def upload(local_file: str | Path, location: str | Path) -> None:
    """Copy a local file to a location (streamed, not read into memory)."""
    fs, path = resolve(location)
    if isinstance(fs, pafs.LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(str(local_file), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def open_input_file(location: str | Path) -> IO[bytes]:
    """A random-access file (what `pyarrow.parquet.ParquetFile` needs to read footers and row groups)."""
    fs, path = resolve(location)
    return fs.open_input_file(path)  # type: ignore[return-value]


def parquet_file(location: str | Path) -> Any:
    """`pyarrow.parquet.ParquetFile` of a shard at a local path or a URI."""
    import pyarrow.parquet as pq

    if not is_uri(location):
        return pq.ParquetFile(location)
    return pq.ParquetFile(open_input_file(location))


def filesystem_and_paths(locations: list[str]) -> tuple[pafs.FileSystem | None, list[str]]:
    """For `ray.data.read_parquet(paths, filesystem=...)`: (None, local paths) for local files, else
    the object store's filesystem and the paths inside it. The filesystem object travels with the
    read tasks (it pickles with its endpoint and region), so every node reads the same store."""
    if not locations or not is_uri(locations[0]):
        return None, list(locations)
    resolved = [resolve(loc) for loc in locations]
    return resolved[0][0], [p for _, p in resolved]


def size_and_mtime(location: str | Path) -> tuple[int, object]:
    """A file's size and modification time (what tells a rewritten file from the one hashed before)."""
    info = _info(location)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(2, "No such file", str(location))
    return int(info.size), info.mtime_ns if info.mtime_ns is not None else info.mtime


def sha256(location: str | Path) -> str:
    """sha256 hex of a file, streamed."""
    fs, path = resolve(location)
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_new_bytes(location: str | Path, data: bytes) -> bool:
    """Create a file only if nothing is there yet (create-if-absent); False, and nothing written, if
    something is. Two writers racing for one name: exactly one gets True.

    Local: a whole temporary file hard-linked into place (`link` fails on an existing name: atomic on a local disk and on NFS). S3: a conditional put
    (`If-None-Match: *`, which S3 has honoured since 2024-08 and moto's server honours), through
    boto3, which reads the same `AWS_ENDPOINT_URL` and credentials as pyarrow. Other object stores
    (gs://, abfs://) have conditional writes too but are not wired here: they get a check then a
    write, which two writers in the same instant can both pass (docs/design.md, "Reserving names").
    """
    s = str(location)
    m = _SCHEME.match(s)
    if m is None or m.group(1).lower() == "file":
        p = Path(absolute(s))
        p.parent.mkdir(parents=True, exist_ok=True)
        # Written whole under a private name, then hard-linked into place (link fails if the name
        # exists): a reader never sees the file created but still empty, which it could not tell
        # from a half-written file left by a killed process.
        tmp = p.with_name(f"{p.name}.tmp-{uuid.uuid4().hex}")  # lists with its name (a lease, not content)
        try:
            with open(tmp, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, p)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        return True
    if m.group(1).lower() == "s3":
        import boto3
        from botocore.exceptions import ClientError

        bucket, _, key = m.group(2).partition("/")
        try:
            boto3.client("s3").put_object(Bucket=bucket, Key=key.rstrip("/"), Body=data, IfNoneMatch="*")
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict") \
                    or e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412):
                return False
            raise
        return True
    if exists(s):
        return False
    write_bytes(s, data)
    return True
