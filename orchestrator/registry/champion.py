"""The champion rule: which registered version holds the alias `champion`.

`promote_if_better` is the one place that moves it by metric (sweeps and pretrain call it), and
only between versions measured alike; `promote` moves an alias by hand (`selfsup registry promote`).

Both read, compare and set under `champion_lock`: a registered model named `LOCK_PREFIX + NAME`,
created if absent. MLflow's store makes a registered model's name unique (a primary key in its SQL
store), so of two processes creating the lock at once exactly one succeeds; the other waits. So two
promotions of one model never interleave, and the champion ends on the better version whichever
finishes first (docs/design.md, "Registration and the champion").
"""

from __future__ import annotations

import math
import random
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from orchestrator.errors import UserError
from orchestrator.registry.versions import CHAMPION, LOCK_PREFIX, ModelRef, resolve_version, version_metric

LOCK_STALE_S = 60.0  # a lock older than this belongs to a promoter that died (a promotion takes ~1 s)
LOCK_WAIT_S = 120.0


def _error_code(e: Exception) -> str:
    return str(getattr(e, "error_code", ""))


@contextmanager
def champion_lock(client: Any, name: str, *, wait_s: float = LOCK_WAIT_S, stale_s: float = LOCK_STALE_S) -> Iterator[None]:
    """Hold the promotion lock of model `name` for the block (see the module docstring).

    A lock whose `expires` tag (the holder's clock plus `stale_s`) has passed is deleted and taken:
    its holder died mid-promotion. Clocks of one cluster agree far better than `stale_s`.

    Raises:
        UserError: the lock stayed held by a live promoter for `wait_s` seconds.
    """
    lock = f"{LOCK_PREFIX}{name}"
    token = uuid.uuid4().hex
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.create_registered_model(lock, tags={"token": token, "expires": f"{time.time() + stale_s:.3f}"},
                                           description=f"selfsup: a promotion of {name!r} is under way (held briefly)")
            break
        except Exception as e:
            if _error_code(e) != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            held = client.get_registered_model(lock)
        except Exception as e:
            if _error_code(e) == "RESOURCE_DOES_NOT_EXIST":
                continue  # released in between: try again
            raise
        if float(dict(held.tags or {}).get("expires", 0.0)) < time.time():
            _delete_lock(client, lock)
            continue
        if time.monotonic() > deadline:
            raise UserError(f"registered model {name!r}: another promotion has held its lock {lock!r} for over "
                            f"{wait_s:.0f} s; try again, or delete that registered model if no selfsup command runs")
        time.sleep(0.05 + random.random() * 0.15)
    try:
        yield
    finally:
        try:
            held = client.get_registered_model(lock)
            if dict(held.tags or {}).get("token") == token:
                _delete_lock(client, lock)
        except Exception as e:
            if _error_code(e) != "RESOURCE_DOES_NOT_EXIST":
                raise


def _delete_lock(client: Any, lock: str) -> None:
    try:
        client.delete_registered_model(lock)
    except Exception as e:
        if _error_code(e) != "RESOURCE_DOES_NOT_EXIST":
            raise


def promote(client: Any, name: str, version: str | int, alias: str = CHAMPION) -> Any:
    """Point `alias` of model `name` at `version` (moving it if set elsewhere), under `champion_lock`.

    Raises:
        UserError: unknown model name or version.
    """
    v = resolve_version(client, ModelRef(name, version=str(version)))
    with champion_lock(client, name):
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
    metric is replaced; ties keep the current holder. The read, the comparison and the move happen
    under `champion_lock`: a concurrent promotion of the same model waits.
    """
    with champion_lock(client, name):
        return _promote_if_better(client, name, version, metric=metric, alias=alias)


def _promote_if_better(client: Any, name: str, version: str | int, *, metric: str, alias: str) -> Promotion:
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

