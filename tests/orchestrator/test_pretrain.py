"""`selfsup pretrain` end to end on a local Ray, against a real `mlflow server` on 127.0.0.1.

- the demo on 2 workers learns (kNN top-1 beats the untrained encoder), is tracked once per epoch,
  ends with a linear probe, and its registered encoder loads with selfsup's safe
  `registry.load_encoder` and embeds any batch size and any image size from its minimum;
  `selfsup evaluate` scores that encoder as pretraining did and logs a linked evaluation run;
- a worker killed mid-run (fault hook) costs one restart from the last checkpoint; every epoch is
  still logged exactly once;
- the whole command killed after its first checkpoint continues with `--resume`; killed again
  between the last checkpoint and its MLflow log, a further `--resume` logs the missing epoch.

A shortened demo (2 epochs) keeps each run around a minute on an otherwise idle 2-core machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.config import load_config
from orchestrator.pretrain import FAULT_BEFORE_LOG_ENV, FAULT_ENV, RUN_RECORD, PretrainResult, run_pretrain
from orchestrator.epoch_loop import FAULT_MARKER

EPOCHS = 2




def _overrides(data: Path, tmp: Path, uri: str, experiment: str, **extra: object) -> list[str]:
    base = {"data.path": data, "data.source": "null", "run.storage_path": tmp / "runs", "tracking.uri": uri,
            "tracking.experiment": experiment, "optim.epochs": EPOCHS, **extra}
    return [f"{k}={v}" for k, v in base.items()]


# Fault tests assert bookkeeping, not learning: half the images, a small kNN probe.
SMALL = {"data.limit": 2048, "eval.knn_train_limit": 1000, "eval.knn_test_limit": 500}


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


@pytest.mark.slow
def test_demo_learns_registers_and_the_encoder_embeds(demo_data: Path, tmp_path: Path, mlflow_server: str,
                                                       ray_temp_root: str, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import torch
    from mlflow.tracking import MlflowClient

    from pipelines.augment import normalize
    from pipelines.memory import load_split

    monkeypatch.setenv("SELFSUP_RAY_TEMP_ROOT", ray_temp_root)
    cfg = load_config(None, _overrides(demo_data, tmp_path, mlflow_server, "e2e", **{"tracking.model_name": "e2e-encoder"}))
    r = run_pretrain(cfg, stem="demo", progress=True)
    out = capsys.readouterr().out
    assert "(4,000 training images, decoded once into memory, 21 MB)" in out  # data.loader auto -> memory
    assert out.count(" epoch ") == EPOCHS and "ETA" in out

    assert r.run_name == "demo-1" and r.epochs == EPOCHS and not r.diverged
    assert r.knn_top1 is not None and r.knn_top1_untrained is not None
    assert r.knn_top1 > r.knn_top1_untrained, (r.knn_top1, r.knn_top1_untrained)
    # The linear probe ran once, after the last epoch, and learned the digits (chance: 10%).
    assert r.linear_top1 is not None and r.linear_top5 is not None
    assert r.linear_top1 > 0.5 and r.linear_top5 >= r.linear_top1, (r.linear_top1, r.linear_top5)
    assert "linear top-1" in out  # the last epoch's line
    c = MlflowClient(mlflow_server)
    run = c.get_run(r.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.params["method.name"] == "simclr"
    assert {a.path for a in c.list_artifacts(r.mlflow_run_id)} >= {"config.yaml", "curves.png"}
    for key in ("loss", "knn_top1", "lr", "views_per_second", "epoch_seconds"):
        assert [s for s, _ in _history(mlflow_server, r.mlflow_run_id, key)] == [1, 2], key
    assert len(_history(mlflow_server, r.mlflow_run_id, "knn_top1_untrained")) == 1
    for key in ("linear_top1", "linear_top5"):
        assert [s for s, _ in _history(mlflow_server, r.mlflow_run_id, key)] == [EPOCHS], key
    linear_seconds = _history(mlflow_server, r.mlflow_run_id, "linear_seconds")[0][1]
    assert linear_seconds < 30, linear_seconds  # seconds, not minutes, on 2 busy cores
    losses = [v for _, v in _history(mlflow_server, r.mlflow_run_id, "loss")]
    assert losses[-1] < losses[0]

    mv = c.get_model_version("e2e-encoder", r.model_version)
    assert mv.tags["method"] == "simclr" and mv.tags["dataset"] == "mnist-demo"
    assert float(mv.tags["knn_top1"]) == pytest.approx(r.knn_top1)
    # How the run measured kNN, recorded for the champion rule (the demo's bank: the whole train split).
    assert {k: mv.tags[k] for k in ("image_size", "embedding_dim", "knn_bank", "knn_queries", "knn_k")} == {
        "image_size": "28", "embedding_dim": "256", "knn_bank": "4000", "knn_queries": "1000", "knn_k": "200"}
    assert float(mv.tags["linear_top1"]) == pytest.approx(r.linear_top1)
    assert mv.tags["input_min_size"] == "16" and mv.tags["input_channels"] == "3"
    for words in ("simclr", "mnist-demo", f"for {EPOCHS} epochs", "kNN top-1", "linear top-1",
                  "float32 [B, 3, H, W], any height and width >= 16 (trained at 28x28)", "normalised"):
        assert words in mv.description, (words, mv.description)
    from orchestrator.registry import load_encoder

    model = load_encoder(f"e2e-encoder/{r.model_version}", tracking_uri=mlflow_server).module
    images, _ = load_split(demo_data, "test", limit=40, image_size=28)
    x = normalize(images)
    with torch.no_grad():
        for b in (3, 17):
            z = model(x[:b])
            assert z.shape == (b, 256) and torch.isfinite(z).all()
        # The same images embed the same in a bigger batch (eval-mode BN, no batch coupling).
        torch.testing.assert_close(model(x[:17])[:3], model(x[:3]), rtol=1e-4, atol=1e-4)
        # Any image size from the stated minimum (16) up: 28x28 as trained, and 40x36.
        big = torch.nn.functional.interpolate(x[:5], size=(40, 36), mode="bilinear", align_corners=False)
        assert model(big).shape == (5, 256) and torch.isfinite(model(big)).all()
        assert model(x[:5, :, :16, :16]).shape == (5, 256)

    _evaluate_the_registered_encoder(demo_data, mlflow_server, r, capsys)


def _evaluate_the_registered_encoder(demo_data: Path, uri: str, r: PretrainResult, capsys: pytest.CaptureFixture[str]) -> None:
    """`selfsup evaluate` on the encoder this module's demo run registered (no second pretraining)."""
    from mlflow.tracking import MlflowClient

    from orchestrator.cli import main as cli_main

    capsys.readouterr()
    assert cli_main(["evaluate", "models:/e2e-encoder@champion", str(demo_data), "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    values = {ln.split()[0]: float(ln.split()[1]) for ln in out.splitlines()
              if ln.split() and ln.split()[0] in ("knn_top1", "knn_top5", "linear_top1", "linear_top5")}
    assert set(values) == {"knn_top1", "knn_top5", "linear_top1", "linear_top5"}, out
    # Same protocol, images and seed as the run's last-epoch probe, through the exported model.
    assert values["knn_top1"] == pytest.approx(r.knn_top1, abs=0.005)
    assert values["linear_top1"] == pytest.approx(r.linear_top1, abs=0.02)
    c = MlflowClient(uri)
    mv = c.get_model_version("e2e-encoder", r.model_version)
    run = c.get_run(mv.tags["evaluation_run.mnist-demo"])
    assert c.get_experiment(run.info.experiment_id).name == "selfsup-evaluations"
    assert run.info.status == "FINISHED" and run.info.run_id in out
    assert run.data.tags["model_name"] == "e2e-encoder" and run.data.tags["model_version"] == mv.version
    assert run.data.tags["dataset"] == "mnist-demo" and "linear probe" in run.data.tags["protocol"]
    assert run.data.metrics["linear_top1"] == pytest.approx(values["linear_top1"], abs=1e-4)

    # MAE's protocol beside them: a copy of the registered encoder fine-tuned end to end with a head.
    assert cli_main(["evaluate", "models:/e2e-encoder@champion", str(demo_data), "--tracking-uri", uri,
                     "--finetune-epochs", "2", "--finetune-lr", "1e-3", "--train-limit", "300",
                     "--test-limit", "200", "--linear-epochs", "0"]) == 0
    out = capsys.readouterr().out
    tuned = {ln.split()[0]: float(ln.split()[1]) for ln in out.splitlines()
             if ln.split() and ln.split()[0].startswith(("finetune_", "knn_top1"))}
    assert set(tuned) == {"knn_top1", "finetune_top1", "finetune_top5"}, out
    assert tuned["finetune_top1"] > 0.15 and tuned["finetune_top5"] >= tuned["finetune_top1"]  # 10 digits: chance 0.1
    tuned_run = c.get_run(c.get_model_version("e2e-encoder", r.model_version).tags["evaluation_run.mnist-demo"])
    assert tuned_run.data.params["finetune_epochs"] == "2" and "fine-tuned end to end" in tuned_run.data.tags["protocol"]

    # An image size below the encoder's minimum: one line, exit 2, no run logged.
    runs_before = len(c.search_runs([run.info.experiment_id]))
    assert cli_main(["evaluate", "models:/e2e-encoder@champion", str(demo_data), "--tracking-uri", uri,
                     "--image-size", "12"]) == 2
    err = capsys.readouterr().err
    assert err == (f"selfsup evaluate: error: models:/e2e-encoder/{mv.version} takes images of at least "
                   "16x16 pixels; got 12x12\n")
    assert len(c.search_runs([run.info.experiment_id])) == runs_before


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_dead_worker_resumes_from_last_checkpoint_and_logs_each_epoch_once(
        demo_data: Path, tmp_path: Path, mlflow_server: str, ray_temp_root: str,
        monkeypatch: pytest.MonkeyPatch, loader: str) -> None:
    """With either loader: the restarted worker group maps the driver's decoded data again, or
    gets a new Ray Data shard."""
    monkeypatch.setenv("SELFSUP_RAY_TEMP_ROOT", ray_temp_root)
    monkeypatch.setenv(FAULT_ENV, "2")  # the last worker exits (os._exit) in epoch 2, once
    cfg = load_config(None, _overrides(demo_data, tmp_path, mlflow_server, "fault",
                                       **{"tracking.register": "false", "run.name": f"faulty-{loader}",
                                          "data.loader": loader, **SMALL}))
    r = run_pretrain(cfg)

    assert (Path(r.run_dir) / FAULT_MARKER).is_file(), "the fault hook did not fire"
    assert r.epochs == EPOCHS and r.model_version is None
    for key in ("loss", "knn_top1", "resumed_from_epoch"):
        assert [s for s, _ in _history(mlflow_server, r.mlflow_run_id, key)] == [1, 2], key
    # Epoch 1 ran in the first worker group; epoch 2 (where a worker died) in the restarted one,
    # which started from checkpoint 1.
    assert [v for _, v in _history(mlflow_server, r.mlflow_run_id, "resumed_from_epoch")] == [0, 1]


def _wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"selfsup pretrain exited early with {proc.returncode}")
        snapshot = run_dir / "checkpoint_manager_snapshot.json"  # Train has registered the checkpoint
        if snapshot.is_file() and "checkpoint_dir_name" in snapshot.read_text():
            return
        time.sleep(0.5)
    raise AssertionError(f"no checkpoint in {run_dir} after {timeout} s")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@pytest.mark.slow
