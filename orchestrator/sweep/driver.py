"""The sweep driver: `run_sweep`, and the Tune callback through which it owns every trial's MLflow run.

MLflow has one writer per run. The driver makes each trial's child run as Tune starts the trial
(one after another in one process, so concurrent trials never race on a SQLite store, and a trial
process needs no MLflow before it trains) and closes it as the trial ends. In between, the epochs
are logged by the trial's Train controller (`tracking.MlflowTrainCallback`) for a Train-run trial,
and by this callback, from Tune's results, for an in-process trial.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any

import yaml
from ray import tune
from ray.tune.result import AUTO_RESULT_KEYS

from orchestrator import tracking
from orchestrator.cluster import check_cluster_storage, ray_session
from orchestrator.config import Config, storage_location
from orchestrator.data import check_data, dataset_name, ensure_data, put_decoded, resolve_loader
from orchestrator.errors import UserError
from orchestrator.ray_compat import release_placement_groups, sign_after_tune_saves, sweep_tune_env
from orchestrator.run_folders import config_differences, read_json
from orchestrator.tracking import create_run, mark_diverged
from orchestrator.sweep.finish import finish_sweep, print_summary
from orchestrator.sweep.section import parse_sweep_section
from orchestrator.sweep.records import (absolute_base, driver_run_id, placement_group_dir, resolve_sweep_dir,
                                        save_run_id, train_record_file, trials_dir_of, write_sweep_record)
from orchestrator.sweep.results import RUN_STATUS, SweepResult, trial_status_of
from orchestrator.sweep.space import build_scheduler, build_search, describe, n_grid_trials
from orchestrator.sweep.spec import SWEEP_RECORD, Sweep
from orchestrator.sweep.state_signing import StateSigner, verify_state
from orchestrator.sweep.trials import (IN_PROCESS, resolved_trial_kind, run_train_trial, run_trial_in_process,
                                       trial_config, trial_resources)
from orchestrator.timeline import mark
from pipelines import storage

# Keys of a Tune result that Tune adds itself: not the trial's metrics.
_TUNE_KEYS = {*AUTO_RESULT_KEYS, "trial_id", "experiment_tag", "done", "should_checkpoint"}


class SweepDriverCallback(tune.Callback):
    """In the driver: makes each trial's MLflow run as it starts and closes it as it ends, logs the
    epochs of in-process trials, frees an ended Train-run trial's placement group, prints a line per
    trial start and end. Tune calls `on_trial_start` before it schedules the trial function, so the
    run id is there when the trial runs."""

    def __init__(self, *, trials_dir: str, metric: str, verbose: bool, base: dict[str, Any], uri: str,
                 parent_run_id: str, epochs: int, kind: str) -> None:
        self.trials_dir, self.metric, self.verbose, self.base = trials_dir, metric, verbose, base
        self.uri, self.parent_run_id, self.epochs, self.kind = uri, parent_run_id, epochs, kind
        self._client: Any = None
        # trial id -> (its MLflow run id, the epochs that run holds), for in-process trials
        self._runs: dict[str, tuple[str, set[int]]] = {}

    def __getstate__(self) -> dict[str, Any]:  # Tune saves its callbacks with the experiment (--resume)
        return {**self.__dict__, "_client": None, "_runs": {}}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        over = (trial.config or {}).get("overrides") or {}
        # A trial restarted by --resume keeps its run: the id file, or its Train run's record.
        if (driver_run_id(self.trials_dir, trial.trial_id) is None
                and not storage.is_file(train_record_file(self.trials_dir, trial.trial_id))):
            cfg = trial_config(self.base, dict(over), trial.trial_id, self.trials_dir)
            # A driver killed between making the run and saving its id made it already: reuse it,
            # so a resumed sweep never gives a trial a second run.
            run_id = self._made_before(str(cfg.run.name)) or create_run(cfg, uri=self.uri,
                                                                         parent_run_id=self.parent_run_id)
            save_run_id(self.trials_dir, trial.trial_id, run_id)
        if self.verbose:
            print(f"  trial {trial.trial_id} started: {describe(over)}", flush=True)

    def _made_before(self, run_name: str) -> str | None:
        """The id of this sweep's child run named `run_name`, if the driver made one already."""
        if self._client is None:
            self._client = tracking.client(self.uri)
        exp = self._client.get_run(self.parent_run_id).info.experiment_id
        found = self._client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{self.parent_run_id}' "
                                                              f"and tags.mlflow.runName = '{run_name}'", max_results=1)
        return str(found[0].info.run_id) if found else None

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict[str, Any], **info: Any) -> None:
        if self.kind != IN_PROCESS or "epoch" not in result:
            return
        if trial.trial_id not in self._runs:
            run_id = driver_run_id(self.trials_dir, trial.trial_id)
            if run_id is None:
                return
            if self._client is None:
                self._client = tracking.client(self.uri)
            self._runs[trial.trial_id] = (run_id, tracking.logged_epochs(self._client, run_id))
        run_id, logged = self._runs[trial.trial_id]
        report = {k: v for k, v in result.items() if k not in _TUNE_KEYS}
        if report.get("diverged"):  # the metric a diverged epoch reports (0) is for Tune, not MLflow
            report = {k: report[k] for k in ("epoch", "loss", "diverged") if k in report}
        else:
            report.pop("diverged", None)
        if tracking.log_report(self._client, run_id, report, logged):
            mark("epoch_logged", run=f"trial-{trial.trial_id}", epoch=int(report["epoch"]))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._release(trial)
        m = trial.last_result or {}
        run_id = driver_run_id(self.trials_dir, trial.trial_id)
        if run_id is not None:
            status = trial_status_of(m, self.epochs)  # as the sweep's table will say (ASHA-stopped: KILLED)
            if status == "diverged":
                mark_diverged(self.uri, run_id)
            else:
                tracking.finish_run(self.uri, run_id, RUN_STATUS[status])
        if self.verbose:
            what = "diverged" if m.get("diverged") else f"{self.metric} {float(m.get(self.metric, math.nan)):.4f}"
            print(f"  trial {trial.trial_id} ended after epoch {m.get('epoch', '?')}: {what}", flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._release(trial)
        run_id = driver_run_id(self.trials_dir, trial.trial_id)
        if run_id is not None:
            tracking.finish_run(self.uri, run_id, RUN_STATUS["error"])
        if self.verbose:
            print(f"  trial {trial.trial_id} failed (see {trial.local_path})", flush=True)

    def _release(self, trial: Any) -> None:
        if self.kind != IN_PROCESS:
            release_placement_groups(placement_group_dir(self.trials_dir, trial.trial_id))


def run_sweep(s: Sweep, *, resume: bool = False, verbose: bool = True) -> SweepResult:
    """Run (or continue) a sweep; returns its table and what was registered.

    Raises:
        UserError: bad sweep name / resume request, missing data.
    """
    start = time.perf_counter()
    sweep_dir, lease = resolve_sweep_dir(s, resume=resume)  # a local folder or a URI, reserved
    with lease:
        return _run_reserved(s, sweep_dir, start, resume=resume, verbose=verbose)


def _run_reserved(s: Sweep, sweep_dir: str, start: float, *, resume: bool, verbose: bool) -> SweepResult:
    """`run_sweep` once the sweep's name is reserved."""
    sweep_tune_env()
    record = None
    if resume:
        record, s = _resumed(s, sweep_dir)
    else:
        ensure_data(s.base, quiet=not verbose)
        check_data(s.base, need_labels=f"a sweep ranks its trials by {s.sweep.metric}")  # before Ray starts
        s = Sweep(base=absolute_base(s), sweep=s.sweep, source=s.source, stem=s.stem)
    with ray_session(s.base):
        check_cluster_storage(s.base, {"sweep.storage_path": storage_location(s.sweep.storage_path)},
                              streams_data=resolve_loader(s.base) == "stream")
        # data.loader=memory: decode once here, for every trial (their data fields are the base's
        # unless the sweep varies one; such a trial decodes its own). Before anything is written:
        # a data.loader=memory that cannot fit is refused here.
        data = put_decoded(s.base) if resolve_loader(s.base) == "memory" else None
        if record is None:
            record = _start_sweep(s, sweep_dir)
        kind = resolved_trial_kind(s)
        if verbose:
            _print_start(s, sweep_dir, resume, data, kind)
        tuner = _tuner(s, sweep_dir, record, data, kind, resume=resume, verbose=verbose)
        fit_start = time.perf_counter()
        with sign_after_tune_saves(StateSigner(sweep_dir)):
            results = tuner.fit()
        fit_end = time.perf_counter()
        # Tune ends a sweep whose time budget ran out without an error: tell it from a complete one.
        budget = s.sweep.time_budget_s is not None and fit_end - fit_start >= s.sweep.time_budget_s
        out = finish_sweep(s, sweep_dir, record, results, budget_ran_out=budget)
        out.timings = {"setup_s": fit_start - start, "tune_s": fit_end - fit_start,
                       "finish_s": time.perf_counter() - fit_end}
    out.wall_seconds = time.perf_counter() - start
    if verbose:
        print_summary(out)
    return out


def _resumed(s: Sweep, sweep_dir: str) -> tuple[dict[str, Any], Sweep]:
    """The record of the sweep `--resume` continues and the sweep it recorded, or `UserError` when it
    cannot be continued:
    finished, ended by its time budget, or asked to continue with another base config or sweep
    section (as `pretrain --resume`: the trials that ran and those still to run share one)."""
    name, record_path = storage.name(sweep_dir), storage.join(sweep_dir, SWEEP_RECORD)
    record = read_json(record_path) or {}
    results_md = storage.join(sweep_dir, "results.md")
    if record.get("status") == "finished":
        raise UserError(f"sweep {name!r} has finished ({results_md}); nothing to resume")
    if record.get("status") == "time budget":
        raise UserError(f"sweep {name!r} ended on its time budget (sweep.time_budget_s = "
                        f"{record['sweep'].get('time_budget_s')} s; {results_md}); --resume "
                        "cannot extend it: start a new sweep with a larger sweep.time_budget_s")
    base = Config.from_dict(record["base"], source=str(record_path))
    configured = absolute_base(s)
    # The tracking URI is this command's, never the record's (the MLflow login goes to it).
    if record.get("tracking_uri") != configured.tracking.uri:
        raise UserError(f"{record_path}: tracking_uri = {record.get('tracking_uri')!r}, but this command tracks to "
                        f"{configured.tracking.uri!r}; --resume continues a sweep in the MLflow store it started "
                        "in: set tracking.uri or MLFLOW_TRACKING_URI to it (a record never chooses where "
                        "credentials go)")
    diff = config_differences(base, configured)
    if diff:
        raise UserError(f"--resume continues sweep {name!r} with its recorded base config "
                        f"({record_path}); these differ: {', '.join(diff)} (start a new sweep instead)")
    recorded_sweep = parse_sweep_section(record["sweep"], source=str(record_path))
    if dataclasses.asdict(recorded_sweep) != {**dataclasses.asdict(s.sweep), "name": recorded_sweep.name}:
        raise UserError(f"--resume continues sweep {name!r} with its recorded sweep section "
                        f"({record_path}); start a new sweep to change it")
    return record, Sweep(base=base, sweep=recorded_sweep, source=s.source, stem=s.stem)


def _start_sweep(s: Sweep, sweep_dir: str) -> dict[str, Any]:
    """The MLflow experiment and parent run (before any trial process opens the store: SQLite races)
    and the sweep record; returns the record."""
    base, sw, uri = s.base, s.sweep, str(s.base.tracking.uri)
    exp_id = tracking.ensure_experiment(uri, base.tracking.experiment)
    params = {f"sweep.{k}": (json.dumps(v) if isinstance(v, (dict, list)) else v)
              for k, v in dataclasses.asdict(sw).items()}
    params["sweep.trials"] = n_grid_trials(sw)
    sweep_yaml = yaml.safe_dump({**base.to_dict(), "sweep": dataclasses.asdict(sw)}, sort_keys=False)
    parent = tracking.start_run(uri, exp_id, storage.name(sweep_dir), params, sweep_yaml,
                                tags={"selfsup.kind": "sweep", "dataset": dataset_name(base)})
    record = {"name": storage.name(sweep_dir), "status": "running", "parent_run_id": parent, "tracking_uri": uri,
              "base": base.to_dict(), "sweep": dataclasses.asdict(sw)}
    write_sweep_record(sweep_dir, record)
    return record


def _tuner(s: Sweep, sweep_dir: str, record: dict[str, Any], data: Any, kind: str, *, resume: bool,
           verbose: bool) -> Any:
    """The Tuner of this sweep (restored on --resume when Tune saved its state)."""
    sw, base, trials_dir = s.sweep, s.base, trials_dir_of(sweep_dir)
    if kind == IN_PROCESS:
        function = tune.with_parameters(run_trial_in_process, base=base.to_dict(), trials_dir=trials_dir,
                                        metric=sw.metric, data=data)
    else:
        function = tune.with_parameters(run_train_trial, base=base.to_dict(), trials_dir=trials_dir,
                                        parent_run_id=record["parent_run_id"], metric=sw.metric, data=data)
    trainable = tune.with_resources(function, trial_resources(s, kind))
    if resume and tune.Tuner.can_restore(sweep_dir):
        verify_state(sweep_dir)  # nothing another job could have written is unpickled unverified
        return tune.Tuner.restore(sweep_dir, trainable=trainable, resume_errored=True, param_space=None)
    param_space, search_alg, num_samples = build_search(sw)
    callback = SweepDriverCallback(trials_dir=trials_dir, metric=sw.metric, verbose=verbose, base=base.to_dict(),
                                   uri=record["tracking_uri"], parent_run_id=record["parent_run_id"],
                                   epochs=base.optim.epochs, kind=kind)
    return tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(
            search_alg=search_alg,
            scheduler=build_scheduler(sw, base.optim.epochs, rungs_file=storage.join(sweep_dir, "asha-rungs.json")),
            num_samples=num_samples, max_concurrent_trials=sw.max_concurrent_trials,
            # Actor reuse only where a trial can be reset: docs/design.md, "Sweeps".
            time_budget_s=sw.time_budget_s, reuse_actors=sw.reuse_actors and kind == IN_PROCESS),
        run_config=tune.RunConfig(
            name=storage.name(sweep_dir), storage_path=storage.parent(sweep_dir), callbacks=[callback], verbose=0,
            # An in-process trial is its own worker: Tune restarts it from its last checkpoint. A
            # Train-run trial's Train run restarts its workers itself (run.max_failures).
            failure_config=tune.FailureConfig(max_failures=base.run.max_failures if kind == IN_PROCESS else 0),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=base.run.checkpoints_to_keep)))


def _print_start(s: Sweep, sweep_dir: str, resume: bool, data: Any, kind: str) -> None:
    sw = s.sweep
    how = f", decoded once into memory for every trial ({data.nbytes / 1e6:,.0f} MB)" if data else ""
    where = "in the trial's own process" if kind == IN_PROCESS else f"{s.base.scaling.num_workers} Train worker(s)"
    print(f"selfsup sweep: {'resuming' if resume else 'running'} {storage.name(sweep_dir)}: {sw.searcher} search, "
          f"{n_grid_trials(sw)} trials over {', '.join(sorted(sw.methods))}, "
          f"{sw.scheduler.upper()} on {sw.metric}, {sw.max_concurrent_trials} at a time; "
          f"{s.base.optim.epochs} epochs each, {where}{how}", flush=True)
