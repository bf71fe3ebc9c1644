"""Registered encoders in the MLflow model registry: list, show, best, promote, embed.

Model versions carry the tags `method`, `dataset`, `knn_top1` and how that was measured (kNN
bank and queries, k, T, input size, embedding width; written at registration by
`orchestrator.tracking.register_encoder`); one registered model per dataset, `<dataset>-encoder`.
The alias `champion` names the best version of a model; `promote_if_better` is the one place that
moves it by metric (sweeps and pretrain call it), and only between versions measured alike.

`load_encoder` is the one place that loads a registered model (embed, evaluate, tests): pt2 only,
checked before it is read, so that nothing from the model store runs here.

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
from pipelines.images import DEFAULT_MAX_IMAGE_PIXELS

CHAMPION = "champion"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def connect(tracking_uri: str | None = None, *, must_exist: bool = True) -> Any:
    """An `MlflowClient` on the tracking store, checked to be reachable.

    Args:
        tracking_uri: see `resolve_tracking_uri`.
        must_exist: refuse a SQLite store whose file is missing (instead of creating an empty one
            where the user mistyped a path).

    Raises:
        UserError: the SQLite file does not exist, the server does not answer on /health, or it
            refuses the credentials (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD).
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
        from orchestrator.mlflow_auth import credentials_checked

        c = MlflowClient(tracking_uri=uri, registry_uri=uri)
        with credentials_checked(uri):  # /health answers anyone; this request needs the credentials
            c.search_experiments(max_results=1)
        return c
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


def name_filter(name: str) -> str | None:
    """An MLflow search filter for versions of model `name`, or None where no filter can say it.

    MLflow's filter parser strips the outer quotes of a value and unescapes nothing (3.17
    `SearchUtils._strip_quotes`), so a name is quoted with the quote it does not contain; a name
    with both kinds has no filter (the caller then filters every version itself).
    """
    if "'" not in name:
        return f"name = '{name}'"
    if '"' not in name:
        return f'name = "{name}"'
    return None


def _versions(client: Any, name: str) -> list[Any]:
    out: list[Any] = []
    token = None
    query = name_filter(name)
    while True:
        page = client.search_model_versions(query, max_results=1000, page_token=token)
        out.extend(v for v in page if v.name == name)
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


# What a kNN accuracy depends on besides the encoder (model version tags written at registration:
# `pretrain.protocol_tags` and `tracking.register_encoder`). Two versions' metrics compare only
# when all of these agree: a bigger memory bank or other queries give another number for the same
# encoder, and a champion of another input size or width cannot stand in for the one it replaces.
PROTOCOL_TAGS = ("dataset", "image_size", "embedding_dim", "knn_k", "knn_t", "knn_bank", "knn_queries",
                 "knn_bank_split", "knn_query_split")


@dataclass
class Promotion:
    """What `promote_if_better` did: `moved` (also its truth value) and, when not, `reason`."""

    moved: bool
    reason: str = ""
    holder: str | None = None  # the version that holds the alias afterwards

    def __bool__(self) -> bool:
        return self.moved


def protocol_differences(current: Any, candidate: Any) -> list[str]:
    """The protocol tags on which two versions differ: "knn_bank 1000 (v3) vs 4000 (v5)"."""
    a, b = dict(current.tags or {}), dict(candidate.tags or {})
    return [f"{k} {a.get(k, 'unrecorded')} (v{current.version}) vs {b.get(k, 'unrecorded')} (v{candidate.version})"
            for k in PROTOCOL_TAGS if a.get(k) != b.get(k)]


def promote_if_better(client: Any, name: str, version: str | int, *, metric: str = "knn_top1",
                      alias: str = CHAMPION) -> Promotion:
    """Move `alias` to `version` only if it beats the current holder on `metric`, measured alike.

    Like with like: the holder and the candidate must agree on every `PROTOCOL_TAGS` tag (dataset,
    kNN bank size and queries, k, T, input size, embedding width); otherwise the alias stays and the
    reason says which differ (`selfsup registry promote` moves it by hand). A holder without the
    metric is replaced; ties keep the current holder.
    """
    candidate = resolve_version(client, ModelRef(name, version=str(version)))
    value = version_metric(client, candidate, metric)
    if value is None or not math.isfinite(value):
        return Promotion(False, f"version {candidate.version} has no finite {metric}")
    aliases = dict(client.get_registered_model(name).aliases or {})
    if alias in aliases:
        current = client.get_model_version_by_alias(name, alias)
        if str(current.version) == str(candidate.version):
            return Promotion(False, f"version {candidate.version} holds {alias!r} already", str(current.version))
        differ = protocol_differences(current, candidate)
        if differ:
            return Promotion(False, f"{alias!r} stays at version {current.version}: measured differently "
                             f"({'; '.join(differ)}); move it with `selfsup registry promote {name} "
                             f"{candidate.version}`", str(current.version))
        held = version_metric(client, current, metric)
        if held is not None and math.isfinite(held) and value <= held:
            return Promotion(False, f"{alias!r} stays at version {current.version}: {metric} {held:.4f} >= "
                             f"{value:.4f}", str(current.version))
    client.set_registered_model_alias(name, alias, candidate.version)
    return Promotion(True, holder=str(candidate.version))


