"""The end of a sweep: final statuses, artifacts, the best trial's registration, the summary."""

from __future__ import annotations

import math
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


from orchestrator.config import Config, apply_overrides, storage_location
from orchestrator import tracking
from orchestrator.data import dataset_name
from orchestrator.run_folders import read_state
from orchestrator.sweep.results import (RUN_STATUS, SweepResult, markdown_table, plot_png, results_table, short_name,
                                        swept_keys)
from orchestrator.sweep.space import n_grid_trials, trial_defaults
from orchestrator.sweep.spec import METRICS, TRIAL_PREFIX, Sweep
from orchestrator.sweep.records import trials_dir_of, write_sweep_record
from orchestrator.training import STATE_FILE
from pipelines import storage


def finish_sweep(s: Sweep, sweep_dir: str, record: dict[str, Any], results: Any, *,
                 budget_ran_out: bool = False) -> SweepResult:
    """Final statuses on the child runs, table + plot artifacts, best encoder, champion; the sweep
    record says "finished" (or "time budget") last."""
    sw, uri, parent = s.sweep, record["tracking_uri"], record["parent_run_id"]
    c = tracking.client(uri)
    table = results_table(results, sw, s.base.optim.epochs, trials_dir_of(sweep_dir), c)
    _close_trial_runs(c, table)
    md = _write_artifacts(c, parent, table, sw, sweep_dir)
    out = SweepResult(name=storage.name(sweep_dir), sweep_dir=sweep_dir, parent_run_id=parent, tracking_uri=uri,
                      table=table, metric=sw.metric, planned=n_grid_trials(sw), budget_ran_out=budget_ran_out,
                      markdown=md)
    counts = table["status"].value_counts().to_dict() if not table.empty else {}
    metrics = {f"trials_{k.replace(' ', '_')}": float(v) for k, v in counts.items()}
    out.best = best_row(table, sw.metric)
    if out.best is not None:
        metrics[f"best_{sw.metric}"] = float(out.best[sw.metric])
        c.set_tag(parent, "best_trial", out.best["trial"])
        if sw.register and s.base.tracking.register:
            if record.get("model_uri"):  # registered by an earlier run of this sweep's driver
                out.model_uri, out.champion = record["model_uri"], bool(record.get("champion"))
                out.champion_note = str(record.get("champion_note", ""))
            else:
                out.model_uri, out.champion, out.champion_note = _register_best(s, out.best, uri, sweep_dir)
                record.update(model_uri=out.model_uri, champion=out.champion, champion_note=out.champion_note)
                c.set_tag(parent, "registered_model", out.model_uri)
    if metrics:
        # Imported here: trial processes import this package (for `trials`) and must not pay for
        # MLflow before they train (one MLflow writer per run: the driver, docs/design.md).
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        c.log_batch(parent, metrics=[Metric(k, v, ts, 0) for k, v in metrics.items()])
    if budget_ran_out:
        c.set_tag(parent, "selfsup.ended_by", "time_budget_s")
    c.set_terminated(parent, "FINISHED")
    write_sweep_record(sweep_dir, {**record, "status": "time budget" if budget_ran_out else "finished"})
    return out


def _close_trial_runs(c: Any, table: Any) -> None:
    """Tag each trial's run with its status and id; end those still open with the table's status."""
    for _, row in table.iterrows():
        run_id = row["mlflow_run_id"]
        if not run_id:
            continue
        c.set_tag(run_id, "selfsup.trial_status", row["status"])
        c.set_tag(run_id, "selfsup.trial_id", row["trial"])
        # A trial Tune stopped (ASHA, time budget) or that failed was killed before it could
        # close its run (or closed it as FAILED on the way down): the driver says what happened.
        if row["status"] in ("stopped", "error", "not run") or c.get_run(run_id).info.status == "RUNNING":
            c.set_terminated(run_id, RUN_STATUS[row["status"]])


def _write_artifacts(c: Any, parent: str, table: Any, sw: Any, sweep_dir: str) -> str:
    """results.csv, results.md and the plot: made in a local folder, logged to the parent run and
    copied next to the sweep's record (which may be in an object store). Returns the markdown."""
    md = markdown_table(table, sw.metric)
    with tempfile.TemporaryDirectory(prefix="selfsup-sweep-") as d:
        local = Path(d)
        table.to_csv(local / "results.csv", index=False)
        (local / "results.md").write_text(md)
        plot_png(table, sw, local / "knn_by_hparam.png")
        for f in ("results.csv", "results.md", "knn_by_hparam.png"):
            c.log_artifact(parent, str(local / f))
            storage.upload(local / f, storage.join(sweep_dir, f))
    return md


