"""The driver of one pretraining run: `selfsup pretrain [--config FILE] [--set k=v ...] [--resume]`.

Thin by design (Ray's `torch_fashion_mnist_example.py` pattern): resolve the config, make sure the
data is there, open the MLflow run, start (or join) Ray, build a `TorchTrainer` around
`orchestrator.train_loop.train_func_per_worker`, fit, register the encoder, print where it all went.

Run names and `--resume`: Ray Train resumes a run that is started again with the same
`RunConfig(storage_path, name)`, so names are stable (no timestamps). With `run.name` unset the
run is called `<config name>-<n>` (`demo-1`, `demo-2`, ...: the next free n under
`run.storage_path`); `--resume` without a name picks the newest `<config name>-<n>`. Starting a run
whose folder exists without `--resume` is an error (so a run is never mixed with another one), and
`--resume` continues with the config recorded in the run folder (`selfsup-run.json`), the same
MLflow run and the last checkpoint.

Storage: `run.storage_path` and `data.path` are local folders or object-store URIs; everything
here reads and writes them through `pipelines.storage`, and Ray Train gets the same string, so a
run on `s3://...` is resumed with `--resume` from any machine and working folder. On a cluster of
more than one node a local folder is refused before training (`check_cluster_storage`) unless
`run.shared_filesystem` says every node mounts it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator import tracking
from orchestrator.config import (Config, ConfigError, check_data_folder, config_name, load_config,
                                 storage_location, to_yaml)
from orchestrator.data import (LABEL_METRICS_TAG, DataCheck, DecodedData, check_data, label_metrics,
                               no_labels_note)
from orchestrator.errors import UserError
from pipelines import storage

RUN_RECORD = "selfsup-run.json"
FAULT_ENV = "SELFSUP_FAULT_KILL_AT_EPOCH"
# Test hook: SELFSUP_FAULT_KILL_BEFORE_LOGGING_EPOCH=N kills the driver (and the Train controller)
# once epoch N's checkpoint is registered, before its metrics reach MLflow.
FAULT_BEFORE_LOG_ENV = "SELFSUP_FAULT_KILL_BEFORE_LOGGING_EPOCH"
log = logging.getLogger("selfsup")


@dataclass
class PretrainResult:
    """What one pretraining run produced (also printed at the end of `selfsup pretrain`)."""

    run_name: str
    run_dir: str
    tracking_uri: str
    experiment: str
    mlflow_run_id: str
    epochs: int
    knn_top1: float | None = None
    knn_top5: float | None = None
    knn_top1_untrained: float | None = None
    linear_top1: float | None = None  # the linear probe after the last epoch (None: off, or no labels)
    linear_top5: float | None = None
    loss: float | None = None
    model_name: str | None = None
    model_version: str | None = None
    diverged: bool = False
    champion: bool = False  # the registered version is now the champion
    champion_note: str = ""  # why not, when it is not
    wall_seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def model_uri(self) -> str | None:
        return f"models:/{self.model_name}/{self.model_version}" if self.model_version else None


@dataclass
class RunPaths:
    """Where a run lives: Ray Train's run folder (checkpoints) and its record."""

    name: str
    storage_path: str
    run_dir: str  # a local folder or a URI

    @property
    def record(self) -> str:
        return storage.join(self.run_dir, RUN_RECORD)


# --- quiet Ray --------------------------------------------------------------------------------

