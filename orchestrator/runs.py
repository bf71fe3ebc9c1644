"""The run lifecycle that `selfsup pretrain` and `selfsup sweep` share.

Ray: join the configured cluster or start a private local one, and stop what was started
(`ray_session`); refuse storage the cluster's other nodes cannot see (`check_cluster_storage`).
Records: numbered run and sweep folders (`numbered_dir`), JSON records written atomically
(`write_json`), the config comparison `--resume` makes (`config_differences`). Data: ingest on the
first run, the Ray Data train split, the dataset's name and the kNN protocol's tags. MLflow: the run
of one pretraining (`create_run`), a diverged run's end (`mark_diverged`), and registering an
encoder from a checkpoint with the champion rule (`register_from_state`).
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray

from orchestrator import tracking
from orchestrator.config import Config, check_data_folder, storage_location, to_yaml
from orchestrator.data import LABEL_METRICS_TAG, label_metrics, no_labels_note
from orchestrator.errors import UserError
from orchestrator.ray_compat import ray_session_at, start_or_join_ray
from orchestrator.train_loop import build_model, encoder_state, load_state
from pipelines import storage
from pipelines.ingest import ingest
from pipelines.manifest import read_manifest
from pipelines.memory import split_rows

RUN_RECORD = "selfsup-run.json"  # a pretraining run's record, in its run folder


# --- Ray ---------------------------------------------------------------------------------------------

@contextmanager
def ray_session(cfg: Config) -> Iterator[bool]:
    """Ray for one command: joined or started (`init_ray`); what was started here is shut down and
    its temporary folder removed on the way out. Yields whether Ray was started here."""
    with ray_session_at(cfg.run.ray_address) as started:
        yield started


def init_ray(cfg: Config) -> tuple[bool, str | None]:
    """Join the configured Ray cluster (`run.ray_address`, else `RAY_ADDRESS`), or start a private
    local one; returns (started_here, temp_dir). See `orchestrator.ray_compat.start_or_join_ray`."""
    return start_or_join_ray(cfg.run.ray_address)



def spans_nodes(cfg: Config) -> int:
    """How many nodes this run's Train workers may land on, as far as the driver can tell: the
    alive nodes of the Ray cluster; 2 when there is one node but it lacks a GPU that the workers
    ask for (an autoscaling cluster, `cluster.yaml`, adds GPU nodes only once a job asks)."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) == 1 and cfg.scaling.use_gpu and not nodes[0].get("Resources", {}).get("GPU"):
        return 2
    return len(nodes)


def check_cluster_storage(cfg: Config, locations: dict[str, str], *, streams_data: bool) -> None:
    """Refuse, before training, local folders that Train workers on other nodes cannot see.

    Ray Train checks its storage from the workers and fails with "Unable to set up cluster storage"
    once the run is under way; Ray Data read tasks (`data.loader=stream`) and the rank-0 kNN probe
    read `data.path` on whatever node they run. A cluster of one node, a URI, or a local folder the
    user declared shared (`run.shared_filesystem`) passes.

    Args:
        locations: {"config field": location} that the workers write or read (a storage path).
        streams_data: the workers read `data.path` themselves (stream loader): it is checked too.

    Raises:
        UserError: one line naming the field and what to set.
    """
    if cfg.run.shared_filesystem:
        return
    fields = dict(locations)
    if streams_data:
        fields["data.path"] = cfg.data.path
    local = [(f, v) for f, v in fields.items() if not storage.is_uri(v)]
    if not local:
        return
    n = spans_nodes(cfg)
    if n <= 1:
        return
    field_name, value = local[0]
    raise UserError(f"{field_name} = {value!r} is a local folder, but this Ray cluster has {n} nodes whose Train "
                    f"workers cannot see it: set {field_name} to a URI that every node reaches (s3://BUCKET/..., "
                    "gs://...), or, if every node mounts that folder at the same path, set run.shared_filesystem=true")
