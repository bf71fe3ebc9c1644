"""What a pretraining run produced (`PretrainResult`) and what `selfsup pretrain` prints: the
header, one line per epoch (from the Train controller's MLflow callback, through a Ray queue), and
the summary at the end."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any

from orchestrator.config import Config
from orchestrator.data import DataCheck, DecodedData, train_rows
from orchestrator.run_folders import RunPaths


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
    restarts: str = ""  # the worker-group restarts and resizes, and the time each lost ("" when none)

    @property
    def model_uri(self) -> str | None:
        return f"models:/{self.model_name}/{self.model_version}" if self.model_version else None


def duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def pct(value: Any) -> str:
    return f"{100 * float(value):5.1f}%" if value is not None and math.isfinite(float(value)) else "  n/a"


def epoch_line(m: dict[str, Any], total_epochs: int, epoch_times: list[float]) -> str:
    """One line per epoch: epoch, loss, kNN top-1, lr, views/s, epoch time, ETA."""
    epoch = int(m["epoch"])
    epoch_times.append(float(m.get("epoch_seconds", 0.0)))
    eta = sum(epoch_times) / len(epoch_times) * (total_epochs - epoch)
    width = len(str(total_epochs))
    parts = [f"epoch {epoch:{width}d}/{total_epochs}", f"loss {float(m.get('loss', math.nan)):.4f}"]
    if "knn_top1" in m:  # not for a dataset without labels
        parts.append(f"kNN top-1 {pct(m.get('knn_top1'))}")
    if "linear_top1" in m:
        parts.append(f"linear top-1 {pct(m['linear_top1'])}")
    if "momentum" in m:
        parts.append(f"tau {float(m['momentum']):.4f}")
    parts += [f"lr {float(m.get('lr', 0)):.2e}", f"{float(m.get('views_per_second', 0)):,.0f} views/s",
              f"{float(m.get('epoch_seconds', 0)):.1f}s", f"ETA {duration(eta)}"]
    return "  ".join(parts)


class EpochPrinter:
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
            print(f"  untrained encoder: kNN top-1 {pct(m['knn_top1_untrained']).strip()}", flush=True)
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


def print_header(cfg: Config, paths: RunPaths, resume: bool, decoded: DecodedData | None,
                  checked: DataCheck | None = None) -> None:
    s = cfg.scaling
    count = f"{s.min_workers}-{s.max_workers} workers, elastic" if s.elastic else \
        f"{s.num_workers} worker{'s' if s.max_workers > 1 else ''}"
    where = f"{count} ({'GPU' if s.use_gpu else 'CPU'})"
    how = (f"decoded once into memory, {decoded.nbytes / 1e6:,.0f} MB" if decoded is not None
           else "streamed through Ray Data")
    print(f"selfsup pretrain: {'resuming' if resume else 'run'} {paths.name}: {cfg.method.name}, "
          f"{cfg.model.encoder}, {where}, {cfg.optim.epochs} epochs, batch {cfg.optim.batch_size}, "
          f"data {cfg.data.path} ({train_rows(cfg):,} training images, {how})", flush=True)
    if checked is not None and checked.label_note:
        print(f"  {checked.label_note}", flush=True)


def print_summary(r: PretrainResult) -> None:
    if r.diverged:
        print(f"selfsup pretrain: run {r.run_name} diverged (loss {r.loss}) after epoch {r.epochs}; "
              "nothing registered. Try a lower optim.lr.")
        return
    gain = ""
    if r.knn_top1 is not None and r.knn_top1_untrained is not None:
        gain = f" (untrained encoder: {pct(r.knn_top1_untrained).strip()})"
    knn = f"kNN top-1 {pct(r.knn_top1).strip()}{gain}" if r.knn_top1 is not None else \
        f"loss {r.loss:.4f} (no labels: no kNN)" if r.loss is not None else "no labels: no kNN"
    linear = f", linear top-1 {pct(r.linear_top1).strip()}" if r.linear_top1 is not None else ""
    print(f"done in {duration(r.wall_seconds)}: {knn}{linear} after {r.epochs} epochs")
    print(f"  MLflow run:   {r.mlflow_run_id} (experiment {r.experiment!r}, run {r.run_name!r}) in {r.tracking_uri}")
    if r.tracking_uri.startswith("sqlite:"):
        print(f"                view it: mlflow ui --backend-store-uri {r.tracking_uri}")
    if r.model_uri:
        print(f"  registered:   {r.model_uri}  ->  selfsup registry embed {r.model_uri} IMAGES OUT.parquet")
        print(f"  champion:     {'now this version' if r.champion else r.champion_note}")
    print(f"  checkpoints:  {r.run_dir}  (continue an interrupted run with --resume)")
    if r.restarts:
        print(f"  workers:      {r.restarts}")