def best_row(table: Any, metric: str) -> dict[str, Any] | None:
    """The best trial that finished (else the best that ASHA stopped) with a value of `metric`."""
    if table.empty:
        return None
    ok = table[table["status"].isin(["finished", "stopped"]) & table[metric].notna()]
    finished = ok[ok["status"] == "finished"]
    pool = finished if not finished.empty else ok
    return pool.iloc[0].to_dict() if not pool.empty else None


def _best_state_file(s: Sweep, best: dict[str, Any], sweep_dir: str) -> str | None:
    """The checkpoint file of the best trial's last epoch, or None when there is none."""
    ckpt = best.get("checkpoint_path")  # Ray's Checkpoint.path: without the URI's scheme on object stores
    if isinstance(ckpt, str) and ckpt:
        state_file = storage.join(storage.with_scheme_of(storage_location(s.sweep.storage_path), ckpt), STATE_FILE)
        if storage.is_file(state_file):
            return state_file
    # A Train-run trial that had finished when a killed driver's sweep was resumed reports its end
    # again without a checkpoint (`run_train_trial`): its Train run's newest checkpoint (names sort
    # by time; not checkpoint_manager_snapshot.json: the checkpoints are checkpoint_<date>_<time>).
    run_dir = storage.join(trials_dir_of(sweep_dir), f"{TRIAL_PREFIX}{best['trial']}")
    names = sorted(n for n in storage.list_names(run_dir) if re.match(r"checkpoint_\d{4}-", n))
    state_file = storage.join(run_dir, names[-1], STATE_FILE) if names else ""
    return state_file if state_file and storage.is_file(state_file) else None


def _register_best(s: Sweep, best: dict[str, Any], uri: str, sweep_dir: str) -> tuple[str | None, bool, str]:
    """Register the best trial's encoder (from its last checkpoint) and maybe move `champion`."""
    # Imported here: the registry imports MLflow, which a trial process (it imports this package)
    # must not pay for before it trains (docs/design.md, "MLflow: one writer per run").
    from orchestrator.registry.register import default_model_name, register_run_encoder

    state_file = _best_state_file(s, best, sweep_dir)
    if state_file is None:
        print(f"selfsup sweep: no checkpoint of trial {best['trial']}; nothing registered",
              file=sys.stderr, flush=True)
        return None, False, ""
    state = read_state(state_file)
    cfg = _trial_config(s, best)
    c = tracking.client(uri)
    status = c.get_run(best["mlflow_run_id"]).info.status
    # every accuracy of the last epoch (kNN, linear): `registry best` can rank by any of them
    tags = {**{k: v for k, v in state["metrics"].items() if k in METRICS},
            "method": cfg.method.name, s.sweep.metric: best[s.sweep.metric], "encoder": cfg.model.encoder,
            "run_name": f"{TRIAL_PREFIX}{best['trial']}", "sweep": s.stem}
    reg = register_run_encoder(cfg, state, uri=uri, run_id=best["mlflow_run_id"],
                               model_name=default_model_name(cfg, dataset_name(cfg)), tags=tags, metric=s.sweep.metric)
    c.set_terminated(best["mlflow_run_id"], status)  # registering reopened the trial's run
    return reg.model_uri, reg.promotion.moved, reg.promotion.reason


def _trial_config(s: Sweep, row: dict[str, Any]) -> Config:
    """The config a trial ran with, rebuilt from its table row (the swept values)."""
    over = dict(trial_defaults(str(row["method"])))
    for key in swept_keys(s.sweep):
        v = row.get(short_name(key))
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            over[key] = v.item() if hasattr(v, "item") else v
    return apply_overrides(s.base, over, source="best trial")


def print_summary(out: SweepResult) -> None:
    print(f"\nselfsup sweep {out.name}: {len(out.table)} trials in {out.wall_seconds:.0f}s\n")
    print(out.markdown)
    if out.budget_ran_out:
        done = int((out.table["status"] == "finished").sum()) if not out.table.empty else 0
        print(f"  time budget:  ran out: {len(out.table)} of {out.planned} trials started, {done} finished; "
              "the trials it cut short are 'stopped', the rest did not run")
    print(f"  table, plot:  {out.sweep_dir}/results.csv, results.md, knn_by_hparam.png "
          f"(also artifacts of MLflow run {out.parent_run_id})")
    if out.best:
        print(f"  best trial:   {out.best['trial']} ({out.best['method']}), "
              f"{out.metric} {out.best[out.metric]:.4f}")
    if out.model_uri:
        print(f"  registered:   {out.model_uri}" + ("  (now the champion)" if out.champion else
                                                    f"  (not the champion: {out.champion_note})"))
    if not out.budget_ran_out:
        print("  an interrupted sweep continues with the same command plus --resume", flush=True)