def quiet_ray_env() -> None:
    """Environment that keeps Ray's log noise out of the terminal (set before `ray.init`).

    Also: Ray Train's controller polls its workers every `RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`
    (Train propagates it from the driver to the controller and workers), 2 s by default; reports,
    the end of training and a dead worker are noticed only then. 0.5 s cuts that wait at every
    epoch and at the end of each run (sweep trials are short), for a few cheap RPCs per second.
    """
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    for name in ("ray", "ray.train", "ray.data", "ray.tune", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def init_ray(cfg: Config) -> tuple[bool, str | None]:
    """Join the configured Ray cluster, or start a local one; returns (started_here, temp_dir).

    Local: `num_cpus` = 2 x cores (at least 4): Ray Data's read/decode tasks need logical CPUs
    next to the Train workers or a 2-core machine hangs (docs/design.md, "Data"). Token auth is set
    explicitly: off for the private local cluster (its temp dir is private to this run; the
    dashboard is not started), as the environment says for a cluster (`RAY_AUTH_MODE`).
    """
    import ray

    if ray.is_initialized():
        return False, None
    quiet_ray_env()
    _drop_benign_ray_notices()
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
    # SELFSUP_RAY_LOGS=1 shows the workers' own output (tracebacks, Ray Data progress) for debugging.
    common: dict[str, Any] = dict(log_to_driver=os.environ.get("SELFSUP_RAY_LOGS") == "1",
                                  logging_level=logging.WARNING, configure_logging=True)
    if address:
        os.environ.setdefault("RAY_AUTH_MODE", "token" if _token_exists() else "disabled")
        ray.init(address=address, **common)
        return False, None
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # A private local Ray has no preemptible nodes to watch, no dashboard and no Prometheus: without
    # Train's PreemptionWatcher actor, Train's metrics and Ray's metrics collection (the dashboard
    # agent scans every process's stats each few seconds) the Ray processes other than the training
    # worker took 6.6% of a 2-core machine during the demo's epochs instead of 8.8% (measured from
    # /proc; see the issue notes). They compete with training for the same cores.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
    os.environ.setdefault("RAY_enable_metrics_collection", "0")
    # Ray's unix-socket paths must stay under 107 bytes: a short private folder in /tmp.
    temp_dir = tempfile.mkdtemp(prefix="selfsup-ray-", dir=os.environ.get("SELFSUP_RAY_TEMP_ROOT", "/tmp"))
    ray.init(address="local", num_cpus=max(4, 2 * (os.cpu_count() or 1)), include_dashboard=False,
             _temp_dir=temp_dir, **common)
    return True, temp_dir


# Benign raylet notices that Ray prints on the driver's stdout even with log_to_driver=False.
_RAY_NOTICES = ("PYTHON worker processes have been started on node",)


def _drop_benign_ray_notices() -> None:
    """Keep the terminal to our epoch lines: drop the raylet's "N PYTHON worker processes" notice.

    On 2 cores Ray's expected worker start-up concurrency is 2, and the Train controller, 2 workers,
    the Ray Data coordinator and the read/shuffle tasks exceed it: harmless, but printed twice per
    run. Real errors (a dead actor, a failed task) still print. Wraps a private Ray function; if it
    is not there (another Ray version) nothing is filtered.
    """
    import ray._private.worker as ray_worker

    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is None or getattr(original, "_selfsup_filtered", False):
        return

    def filtered(data: dict[str, Any], ignore_prefix: bool) -> None:
        lines = [ln for ln in data.get("lines", []) if not any(n in ln for n in _RAY_NOTICES)]
        if lines:
            original({**data, "lines": lines}, ignore_prefix)

    filtered._selfsup_filtered = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = filtered


def spans_nodes(cfg: Config) -> int:
    """How many nodes this run's Train workers may land on, as far as the driver can tell: the
    alive nodes of the Ray cluster; 2 when there is one node but it lacks a GPU that the workers
    ask for (an autoscaling cluster, `cluster.yaml`, adds GPU nodes only once a job asks)."""
    import ray

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


def _token_exists() -> bool:
    return (Path.home() / ".ray" / "auth_token").is_file()


def cpus_per_worker(cfg: Config) -> float:
    """`scaling.cpus_per_worker`, or 1 when the cluster has a CPU to spare for Ray Data, else a share."""
    if cfg.scaling.cpus_per_worker is not None:
        return cfg.scaling.cpus_per_worker
    import ray

    total = float(ray.cluster_resources().get("CPU", 1.0))
    n = cfg.scaling.num_workers
    if total - n >= 1.0:
        return 1.0
    return max(0.1, round((total - 1.0) / n, 2))


# --- run names and records --------------------------------------------------------------------

def resolve_run(cfg: Config, *, stem: str, resume: bool) -> RunPaths:
    """Pick the run name and folder (see the module docstring), or raise `UserError`."""
    root = storage_location(cfg.run.storage_path)
    run_dir = numbered_dir(root, name=cfg.run.name, stem=stem, record=RUN_RECORD, resume=resume, kind="run")
    return RunPaths(storage.name(run_dir), root, run_dir)


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


def read_record(paths: RunPaths) -> dict[str, Any]:
    try:
        return json.loads(storage.read_text(paths.record))
    except (OSError, ValueError) as e:
        raise UserError(f"{paths.record}: unreadable run record ({e})") from None


def write_record(paths: RunPaths, record: dict[str, Any]) -> None:
    storage.write_text(paths.record, json.dumps(record, indent=2) + "\n")


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


# --- data -------------------------------------------------------------------------------------

def ensure_data(cfg: Config, *, quiet: bool = False) -> None:
    """Ingest `data.source` into `data.path` if it has no manifest yet (the demo's first run)."""
    if cfg.data.source is None or storage.is_file(storage.join(cfg.data.path, "manifest.json")):
        check_data_folder(cfg)
        return
    from pipelines.ingest import ingest

    if not quiet:
        print(f"selfsup: first run: ingesting {cfg.data.source!r} into {cfg.data.path} ...", flush=True)
    ingest(cfg.data.source, cfg.data.path, progress=False)
    check_data_folder(cfg)


def train_dataset(cfg: Config) -> Any:
    """The lazy Ray Data train split (shuffled, decoded, maybe augmented each epoch): the first
    `data.limit` rows, the same every epoch (`data.loader=stream`)."""
    from pipelines.stream import read_split

    return read_split(cfg.data.path, cfg.data.train_split, image_size=cfg.data.image_size,
                      augment_on=cfg.resolved_augment_on(), preset=cfg.augment_preset(),  # type: ignore[arg-type]
                      view_size=cfg.data.image_size, seed=None, limit=cfg.data.limit,
                      max_pixels=cfg.data.max_image_pixels)


def train_rows(cfg: Config) -> int:
    from pipelines.manifest import read_manifest

    rows = read_manifest(cfg.data.path).rows(cfg.data.train_split)
    return min(rows, cfg.data.limit) if cfg.data.limit is not None else rows


def dataset_name(cfg: Config) -> str:
    from pipelines.manifest import read_manifest

    return read_manifest(cfg.data.path).name


def protocol_tags(cfg: Config) -> dict[str, Any]:
    """How this run's kNN accuracy was measured, as model version tags: the registry's champion
    rule compares only versions that agree on these (`orchestrator.registry.PROTOCOL_TAGS`)."""
    from pipelines.memory import split_rows

    d, e = cfg.data, cfg.eval
    return {"dataset": dataset_name(cfg), "image_size": d.image_size, "knn_k": e.knn_k, "knn_t": e.knn_t,
            "knn_bank": split_rows(d.path, d.train_split, e.knn_train_limit),
            "knn_queries": split_rows(d.path, d.test_split, e.knn_test_limit),
            "knn_bank_split": d.train_split, "knn_query_split": d.test_split}


# --- trainer ----------------------------------------------------------------------------------

def build_trainer(cfg: Config, *, callbacks: list[Any] | None = None, mlflow_parent_run_id: str | None = None,
                  mlflow_run_id: str | None = None, progress: Any = None, data: DecodedData | None = None,
                  curves: bool = True) -> Any:
    """The `TorchTrainer` of one run; Ray must be initialised and `run.name` set.

    Args:
        cfg: resolved config with `run.name` set (the Train run folder is storage_path/name).
        callbacks: extra Ray Train callbacks (a sweep passes `TuneReportCallback()`).
        mlflow_parent_run_id: nest the MLflow run under this one (sweeps); used when a new run is created.
        mlflow_run_id: log into this existing MLflow run; None creates one (params + config logged).
        progress: a `ray.util.queue.Queue` that receives each epoch's metrics (terminal output).
        data: the decoded train split in the object store (`data.loader=memory`, from
            `orchestrator.data.put_decoded`); None streams the shards through Ray Data.
        curves: log the loss/kNN curves PNG (sweep trials don't: the sweep draws its own figure).

    Returns:
        A `ray.train.torch.TorchTrainer`; its MLflow run id is `trainer.selfsup_mlflow_run_id`.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    if cfg.run.name is None:
        raise ValueError("build_trainer needs cfg.run.name (see resolve_run)")
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    if mlflow_run_id is None:
        mlflow_run_id = create_run(cfg, uri=uri, parent_run_id=mlflow_parent_run_id)
    root = storage_location(cfg.run.storage_path)  # a URI goes to Ray unchanged
    worker_config = {**cfg.to_dict(), "_run_dir": storage.join(root, cfg.run.name),
                     "_train_rows": data.train_rows if data is not None else train_rows(cfg),
                     "_fault_kill_at_epoch": _fault_epoch(), "_data": data.for_worker() if data is not None else None,
                     "_label_metrics": label_metrics(cfg)}
    resources: dict[str, float] = {"CPU": cpus_per_worker(cfg)}
    if cfg.scaling.use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    kill_before_log = os.environ.get(FAULT_BEFORE_LOG_ENV)
    mlflow_cb = tracking.MlflowTrainCallback(uri, mlflow_run_id, progress=progress, total_epochs=cfg.optim.epochs,
                                             curves_every_s=60.0 if curves else None,
                                             fault_kill_before_logging=(int(kill_before_log), os.getpid())
                                             if kill_before_log else None)
    warm_up = tracking.controller_warm_up(mlflow_cb)
    trainer = TorchTrainer(
        train_loop_per_worker=_train_func(),
        train_loop_config=worker_config,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=root,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.checkpoints_to_keep),
            callbacks=[mlflow_cb, *([warm_up] if warm_up is not None else []), *(callbacks or [])]),
        datasets={"train": train_dataset(cfg)} if data is None else None,
    )
    trainer.selfsup_mlflow_run_id = mlflow_run_id
    return trainer


def _train_func() -> Any:
    from orchestrator.train_loop import train_func_per_worker

    return train_func_per_worker


def _fault_epoch() -> int | None:
    value = os.environ.get(FAULT_ENV)
    return int(value) if value else None


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


# --- terminal output --------------------------------------------------------------------------

def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _pct(value: Any) -> str:
    return f"{100 * float(value):5.1f}%" if value is not None and math.isfinite(float(value)) else "  n/a"


def epoch_line(m: dict[str, Any], total_epochs: int, epoch_times: list[float]) -> str:
    """One line per epoch: epoch, loss, kNN top-1, lr, views/s, epoch time, ETA."""
    epoch = int(m["epoch"])
    epoch_times.append(float(m.get("epoch_seconds", 0.0)))
    eta = sum(epoch_times) / len(epoch_times) * (total_epochs - epoch)
    width = len(str(total_epochs))
    parts = [f"epoch {epoch:{width}d}/{total_epochs}", f"loss {float(m.get('loss', math.nan)):.4f}"]
    if "knn_top1" in m:  # not for a dataset without labels
        parts.append(f"kNN top-1 {_pct(m.get('knn_top1'))}")
    if "linear_top1" in m:
        parts.append(f"linear top-1 {_pct(m['linear_top1'])}")
    if "momentum" in m:
        parts.append(f"tau {float(m['momentum']):.4f}")
    parts += [f"lr {float(m.get('lr', 0)):.2e}", f"{float(m.get('views_per_second', 0)):,.0f} views/s",
              f"{float(m.get('epoch_seconds', 0)):.1f}s", f"ETA {_duration(eta)}"]
    return "  ".join(parts)


class _Printer:
    """Drains the progress queue in a thread and prints one line per epoch."""

    def __init__(self, queue: Any, total_epochs: int) -> None:
        self.queue, self.total = queue, total_epochs
        self.times: list[float] = []
        self.untrained_shown = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _show(self, m: dict[str, Any]) -> None:
        if not self.untrained_shown and m.get("knn_top1_untrained") is not None:
            print(f"  untrained encoder: kNN top-1 {_pct(m['knn_top1_untrained']).strip()}", flush=True)
            self.untrained_shown = True
        print("  " + epoch_line(m, self.total, self.times), flush=True)

    def _run(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                self._show(self.queue.get(block=True, timeout=0.5))
            except Empty:
                continue
            except Exception:  # the queue actor went away (Ray shut down)
                return

    def stop(self) -> None:
        from ray.util.queue import Empty

        self._stop.set()
        self._thread.join(timeout=5)
        try:
            while True:
                self._show(self.queue.get_nowait())
        except (Empty, Exception):
            pass
        try:
            self.queue.shutdown()
        except Exception:
            pass


# --- the run ----------------------------------------------------------------------------------

def run_pretrain(cfg: Config, *, resume: bool = False, stem: str = "run", callbacks: list[Any] | None = None,
                 mlflow_parent_run_id: str | None = None, mlflow_run_id: str | None = None, close_run: bool = True,
                 progress: bool = False, data: DecodedData | None = None, curves: bool = True) -> PretrainResult:
    """Pretrain one encoder on Ray Train, track it in MLflow and register it.

    Args:
        cfg: a validated config (`load_config`). `run.name` None: an automatic `<stem>-<n>` name.
        resume: continue the run of that name from its last checkpoint (its recorded config wins;
            a differing config is a `UserError`).
        stem: prefix of automatic run names (the config file's stem).
        callbacks: extra Ray Train callbacks, e.g. Tune's `TuneReportCallback()` in a sweep trial.
        mlflow_parent_run_id: nest this run's MLflow run under a sweep's parent run.
        mlflow_run_id: log into this MLflow run, which the caller made with `create_run` (a sweep's
            driver makes its trials' runs: a trial process then never imports MLflow before its
            training starts); None makes the run here. Ignored on `resume` (the record has it).
        close_run: mark the MLflow run FINISHED / FAILED at the end; False leaves that to the
            caller (a sweep's driver, which knows when Tune stopped a trial).
        progress: print one line per epoch on stdout.
        data: decoded data already in the object store (a sweep's, shared by its trials); used when
            this run's loader is memory and its data fields match, else decoded here.
        curves: log the curves PNG (see `build_trainer`).

    Returns:
        The `PretrainResult` (kNN top-1, registered model version, ...). A diverged run (NaN loss)
        returns with `diverged=True` and registers nothing.

    Raises:
        UserError: bad run name / resume request, missing data.
        ray.train.TrainingFailedError: the workers failed more than `run.max_failures` times.
    """
    from orchestrator.timeline import mark

    start = time.perf_counter()
    cfg = absolute_paths(cfg)
    paths = resolve_run(cfg, stem=stem, resume=resume)
    ensure_data(cfg, quiet=not progress)
    checked = check_data(cfg)  # empty or too-small splits, checksums, labels: before Ray starts
    cfg = Config.from_dict({**cfg.to_dict(), "run": {**cfg.to_dict()["run"], "name": paths.name}})
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    if resume:
        record = read_record(paths)
        recorded = Config.from_dict(record["config"], source=str(paths.record))
        diff = config_differences(recorded, cfg)
        if diff:
            raise UserError(f"--resume continues run {paths.name!r} with its recorded config; these differ: "
                            f"{', '.join(diff)} (start a new run instead)")
        if record.get("status") == "finished":
            raise UserError(f"run {paths.name!r} has finished already (model {record.get('model_uri')}); "
                            "nothing to resume")
        run_id = str(record["mlflow_run_id"])
        uri = record.get("tracking_uri", uri)

    started, temp_dir = init_ray(cfg)
    printer = None
    try:
        from orchestrator.data import resolve_loader

        check_cluster_storage(cfg, {"run.storage_path": cfg.run.storage_path},
                              streams_data=resolve_loader(cfg) == "stream")
        decoded = _decoded_for(cfg, data)  # refuses data.loader=memory that cannot fit before anything is written
        if not resume:
            run_id = mlflow_run_id or create_run(cfg, uri=uri, parent_run_id=mlflow_parent_run_id)
            record = {"name": paths.name, "status": "running", "mlflow_run_id": run_id, "tracking_uri": uri,
                      "experiment": cfg.tracking.experiment, "config": cfg.to_dict()}
            write_record(paths, record)
        if checked.label_note:
            log.info("%s", checked.label_note)
        cfg.tracking.uri = uri
        queue = None
        if progress:
            from ray.util.queue import Queue

            queue = Queue(actor_options={"num_cpus": 0})
            printer = _Printer(queue, cfg.optim.epochs)
            printer.start()
            _print_header(cfg, paths, resume, decoded, checked)
        trainer = build_trainer(cfg, callbacks=callbacks, mlflow_run_id=run_id, progress=queue, data=decoded,
                                curves=curves)
        mark("fit_start", run=paths.name, mlflow_imported="mlflow" in sys.modules)
        try:
            result = trainer.fit()
            mark("fit_end", run=paths.name)
        except BaseException:
            if close_run:
                tracking.finish_run(uri, run_id, "FAILED")
            raise
        finally:
            if printer is not None:
                printer.stop()
        out = _finish(cfg, paths, record, result, uri, run_id, start, close_run=close_run, curves=curves)
        mark("run_end", run=paths.name)
    finally:
        if started:
            import ray

            ray.shutdown()
            if temp_dir:
                shutil.rmtree(temp_dir, ignore_errors=True)
    return out


def _decoded_for(cfg: Config, data: DecodedData | None) -> DecodedData | None:
    """The decoded data this run trains from (`data.loader` memory), or None to stream (Ray must be up)."""
    from orchestrator.data import matches, put_decoded, resolve_loader

    if resolve_loader(cfg) != "memory":
        return None
    return data if matches(data, cfg) else put_decoded(cfg)


def _print_header(cfg: Config, paths: RunPaths, resume: bool, decoded: DecodedData | None,
                  checked: DataCheck | None = None) -> None:
    s = cfg.scaling
    where = f"{s.num_workers} worker{'s' if s.num_workers > 1 else ''} ({'GPU' if s.use_gpu else 'CPU'})"
    how = (f"decoded once into memory, {decoded.nbytes / 1e6:,.0f} MB" if decoded is not None
           else "streamed through Ray Data")
    print(f"selfsup pretrain: {'resuming' if resume else 'run'} {paths.name}: {cfg.method.name}, "
          f"{cfg.model.encoder}, {where}, {cfg.optim.epochs} epochs, batch {cfg.optim.batch_size}, "
          f"data {cfg.data.path} ({train_rows(cfg):,} training images, {how})", flush=True)
    if checked is not None and checked.label_note:
        print(f"  {checked.label_note}", flush=True)


def _finish(cfg: Config, paths: RunPaths, record: dict[str, Any], result: Any, uri: str, run_id: str,
            start: float, *, close_run: bool = True, curves: bool = True) -> PretrainResult:
    """Read the last checkpoint, register the encoder, close the MLflow run (unless the caller
    closes it: `close_run` False) and the record."""
    from orchestrator.train_loop import STATE_FILE, build_model, encoder_state, load_state

    last = dict(result.metrics or {})
    state = None
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as d:
            state = load_state(Path(d) / STATE_FILE)
        metrics = {**state["metrics"], **{k: v for k, v in last.items() if k not in state["metrics"]}}
        # A command killed after the last checkpoint but before its epoch reached MLflow: --resume
        # runs no epoch, so nothing reports it; log it (and any other missing one) from here.
        if tracking.backfill_epochs(uri, run_id, list(state.get("history", []))) and curves:
            try:
                tracking.log_curves(tracking.client(uri), run_id)
            except Exception:  # a plot must never end a run
                pass
    else:
        metrics = last
    out = PretrainResult(run_name=paths.name, run_dir=str(paths.run_dir), tracking_uri=uri,
                         experiment=cfg.tracking.experiment, mlflow_run_id=run_id,
                         epochs=int(metrics.get("epoch", 0)), knn_top1=_f(metrics.get("knn_top1")),
                         knn_top5=_f(metrics.get("knn_top5")), knn_top1_untrained=_f(metrics.get("knn_top1_untrained")),
                         linear_top1=_f(metrics.get("linear_top1")), linear_top5=_f(metrics.get("linear_top5")),
                         loss=_f(metrics.get("loss")), diverged=bool(last.get("diverged")),
                         metrics={k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
    if out.diverged:
        if close_run:
            mark_diverged(uri, run_id)
        write_record(paths, {**record, "status": "diverged"})
        out.wall_seconds = time.perf_counter() - start
        return out
    if out.knn_top1 is None:
        # train_loop.probe_metrics scores nothing when images carry no label (-1): say so here,
        # once, where the user looks, and on the run (the driver writes to it after training).
        print(f"selfsup pretrain: kNN and linear probes skipped: the images of {cfg.data.path} carry no labels",
              file=sys.stderr, flush=True)
        tracking.client(uri).set_tag(run_id, "probes", "skipped: the images carry no labels")
    if cfg.tracking.register and state is not None:
        model = build_model(cfg)
        model.encoder.load_state_dict(encoder_state(state["model"]))
        name = cfg.tracking.model_name or f"{dataset_name(cfg)}-encoder"
        mv = tracking.register_encoder(
            model.encoder, tracking_uri=uri, run_id=run_id, model_name=name, image_size=cfg.data.image_size,
            tags={"method": cfg.method.name, "encoder": cfg.model.encoder, "run_name": paths.name,
                  "epochs": out.epochs, **protocol_tags(cfg),
                  # no labels: no kNN tags (a "None" tag would read as a metric)
                  **({"knn_top1": out.knn_top1, "knn_top1_untrained": out.knn_top1_untrained}
                     if out.knn_top1 is not None else {LABEL_METRICS_TAG: "off: no labels"}),
                  **({"linear_top1": out.linear_top1, "linear_top5": out.linear_top5}
                     if out.linear_top1 is not None else {})},
            summary=version_summary(cfg, out))
        out.model_name, out.model_version = name, str(mv.version)
        promotion = _promote(uri, name, out.model_version)
        out.champion, out.champion_note = promotion.moved, promotion.reason
    if close_run:
        tracking.finish_run(uri, run_id, "FINISHED")
    write_record(paths, {**record, "status": "finished", "model_uri": out.model_uri,
                         "knn_top1": out.knn_top1, "linear_top1": out.linear_top1})
    out.wall_seconds = time.perf_counter() - start
    return out


def version_summary(cfg: Config, r: PretrainResult) -> str:
    """What a registered version is, for its description: method, data, epochs, kNN and linear top-1."""
    linear = (f"linear top-1 {_pct(r.linear_top1).strip()} (top-5 {_pct(r.linear_top5).strip()})"
              if r.linear_top1 is not None else "no linear probe")
    return (f"{cfg.method.name} pretraining of a {cfg.model.encoder} encoder on {dataset_name(cfg)} "
            f"({cfg.data.train_split} split, {cfg.data.image_size}x{cfg.data.image_size}) for {r.epochs} epochs "
            f"(run {r.run_name}). On the {cfg.data.test_split} split: kNN top-1 {_pct(r.knn_top1).strip()} "
            f"(k={cfg.eval.knn_k}), {linear}.")


def mark_diverged(uri: str, run_id: str) -> None:
    """A diverged run (NaN/inf loss): tag `diverged`, status FAILED."""
    tracking.client(uri).set_tag(run_id, "diverged", "true")
    tracking.finish_run(uri, run_id, "FAILED")


def _promote(uri: str, name: str, version: str) -> Any:
    """Point `champion` at this version if its knn_top1 beats the current champion's, measured
    alike; returns the `registry.Promotion` (why not, when it did not move)."""
    from orchestrator.registry import promote_if_better

    return promote_if_better(tracking.client(uri), name, version, metric="knn_top1")


def _f(v: Any) -> float | None:
    return None if v is None else float(v)


def _print_summary(r: PretrainResult) -> None:
    if r.diverged:
        print(f"selfsup pretrain: run {r.run_name} diverged (loss {r.loss}) after epoch {r.epochs}; "
              "nothing registered. Try a lower optim.lr.")
        return
    gain = ""
    if r.knn_top1 is not None and r.knn_top1_untrained is not None:
        gain = f" (untrained encoder: {_pct(r.knn_top1_untrained).strip()})"
    knn = f"kNN top-1 {_pct(r.knn_top1).strip()}{gain}" if r.knn_top1 is not None else \
        f"loss {r.loss:.4f} (no labels: no kNN)" if r.loss is not None else "no labels: no kNN"
    linear = f", linear top-1 {_pct(r.linear_top1).strip()}" if r.linear_top1 is not None else ""
    print(f"done in {_duration(r.wall_seconds)}: {knn}{linear} after {r.epochs} epochs")
    print(f"  MLflow run:   {r.mlflow_run_id} (experiment {r.experiment!r}, run {r.run_name!r}) in {r.tracking_uri}")
    if r.tracking_uri.startswith("sqlite:"):
        print(f"                view it: mlflow ui --backend-store-uri {r.tracking_uri}")
    if r.model_uri:
        print(f"  registered:   {r.model_uri}  ->  selfsup registry embed {r.model_uri} IMAGES OUT.parquet")
        print(f"  champion:     {'now this version' if r.champion else r.champion_note}")
    print(f"  checkpoints:  {r.run_dir}  (continue an interrupted run with --resume)")


def main(config: str | None = None, overrides: list[str] | None = None, resume: bool = False) -> int:
    """`selfsup pretrain`: returns the exit code (UserError propagates to the CLI: exit 2)."""
    cfg = load_config(config, overrides or [], check_data=None)  # a data.source is ingested first
    try:
        result = run_pretrain(cfg, resume=resume, stem=config_name(config), progress=True)
    except (UserError, ConfigError):
        raise
    except Exception as e:
        if type(e).__name__ in ("TrainingFailedError", "WorkerGroupError", "ControllerError"):
            lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
            print(f"selfsup pretrain: training failed: {lines[-1] if lines else type(e).__name__}", file=sys.stderr)
            print("  (rerun with SELFSUP_RAY_LOGS=1 to see the workers' own output)", file=sys.stderr)
            return 1
        raise
    _print_summary(result)
    return 0 if not result.diverged else 1
