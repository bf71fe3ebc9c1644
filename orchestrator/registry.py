"""Registered encoders in the MLflow model registry: list, show, best, promote, embed.

Model versions carry the tags `method`, `dataset` and `knn_top1` (written by
`orchestrator.tracking.register_encoder`); one registered model per dataset, `<dataset>-encoder`.
The alias `champion` names the best version of a model; `promote_if_better` is the one place that
moves it by metric (sweeps and pretrain call it).

Everything here works against the local SQLite store and against an `mlflow server` URI.
Note: `search_model_versions` leaves `aliases` empty (MLflow 3.x), so aliases are read from
`get_registered_model(name).aliases`.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from orchestrator.encoder_input import TAG_IMAGE_SIZE, TAG_MIN_SIZE, EncoderInput, parse_size
from orchestrator.errors import UserError
from orchestrator.tracking import resolve_tracking_uri

CHAMPION = "champion"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def connect(tracking_uri: str | None = None, *, must_exist: bool = True) -> Any:
    """An `MlflowClient` on the tracking store, checked to be reachable.

    Args:
        tracking_uri: see `resolve_tracking_uri`.
        must_exist: refuse a SQLite store whose file is missing (instead of creating an empty one
            where the user mistyped a path).

    Raises:
        UserError: the SQLite file does not exist, or the server does not answer on /health.
    """
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///") and must_exist:
        path = Path(uri[len("sqlite:///"):])
        if not path.exists():
            raise UserError(f"no MLflow store at {uri} ({path.resolve()} does not exist); "
                            "pass --tracking-uri or set MLFLOW_TRACKING_URI")
    elif uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10) as r:
                r.read()
        except (urllib.error.URLError, OSError) as e:
            raise UserError(f"cannot reach the MLflow server at {uri}: {e}") from None
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# --- references: NAME, NAME@ALIAS, NAME/VERSION, models:/... --------------------------------------

@dataclass(frozen=True)
class ModelRef:
    """A parsed `NAME`, `NAME@ALIAS` or `NAME/VERSION` (optionally prefixed `models:/`)."""

    name: str
    alias: str | None = None
    version: str | None = None

    @property
    def uri(self) -> str:
        if self.alias:
            return f"models:/{self.name}@{self.alias}"
        return f"models:/{self.name}/{self.version}" if self.version else f"models:/{self.name}"


def parse_ref(ref: str) -> ModelRef:
    """Parse `NAME`, `NAME@ALIAS`, `NAME/VERSION` or the same with a `models:/` prefix.

    Raises:
        UserError: the reference has none of these forms.
    """
    text = ref[len("models:/"):] if ref.startswith("models:/") else ref
    m = re.fullmatch(r"([^@/]+)(?:@([^@/]+)|/(\d+))?", text)
    if not m:
        raise UserError(f"bad model reference {ref!r}; use NAME, NAME@ALIAS or NAME/VERSION "
                        "(optionally prefixed models:/)")
    return ModelRef(m.group(1), m.group(2), m.group(3))


def registered_names(client: Any) -> list[str]:
    """Names of every registered model, sorted."""
    names: list[str] = []
    token = None
    while True:
        page = client.search_registered_models(max_results=1000, page_token=token)
        names.extend(m.name for m in page)
        token = page.token
        if not token:
            return sorted(names)


def _versions(client: Any, name: str) -> list[Any]:
    out: list[Any] = []
    token = None
    while True:
        page = client.search_model_versions(f"name = '{name}'", max_results=1000, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return sorted(out, key=lambda v: int(v.version))


def _require_model(client: Any, name: str) -> Any:
    names = registered_names(client)
    if name not in names:
        raise UserError(f"no registered model {name!r}; registered: {', '.join(names) or '(none)'}")
    return client.get_registered_model(name)


def resolve_version(client: Any, ref: str | ModelRef) -> Any:
    """The `ModelVersion` a reference names; a bare NAME means its champion, else its latest version.

    Raises:
        UserError: unknown model name, alias or version (the message lists what exists).
    """
    r = parse_ref(ref) if isinstance(ref, str) else ref
    model = _require_model(client, r.name)
    aliases: dict[str, str] = dict(model.aliases or {})
    if r.alias:
        if r.alias not in aliases:
            raise UserError(f"registered model {r.name!r} has no alias {r.alias!r}; "
                            f"aliases: {', '.join(sorted(aliases)) or '(none)'}")
        return client.get_model_version_by_alias(r.name, r.alias)
    versions = _versions(client, r.name)
    if r.version:
        for v in versions:
            if str(v.version) == r.version:
                return v
        raise UserError(f"registered model {r.name!r} has no version {r.version}; "
                        f"versions: {', '.join(str(v.version) for v in versions) or '(none)'}")
    if CHAMPION in aliases:
        return client.get_model_version_by_alias(r.name, CHAMPION)
    if not versions:
        raise UserError(f"registered model {r.name!r} has no versions")
    return versions[-1]


# --- metrics ---------------------------------------------------------------------------------------

def version_metric(client: Any, version: Any, metric: str) -> float | None:
    """A version's value of `metric`: its tag of that name, else its source run's last value."""
    tags = dict(version.tags or {})
    if metric in tags:
        try:
            return float(tags[metric])
        except ValueError:
            return None
    if version.run_id:
        try:
            run = client.get_run(version.run_id)
        except Exception:  # the run may have been deleted; the version still stands
            return None
        value = run.data.metrics.get(metric)
        return None if value is None else float(value)
    return None


def _aliases_by_version(client: Any, name: str) -> dict[str, list[str]]:
    by_version: dict[str, list[str]] = {}
    for alias, version in (client.get_registered_model(name).aliases or {}).items():
        by_version.setdefault(str(version), []).append(alias)
    return by_version


def list_versions(client: Any, metric: str = "knn_top1") -> pd.DataFrame:
    """Every registered version: name, version, aliases, metric, method, dataset, run id."""
    rows = []
    for name in registered_names(client):
        aliases = _aliases_by_version(client, name)
        for v in _versions(client, name):
            tags = dict(v.tags or {})
            rows.append({"name": name, "version": int(v.version),
                         "aliases": ",".join(sorted(aliases.get(str(v.version), []))),
                         metric: version_metric(client, v, metric),
                         "method": tags.get("method", ""), "dataset": tags.get("dataset", ""),
                         "run_id": v.run_id or ""})
    return pd.DataFrame(rows, columns=["name", "version", "aliases", metric, "method", "dataset",
                                       "run_id"])


def best_version(client: Any, metric: str = "knn_top1", *, dataset: str | None = None,
                 method: str | None = None, model: str | None = None) -> tuple[Any, float]:
    """The registered version with the highest `metric`, filtered by dataset/method/model name.

    Raises:
        UserError: nothing registered matches, or no match has the metric.
    """
    names = registered_names(client)
    if model is not None and model not in names:
        raise UserError(f"no registered model {model!r}; registered: {', '.join(names) or '(none)'}")
    best: tuple[Any, float] | None = None
    matched = 0
    for name in [model] if model else names:
        for v in _versions(client, name):
            tags = dict(v.tags or {})
            if dataset is not None and tags.get("dataset") != dataset:
                continue
            if method is not None and tags.get("method") != method:
                continue
            matched += 1
            value = version_metric(client, v, metric)
            if value is None or math.isnan(value):
                continue
            if best is None or value > best[1]:
                best = (v, value)
    where = ", ".join(f"{k}={v}" for k, v in (("model", model), ("dataset", dataset),
                                              ("method", method)) if v is not None)
    if matched == 0:
        raise UserError(f"no registered encoder matches {where or 'anything'}; "
                        f"registered: {', '.join(names) or '(none)'}")
    if best is None:
        raise UserError(f"none of the {matched} registered encoders matching {where or 'anything'} "
                        f"has a metric {metric!r}")
    return best


# --- aliases ---------------------------------------------------------------------------------------

def promote(client: Any, name: str, version: str | int, alias: str = CHAMPION) -> Any:
    """Point `alias` of model `name` at `version` (moving it if set elsewhere).

    Raises:
        UserError: unknown model name or version.
    """
    v = resolve_version(client, ModelRef(name, version=str(version)))
    client.set_registered_model_alias(name, alias, v.version)
    return v


def promote_if_better(client: Any, name: str, version: str | int, *, metric: str = "knn_top1",
                      alias: str = CHAMPION) -> bool:
    """Move `alias` to `version` only if it beats the current holder on `metric`.

    The current holder must be of the same dataset (the version's `dataset` tag); a holder of
    another dataset, or one without the metric, is replaced. Ties keep the current holder.

    Returns:
        True if the alias now points at `version` because of this call.
    """
    candidate = resolve_version(client, ModelRef(name, version=str(version)))
    value = version_metric(client, candidate, metric)
    if value is None or not math.isfinite(value):
        return False
    aliases = dict(client.get_registered_model(name).aliases or {})
    if alias in aliases:
        current = client.get_model_version_by_alias(name, alias)
        if str(current.version) == str(candidate.version):
            return False
        same_dataset = (dict(current.tags or {}).get("dataset")
                        == dict(candidate.tags or {}).get("dataset"))
        held = version_metric(client, current, metric)
        if same_dataset and held is not None and math.isfinite(held) and value <= held:
            return False
    client.set_registered_model_alias(name, alias, candidate.version)
    return True


# --- embeddings ------------------------------------------------------------------------------------

@dataclass
class LoadedEncoder:
    """A registered encoder, its input contract, and (loaded at the first call) its pt2 program.

    Calling it checks the input first (`EncoderInput.check`: one-line `UserError`), then embeds.
    The program is downloaded and loaded only then, so a bad request fails before any download.
    """

    uri: str  # models:/NAME/VERSION
    version: Any  # the ModelVersion
    spec: EncoderInput
    _model: Any = None

    @property
    def model_id(self) -> str | None:
        """MLflow 3's LoggedModel id: the version's source `models:/<model_id>` (its `model_id`
        attribute came back empty from the SQLite store here)."""
        source = str(self.version.source or "")
        return getattr(self.version, "model_id", None) or (
            source[len("models:/"):] if source.startswith("models:/m-") else None)

    @property
    def model(self) -> Any:
        if self._model is None:
            import mlflow
            import torch

            with _no_progress_bars():
                model = mlflow.pytorch.load_model(self.uri)
            # A pt2 model loads as a torch.export GraphModule, exported in eval mode; it refuses .eval().
            if isinstance(model, torch.nn.Module) and not hasattr(model, "graph"):
                model.eval()
            self._model = model
        return self._model

    def __call__(self, x: Any) -> Any:
        self.spec.check(x.shape, self.uri, dtype=x.dtype)
        return self.model(x)

    def input_size(self, requested: tuple[int, int] | None) -> tuple[int, int]:
        """The (H, W) to resize images to: `requested`, checked, else the training size."""
        size = requested or (self.spec.image_size, self.spec.image_size)
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


def load_encoder(model_ref: str | ModelRef, *, tracking_uri: str | None = None) -> LoadedEncoder:
    """A registered encoder (the one load path of `embed` and `selfsup evaluate`; pt2 programs only).

    Args:
        model_ref: `models:/NAME@ALIAS`, `models:/NAME/VERSION`, or the same without `models:/`.
        tracking_uri: see `resolve_tracking_uri`.

    Raises:
        UserError: unknown model/alias/version, or a model that does not say what images it takes.
    """
    import mlflow

    client = connect(tracking_uri)
    version = resolve_version(client, model_ref)
    uri = f"models:/{version.name}/{version.version}"
    uri_store = resolve_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(uri_store)
    mlflow.set_registry_uri(uri_store)
    tags = dict(version.tags or {})
    shape = None
    if not {TAG_MIN_SIZE, TAG_IMAGE_SIZE} <= set(tags):  # registered before the contract tags: its signature
        with _no_progress_bars():
            sig = mlflow.models.get_model_info(uri).signature
        if sig is None or not sig.inputs.is_tensor_spec():
            raise UserError(f"model {uri} has no tensor input signature; cannot tell what images it takes")
        shape = sig.inputs.inputs[0].shape
    return LoadedEncoder(uri, version, EncoderInput.of(tags, shape))


def _image_folder_items(source: Path) -> tuple[list[Path], list[int]]:
    """Image files under `source` (never leaving it) and their class index (sub-folder), or -1."""
    root = source.resolve()
    files = sorted(p for p in source.rglob("*")
                   if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                   and p.resolve().is_relative_to(root))
    classes = sorted({p.relative_to(source).parts[0] for p in files
                      if len(p.relative_to(source).parts) > 1})
    index = {c: i for i, c in enumerate(classes)}
    labels = [index[p.relative_to(source).parts[0]] if len(p.relative_to(source).parts) > 1 else -1
              for p in files]
    return files, labels


def _iter_source(source: Path, batch_size: int):
    """Yield (encoded image bytes list, labels, paths) batches from a shard or image folder."""
    if (source / "manifest.json").exists():
        import pyarrow.parquet as pq

        from pipelines.manifest import read_manifest

        for split, entry in read_manifest(source).splits.items():
            for f in entry.files:
                pf = pq.ParquetFile(source / f)
                for batch in pf.iter_batches(batch_size=batch_size, columns=["image", "label", "path"]):
                    d = batch.to_pydict()
                    yield d["image"], d["label"], [f"{split}:{p}" for p in d["path"]]
        return
    files, labels = _image_folder_items(source)
    for i in range(0, len(files), batch_size):
        chunk = files[i:i + batch_size]
        yield ([p.read_bytes() for p in chunk], labels[i:i + batch_size],
               [str(p.relative_to(source)) for p in chunk])


def _decode(images: list[bytes], size: tuple[int, int], paths: list[str]):
    """uint8 bytes -> normalised float [B, 3, H, W] (the model input convention)."""
    import torch
    import torch.nn.functional as F
    from torchvision.io import ImageReadMode, decode_image

    from pipelines.augment import MEAN, STD

    out = []
    for data, path in zip(images, paths):
        try:
            img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                               mode=ImageReadMode.RGB)
        except RuntimeError as e:
            raise UserError(f"{path}: cannot decode image ({e})") from None
        x = img.float().div_(255.0).unsqueeze(0)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        out.append(x)
    x = torch.cat(out)
    mean = torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std


def embed(model_ref: str, source: str | Path, out: str | Path, *, tracking_uri: str | None = None,
          batch_size: int = 256, image_size: tuple[int, int] | None = None) -> int:
    """Write embeddings of every image in `source` to the Parquet file `out`.

    Args:
        model_ref: `models:/NAME@ALIAS`, `models:/NAME/VERSION`, or the same without `models:/`.
        source: a shard folder (with `manifest.json`; every split) or an image folder
            (`.jpg/.jpeg/.png`, class sub-folders give the label, else -1).
        out: Parquet file with columns `path`, `label`, `embedding` (list<float32>).
        tracking_uri: see `resolve_tracking_uri`.
        batch_size: images per forward pass.
        image_size: (H, W) every image is resized to; None: the model's training size.

    Returns:
        The number of rows written.

    Raises:
        UserError: bad source, unknown model, or an `image_size` the model does not take.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    src = Path(source)
    if not src.is_dir():
        raise UserError(f"{source}: not a folder; embed takes an image folder or a shard folder")
    if not (src / "manifest.json").exists() and not _image_folder_items(src)[0]:
        raise UserError(f"{source}: no shard folder (manifest.json) and no "
                        f"{'/'.join(IMAGE_SUFFIXES)} images found")
    model = load_encoder(model_ref, tracking_uri=tracking_uri)
    size = model.input_size(image_size)

    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.NamedTemporaryFile(dir=out_path.parent, prefix=f".{out_path.name}.", delete=False)
    tmp.close()
    writer = None
    rows = 0
    try:
        with torch.inference_mode():
            for images, labels, paths in _iter_source(src, batch_size):
                feats = model(_decode(images, size, paths)).reshape(len(images), -1).float().numpy()
                dim = feats.shape[1]
                table = pa.table({
                    "path": pa.array(paths, pa.string()),
                    "label": pa.array(labels, pa.int64()),
                    "embedding": pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), dim),
                })
                if writer is None:
                    writer = pq.ParquetWriter(tmp.name, table.schema)
                writer.write_table(table)
                rows += len(paths)
        if writer is not None:
            writer.close()
            writer = None
        os.replace(tmp.name, out_path)
    finally:
        if writer is not None:
            writer.close()
        if os.path.exists(tmp.name):
            os.unlink(tmp.name)
    return rows


