"""The driver of one pretraining run: `selfsup pretrain [--config FILE] [--set k=v ...] [--resume]`.

Thin by design (Ray's `torch_fashion_mnist_example.py` pattern): resolve the config, make sure the
data is there, open the MLflow run, start (or join) Ray, build a `TorchTrainer` around
`orchestrator.epoch_loop.train_func_per_worker`, fit, register the encoder, print where it all went.

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

import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator import tracking
from orchestrator.cluster import check_cluster_storage, cpus_per_worker, ray_session
from orchestrator.config import Config, ConfigError, absolute_paths, config_name, load_config, storage_location
from orchestrator.data import (LABEL_METRICS_TAG, DataCheck, DecodedData, check_data, dataset_name, ensure_data,
                               label_metrics, matches, put_decoded, resolve_loader, train_dataset, train_rows)
from orchestrator.errors import UserError, disk_full
from orchestrator.ray_compat import controller_warm_up, fresh_elastic_scaling, remove_unregistered_checkpoints
from orchestrator.run_folders import (RUN_RECORD, RunPaths, config_differences, numbered_dir, read_json, reserve_dir,
                                      write_json)
from orchestrator.run_output import EpochPrinter, PretrainResult, pct, print_header, print_summary
from orchestrator.tracking import create_run, mark_diverged
from orchestrator.timeline import mark
from pipelines import storage

FAULT_ENV = "SELFSUP_FAULT_KILL_AT_EPOCH"
# Test hook: SELFSUP_FAULT_KILL_BEFORE_LOGGING_EPOCH=N kills the driver (and the Train controller)
# once epoch N's checkpoint is registered, before its metrics reach MLflow.
FAULT_BEFORE_LOG_ENV = "SELFSUP_FAULT_KILL_BEFORE_LOGGING_EPOCH"
log = logging.getLogger("selfsup")


# --- run names and records --------------------------------------------------------------------

def resolve_run(cfg: Config, *, stem: str, resume: bool, reserve: bool = True) -> RunPaths:
    """Pick the run name and folder (see the module docstring) and reserve it (`run_folders.reserve_dir`;
    not `reserve`: a sweep trial, whose sweep holds the reservation), or raise `UserError`."""
    root = storage_location(cfg.run.storage_path)
    if not reserve:
        run_dir = numbered_dir(root, name=cfg.run.name, stem=stem, record=RUN_RECORD, resume=resume, kind="run")
        return RunPaths(storage.name(run_dir), root, run_dir)
    run_dir, lease = reserve_dir(root, name=cfg.run.name, stem=stem, record=RUN_RECORD, resume=resume, kind="run")
    return RunPaths(storage.name(run_dir), root, run_dir, lease)


def read_record(paths: RunPaths) -> dict[str, Any]:
    try:
        record = read_json(paths.record)
    except (OSError, ValueError) as e:
        raise UserError(f"{paths.record}: unreadable run record ({e})") from None
    if record is None:
        raise UserError(f"{paths.record}: no run record")
    return record


def write_record(paths: RunPaths, record: dict[str, Any]) -> None:
    write_json(paths.record, record)


# --- trainer ----------------------------------------------------------------------------------

def build_trainer(cfg: Config, *, mlflow_run_id: str, callbacks: list[Any] | None = None, progress: Any = None,
                  data: DecodedData | None = None, curves: bool = True) -> Any:
    """The `TorchTrainer` of one run; Ray must be initialised and `run.name` set.

    Args:
        cfg: resolved config with `run.name` set (the Train run folder is storage_path/name).
        mlflow_run_id: the run's MLflow run (`tracking.create_run`), which its epochs are logged to.
        callbacks: extra Ray Train callbacks (a sweep passes `TuneReportCallback()`).
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
    warm_up = controller_warm_up(mlflow_cb)
    if cfg.scaling.elastic:
        fresh_elastic_scaling()
    trainer = TorchTrainer(
        train_loop_per_worker=_train_func(),
        train_loop_config=worker_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.for_ray(), use_gpu=cfg.scaling.use_gpu, resources_per_worker=resources,
            elastic_resize_monitor_interval_s=cfg.scaling.elastic_resize_monitor_interval_s),
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
    # Imported here, not at the top: torch stays out of `selfsup`'s start-up until a run trains.
    from orchestrator.epoch_loop import train_func_per_worker

    return train_func_per_worker


