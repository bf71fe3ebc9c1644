"""The run lifecycle that `selfsup pretrain` and `selfsup sweep` share.

Ray: join the configured cluster or start a private local one, and stop what was started
(`ray_session`); refuse storage the cluster's other nodes cannot see (`check_cluster_storage`).
Records: numbered run and sweep folders (`numbered_dir`), JSON records written atomically
(`write_json`), the config comparison `--resume` makes (`config_differences`). Data: ingest on the
first run, the Ray Data train split, the dataset's name and the kNN protocol's tags. MLflow: the run
of one pretraining (`create_run`) and a diverged run's end (`mark_diverged`); registering an encoder
lives in `orchestrator.registry.register`. Reserving a run's or sweep's name: `reserve_dir`.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray

from orchestrator import tracking
from orchestrator.config import Config, check_data_folder, storage_location, to_yaml
from orchestrator.data import LABEL_METRICS_TAG, label_metrics, no_labels_note
from orchestrator.errors import UserError
from orchestrator.ray_compat import ray_session_at, start_or_join_ray
from orchestrator.reservation import LEASE, Lease, in_use_message, try_acquire
from orchestrator.train_loop import load_state
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


def cpus_per_worker(cfg: Config) -> float:
    """`scaling.cpus_per_worker`, or 1 when the cluster has a CPU to spare for Ray Data, else a share."""
    if cfg.scaling.cpus_per_worker is not None:
        return cfg.scaling.cpus_per_worker
    total = float(ray.cluster_resources().get("CPU", 1.0))
    n = cfg.scaling.max_workers
    if total - n >= 1.0:
        return 1.0
    return max(0.1, round((total - 1.0) / n, 2))


# --- records -----------------------------------------------------------------------------------

def numbered_dir(root: str | Path, *, name: str | None, stem: str, record: str, resume: bool, kind: str) -> str:
    """ROOT/NAME for a run or a sweep (`kind`), ROOT a local folder or a URI: NAME is `name`, else the
    next free `<stem>-<n>`; with `resume`, the named or newest folder that holds its `record` file.
    Raises `UserError`."""
    root = str(root)
    if name is not None:
        d = storage.join(root, name)
        if resume and not storage.is_file(storage.join(d, record)):
            raise UserError(f"--resume: there is no {kind} {name!r} under {root} to continue "
                            f"(leave out --resume to start it)")
        if not resume and storage.exists(d):
            raise UserError(f"{kind}.name = {name!r}: {d} exists already; continue it with --resume, "
                            f"or choose another {kind}.name")
        return d
    pattern = re.compile(rf"^{re.escape(stem)}-(\d+)$")
    taken = storage.list_names(root)
    numbers = sorted(int(m.group(1)) for p in taken
                     if (m := pattern.match(p)) and storage.is_file(storage.join(root, p, record)))
    if resume:
        if not numbers:
            raise UserError(f"--resume: no {stem}-<n> {kind} under {root} to continue "
                            f"(set {kind}.name to pick one)")
        return storage.join(root, f"{stem}-{numbers[-1]}")
    n = (numbers[-1] + 1) if numbers else 1
    while f"{stem}-{n}" in taken:
        n += 1
    return storage.join(root, f"{stem}-{n}")


def reserve_dir(root: str | Path, *, name: str | None, stem: str, record: str, resume: bool,
                kind: str) -> tuple[str, Lease]:
    """`numbered_dir`, and the name reserved for this command (`orchestrator.reservation`): a lease
    created if absent before Ray and MLflow start, so two commands never share a folder. An automatic
    name another command holds is skipped; a name the user gave, or `--resume` of a run that another
    command still runs, is a `UserError` (one line). Returns (the folder, the held lease)."""
    for _ in range(1000):
        # A new named run: its lease decides (a folder holding only a lease is a command starting).
        d = (storage.join(str(root), name) if name is not None and not resume else
             numbered_dir(root, name=name, stem=stem, record=record, resume=resume, kind=kind))
        lease, holder = try_acquire(d)
        if lease is None:
            if name is not None or resume:
                raise UserError(in_use_message(kind, storage.name(d), holder or {}))
            continue  # taken by a command that started at the same moment: the next number
        if not resume and [n for n in storage.list_names(d) if not n.startswith(LEASE)]:
            lease.release()  # filled (and released) by another command since the listing
            if name is not None:
                raise UserError(f"{kind}.name = {name!r}: {d} exists already; continue it with --resume, "
                                f"or choose another {kind}.name")
            continue
        return d, lease
    raise UserError(f"{root}: no free {stem}-<n> {kind} name after 1000 tries")


def read_json(location: str) -> dict[str, Any] | None:
    """A JSON record (local or in an object store), or None when it is not there."""
    return json.loads(storage.read_text(location)) if storage.is_file(location) else None


def write_json(location: str, record: dict[str, Any]) -> None:
    """Write a record whole (`storage.write_text` is atomic: a reader never sees half of one)."""
    storage.write_text(location, json.dumps(record, indent=2, default=str) + "\n")


def config_differences(a: Config, b: Config) -> list[str]:
    fa, fb = a.flat(), b.flat()
    return [f"{k} ({fa[k]!r} -> {fb[k]!r})" for k in fa if k != "run.name" and fa[k] != fb[k]]


def absolute_paths(cfg: Config) -> Config:
    """A copy with local `data.path` and `run.storage_path` made absolute (Train workers run in other
    folders); URIs stay as they are."""
    d = cfg.to_dict()
    d["data"]["path"] = storage.absolute(cfg.data.path)
    d["run"]["storage_path"] = storage_location(cfg.run.storage_path)
    return Config.from_dict(d)



# --- data ------------------------------------------------------------------------------------------

def ensure_data(cfg: Config, *, quiet: bool = False) -> None:
    """Ingest `data.source` into `data.path` if it has no manifest yet (the demo's first run)."""
    if cfg.data.source is None or storage.is_file(storage.join(cfg.data.path, "manifest.json")):
        check_data_folder(cfg)
        return
    if not quiet:
        print(f"selfsup: first run: ingesting {cfg.data.source!r} into {cfg.data.path} ...", flush=True)
    ingest(cfg.data.source, cfg.data.path, progress=False, ray_session=ray_session_at)
    check_data_folder(cfg)


def train_dataset(cfg: Config) -> Any:
    """The lazy Ray Data train split (shuffled, decoded, maybe augmented each epoch): the first
    `data.limit` rows, the same every epoch (`data.loader=stream`)."""
    from pipelines.stream import read_split  # Ray Data: imported only by runs that stream

    return read_split(cfg.data.path, cfg.data.train_split, image_size=cfg.data.image_size,
                      augment_on=cfg.resolved_augment_on(), preset=cfg.augment_preset(),  # type: ignore[arg-type]
                      view_size=cfg.data.image_size, seed=None, limit=cfg.data.limit,
                      max_pixels=cfg.data.max_image_pixels)


def train_rows(cfg: Config) -> int:
    rows = read_manifest(cfg.data.path).rows(cfg.data.train_split)
    return min(rows, cfg.data.limit) if cfg.data.limit is not None else rows


def dataset_name(cfg: Config) -> str:
    return read_manifest(cfg.data.path).name


def protocol_tags(cfg: Config) -> dict[str, Any]:
    """How this run's kNN accuracy was measured, as model version tags: the registry's champion
    rule compares only versions that agree on these (`orchestrator.registry.PROTOCOL_TAGS`)."""
    d, e = cfg.data, cfg.eval
    return {"dataset": dataset_name(cfg), "image_size": d.image_size, "knn_k": e.knn_k, "knn_t": e.knn_t,
            "knn_bank": split_rows(d.path, d.train_split, e.knn_train_limit),
            "knn_queries": split_rows(d.path, d.test_split, e.knn_test_limit),
            "knn_bank_split": d.train_split, "knn_query_split": d.test_split}


# --- MLflow ------------------------------------------------------------------------------------

def create_run(cfg: Config, *, uri: str, parent_run_id: str | None = None) -> str:
    """The MLflow run of pretraining `cfg` (paths absolute, `run.name` set): its params, config
    YAML and tags; nested under `parent_run_id` (a sweep's). Returns the run id."""
    exp_id = tracking.ensure_experiment(uri, cfg.tracking.experiment)
    return tracking.start_run(uri, exp_id, str(cfg.run.name), cfg.flat(), to_yaml(cfg),
                              parent_run_id=parent_run_id, tags=_run_tags(cfg))


def _run_tags(cfg: Config) -> dict[str, str]:
    # Set where the run is made (a sweep's driver for its trials): a trial process must not open the
    # MLflow store before training (one writer per run, docs/design.md).
    return {"method": cfg.method.name, "encoder": cfg.model.encoder, "dataset": dataset_name(cfg),
            "selfsup.storage_path": storage_location(cfg.run.storage_path),
            LABEL_METRICS_TAG: "on" if label_metrics(cfg) else no_labels_note(cfg.data.path)}


def mark_diverged(uri: str, run_id: str) -> None:
    """A diverged run (NaN/inf loss): tag `diverged`, status FAILED."""
    tracking.client(uri).set_tag(run_id, "diverged", "true")
    tracking.finish_run(uri, run_id, "FAILED")


def read_state(location: str) -> dict[str, Any]:
    """A checkpoint file (local or in an object store), loaded without unpickling code."""
    return load_state(io.BytesIO(storage.read_bytes(location)))
