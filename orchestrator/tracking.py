"""MLflow tracking for pretraining runs: one writer per run, and encoder registration.

Who writes what (never two processes at once):
- the driver creates the experiment and the run, and logs the resolved config (params + YAML);
- during training, `MlflowTrainCallback` (a `ray.train.UserCallback`) is the only writer: it runs in
  the Ray Train controller process and logs rank 0's metrics with `step=epoch`, skipping epochs the
  run already holds, so each epoch is logged exactly once even after a worker-group restart or a
  `--resume`; it also redraws the loss/kNN curves PNG;
- after training, the driver registers the encoder and closes the run.

The store is created in the driver before any worker starts: several processes opening a fresh
SQLite store at once race on schema creation (docs/design.md, "MLflow: one writer per run").

Registered model input: float32 `[B, 3, H, W]`, RGB, values in [0, 1] normalised with
`pipelines.augment.MEAN` / `STD` (ImageNet mean/std); any batch size, any H and W from the
encoder's `min_input_size` up (`orchestrator.encoder_input`, which also checks inputs).
Output: float32 `[B, output_dim]` embeddings (the encoder's pooled features, no projection head).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import ray.train

from orchestrator.config import Config

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
CURVES_PNG = "curves.png"
CONFIG_YAML = "config.yaml"
PIP_REQUIREMENTS = ["torch==2.14.1", "torchvision==0.29.1", "numpy"]


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The config's URI, else $MLFLOW_TRACKING_URI, else MLflow's default `sqlite:///mlflow.db`."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def client(uri: str) -> Any:
    """An `MlflowClient` for `uri` (imported lazily: mlflow takes ~1 s to import)."""
    import logging

    from mlflow.tracking import MlflowClient

    # mlflow configures its loggers at import (INFO: "Creating initial MLflow database tables...").
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(uri: str, name: str, artifact_location: str | None = None) -> str:
    """Create the store (if new) and the experiment (if missing); returns the experiment id.

    `artifact_location` applies to a new experiment only; None is MLflow's default (for a SQLite
    store: ./mlruns in the current directory, wherever the database file is).

    Raises:
        UserError: the server refused the credentials (`orchestrator.mlflow_auth`).
    """
    from orchestrator.mlflow_auth import credentials_checked

    c = client(uri)
    with credentials_checked(uri):  # the first request of a pretrain, sweep or evaluate: 401/403 as one line
        exp = c.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    try:
        return str(c.create_experiment(name, artifact_location=artifact_location))
    except Exception:  # created concurrently by another driver
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return str(exp.experiment_id)


def start_run(uri: str, experiment_id: str, run_name: str, params: dict[str, Any], config_yaml: str, *,
              parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> str:
    """Create a run (nested under `parent_run_id` for sweeps), log params and the config; returns its id."""
    from mlflow.entities import Param
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    c = client(uri)
    all_tags = {MLFLOW_RUN_NAME: run_name, **(tags or {})}
    if parent_run_id:
        all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    run = c.create_run(experiment_id, run_name=run_name, tags=all_tags)
    run_id = run.info.run_id
    items = [Param(k, "null" if v is None else str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i:i + 100])
    c.log_text(run_id, config_yaml, CONFIG_YAML)
    return str(run_id)


def logged_epochs(c: Any, run_id: str) -> set[int]:
    """Epochs (steps of the `loss` metric) the run already holds."""
    return {int(m.step) for m in c.get_metric_history(run_id, "loss")}


def numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite-or-not float metrics of a report (drops strings, bools, None)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        out[k] = float(v)
    return out


def log_epoch(c: Any, run_id: str, metrics: dict[str, Any], already: set[int]) -> bool:
    """Log one epoch's metrics at step=epoch unless `already` has it; returns whether it logged.

    `knn_top1_untrained` is logged once, at step 0.
    """
    from mlflow.entities import Metric

    epoch = int(metrics["epoch"])
    if epoch in already:
        return False
    ts = int(time.time() * 1000)
    values = numeric_metrics(metrics)
    untrained = values.pop("knn_top1_untrained", None)
    values.pop("epoch", None)
    batch = [Metric(k, v, ts, epoch) for k, v in values.items() if math.isfinite(v) or k == "loss"]
    if untrained is not None and 0 not in already and not c.get_metric_history(run_id, "knn_top1_untrained"):
        batch.append(Metric("knn_top1_untrained", untrained, ts, 0))
    c.log_batch(run_id, metrics=batch)
    already.add(epoch)
    return True


def log_report(c: Any, run_id: str, report: dict[str, Any], already: set[int]) -> bool:
    """Log one epoch report (`epoch_loop`): the earlier epochs it carries in `backfill` that the run
    lacks (a resumed run's first report), then the epoch itself; returns whether the epoch was new."""
    for earlier in json.loads(report.get("backfill") or "[]"):
        if "epoch" in earlier:
            log_epoch(c, run_id, earlier, already)
    return log_epoch(c, run_id, {k: v for k, v in report.items() if k != "backfill"}, already)


def curves_png(c: Any, run_id: str) -> bytes:
    """A PNG of the loss and kNN top-1 curves from the run's metric history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss = sorted((m.step, m.value) for m in c.get_metric_history(run_id, "loss"))
    knn = sorted((m.step, m.value) for m in c.get_metric_history(run_id, "knn_top1"))
    untrained = c.get_metric_history(run_id, "knn_top1_untrained")
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    if loss:
        a.plot(*zip(*loss), marker="o")
    a.set(xlabel="epoch", ylabel="loss", title="pretraining loss")
    if knn:
        b.plot(*zip(*knn), marker="o", label="kNN top-1")
    if untrained:
        b.axhline(untrained[0].value, color="gray", ls="--", label="untrained encoder")
    b.set(xlabel="epoch", ylabel="top-1", title="kNN top-1 (test split)")
    b.legend(loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def log_curves(c: Any, run_id: str) -> None:
    """(Re)write the run's curves PNG artifact."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, CURVES_PNG)
        with open(path, "wb") as f:
            f.write(curves_png(c, run_id))
        c.log_artifact(run_id, path)


class MlflowTrainCallback(ray.train.UserCallback):
    """The single MLflow writer of a Train run, in the Train controller process.

    `after_report` receives every worker's metrics; only rank 0's are logged (all ranks report the
    same epoch). Epochs the run already holds are skipped, so a restarted worker group (which redoes
    the epoch it died in) or a resumed command never logs an epoch twice.

    Args:
        tracking_uri: MLflow URI; the run must exist (see `start_run`).
        run_id: the run to log into.
        progress: optional `ray.util.queue.Queue`; each newly logged rank-0 metrics dict is put there
            for the driver's terminal output.
        curves_every_s: redraw the curves PNG after the last epoch, and after any epoch that ends
            at least this long after the last redraw (None: never; sweep trials, whose sweep plots
            its own figure). Drawing costs ~0.3 s of CPU next to the training (1 s the first time:
            matplotlib), so short epochs do not redraw every time.
        total_epochs: the run's last epoch.
        fault_kill_before_logging: test hook, (epoch, driver pid): as that epoch's report arrives
            (its checkpoint already registered by Train) kill the driver and this controller before
            logging it, as a command killed at that moment (see `pretrain.FAULT_BEFORE_LOG_ENV`).
    """

    def __init__(self, tracking_uri: str, run_id: str, *, progress: Any = None, curves_every_s: float | None = 60.0,
                 total_epochs: int | None = None, fault_kill_before_logging: tuple[int, int] | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.progress = progress
        self.curves_every_s = curves_every_s
        self.total_epochs = total_epochs
        self.fault_kill_before_logging = fault_kill_before_logging
        self._client: Any = None
        self._logged: set[int] | None = None
        self._last_plot: float | None = None
        self._warming: threading.Thread | None = None

    def __getstate__(self) -> dict[str, Any]:  # the client is rebuilt in the controller
        return {**self.__dict__, "_client": None, "_logged": None, "_warming": None}

    def warm_up(self) -> None:
        """Import MLflow and open the client in a thread. `controller_warm_up` calls this when the
        controller starts its workers: otherwise the import (~2 s of CPU) happens at the first
        report and competes with the second epoch's training on a busy CPU."""
        if self._client is None and self._warming is None:
            self._warming = threading.Thread(target=self._open, daemon=True, name="selfsup-mlflow-warm-up")
            self._warming.start()

    def _open(self) -> None:
        try:
            c = client(self.tracking_uri)
            self._logged = logged_epochs(c, self.run_id)
            self._client = c
        except Exception:  # after_report opens it again, and raises there if it must
            pass

    def _plot_due(self, epoch: int) -> bool:
        if self.curves_every_s is None:
            return False
        now = time.monotonic()
        if self._last_plot is None:
            self._last_plot = now  # the clock starts with the first report
        if epoch == self.total_epochs or now - self._last_plot >= self.curves_every_s:
            self._last_plot = now
            return True
        return False

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if not metrics or "epoch" not in metrics[0]:
            return
        if self._warming is not None:
            self._warming.join()
            self._warming = None
        if self._client is None:
            self._client = client(self.tracking_uri)
            self._logged = logged_epochs(self._client, self.run_id)
        assert self._logged is not None
        m = {k: v for k, v in metrics[0].items() if k != "backfill"}
        if self.fault_kill_before_logging and int(m["epoch"]) == self.fault_kill_before_logging[0]:
            import signal

            os.kill(self.fault_kill_before_logging[1], signal.SIGKILL)
            os._exit(1)
        if not log_report(self._client, self.run_id, metrics[0], self._logged):
            return
        epoch = int(m["epoch"])
        if self._plot_due(epoch):
            try:
                log_curves(self._client, self.run_id)
            except Exception:  # a plot must never end a training run
                pass
        if self.progress is not None:
            try:
                self.progress.put_nowait(dict(m))
            except Exception:
                pass
        from orchestrator.timeline import mark

        mark("epoch_logged", run=getattr(getattr(run_context, "run_config", None), "name", None), epoch=epoch)


def backfill_epochs(uri: str, run_id: str, history: list[dict[str, Any]]) -> int:
    """Log the epochs of a checkpoint's `history` that the run lacks; returns how many.

    The callback logs an epoch after Train has registered its checkpoint: a command killed in
    between leaves the checkpoint without its epoch in MLflow. A resumed run logs the earlier ones
    with its first report (`backfill`); the last epoch has no later report, so the driver logs it
    from the final checkpoint here.
    """
    c = client(uri)
    already = logged_epochs(c, run_id)
    return sum(log_epoch(c, run_id, m, already) for m in history if "epoch" in m)


def finish_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Mark the run FINISHED / FAILED / KILLED."""
    client(uri).set_terminated(run_id, status=status)


def create_run(cfg: Config, *, uri: str, parent_run_id: str | None = None) -> str:
    """The MLflow run of pretraining `cfg` (paths absolute, `run.name` set): its params, config
    YAML and tags; nested under `parent_run_id` (a sweep's). Returns the run id."""
    from orchestrator.config import to_yaml

    exp_id = ensure_experiment(uri, cfg.tracking.experiment)
    return start_run(uri, exp_id, str(cfg.run.name), cfg.flat(), to_yaml(cfg),
                              parent_run_id=parent_run_id, tags=_run_tags(cfg))


def _run_tags(cfg: Config) -> dict[str, str]:
    from orchestrator.config import storage_location
    from orchestrator.data import LABEL_METRICS_TAG, dataset_name, label_metrics, no_labels_note

    # Set where the run is made (a sweep's driver for its trials): a trial process must not open the
    # MLflow store before training (one writer per run, docs/design.md).
    return {"method": cfg.method.name, "encoder": cfg.model.encoder, "dataset": dataset_name(cfg),
            "selfsup.storage_path": storage_location(cfg.run.storage_path),
            LABEL_METRICS_TAG: "on" if label_metrics(cfg) else no_labels_note(cfg.data.path)}


def mark_diverged(uri: str, run_id: str) -> None:
    """A diverged run (NaN/inf loss): tag `diverged`, status FAILED."""
    client(uri).set_tag(run_id, "diverged", "true")
    finish_run(uri, run_id, "FAILED")



@contextlib.contextmanager
def _fluent_tracking_at(uri: str) -> Any:
    """MLflow's fluent API (`start_run`, `log_model`) on `uri` for the block only.

    `mlflow.set_tracking_uri` also exports `MLFLOW_TRACKING_URI`, which every process this one
    starts afterwards would inherit (a test's temporary store reached the 2-node cluster's processes
    that way); the previous URI and the environment are put back.
    """
    import mlflow

    before_env, before = os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
        if before_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before_env


def register_encoder(encoder: Any, *, tracking_uri: str, run_id: str, model_name: str, image_size: int,
                     tags: dict[str, Any], summary: str = "") -> Any:
    """Log the encoder to the run (torch.export "pt2": dynamic batch, height and width) and register a new
    version, created with its tags (callers: `orchestrator.registry.register.register_run_encoder`).

    The model takes float32 `[B, 3, H, W]`, RGB normalised with `pipelines.augment.MEAN` / `STD`,
    any B >= 1 and any H, W >= the encoder's `min_input_size` (at most `image_size`), and returns
    float32 `[B, output_dim]`. selfsup loads it with `orchestrator.registry.load_encoder`, from
    `encoder.json` (how to build it) and `encoder.safetensors` (its weights) logged beside the pt2;
    the pt2 is for deployment (`mlflow.pytorch.load_model`), and is as trustworthy as the store.

    Args:
        encoder: the trained encoder, made by `methods.encoders.build_encoder` (it carries the
            `build_spec` it is rebuilt from), with `output_dim`, and `min_input_size` if it has a
            minimum; moved to CPU and eval mode.
        image_size: the side of the square training images (the export example's size).
        tags: set on the model version (e.g. method, dataset, knn_top1, the kNN protocol of
            `pretrain.protocol_tags`); values become strings. `image_size` and `embedding_dim`
            (the input and output widths, which the champion rule compares) and the input contract
            (`EncoderInput.tags`) are always set.
        summary: the start of the version's description (what was trained, how well); the input
            contract and the output are appended.

    Returns:
        The new `ModelVersion` (with its tags).
    """
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from orchestrator.encoder_input import EncoderInput, exportable, size_oblivious

    from orchestrator.registry.encoder_files import SPEC_FILE, WEIGHTS_FILE, encoder_spec, weights_bytes

    encoder = encoder.to("cpu").eval()
    build = encoder_spec(encoder)  # before anything is logged: an encoder selfsup could not rebuild is refused
    spec = EncoderInput(min_size=min(int(getattr(encoder, "min_input_size", image_size)), image_size),
                        image_size=image_size)
    # -1: mlflow exports these dimensions as dynamic (Dim.AUTO); the range of H and W comes from
    # the `torch._check`s in `exportable`.
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, int(encoder.output_dim)))]))
    # Batch 2, not 1: a size-1 example dimension is exported static (mlflow's note on Dim.AUTO).
    example = torch.randn(2, 3, image_size, image_size).numpy()
    # The fluent API (the run, log_model) and the version's source `models:/<id>` resolve through
    # the global tracking URI: set for this block only.
    with _fluent_tracking_at(tracking_uri):
        c = client(tracking_uri)
        # redirect_stderr: mlflow eprint()s "Successfully registered model ..." (errors still raise).
        with tempfile.TemporaryDirectory(prefix="selfsup-register-") as files, \
                mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None), torch.no_grad(), \
                contextlib.redirect_stderr(io.StringIO()), size_oblivious():
            # What selfsup loads (`registry.encoder_files`): the spec and the weights. The pt2 beside
            # them is for deployment (`mlflow.pytorch.load_model`); selfsup never deserialises it.
            Path(files, SPEC_FILE).write_text(json.dumps(build, sort_keys=True))
            Path(files, WEIGHTS_FILE).write_bytes(weights_bytes(encoder))
            info = mlflow.pytorch.log_model(exportable(encoder, spec.min_size), name="encoder", input_example=example,
                                            signature=signature, serialization_format="pt2",
                                            pip_requirements=PIP_REQUIREMENTS, metadata=spec.tags(),
                                            extra_files=[str(Path(files, SPEC_FILE)), str(Path(files, WEIGHTS_FILE))])
        tags = {**tags, "image_size": image_size, "embedding_dim": int(encoder.output_dim), **spec.tags()}
        description = (f"{summary.strip()} " if summary.strip() else "") + (
            f"Input: {spec.describe()}. Output: float32 [B, {int(encoder.output_dim)}] embeddings "
            "(the encoder's pooled features, no projection head).")
        # The version is created with its tags and description in one request (one transaction in
        # MLflow's SQL store): no reader ever sees it, or resolves a bare NAME to it, half-tagged.
        from mlflow.exceptions import MlflowException

        try:
            c.create_registered_model(model_name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        return c.create_model_version(model_name, info.model_uri, run_id=run_id,
                                      tags={k: str(v) for k, v in tags.items()}, description=description,
                                      model_id=info.model_id)
