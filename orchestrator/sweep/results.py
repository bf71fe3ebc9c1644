"""The sweep's results: statuses, the table (CSV, markdown) and the plot."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from orchestrator.sweep.records import driver_run_id
from orchestrator.sweep.space import method_dims
from orchestrator.sweep.spec import SweepConfig


# --- results -------------------------------------------------------------------------------------

@dataclass
class SweepResult:
    """What a sweep produced: the table (one row per trial), where it went, and what was registered."""

    name: str
    sweep_dir: str
    parent_run_id: str
    tracking_uri: str
    table: Any  # pandas.DataFrame
    best: dict[str, Any] | None = None
    model_uri: str | None = None
    champion: bool = False
    champion_note: str = ""  # why the champion stayed, when it did
    wall_seconds: float = 0.0
    markdown: str = ""
    metric: str = "knn_top1"
    timings: dict[str, float] = field(default_factory=dict)  # setup_s, tune_s, finish_s (driver)
    planned: int = 0  # trials the sweep asked for (a time budget can end it before all started)
    budget_ran_out: bool = False  # sweep.time_budget_s ended the sweep


def swept_keys(sw: SweepConfig) -> list[str]:
    keys: list[str] = []
    for m in sw.methods:
        for k in method_dims(sw, m):
            if k not in keys:
                keys.append(k)
    return keys


def short_name(key: str) -> str:
    return key.split(".", 1)[1] if "." in key else key


# A trial's status (the table's) -> its MLflow run's final status.
RUN_STATUS = {"finished": "FINISHED", "stopped": "KILLED", "not run": "KILLED", "diverged": "FAILED",
              "error": "FAILED"}


def trial_status_of(m: dict[str, Any], epochs: int, *, error: bool = False, started: bool = True) -> str:
    """A trial's status from its last result `m`; `started`: Tune started it (the driver made its MLflow run)."""
    if error:
        return "error"
    if m.get("diverged"):
        return "diverged"
    if "epoch" not in m:  # started: Tune ended it (time budget) before its first epoch
        return "stopped" if started else "not run"
    return "finished" if int(m["epoch"]) >= epochs else "stopped"


def result_status(result: Any, epochs: int, started: bool) -> str:
    return trial_status_of(result.metrics or {}, epochs, error=result.error is not None, started=started)


def epoch_seconds(client: Any, run_id: str | None) -> float:
    """The sum of a trial's epoch times (training + kNN eval), from its MLflow run (one per epoch)."""
    if not run_id:
        return 0.0
    by_step = {m.step: m.value for m in client.get_metric_history(run_id, "epoch_seconds")}
    return float(sum(by_step.values()))


def results_table(results: Any, sw: SweepConfig, epochs: int, trials_dir: str, client: Any) -> Any:
    """One row per trial: trial, method, swept values, epochs, metric, loss, status, train seconds."""
    import pandas as pd

    keys = swept_keys(sw)
    rows = []
    for r in results:
        over = dict((r.config or {}).get("overrides") or {})
        m = r.metrics or {}
        trial_id = str(m.get("trial_id") or (Path(r.path).name if r.path else ""))
        run_id = driver_run_id(trials_dir, trial_id) or ""  # made by the driver as Tune started the trial
        train_s = epoch_seconds(client, run_id)
        status = result_status(r, epochs, started=bool(run_id))
        value = m.get(sw.metric)
        row = {"trial": trial_id, "method": over.get("method.name", ""),
               # a mapping (model.encoder_args) as its JSON text: a table cell and a plot category
               **{short_name(k): (json.dumps(v, sort_keys=True) if isinstance(v := over.get(k), (dict, list)) else v)
                  for k in keys},
               "epochs": int(m.get("epoch", 0)),
               sw.metric: (float(value) if status not in ("diverged", "error", "not run") and value is not None
                           else math.nan),
               "loss": float(m["loss"]) if isinstance(m.get("loss"), (int, float)) else math.nan,
               "status": status, "train_s": round(train_s, 2),
               "trial_s": round(float(m.get("time_total_s") or 0.0), 2),
               "mlflow_run_id": run_id,
               # Train-run trials report their Train checkpoint's path; in-process ones hand Tune theirs
               "checkpoint_path": m.get("checkpoint_path") or (r.checkpoint.path if r.checkpoint else "")}
        rows.append(row)
    df = pd.DataFrame(rows)
    if not df.empty:
        df = df.sort_values([sw.metric, "trial"], ascending=[False, True], na_position="last")
    return df.reset_index(drop=True)


def markdown_table(df: Any, metric: str) -> str:
    """A GitHub markdown table of the visible columns (no `tabulate` dependency)."""
    cols = [c for c in df.columns if c not in ("mlflow_run_id", "checkpoint_path", "trial_s")]

    def cell(c: str, v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        if c in (metric, "loss") and isinstance(v, float):
            return f"{v:.4f}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(cell(c, row[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def plot_png(df: Any, sw: SweepConfig, path: Path) -> None:
    """kNN top-1 by method and hyper-parameter: one panel per swept field, one colour per method.

    Diverged trials are drawn as crosses at 0; trials ASHA stopped as hollow markers.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = swept_keys(sw) or ["method.name"]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.4), squeeze=False)
    colors = {m: f"C{i}" for i, m in enumerate(sorted(sw.methods))}
    for ax, key in zip(axes[0], keys):
        col = short_name(key) if key != "method.name" else "method"
        for method, group in df.groupby("method"):
            for _, row in group.iterrows():
                x = row[col]
                if x is None or (isinstance(x, float) and math.isnan(x)):
                    continue
                y = row[sw.metric]
                c = colors.get(method, "gray")
                if row["status"] == "diverged":
                    ax.scatter([x], [0.0], marker="x", color=c)
                elif isinstance(y, float) and math.isnan(y):
                    continue
                elif row["status"] == "stopped":
                    ax.scatter([x], [y], facecolors="none", edgecolors=c)
                else:
                    ax.scatter([x], [y], color=c)
        if key == "optim.lr":
            ax.set_xscale("log")
        ax.set(xlabel=short_name(key), ylabel=sw.metric, title=f"{sw.metric} by {short_name(key)}")
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=m) for m, c in colors.items()]
    handles += [plt.Line2D([], [], marker="o", ls="", markerfacecolor="none", color="gray", label="stopped (ASHA)"),
                plt.Line2D([], [], marker="x", ls="", color="gray", label="diverged")]
    axes[0][-1].legend(handles=handles, loc="best", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- the driver -----------------------------------------------------------------------------------