def _fault_epoch() -> int | None:
    value = os.environ.get(FAULT_ENV)
    return int(value) if value else None



# --- the run ----------------------------------------------------------------------------------

def run_pretrain(cfg: Config, *, resume: bool = False, stem: str = "run", callbacks: list[Any] | None = None,
                 progress: bool = False) -> PretrainResult:
    """Pretrain one encoder on Ray Train, track it in MLflow and register it.

    Args:
        cfg: a validated config (`load_config`). `run.name` None: an automatic `<stem>-<n>` name.
        resume: continue the run of that name from its last checkpoint (its recorded config wins;
            a differing config is a `UserError`).
        stem: prefix of automatic run names (the config file's stem).
        callbacks: extra Ray Train callbacks (a benchmark's probes).
        progress: print one line per epoch on stdout.

    Returns:
        The `PretrainResult` (kNN top-1, registered model version, ...). A diverged run (NaN loss)
        returns with `diverged=True` and registers nothing.

    Raises:
        UserError: bad run name / resume request, missing data.
        ray.train.TrainingFailedError: the workers failed more than `run.max_failures` times.
    """
    return _run(cfg, resume=resume, stem=stem, callbacks=callbacks, progress=progress, trial=None)


@dataclass(frozen=True)
class SweepTrial:
    """What a sweep trial's Train run (`run_trial`) takes from its sweep."""

    parent_run_id: str  # the sweep's MLflow run
    # The trial's MLflow run, made by the sweep's driver (which also ends it, knowing when Tune
    # stopped the trial); None: made here under `parent_run_id`, and ended here.
    mlflow_run_id: str | None
    data: DecodedData | None  # the sweep's decoded data, used when this trial's data fields match


def run_trial(cfg: Config, trial: SweepTrial, *, resume: bool, callbacks: list[Any]) -> PretrainResult:
    """A multi-worker sweep trial: `run_pretrain`'s lifecycle, with what differs for a trial.

    No lease on the run's name (its sweep's lease covers it, and Tune may restart the trial on
    another node), no curves PNG (the sweep draws its own figure), no epoch lines, and its MLflow
    run the one the sweep's driver made (`SweepTrial`). `callbacks` carry its reports to Tune.
    """
    return _run(cfg, resume=resume, stem="trial", callbacks=callbacks, progress=False, trial=trial)


def _run(cfg: Config, *, resume: bool, stem: str, callbacks: list[Any] | None, progress: bool,
         trial: SweepTrial | None) -> PretrainResult:
    """The one run lifecycle of `run_pretrain` and `run_trial`."""
    start = time.perf_counter()
    cfg = absolute_paths(cfg)
    if resume:  # nothing to continue: said first, before the data is looked at
        resolve_run(cfg, stem=stem, resume=True, reserve=False)
    # The data before the name's lease: a command refused for its data writes nothing.
    ensure_data(cfg, quiet=not progress)
    checked = check_data(cfg)  # empty or too-small splits, checksums, labels: before Ray starts
    paths = resolve_run(cfg, stem=stem, resume=resume, reserve=trial is None)
    try:
        return _run_reserved(cfg, paths, start, checked, resume=resume, callbacks=callbacks, progress=progress,
                             trial=trial)
    finally:
        if paths.lease is not None:
            paths.lease.release()


def _run_reserved(cfg: Config, paths: RunPaths, start: float, checked: DataCheck, *, resume: bool,
                  callbacks: list[Any] | None, progress: bool, trial: SweepTrial | None) -> PretrainResult:
    """`_run` once the data is checked and the run's name reserved."""
    close_run = trial is None or trial.mlflow_run_id is None
    curves = trial is None
    cfg = Config.from_dict({**cfg.to_dict(), "run": {**cfg.to_dict()["run"], "name": paths.name}})
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    # The tracking URI always comes from this command's config and environment, never from the
    # record: a record sits where any job can write, and the MLflow login goes to this URI.
    record = _resumed_record(cfg, paths, uri) if resume else None
    with ray_session(cfg):
        check_cluster_storage(cfg, {"run.storage_path": cfg.run.storage_path},
                              streams_data=resolve_loader(cfg) == "stream")
        # data.loader=memory that cannot fit is refused before anything is written
        decoded = _decoded_for(cfg, trial.data if trial else None)
        if record is None:
            run_id = ((trial.mlflow_run_id if trial else None)
                      or create_run(cfg, uri=uri, parent_run_id=trial.parent_run_id if trial else None))
            record = {"name": paths.name, "status": "running", "mlflow_run_id": run_id, "tracking_uri": uri,
                      "experiment": cfg.tracking.experiment, "config": cfg.to_dict()}
            write_record(paths, record)
        run_id = str(record["mlflow_run_id"])
        if checked.label_note:
            log.info("%s", checked.label_note)
        cfg.tracking.uri = uri
        if progress:
            print_header(cfg, paths, resume, decoded, checked)
        result = _fit(cfg, paths, run_id, uri, callbacks=callbacks, decoded=decoded, progress=progress,
                      close_run=close_run, curves=curves)
        out = _finish(cfg, paths, record, result, uri, run_id, start, close_run=close_run, curves=curves)
        mark("run_end", run=paths.name)
    return out


