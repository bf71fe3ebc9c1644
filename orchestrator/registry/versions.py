"""Finding registered encoders: the store connection, model references, and version look-ups.

Model versions carry the tags `method`, `dataset`, `knn_top1` and how that was measured (kNN
bank and queries, k, T, input size, embedding width; written at registration by
`orchestrator.tracking.register_encoder`); one registered model per dataset, `<dataset>-encoder`.

Everything here works against the local SQLite store and against an `mlflow server` URI.
Note: `search_model_versions` leaves `aliases` empty (MLflow 3.x), so aliases are read from
`get_registered_model(name).aliases`.
"""

from __future__ import annotations

import math
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow import MlflowClient

from orchestrator.errors import UserError
from orchestrator.mlflow_auth import credentials_checked
from orchestrator.tracking import resolve_tracking_uri

CHAMPION = "champion"  # the alias that names the best version of a model
# Registered models with this prefix are promotion locks (`champion.champion_lock`), not encoders.
LOCK_PREFIX = "selfsup-lock--"


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
        names.extend(m.name for m in page if not m.name.startswith(LOCK_PREFIX))
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


def versions_of(client: Any, name: str) -> list[Any]:
    """Every version of model `name`, oldest first."""
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
    versions = versions_of(client, r.name)
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


def aliases_by_version(client: Any, name: str) -> dict[str, list[str]]:
    """{version: [its aliases]} of model `name`."""
    by_version: dict[str, list[str]] = {}
    for alias, version in (client.get_registered_model(name).aliases or {}).items():
        by_version.setdefault(str(version), []).append(alias)
    return by_version


def list_versions(client: Any, metric: str = "knn_top1") -> pd.DataFrame:
    """Every registered version: name, version, aliases, metric, method, dataset, run id."""
    rows = []
    for name in registered_names(client):
        aliases = aliases_by_version(client, name)
        for v in versions_of(client, name):
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
        for v in versions_of(client, name):
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
