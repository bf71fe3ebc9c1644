"""The pretraining config: defaults, YAML + --set, and one clear message (exit 2) per bad config.

No Ray here: every bad config must be rejected before Ray starts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from orchestrator import cli
from orchestrator.config import (Config, ConfigError, apply_overrides, load_config, parse_overrides, to_yaml,
                                 validate)

REPO = Path(__file__).resolve().parents[2]
PRESETS = ["demo", "cifar10-simclr", "cifar10-moco", "cifar10-byol"]


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    """A folder with a manifest naming train/test and classes (validation reads nothing else; a
    dataset without classes needs no test split)."""
    d = tmp_path / "data"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"name": "x", "classes": ["a", "b"],
                                                 "splits": {"train": {"files": [], "rows": 8},
                                                                          "test": {"files": [], "rows": 4}}}))
    return d


def test_demo_yaml_spells_out_the_defaults() -> None:
    assert load_config(str(REPO / "configs" / "demo.yaml"), check=False) == Config()


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_load_and_validate(preset: str, data_dir: Path) -> None:
    cfg = load_config(str(REPO / "configs" / f"{preset}.yaml"), [f"data.path={data_dir}"])
    assert cfg.method.name in preset or preset == "demo"
    if preset != "demo":
        assert (cfg.model.encoder, cfg.model.cifar_stem, cfg.data.image_size) == ("resnet18", True, 32)


def test_yaml_then_overrides_typed(tmp_path: Path, data_dir: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"method": {"name": "moco", "queue_size": 512}, "optim": {"lr": "1e-3"},
                                 "data": {"path": str(data_dir), "source": None}}))
    cfg = load_config(str(f), ["method.temperature=0.1", "optim.epochs=3", "optim.scale_lr=true",
                               "scaling.cpus_per_worker=0.5", "run.name=r1"])
    assert cfg.method.name == "moco" and cfg.method.queue_size == 512 and cfg.method.temperature == 0.1
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.epochs == 3 and cfg.optim.scale_lr is True and cfg.run.name == "r1"
    assert cfg.effective_lr() == pytest.approx(1e-3 * 256 / 256)
    assert cfg.method_kwargs() == {"temperature": 0.1, "queue_size": 512}
    assert cfg.augment_preset() == "moco_v2"


def test_round_trips_through_dict_and_yaml() -> None:
    cfg = apply_overrides(Config(), {"method.name": "byol", "method.momentum": 0.99, "optim.batch_size": 64})
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert Config.from_dict(yaml.safe_load(to_yaml(cfg))) == cfg
    assert cfg.flat()["method.momentum"] == 0.99
    assert Config().method.momentum is None  # apply_overrides returns a copy


def test_parse_overrides_reads_yaml_scalars() -> None:
    assert parse_overrides(["a.b=1", "a.c=0.5", "a.d=null", "a.e=true", "a.f=x=y"]) == {
        "a.b": 1, "a.c": 0.5, "a.d": None, "a.e": True, "a.f": "x=y"}


def _bad_file(tmp_path: Path, text: str) -> str:
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    return str(f)


BAD = [
    # (yaml text or None, --set overrides, fragments the one-line message must contain)
    ("method:\n  name: simclr\n  temprature: 0.2\n", [], ["bad.yaml", "method.temprature", "temperature"]),
    ("trainer:\n  epochs: 3\n", [], ["bad.yaml", "unknown section 'trainer'", "optim"]),
    ("optim: [1, 2\n", [], ["bad.yaml", "not valid YAML"]),
    (None, ["optim.lr=fast"], ["--set optim.lr=fast", "expected a number"]),
    (None, ["optim.epochs=2.5"], ["optim.epochs", "expected an integer"]),
    (None, ["scaling.use_gpu=maybe"], ["scaling.use_gpu", "true or false"]),
    (None, ["optim.batch_size=255"], ["--set optim.batch_size=255", "divisible by scaling.num_workers (2)"]),
    ("optim:\n  batch_size: 255\n", [], ["bad.yaml: optim.batch_size = 255", "divisible by scaling.num_workers"]),
    (None, ["scaling.use_gpu=true"], ["scaling.use_gpu", "no CUDA GPU"]),
    (None, ["method.name=swav"], ["--set method.name=swav: allowed: simclr, moco, byol"]),
    (None, ["model.encoder=vit"], ["--set model.encoder=vit", "convnet, resnet18, resnet50"]),
    (None, ["optim.name=adam"], ["--set optim.name=adam", "sgd, lars, adamw"]),
    (None, ["method.momentum=0.99"], ["method.momentum", "only moco, byol take it, not simclr"]),
    (None, ["optim.lr=-1"], ["--set optim.lr=-1: must be > 0"]),
    ("optim:\n  lr: 0\n", [], ["bad.yaml: optim.lr = 0.0: must be > 0"]),
    ("optim:\n  lr: 0\n", ["optim.lr=-2"], ["--set optim.lr=-2: must be > 0"]),  # the --set wins, and is named
    (None, ["optim.warmup_epochs=20"], ["optim.warmup_epochs", "<= optim.epochs (5)"]),
    (None, ["run.name=a b"], ["--set run.name=a b", "letters, digits"]),
    (None, ["data.path=/nonexistent/selfsup", "data.source=null"],
     ["--set data.path=/nonexistent/selfsup", "does not exist", "selfsup ingest"]),
    (None, ["data.test_split=val"], ["data.test_split = 'val'", "has splits: test, train"]),
    (None, ["tracking.uri=file:///tmp/mlruns"], ["tracking.uri", "sqlite"]),
    (None, ["optim"], ["--set 'optim'", "KEY=VALUE"]),
]


@pytest.mark.parametrize("text,overrides,fragments", BAD, ids=[b[2][0] for b in BAD])
def test_bad_config_one_clear_line_exit_2(text: str | None, overrides: list[str], fragments: list[str],
                                          tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["pretrain"]
    if text is not None:
        argv += ["--config", _bad_file(tmp_path, text)]
    if not any(o.startswith("data.") for o in overrides):
        overrides = [f"data.path={data_dir}", "data.source=null", *overrides]
    elif "data.test_split=val" in overrides:
        overrides = [f"data.path={data_dir}", *overrides]
    for o in overrides:
        argv += ["--set", o]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("selfsup pretrain: error: ")
    for fragment in fragments:
        assert fragment in err


def test_missing_config_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["pretrain", "--config", "no/such.yaml"]) == 2
    assert "--config no/such.yaml: no such file" in capsys.readouterr().err


def test_resume_without_a_run_is_a_user_error(tmp_path: Path, data_dir: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["pretrain", "--resume", "--set", f"data.path={data_dir}", "--set", "data.source=null",
            "--set", f"run.storage_path={tmp_path / 'runs'}"]
    assert cli.main(argv) == 2
    assert "--resume: no demo-<n> run under" in capsys.readouterr().err
    assert cli.main([*argv, "--set", "run.name=nope"]) == 2
    assert "there is no run 'nope'" in capsys.readouterr().err


def test_validate_can_skip_data_and_gpu_checks() -> None:
    cfg = apply_overrides(Config(), {"data.path": "/nonexistent", "data.source": None, "scaling.use_gpu": True})
    validate(cfg, check_data=False, check_gpu=False)
    with pytest.raises(ConfigError):
        validate(cfg, check_gpu=False)


def test_local_ray_stays_on_loopback_and_a_config_address_says_to_use_ray_address(
        tmp_path: Path, data_dir: Path) -> None:
    """The CLI keeps the Ray it starts on 127.0.0.1; a cluster is joined through RAY_ADDRESS."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", cli.LOOPBACK_ENV)}
    code = ("import os, sys; from orchestrator import cli; cli.keep_local_ray_on_loopback(); "
            "print(os.environ.get(cli.LOOPBACK_ENV)); sys.exit(cli.main(sys.argv[1:]))")
    argv = ["pretrain", "--set", f"data.path={data_dir}", "--set", "data.source=null",
            "--set", f"run.storage_path={tmp_path / 'runs'}", "--set", "run.ray_address=auto"]
    p = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=300)
    assert p.stdout.strip() == "0"  # Ray, imported after this, binds 127.0.0.1 only
    assert p.returncode == 2, p.stderr
    assert "--set run.ray_address=auto: set the environment variable RAY_ADDRESS=auto" in p.stderr
    assert not (tmp_path / "runs").exists()  # refused before anything was written
    p = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True,
                       env={**env, "RAY_ADDRESS": "auto"}, timeout=300)
    assert p.stdout.splitlines()[0] == "None"  # joining a cluster keeps Ray's own default