def _resumed_record(cfg: Config, paths: RunPaths, uri: str) -> dict[str, Any]:
    """The record of the run `--resume` continues, or `UserError` when it cannot be continued
    (also when it names another MLflow store than `uri`, this command's)."""
    record = read_record(paths)
    recorded_uri = record.get("tracking_uri")
    if recorded_uri is not None and recorded_uri != uri:
        raise UserError(f"{paths.record}: tracking_uri = {recorded_uri!r}, but this command tracks to {uri!r}; "
                        "--resume continues a run in the MLflow store it started in: set tracking.uri or "
                        "MLFLOW_TRACKING_URI to it (a record never chooses where credentials go)")
    recorded = Config.from_dict(record["config"], source=str(paths.record))
    diff = config_differences(recorded, cfg)
    if diff:
        raise UserError(f"--resume continues run {paths.name!r} with its recorded config; these differ: "
                        f"{', '.join(diff)} (start a new run instead)")
    if record.get("status") == "finished":
        raise UserError(f"run {paths.name!r} has finished already (model {record.get('model_uri')}); "
                        "nothing to resume")
    return record


def _fit(cfg: Config, paths: RunPaths, run_id: str, uri: str, *, callbacks: list[Any] | None,
         decoded: DecodedData | None, progress: bool, close_run: bool, curves: bool) -> Any:
    """Build the trainer and fit it; the MLflow run ends FAILED if fitting raises (and `close_run`)."""
    printer = None
    queue = None
    if progress:
        from ray.util.queue import Queue

        queue = Queue(actor_options={"num_cpus": 0})
        printer = EpochPrinter(queue, cfg.optim.epochs)
        printer.start()
    trainer = build_trainer(cfg, callbacks=callbacks, mlflow_run_id=run_id, progress=queue, data=decoded,
                            curves=curves)
    mark("fit_start", run=paths.name, mlflow_imported="mlflow" in sys.modules)
    try:
        result = trainer.fit()
        mark("fit_end", run=paths.name)
        return result
    except BaseException as e:
        if close_run:
            tracking.finish_run(uri, run_id, "FAILED")
        if disk_full(e):
            # Restarting cannot help (Ray Train already tried `run.max_failures` times): one line,
            # and the part-written checkpoints go, so that freeing space is all --resume needs.
            remove_unregistered_checkpoints(paths.run_dir)
            raise UserError(f"{paths.run_dir}: no space left on device for the next checkpoint; the run's earlier "
                            "checkpoints are kept: free space there, then continue with --resume") from None
        raise
    finally:
        if printer is not None:
            printer.stop()


def _decoded_for(cfg: Config, data: DecodedData | None) -> DecodedData | None:
    """The decoded data this run trains from (`data.loader` memory), or None to stream (Ray must be up)."""
    if resolve_loader(cfg) != "memory":
        return None
    return data if matches(data, cfg) else put_decoded(cfg)


def _finish(cfg: Config, paths: RunPaths, record: dict[str, Any], result: Any, uri: str, run_id: str,
            start: float, *, close_run: bool = True, curves: bool = True) -> PretrainResult:
    """Read the last checkpoint, register the encoder, close the MLflow run (unless the caller
    closes it: `close_run` False) and the record."""
    state, out = _read_result(cfg, paths, result, uri, run_id, curves=curves)
    if state is not None:
        _log_restarts(uri, run_id, list(state.get("history", [])), out)
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
        _register(cfg, state, out, uri, run_id)
        # Recorded at once (registration is idempotent per run anyway: `registry.register`).
        write_record(paths, {**record, "model_uri": out.model_uri})
    if close_run:
        tracking.finish_run(uri, run_id, "FINISHED")
    write_record(paths, {**record, "status": "finished", "model_uri": out.model_uri,
                         "knn_top1": out.knn_top1, "linear_top1": out.linear_top1})
    out.wall_seconds = time.perf_counter() - start
    return out