# --- CLI -------------------------------------------------------------------------------------------

def _fmt_metric(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _print_table(df: pd.DataFrame) -> None:
    if df.empty:
        print("(no registered encoders)")
        return
    show = df.copy()
    for col in show.columns:
        if show[col].dtype.kind == "f" or col == "knn_top1":
            show[col] = show[col].map(_fmt_metric)
    print(show.to_string(index=False))


def _describe(client: Any, v: Any) -> dict[str, Any]:
    aliases = _aliases_by_version(client, v.name).get(str(v.version), [])
    return {"name": v.name, "version": v.version, "aliases": ",".join(sorted(aliases)),
            "uri": f"models:/{v.name}/{v.version}", "run_id": v.run_id, "source": v.source,
            "status": v.status, "description": v.description or "",
            **{f"tag.{k}": val for k, val in sorted((v.tags or {}).items())}}


def main(args: argparse.Namespace) -> int:
    """`selfsup registry {list,show,best,promote,embed}`; see `orchestrator.cli`."""
    cmd = args.registry_command
    if cmd == "embed":
        n = embed(args.uri, args.source, args.out, tracking_uri=args.tracking_uri,
                  image_size=parse_size(args.image_size) if args.image_size else None)
        print(f"wrote {n} embeddings to {args.out}")
        return 0
    client = connect(args.tracking_uri)
    if cmd == "list":
        _print_table(list_versions(client))
    elif cmd == "show":
        for k, val in _describe(client, resolve_version(client, args.ref)).items():
            print(f"{k:16} {val}")
    elif cmd == "best":
        v, value = best_version(client, args.metric, dataset=args.dataset, method=args.method,
                                model=getattr(args, "model", None))
        print(f"models:/{v.name}/{v.version}\t{args.metric}={value:.4f}")
    elif cmd == "promote":
        v = promote(client, args.name, args.version, args.alias)
        print(f"{args.alias} -> models:/{v.name}/{v.version}")
    else:  # argparse only lets the commands above through
        print(f"unknown registry command {cmd!r}", file=sys.stderr)
        return 2
    return 0
