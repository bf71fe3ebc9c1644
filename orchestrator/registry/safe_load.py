"""Loading a registered encoder safely: `load_encoder`, the one way selfsup loads a model.

Nothing a model version holds runs here and no file outside it is read: the encoder is rebuilt
from selfsup's own code (`methods.encoders.build_encoder`, named in the version's `encoder.json`)
and its weights read from `encoder.safetensors` (`orchestrator.registry.encoder_files`). The
version's pt2 export, its MLmodel and everything else it holds are never downloaded. Used by
`selfsup registry embed`, `selfsup evaluate` and tests.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.artifacts
from mlflow.exceptions import MlflowException

from orchestrator.encoder_input import TAG_IMAGE_SIZE, TAG_MIN_SIZE, EncoderInput
from orchestrator.registry.encoder_files import (FILES_DIR, MAX_SPEC_BYTES, MAX_WEIGHTS_BYTES, SPEC_FILE,
                                                 WEIGHTS_FILE, build_and_load, check_spec, refuse)
from orchestrator.registry.versions import ModelRef, connect, resolve_version
from orchestrator.tracking import resolve_tracking_uri


@dataclass
class LoadedEncoder:
    """A registered encoder loaded for inference, with the input contract it states.

    `module(x)` maps float32 `[B, 3, H, W]` (normalised with `pipelines.augment.MEAN`/`STD`) to
    `[B, output_dim]`; calling the `LoadedEncoder` itself checks the input first
    (`EncoderInput.check`: a one-line `UserError` instead of torch.export's guard failure).
    """

    module: Any  # the encoder, an `nn.Module` in eval mode on the CPU
    version: Any  # the ModelVersion
    spec: EncoderInput
    output_dim: int | None

    @property
    def name(self) -> str:
        return str(self.version.name)

    @property
    def uri(self) -> str:
        return f"models:/{self.version.name}/{self.version.version}"

    @property
    def image_size(self) -> tuple[int, int]:
        """The (H, W) it was trained at."""
        return self.spec.image_size, self.spec.image_size

    @property
    def model_id(self) -> str | None:
        """MLflow 3's LoggedModel id: the version's source `models:/<model_id>` (its `model_id`
        attribute came back empty from the SQLite store here)."""
        source = str(self.version.source or "")
        return getattr(self.version, "model_id", None) or (
            source[len("models:/"):] if source.startswith("models:/m-") else None)

    def __call__(self, x: Any) -> Any:
        self.spec.check(x.shape, self.uri, dtype=x.dtype)
        return self.module(x)

    def input_size(self, requested: tuple[int, int] | None) -> tuple[int, int]:
        """The (H, W) to resize images to: `requested`, checked, else the training size."""
        size = requested or self.image_size
        self.spec.check((1, self.spec.channels, *size), self.uri)
        return size


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """MLflow draws a download progress bar on stderr, which would break the CLI's one-line output."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def load_encoder(ref: str | ModelRef, *, tracking_uri: str | None = None, client: Any = None) -> LoadedEncoder:
    """Load a registered encoder, running nothing that the store holds: the one way selfsup loads a
    model (`registry embed`, `selfsup evaluate`).

    Only the version's `encoder.json` and `encoder.safetensors` are downloaded, each after its size
    is checked against a limit; the spec is checked (a known encoder name, plain JSON arguments, no
    argument that reads a file), the encoder built by selfsup's code, first on the `meta` device,
    and the weights' names and shapes compared with it before they load (strictly). The input
    contract comes from the version's tags (`orchestrator.encoder_input`).

    Args:
        ref: `NAME`, `NAME@ALIAS`, `NAME/VERSION`, optionally prefixed `models:/` (see `resolve_version`).
        tracking_uri: see `resolve_tracking_uri`.
        client: an `MlflowClient` on that store (default: `connect(tracking_uri)`).

    Raises:
        UserError: unknown reference, unreachable store, or a version without these two files, or
            whose files do not check out (one line: why).
    """
    if client is None:
        client = connect(tracking_uri)
    version = resolve_version(client, ref)
    name, number = str(version.name), str(version.version)
    where = f"models:/{name}/{number}"
    uri = resolve_tracking_uri(tracking_uri)
    # The version's own artifact location, not `models:/...`, whose resolution reads MLflow's
    # global registry URI rather than the one passed here.
    source = client.get_model_version_download_uri(name, number).rstrip("/")
    sizes = _file_sizes(f"{source}/{FILES_DIR}", uri, where)
    with _no_progress_bars(), tempfile.TemporaryDirectory(prefix="selfsup-model-") as tmp:
        raw_spec = _download(f"{source}/{FILES_DIR}", SPEC_FILE, sizes, MAX_SPEC_BYTES, uri, tmp, where)
        spec = check_spec(raw_spec, where)
        weights = _download(f"{source}/{FILES_DIR}", WEIGHTS_FILE, sizes, MAX_WEIGHTS_BYTES, uri, tmp, where)
    tags = dict(version.tags or {})
    if not {TAG_MIN_SIZE, TAG_IMAGE_SIZE} <= set(tags):
        raise refuse(where, f"its tags do not state the images it takes ({TAG_MIN_SIZE}, {TAG_IMAGE_SIZE})")
    spec_in = EncoderInput.of(tags, None)
    module = build_and_load(spec, weights, where)
    return LoadedEncoder(module=module, version=version, spec=spec_in, output_dim=getattr(module, "output_dim", None))


def _file_sizes(folder: str, uri: str, where: str) -> dict[str, int]:
    """The sizes of the files in the model's `extra_files` folder, from the store's listing."""
    try:
        listing = mlflow.artifacts.list_artifacts(artifact_uri=folder, tracking_uri=uri)
    except MlflowException as e:
        raise refuse(where, f"its files could not be listed ({str(e.message).splitlines()[0][:200]})") from None
    return {Path(f.path).name: int(f.file_size or 0) for f in listing or [] if not f.is_dir}


def _download(folder: str, file: str, sizes: dict[str, int], limit: int, uri: str, tmp: str, where: str) -> bytes:
    """One file of the model, at most `limit` bytes by the listing and on disk."""
    if file not in sizes:
        raise refuse(where, f"it has no {file} (registered before selfsup stored encoders that way, or not by "
                     "selfsup); register it again from its run")
    if sizes[file] > limit:
        raise refuse(where, f"its {file} is {sizes[file]} bytes (at most {limit})")
    path = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{folder}/{file}", dst_path=tmp, tracking_uri=uri))
    if path.is_symlink() or not path.is_file() or path.stat().st_size > limit:
        raise refuse(where, f"its {file} is not a plain file of at most {limit} bytes")
    return path.read_bytes()