# --- loading: pt2 only, nothing from the store runs -------------------------------------------------

# The files selfsup's own registration writes (`tracking.register_encoder`: pt2, no code paths).
PT2_FILE = "model.pt2"
ALLOWED_FLAVORS = {"pytorch", "python_function"}


@dataclass
class LoadedEncoder:
    """A registered encoder loaded for inference, with the input contract it states.

    `module(x)` maps float32 `[B, 3, H, W]` (normalised with `pipelines.augment.MEAN`/`STD`) to
    `[B, output_dim]`; calling the `LoadedEncoder` itself checks the input first
    (`EncoderInput.check`: a one-line `UserError` instead of torch.export's guard failure).
    """

    module: Any  # a torch.export GraphModule (already in eval mode; it refuses `.eval()`)
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

    MLflow 3.17 unpickles by default (`MLFLOW_ALLOW_PICKLE_DESERIALIZATION`), and a model version can
    carry a `code` folder that `mlflow.pytorch.load_model` puts on `sys.path`. selfsup registers
    torch.export ("pt2") models only, so it loads only those: the version's MLmodel (read as plain
    YAML) must have the `pytorch` flavor, no `code` in any flavor and its weights as `data/model.pt2`
    (no pickled `model.pth`); the pt2 archive must hold nothing but tensors and JSON/text records
    (MLflow's own check, which `mlflow.pytorch.load_model` runs only when pickle is switched off);
    then `torch.export.load` reads it. The input contract comes from the version's tags
    (`orchestrator.encoder_input`), or from its signature for versions registered before those tags.

    Args:
        ref: `NAME`, `NAME@ALIAS`, `NAME/VERSION`, optionally prefixed `models:/` (see `resolve_version`).
        tracking_uri: see `resolve_tracking_uri`.
        client: an `MlflowClient` on that store (default: `connect(tracking_uri)`).

    Raises:
        UserError: unknown reference, unreachable store, or a model that is not such a pt2 model
            (one line: why).
    """
    import mlflow.artifacts
    import torch

    if client is None:
        client = connect(tracking_uri)
    version = resolve_version(client, ref)
    name, number = str(version.name), str(version.version)
    where = f"models:/{name}/{number}"
    uri = resolve_tracking_uri(tracking_uri)
    with _no_progress_bars(), tempfile.TemporaryDirectory(prefix="selfsup-model-") as tmp:
        # Downloading runs nothing; the files are checked before anything reads them as a model.
        # The version's own artifact location, not `models:/...`, whose resolution reads MLflow's
        # global registry URI rather than the one passed here.
        source = client.get_model_version_download_uri(name, number)
        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp,
                                                        tracking_uri=uri)).resolve()
        pt2, shape, output_dim = _check_pt2_model(root, where)
        module = torch.export.load(str(pt2)).module()
    tags = dict(version.tags or {})
    spec = EncoderInput.of(tags, None if {TAG_MIN_SIZE, TAG_IMAGE_SIZE} <= set(tags) else shape)
    return LoadedEncoder(module=module, version=version, spec=spec, output_dim=output_dim)


def _refuse(where: str, why: str) -> UserError:
    return UserError(f"{where}: refused to load: {why}; selfsup loads only the torch.export (pt2) "
                     "encoders it registers, and never runs code from the model store")


def _check_pt2_model(root: Path, where: str) -> tuple[Path, list[int], int | None]:
    """The pt2 file, the signature's input shape and the output width of a downloaded model folder,
    or `UserError` (see `load_encoder`)."""
    import json

    import yaml

    try:
        mlmodel = yaml.safe_load((root / "MLmodel").read_text())
    except (OSError, yaml.YAMLError) as e:
        raise _refuse(where, f"no readable MLmodel file ({type(e).__name__})") from None
    flavors = mlmodel.get("flavors") if isinstance(mlmodel, dict) else None
    if not isinstance(flavors, dict) or not isinstance(flavors.get("pytorch"), dict):
        raise _refuse(where, f"not a pytorch model (flavors: {', '.join(map(str, flavors or {})) or 'none'})")
    other = sorted(map(str, set(flavors) - ALLOWED_FLAVORS))
    if other:
        raise _refuse(where, f"unexpected flavor {', '.join(other)}")
    for flavor, conf in flavors.items():
        if isinstance(conf, dict) and conf.get("code"):
            raise _refuse(where, f"the {flavor} flavor carries a code path ({conf['code']!r})")
    data = flavors["pytorch"].get("model_data")
    data_dir = (root / str(data)).resolve() if isinstance(data, str) and data else None
    if data_dir is None or not data_dir.is_relative_to(root) or not data_dir.is_dir():
        raise _refuse(where, f"bad model_data {data!r}")
    pt2 = data_dir / PT2_FILE
    if not pt2.is_file() or pt2.is_symlink():
        found = sorted(p.name for p in data_dir.iterdir())
        raise _refuse(where, f"it is not a pt2 model (its data holds {', '.join(found) or 'nothing'}; "
                      "a pickled model.pth would run code as it loads)")
    try:
        from mlflow.pytorch import _validate_pt2_archive_is_pickle_free  # MLflow 3.17.2
    except ImportError:  # fail closed on an MLflow without the check
        raise _refuse(where, "this MLflow has no pt2 archive check") from None
    from mlflow.exceptions import MlflowException

    try:
        _validate_pt2_archive_is_pickle_free(str(pt2))
    except MlflowException as e:
        record = re.search(r"record '([^']*)'", str(e.message))
        raise _refuse(where, "its pt2 archive holds a record that is not plain tensors or text"
                      + (f" ({record[1]})" if record else "")) from None
    try:
        sig = mlmodel.get("signature") or {}
        inputs = json.loads(sig["inputs"])
        shape = inputs[0]["tensor-spec"]["shape"]
        outputs = json.loads(sig["outputs"]) if sig.get("outputs") else None
        output_dim = int(outputs[0]["tensor-spec"]["shape"][-1]) if outputs else None
    except (KeyError, IndexError, TypeError, ValueError):
        raise _refuse(where, "no tensor input signature, so its image size is unknown") from None
    if len(shape) != 4 or shape[1] != 3:
        raise _refuse(where, f"it takes input {shape}, not [B, 3, H, W] images")
    return pt2, [int(v) for v in shape], output_dim


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


def _iter_source(source: Path, batch_size: int, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
    """Yield (encoded image bytes list, labels, paths) batches from a shard or image folder."""
    if (source / "manifest.json").exists():
        import pyarrow.parquet as pq

        from pipelines.manifest import read_manifest, split_files

        for split in read_manifest(source).splits:
            for f in split_files(source, split, allow_empty=True):  # names and sha256 checked
                pf = pq.ParquetFile(f)
                for batch in pf.iter_batches(batch_size=batch_size, columns=["image", "label", "path"]):
                    d = batch.to_pydict()
                    yield d["image"], d["label"], [f"{split}:{p}" for p in d["path"]]
        return
    files, labels = _image_folder_items(source)
    for i in range(0, len(files), batch_size):
        chunk = files[i:i + batch_size]
        yield ([_checked_file(p, source, max_pixels) for p in chunk], labels[i:i + batch_size],
               [str(p.relative_to(source)) for p in chunk])


def _checked_file(path: Path, source: Path, max_pixels: int | None) -> bytes:
    """An image file of a plain folder, made safe for torchvision as ingest makes it.

    Not just the pixel limit: torchvision 0.29's PNG decoder crashes the process (SIGSEGV) on a
    corrupt IDAT, so a file that has not been through ingest is first decoded with PIL (and an
    animated, 16-bit, palette or CMYK image re-encoded to 8-bit), `pipelines.images.normalise`.
    """
    from pipelines.images import TooManyPixels, normalise

    rel = path.relative_to(source)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{rel}: cannot read ({e.strerror or e})") from None
    try:
        return normalise(data, max_pixels, "--max-image-pixels").data
    except TooManyPixels as e:
        raise UserError(f"{rel}: {e}") from None
    except Exception as e:  # PIL: UnidentifiedImageError, OSError (truncated), SyntaxError, ...
        raise UserError(f"{rel}: cannot decode image ({e})") from None


def _decode(images: list[bytes], size: tuple[int, int], paths: list[str], max_pixels: int | None):
    """uint8 bytes -> normalised float [B, 3, H, W] (the model input convention).

    Each image's header is checked against `max_pixels` before it is decoded (the source may be any
    folder of images: a decompression bomb is refused, not decoded), and each is resized right
    after its own decode.
    """
    import torch
    import torch.nn.functional as F

    from pipelines.augment import MEAN, STD
    from pipelines.errors import DataError
    from pipelines.images import decode_rgb

    out = []
    for data, path in zip(images, paths):
        try:
            img = decode_rgb(bytearray(data), max_pixels=max_pixels, setting="--max-image-pixels")
        except DataError as e:
            raise UserError(f"{path}: {e}") from None
        x = img.float().div_(255.0).unsqueeze(0)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        out.append(x)
    x = torch.cat(out)
    mean = torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std


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
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    src = Path(source)
    if not src.is_dir():
        raise UserError(f"{source}: not a folder; embed takes an image folder or a shard folder")
    if (src / "manifest.json").exists():
        from pipelines.manifest import read_manifest

        read_manifest(src)  # a bad manifest (shard names outside the folder) is told before any model loads
    elif not _image_folder_items(src)[0]:
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
            for images, labels, paths in _iter_source(src, batch_size, max_pixels):
                feats = model(_decode(images, size, paths, max_pixels)).reshape(len(images), -1).float().numpy()
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
                  max_pixels=args.max_image_pixels,
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
