"""Loading a registered encoder safely: `load_encoder`, the one way selfsup loads a model.

pt2 (torch.export) only, checked before it is read, so that nothing from the model store runs
here: no pickle, no code paths. Used by `selfsup registry embed`, `selfsup evaluate` and tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.artifacts
import yaml
from mlflow.exceptions import MlflowException

from orchestrator.encoder_input import TAG_IMAGE_SIZE, TAG_MIN_SIZE, EncoderInput
from orchestrator.errors import UserError
from orchestrator.registry.versions import ModelRef, connect, resolve_version
from orchestrator.tracking import resolve_tracking_uri

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
    # Here, not at the top: `selfsup registry list/show/best/promote` import this package and never
    # need torch (about 2 s to import).
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
    mlmodel = _read_mlmodel(root, where)
    pt2 = _pt2_file(root, mlmodel["flavors"], where)
    _check_pickle_free(pt2, where)
    shape, output_dim = _signature(mlmodel, where)
    return pt2, shape, output_dim


def _read_mlmodel(root: Path, where: str) -> dict[str, Any]:
    """The MLmodel file as plain YAML, checked to name the pytorch flavor (and nothing but
    `ALLOWED_FLAVORS`) with no code path in any flavor."""
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
    return mlmodel


def _pt2_file(root: Path, flavors: dict[str, Any], where: str) -> Path:
    """The pytorch flavor's `model.pt2`, a plain file inside the model folder (not a pickled model.pth)."""
    data = flavors["pytorch"].get("model_data")
    data_dir = (root / str(data)).resolve() if isinstance(data, str) and data else None
    if data_dir is None or not data_dir.is_relative_to(root) or not data_dir.is_dir():
        raise _refuse(where, f"bad model_data {data!r}")
    pt2 = data_dir / PT2_FILE
    if not pt2.is_file() or pt2.is_symlink():
        found = sorted(p.name for p in data_dir.iterdir())
        raise _refuse(where, f"it is not a pt2 model (its data holds {', '.join(found) or 'nothing'}; "
                      "a pickled model.pth would run code as it loads)")
    return pt2


def _check_pickle_free(pt2: Path, where: str) -> None:
    """MLflow's own check that a pt2 archive holds only tensors and JSON/text records."""
    try:
        # Here, not at the top: mlflow.pytorch imports torch (see `load_encoder`), and an MLflow
        # without this check must refuse the model rather than fail to import this module.
        from mlflow.pytorch import _validate_pt2_archive_is_pickle_free  # MLflow 3.17.2
    except ImportError:  # fail closed on an MLflow without the check
        raise _refuse(where, "this MLflow has no pt2 archive check") from None
    try:
        _validate_pt2_archive_is_pickle_free(str(pt2))
    except MlflowException as e:
        record = re.search(r"record '([^']*)'", str(e.message))
        raise _refuse(where, "its pt2 archive holds a record that is not plain tensors or text"
                      + (f" ({record[1]})" if record else "")) from None


def _signature(mlmodel: dict[str, Any], where: str) -> tuple[list[int], int | None]:
    """The signature's input shape ([B, 3, H, W]) and output width (None if it states none)."""
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
    return [int(v) for v in shape], output_dim
