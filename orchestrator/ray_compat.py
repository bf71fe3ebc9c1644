"""Every place selfsup leans on Ray internals or tunes Ray past its documented knobs, in one file.

Each entry says what it works around and the Ray version it was checked against (2.60.0, the
version `pyproject.toml` pins). On a Ray upgrade, re-check this file first: where an internal has
moved, the entries fail soft (nothing filtered, no warm-up, no placement-group cleanup) rather than
failing a run. Ray's internals are imported inside each entry for that reason: an internal that
moved then costs only its own entry.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterator
from typing import Any

from pipelines import storage

# --- environment (checked against Ray 2.60.0) -------------------------------------------------

# Ray reads this when it is imported: with "0" a Ray that selfsup starts itself binds 127.0.0.1
# only (otherwise GCS, raylet and workers listen on every interface). Joining a cluster goes
# through RAY_ADDRESS (orchestrator/submit.py sets it), which leaves Ray's own default.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def keep_local_ray_on_loopback() -> None:
    """Nothing listens beyond 127.0.0.1 unless the user says so (by setting RAY_ADDRESS)."""
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault(LOOPBACK_ENV, "0")


# --- quiet Ray --------------------------------------------------------------------------------

def sweep_tune_env() -> None:
    """The Tune settings of `selfsup sweep` (set before Tune starts)."""
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")  # --resume loses at most ~2 s of Tune state
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Tune snapshots its state each time a trial has made `num_to_keep` checkpoints (so that a resumed
    # sweep never points at a deleted one) and warns when that is often: every epoch of a short
    # in-process trial is. The snapshot is the point; the warning is noise.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Trial result files: the sweep's ResultGrid reads them (forced: `quiet_ray_env` defaults it off).
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "0"


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
    # Tune's result files (result.json, progress.csv per trial): nothing outside a sweep reads them;
    # a sweep does (`sweep_tune_env` turns them back on).
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    for name in ("ray", "ray.train", "ray.data", "ray.tune", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)



# --- starting Ray (checked against Ray 2.60.0) -------------------------------------------------

def start_or_join_ray(address: str | None = None) -> tuple[bool, str | None]:
    """Join the Ray cluster at `address` (else `RAY_ADDRESS`), or start a private local one;
    returns (started_here, temp_dir). The one way selfsup starts Ray (`pretrain`, `sweep`, `ingest`).

    Local: `num_cpus` = 2 x cores (at least 4): Ray Data's read/decode tasks need logical CPUs
    next to the Train workers or a 2-core machine hangs (docs/design.md, "Data"). Token auth is set
    explicitly: off for the private local cluster (its temp dir is private to this run; the
    dashboard is not started), as the environment says for a cluster (`RAY_AUTH_MODE`).
    """
    import tempfile
    from pathlib import Path

    import ray

    if ray.is_initialized():
        return False, None
    quiet_ray_env()
    drop_benign_ray_notices()
    address = address or os.environ.get("RAY_ADDRESS")
    # SELFSUP_RAY_LOGS=1 shows the workers' own output (tracebacks, Ray Data progress) for debugging.
    common: dict[str, Any] = dict(log_to_driver=os.environ.get("SELFSUP_RAY_LOGS") == "1",
                                  logging_level=logging.WARNING, configure_logging=True)
    if address:
        token = (Path.home() / ".ray" / "auth_token").is_file()
        os.environ.setdefault("RAY_AUTH_MODE", "token" if token else "disabled")
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


@contextlib.contextmanager
def ray_session_at(address: str | None = None) -> Iterator[bool]:
    """Ray for one command (`start_or_join_ray`); what was started here is shut down and its
    temporary folder removed on the way out. Yields whether Ray was started here."""
    import shutil

    import ray

    started, temp_dir = start_or_join_ray(address)
    try:
        yield started
    finally:
        if started:
            ray.shutdown()
            if temp_dir:
                shutil.rmtree(temp_dir, ignore_errors=True)


# --- driver output (checked against Ray 2.60.0) ---------------------------------------------------

# Benign raylet notices that Ray prints on the driver's stdout even with log_to_driver=False.
_RAY_NOTICES = ("PYTHON worker processes have been started on node",)


def drop_benign_ray_notices() -> None:
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


# --- Train V2 worker-group callbacks (checked against Ray 2.60.0) --------------------------------

def placement_group_recorder(path: str) -> Any:
    """A Train worker-group callback that appends each worker group's placement group id to `path`.

    Workaround: Train V2 creates the workers' placement group from its controller, with the job's
    lifetime; its `PlacementGroupCleaner` removes it when the controller dies only if the Ray state
    API answers, which needs the dashboard (not started here) and a single Ray instance per machine.
    When Tune stops a trial (ASHA) the controller dies with the trial and the placement group
    would keep its CPUs until the sweep ends, starving later trials. The driver removes the
    groups recorded here when the trial ends (`release_placement_groups`). `path` is a folder (local
    or in an object store, which cannot append): one empty file per group, named by its id.
    """
    try:
        from ray.train.v2._internal.execution.callback import WorkerGroupCallback
    except ImportError:
        return None

    class PlacementGroupRecorder(WorkerGroupCallback):
        def after_worker_group_start(self, worker_group: Any) -> None:
            try:
                pg = worker_group._worker_group_state.placement_group_handle.placement_group
                storage.write_text(storage.join(path, pg.id.hex()), "")
            except Exception:  # internal API moved: then only the cleanup is lost
                pass

    return PlacementGroupRecorder()


def release_placement_groups(path: str) -> int:
    """Remove the still-existing placement groups recorded in the folder `path`; returns how many."""
    recorded = [n for n in storage.list_names(path) if re.fullmatch(r"[0-9a-f]+", n)]
    if not recorded:
        return 0
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    removed = 0
    table = placement_group_table()
    for pg_hex in set(recorded):
        if table.get(pg_hex, {}).get("state") in ("CREATED", "PENDING", "RESCHEDULING"):
            try:
                remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_hex))))
                removed += 1
            except Exception:
                pass
    return removed


def controller_warm_up(callback: Any) -> Any:
    """A Train worker-group callback that calls `callback.warm_up()` (`tracking.MlflowTrainCallback`)
    in the controller as it starts the workers, or None where this Ray lacks the hook.

    `WorkerGroupCallback` is internal to Ray Train V2 (2.60; the sweep's placement-group cleanup
    uses it too). Both callbacks travel to the controller in one list, so they share `callback`.
    """
    try:
        from ray.train.v2._internal.execution.callback import WorkerGroupCallback
    except ImportError:
        return None

    class WarmUp(WorkerGroupCallback):
        def __init__(self, target: Any) -> None:
            self.target = target

        def before_worker_group_start(self, worker_group_context: Any) -> None:
            self.target.warm_up()

    return WarmUp(callback)


# --- Train V2 elastic scaling (checked against Ray 2.60.0) --------------------------------------

# An elastic run's worker group that cannot be placed within this long is given up and the size
# decided again (Ray's default: 60 s, `RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`; a user's value wins).
ELASTIC_START_TIMEOUT_S = 20


def fresh_elastic_scaling() -> None:
    """Make Train's elastic policy count workers on the cluster as it is now (elastic runs only).

    Workaround: `ElasticScalingPolicy._get_reserved_resources` asks Ray Data's
    `AutoscalingCoordinator` for its reservations without `recompute`, and the coordinator refreshes
    its view of the nodes every 20 s (`TICK_INTERVAL_S`). After a lost node the policy still counts
    that node's workers, asks for a group that cannot be placed and waits out
    `RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S` (60 s) before it decides again: seen here, 66 s from the
    kill to the one-worker group, in a run whose epochs took 3 s. A node that joins is likewise
    noticed up to 20 s late. The coordinator's own `recompute=True` (meant for callers that pin
    workers to nodes) re-reads the nodes first; a query is at most once a second (the policy's
    `GET_RESERVED_RESOURCES_INTERVAL_S`). Applied by swapping the policy that
    `DataParallelTrainer.fit` builds (in the driver; the policy object then travels to the Train
    controller). If the internals moved, nothing is swapped and Ray's own policy runs.

    That is not enough on its own: a worker's death reaches the controller before the GCS has
    declared its node dead (its health checks: 3 s x 5 misses by default), so the first decision
    can still count the lost node. Its group then cannot be placed; with the start timeout at
    `ELASTIC_START_TIMEOUT_S` instead of 60 s that costs 20 s before the next decision. Placing a
    group the elastic policy sized from live nodes takes well under a second, so the shorter
    timeout only cuts that wait (Train propagates the variable from the driver to its controller).
    """
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", str(ELASTIC_START_TIMEOUT_S))
    try:
        import ray
        from ray.train.v2._internal.execution.scaling_policy import elastic
        from ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client import (
            AUTOSCALING_REQUESTS_GET_TIMEOUT_S)
        from ray.train.v2.api import data_parallel_trainer
    except ImportError:
        return
    if getattr(data_parallel_trainer.create_scaling_policy, "_selfsup_fresh", False):
        return
    original = data_parallel_trainer.create_scaling_policy

    class FreshElasticScalingPolicy(elastic.ElasticScalingPolicy):
        def _get_reserved_resources(self) -> Any:
            now = elastic.time_monotonic()
            if now - self._latest_reserved_resources_query_time < self.GET_RESERVED_RESOURCES_INTERVAL_S:
                return self._latest_reserved_resources
            try:
                self._latest_reserved_resources = ray.get(
                    self._autoscaling_coordinator.get_reserved_resources.remote(self._requester_id, recompute=True),
                    timeout=AUTOSCALING_REQUESTS_GET_TIMEOUT_S)
            except Exception:
                return super()._get_reserved_resources()  # Ray's own query (and its warning)
            self._latest_reserved_resources_query_time = elastic.time_monotonic()
            return self._latest_reserved_resources

    def create_scaling_policy(scaling_config: Any) -> Any:
        if getattr(scaling_config, "elasticity_enabled", False):
            return FreshElasticScalingPolicy(scaling_config=scaling_config)
        return original(scaling_config)

    create_scaling_policy._selfsup_fresh = True  # type: ignore[attr-defined]
    data_parallel_trainer.create_scaling_policy = create_scaling_policy


# --- Tune's ASHA across a restart (checked against Ray 2.60.0) ----------------------------------------

def resumable_asha(state_file: str, **kwargs: Any) -> Any:
    """`ray.tune.schedulers.ASHAScheduler(**kwargs)` whose rungs survive a killed sweep driver, kept in
    `state_file` (local or a URI); see `ResumableASHA` below."""
    from ray.tune.schedulers import ASHAScheduler

    class ResumableASHA(ASHAScheduler):
        """ASHA whose rungs survive a killed sweep driver.

        `Tuner.restore` brings back the searcher's state but not the scheduler's: a resumed ASHA starts
        with empty rungs (its `save`/`restore` exist but Tune never calls them), so it lets through
        trials it would have stopped. This one writes each bracket's rungs (trial id -> metric at each
        milestone; `_Bracket._rungs`, internal) to `state_file` (local or a URI) after every result and
        reads them back before its first decision after a restart.
        """

        def __init__(self, state_file: str, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._state_file = state_file
            self._loaded = False

        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
            self._load_once()
            decision = super().on_trial_result(tune_controller, trial, result)
            self._save()
            return decision

        def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> None:
            self._load_once()
            super().on_trial_complete(tune_controller, trial, result)
            self._save()

        def _rungs(self) -> list[list[tuple[float, dict[str, float]]]]:
            return [list(getattr(b, "_rungs", [])) for b in self._brackets]

        def _save(self) -> None:
            try:
                state = [[[milestone, dict(recorded)] for milestone, recorded in rungs] for rungs in self._rungs()]
                storage.write_text(self._state_file, json.dumps(state))
            except Exception:  # the internal moved: only the carry-over across a restart is lost
                pass

        def _load_once(self) -> None:
            if self._loaded:
                return
            self._loaded = True
            try:
                if not storage.is_file(self._state_file):
                    return
                saved = json.loads(storage.read_text(self._state_file))
                for rungs, saved_rungs in zip(self._rungs(), saved):
                    for (_, recorded), (_, saved_recorded) in zip(rungs, saved_rungs):
                        for trial_id, value in saved_recorded.items():
                            recorded.setdefault(trial_id, value)
            except Exception:
                pass

    return ResumableASHA(state_file, **kwargs)


# --- Tune's saved state, signed as it is saved (checked against Ray 2.60.0) --------------------

class sign_after_tune_saves:  # noqa: N801 (a context manager used as `with sign_after_tune_saves(...)`)
    """While active, call `sign(staging_dir)` each time Tune has saved its experiment state.

    `TuneController.save_to_dir` writes the experiment state, the searcher's and the callbacks'
    state into the driver's staging folder; Tune then uploads that folder to the storage path. The
    digests are recorded right after the save, before the upload (`orchestrator.sweep.
    state_signing`). Ray has no hook there, so the method is wrapped.
    Fails loud, not soft: a sweep whose state could not be signed would be refused on `--resume`.
    """

    def __init__(self, sign: Any) -> None:
        self.sign = sign
        self._original: Any = None

    def __enter__(self) -> sign_after_tune_saves:
        from ray.tune.execution.tune_controller import TuneController

        original = TuneController.save_to_dir
        sign = self.sign

        def save_to_dir(controller: Any) -> None:
            original(controller)
            sign(controller._storage.experiment_driver_staging_path)

        self._original = original
        TuneController.save_to_dir = save_to_dir  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: Any) -> None:
        from ray.tune.execution.tune_controller import TuneController

        TuneController.save_to_dir = self._original  # type: ignore[method-assign]


# --- Train V2's run folder (checked against Ray 2.60.0) -----------------------------------------

# The controller's list of the checkpoints it registered; a restart or `--resume` restores from it.
CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"


def remove_unregistered_checkpoints(run_dir: str) -> list[str]:
    """Delete the `checkpoint_*` folders of `run_dir` that the controller never registered, and
    return their names: uploads that failed part-way (a full disk) and left a part-written
    `state.pt`. Nothing reads them (a restore goes through the snapshot's list); they only hold
    the space the next checkpoint needs. Call it once the run's workers have stopped."""
    import json

    from pipelines import storage

    snapshot = storage.join(run_dir, CHECKPOINT_SNAPSHOT)
    registered: set[str] = set()
    if storage.exists(snapshot):
        results = json.loads(storage.read_text(snapshot)).get("checkpoint_results") or []
        registered = {str(r.get("checkpoint_dir_name")) for r in results}
    removed = [n for n in storage.list_names(run_dir) if n.startswith("checkpoint_") and n not in registered
               and storage.is_dir(storage.join(run_dir, n))]
    for n in removed:
        storage.delete_tree(storage.join(run_dir, n))
    return removed
