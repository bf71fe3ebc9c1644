"""Registering a trained encoder: the one path that pretraining and sweeps take.

`register_run_encoder` turns a run's checkpoint into a model version and applies the champion rule:
- idempotent per run: a version whose `run_id` is the run's is returned as it is, so a resumed or
  retried run (a command that died after registering, before its record said so) never adds a
  second one;
- never visible half-registered: the version is created with its tags and description in one
  request (`MlflowClient.create_model_version(..., tags=...)`, one database transaction in MLflow's
  SQL store), so no reader, and no bare `NAME`, ever resolves to a version without its tags;
- the champion moves under `champion.champion_lock` (`promote_if_better`).

`default_model_name` is the one place that names a dataset's model, `<dataset>-encoder`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from orchestrator.config import MODEL_NAME
from orchestrator.errors import UserError
from orchestrator.registry.champion import Promotion, promote_if_better
from orchestrator.registry.versions import name_filter

if TYPE_CHECKING:
    from orchestrator.config import Config


def default_model_name(cfg: Config, dataset: str) -> str:
    """`tracking.model_name`, else `<dataset>-encoder` with the dataset's name made a valid model
    name (characters other than letters, digits, '.', '_' and '-' become '-': a source folder named
    `cats@v2` trains `cats-v2-encoder`).

    Raises:
        UserError: no valid name can be derived (the dataset's name has no letter or digit).
    """
    if cfg.tracking.model_name:
        return cfg.tracking.model_name
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", dataset).strip("-._")[:90]
    name = f"{safe}-encoder"
    if not safe or not MODEL_NAME.match(name):
        raise UserError(f"the dataset's name {dataset!r} gives no valid model name: set tracking.model_name "
                        "(letters, digits, '.', '_' and '-', starting with a letter or digit)")
    return name


@dataclass
class Registration:
    """What `register_run_encoder` did: the version (`models:/NAME/VERSION`), whether it existed
    already (a resumed run's), and the champion rule's `Promotion`."""

    model_uri: str
    version: str
    existed: bool
    promotion: Promotion


def version_of_run(client: Any, name: str, run_id: str) -> Any | None:
    """The version of model `name` registered from run `run_id`, or None (the oldest if several)."""
    query = name_filter(name)
    run_clause = f"run_id = '{run_id}'"
    found = client.search_model_versions(f"{query} and {run_clause}" if query else run_clause)
    mine = sorted((v for v in found if v.name == name and v.run_id == run_id), key=lambda v: int(v.version))
    return mine[0] if mine else None


def register_run_encoder(cfg: Config, state: dict[str, Any], *, uri: str, run_id: str, model_name: str,
                         tags: dict[str, Any], summary: str = "", metric: str = "knn_top1") -> Registration:
    """Register the encoder of a checkpoint's `state` (`training.save_state`) as a version of
    `model_name` from run `run_id` (once per run), then move `champion` to it if it beats the holder
    measured alike.

    Args:
        cfg: the run's config (builds the model; its data and eval fields give the protocol tags).
        tags: version tags besides the protocol's (method, metrics, run name, ...).
        summary: the start of the version's description.
        metric: what the champion rule compares.
    """
    # Imported here: torch and the data layer, which the registry's readers (list, show) never need.
    from orchestrator import tracking
    from orchestrator.data import protocol_tags
    from methods.encoders import representation_encoder
    from orchestrator.training import build_model

    c = tracking.client(uri)
    existing = version_of_run(c, model_name, run_id)
    if existing is None:
        model = build_model(cfg)
        model.load_state_dict(state["model"])
        encoder = representation_encoder(model)  # DINO: the teacher's backbone
        existing_now = tracking.register_encoder(encoder, tracking_uri=uri, run_id=run_id, model_name=model_name,
                                                 image_size=cfg.data.image_size, tags={**tags, **protocol_tags(cfg)},
                                                 summary=summary)
        version, existed = str(existing_now.version), False
    else:
        version, existed = str(existing.version), True
    promotion = promote_if_better(c, model_name, version, metric=metric)
    return Registration(f"models:/{model_name}/{version}", version, existed, promotion)