def test_killed_command_continues_with_resume(demo_data: Path, tmp_path: Path, mlflow_server: str,
                                               ray_temp_root: str) -> None:
    env = {**os.environ, "SELFSUP_RAY_TEMP_ROOT": ray_temp_root, "PYTHONUNBUFFERED": "1"}
    env.pop(FAULT_ENV, None)
    env.pop(FAULT_BEFORE_LOG_ENV, None)
    argv = [sys.executable, "-m", "orchestrator.cli", "pretrain"]
    for o in _overrides(demo_data, tmp_path, mlflow_server, "killed", **{"run.name": "killme",
                                                                          "tracking.register": "false", **SMALL}):
        argv += ["--set", o]
    run_dir = tmp_path / "runs" / "killme"
    log = open(tmp_path / "first.log", "wb")
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        _wait_for_checkpoint(run_dir, proc, timeout=240)
    finally:
        _kill_group(proc)  # the driver and the local Ray it started (same process group)
        log.close()
    record = (run_dir / RUN_RECORD).read_text()
    assert '"status": "running"' in record

    # Without --resume the name is taken: a clear error, nothing overwritten.
    again = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "continue it with --resume" in again.stderr

    # The resumed command dies again, this time after the last epoch's checkpoint and before that
    # epoch reaches MLflow (the fault hook kills the driver and the Train controller there).
    import json

    run_id = json.loads((run_dir / RUN_RECORD).read_text())["mlflow_run_id"]
    log = open(tmp_path / "second.log", "wb")
    proc = subprocess.Popen([*argv, "--resume"], cwd=tmp_path, env={**env, FAULT_BEFORE_LOG_ENV: str(EPOCHS)},
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        proc.wait(timeout=400)
    finally:
        _kill_group(proc)  # the local Ray the killed driver left behind
        log.close()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "second.log").read_text()[-3000:]
    assert EPOCHS not in [s for s, _ in _history(mlflow_server, run_id, "loss")]
    assert '"status": "running"' in (run_dir / RUN_RECORD).read_text()

    # --resume of that finished-but-unlogged run: no epoch to train; the driver logs the missing
    # epochs from the last checkpoint, then registers and closes as usual.
    done = subprocess.run([*argv, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resuming killme" in done.stdout and "kNN top-1" in done.stdout
    assert '"status": "finished"' in (run_dir / RUN_RECORD).read_text()
    for key in ("loss", "knn_top1", "lr", "resumed_from_epoch"):
        assert [s for s, _ in _history(mlflow_server, run_id, key)] == [1, 2], key
    resumed = [v for _, v in _history(mlflow_server, run_id, "resumed_from_epoch")]
    assert resumed[0] == 0 and resumed[-1] >= 1, resumed  # the rerun started from a checkpoint


@pytest.mark.slow
def test_loose_unlabeled_images_pretrain_and_register_without_knn(cifar10_dir: Path, tmp_path: Path, mlflow_server: str,
                                                                  ray_temp_root: str, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """An ImageFolder of loose images (no class folders): labels -1, no test rows. It pretrains and
    registers an encoder; kNN is left out, and the run, the version and the terminal say so."""
    import io

    import pyarrow.parquet as pq
    from mlflow.tracking import MlflowClient

    from orchestrator.data import LABEL_METRICS_TAG
    from pipelines.ingest import ingest

    monkeypatch.setenv("SELFSUP_RAY_TEMP_ROOT", ray_temp_root)
    src = tmp_path / "photos"
    src.mkdir()
    images = pq.ParquetFile(cifar10_dir / "test-00000-of-00001.parquet").read_row_group(0).column("image")
    for i, data in enumerate(images.to_pylist()[:256]):
        (src / f"img{i:03d}.jpg").write_bytes(io.BytesIO(data).getvalue())  # real JPEGs, loose
    m = ingest(str(src), tmp_path / "data", test_fraction=0.0, progress=False)
    assert m.classes == [] and m.rows("train") == 256 and m.rows("test") == 0
    cfg = load_config(None, _overrides(tmp_path / "data", tmp_path, mlflow_server, "unlabeled",
                                       **{"optim.epochs": 1, "optim.batch_size": 64, "data.image_size": 32,
                                          "tracking.model_name": "loose-encoder"}))
    r = run_pretrain(cfg, stem="loose", progress=True)
    out = capsys.readouterr().out
    assert "has no labels (manifest.json lists no classes): label metrics (kNN) left out" in out
    assert "kNN top-1" not in out, out

    assert r.epochs == 1 and not r.diverged and r.knn_top1 is None and r.loss is not None
    assert r.metrics["steps"] == 4  # 256 images / 2 workers = 128 each, / 32 per worker: real steps
    c = MlflowClient(mlflow_server)
    run = c.get_run(r.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags[LABEL_METRICS_TAG].startswith(str(tmp_path / "data"))
    assert "knn_top1" not in run.data.metrics and "loss" in run.data.metrics
    mv = c.get_model_version("loose-encoder", r.model_version)
    assert mv.tags[LABEL_METRICS_TAG] == "off: no labels" and "knn_top1" not in mv.tags