def _read_result(cfg: Config, paths: RunPaths, result: Any, uri: str, run_id: str, *,
                 curves: bool) -> tuple[dict[str, Any] | None, PretrainResult]:
    """The last checkpoint's state (None without one) and the run's `PretrainResult` from it."""
    from orchestrator.training import STATE_FILE, load_state  # torch: only once a run has trained

    last = dict(result.metrics or {})
    state = None
    metrics = last
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
    out = PretrainResult(run_name=paths.name, run_dir=str(paths.run_dir), tracking_uri=uri,
                         experiment=cfg.tracking.experiment, mlflow_run_id=run_id,
                         epochs=int(metrics.get("epoch", 0)), knn_top1=_f(metrics.get("knn_top1")),
                         knn_top5=_f(metrics.get("knn_top5")), knn_top1_untrained=_f(metrics.get("knn_top1_untrained")),
                         linear_top1=_f(metrics.get("linear_top1")), linear_top5=_f(metrics.get("linear_top5")),
                         loss=_f(metrics.get("loss")), diverged=bool(last.get("diverged")),
                         metrics={k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
    return state, out


def _log_restarts(uri: str, run_id: str, history: list[dict[str, Any]], out: PretrainResult) -> None:
    """The run's summary of its worker-group restarts (`orchestrator.elastic`): metrics `resizes`,
    `restarts`, `resize_seconds_lost` and a tag `resizes` that lists each with the time it lost."""
    from orchestrator.elastic import describe, worker_group_restarts

    restarts = worker_group_restarts(history)
    resizes = [r for r in restarts if r.resize]
    c = tracking.client(uri)
    for key, value in (("resizes", len(resizes)), ("restarts", len(restarts)),
                       ("resize_seconds_lost", sum(r.seconds_lost for r in resizes))):
        c.log_metric(run_id, key, float(value))
    c.set_tag(run_id, "resizes", describe(restarts))
    out.restarts = describe(restarts) if restarts else ""


def _register(cfg: Config, state: dict[str, Any], out: PretrainResult, uri: str, run_id: str) -> None:
    """Register the run's encoder and maybe make it the champion (fills `out`)."""
    from orchestrator.registry.register import default_model_name, register_run_encoder

    name = default_model_name(cfg, dataset_name(cfg))
    tags = {"method": cfg.method.name, "encoder": cfg.model.encoder, "run_name": out.run_name, "epochs": out.epochs,
            # no labels: no kNN tags (a "None" tag would read as a metric)
            **({"knn_top1": out.knn_top1, "knn_top1_untrained": out.knn_top1_untrained}
               if out.knn_top1 is not None else {LABEL_METRICS_TAG: "off: no labels"}),
            **({"linear_top1": out.linear_top1, "linear_top5": out.linear_top5}
               if out.linear_top1 is not None else {})}
    reg = register_run_encoder(cfg, state, uri=uri, run_id=run_id, model_name=name, tags=tags,
                               summary=version_summary(cfg, out))
    out.model_name, out.model_version = name, reg.version
    out.champion, out.champion_note = reg.promotion.moved, reg.promotion.reason


def version_summary(cfg: Config, r: PretrainResult) -> str:
    """What a registered version is, for its description: method, data, epochs, kNN and linear top-1."""
    linear = (f"linear top-1 {pct(r.linear_top1).strip()} (top-5 {pct(r.linear_top5).strip()})"
              if r.linear_top1 is not None else "no linear probe")
    return (f"{cfg.method.name} pretraining of a {cfg.model.encoder} encoder on {dataset_name(cfg)} "
            f"({cfg.data.train_split} split, {cfg.data.image_size}x{cfg.data.image_size}) for {r.epochs} epochs "
            f"(run {r.run_name}). On the {cfg.data.test_split} split: kNN top-1 {pct(r.knn_top1).strip()} "
            f"(k={cfg.eval.knn_k}), {linear}.")


def _f(v: Any) -> float | None:
    return None if v is None else float(v)


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
    print_summary(result)
    return 0 if not result.diverged else 1
