"""The GPU step's CPU-testable parts: the race's smoke run, the compile switch, the step's statistics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestrator.config import ConfigError, load_config
from orchestrator.training import (TrainBatches, build_model, build_optimizer, build_scheduler, compile_model,
                                     compile_wanted, train_one_epoch)

REPO = Path(__file__).resolve().parents[2]




def test_race_smoke_run_reaches_a_low_target_and_reports_the_curve(demo_data: Path, tmp_path: Path) -> None:
    """`race_cifar10.py --smoke` runs the race's loop on CPU (ConvNet, 128 images): it stops at the
    first evaluation at or above the target and writes time-to-target, epochs and the kNN curve."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "race_cifar10.py"), "--data", str(demo_data),
                           "--smoke", "--target", "0.3", "--eval-every", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "race_cifar10.json").read_text())
    assert result["smoke"] and result["device"] == "cpu" and result["method"] == "byol"
    assert result["reached"] and result["epochs_to_target"] == result["curve"][-1]["epoch"]
    assert result["curve"][-1]["knn_top1"] >= 0.3 and all(p["knn_top1"] < 0.3 for p in result["curve"][:-1])
    assert 0 < result["data_seconds"] < result["time_to_target_seconds"] <= result["total_seconds"]
    assert "time to 30 % from a cold start" in (tmp_path / "race_cifar10.md").read_text()


def test_race_refuses_a_missing_gpu_in_one_line(demo_data: Path, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "race_cifar10.py"), "--data", str(demo_data),
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 2 and "no CUDA device" in proc.stdout


def test_compile_switch_resolves_per_device_and_refuses_other_words() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto = load_config(None, [], check=False)
    assert auto.optim.compile == "auto" and not compile_wanted(auto, cpu) and compile_wanted(auto, cuda)
    on = load_config(None, ["optim.compile=true"], check=False)
    off = load_config(None, ["optim.compile=false"], check=False)
    assert compile_wanted(on, cpu) and not compile_wanted(off, cuda)
    with pytest.raises(ConfigError, match=r"optim.compile.*auto, true, false"):
        load_config(None, ["optim.compile=sometimes"], check=True, check_data=False)


def test_epoch_statistics_come_from_one_device_wait_and_compile_keeps_the_state_dict(demo_data: Path) -> None:
    """`train_one_epoch` sums the losses on the device (one transfer at the end) and reports the
    first step's time apart; `compile_model` compiles in place, so the state dict keys (the
    checkpoints, the registered encoder) do not change. Compiled with the "eager" backend here
    (Dynamo's tracing alone: Inductor's C++ compile takes a minute on 2 cores)."""
    cfg = load_config(None, [f"data.path={demo_data}", "data.limit=128", "optim.batch_size=32",
                             "optim.compile=true"], check=False)
    from orchestrator.data import decode_all

    decoded = decode_all(cfg, threads=1)
    torch.manual_seed(0)
    model = build_model(cfg)
    keys = list(model.state_dict())
    assert compile_model(cfg, model, torch.device("cpu"), backend="eager")  # Dynamo only, see above
    assert model._compiled_call_impl is not None
    assert list(model.state_dict()) == keys
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, 4)
    batches = TrainBatches(cfg, decoded, torch.device("cpu"), rank=0, world=1)
    stats = train_one_epoch(model, optimizer, scheduler, batches.epoch(1, 7), device=torch.device("cpu"),
                            first_step=0, total_steps=4, max_steps=4)
    assert stats["steps"] == 4 and stats["images"] == 128
    assert 0 < stats["first_step_seconds"] <= stats["seconds"]
    assert isinstance(stats["loss"], float) and 0 < stats["loss"] < 10
