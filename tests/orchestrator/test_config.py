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
PRESETS = ["demo", "cifar10-simclr", "cifar10-moco", "cifar10-byol", "cifar10-simsiam", "cifar10-barlow_twins",
           "cifar10-vicreg", "cifar10-dino", "cifar10-swav", "imagenet-swav"]


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
    cfg = load_config(str(REPO / "configs" / f"{preset}.yaml"), [f"data.path={data_dir}", "scaling.use_gpu=false"])
    assert cfg.method.name in preset or preset == "demo"
    if preset.startswith("cifar10"):
        assert (cfg.model.encoder, cfg.model.cifar_stem, cfg.data.image_size) == ("resnet18", True, 32)
    if preset.startswith("imagenet"):
        assert (cfg.model.encoder, cfg.model.cifar_stem, cfg.data.image_size) == ("resnet50", False, 224)


# The ViT and ImageNet presets: (encoder, its arguments, image size); GPU presets checked without one.
VIT_PRESETS = {"cifar10-dino-vit": ("vit_tiny", {"patch_size": 4, "drop_path_rate": 0.1}, 32),
               "imagenet-dino-vits16": ("vit_small", {"patch_size": 16, "drop_path_rate": 0.1}, 224),
               "cifar10-mae": ("vit_tiny", {"patch_size": 4}, 32),
               "imagenet-mae-vitb16": ("vit_base", {"patch_size": 16}, 224)}


@pytest.mark.parametrize("preset", sorted(VIT_PRESETS))
def test_vit_and_imagenet_presets_load_and_validate(preset: str, data_dir: Path) -> None:
    cfg = load_config(str(REPO / "configs" / f"{preset}.yaml"), [f"data.path={data_dir}", "scaling.use_gpu=false"])
    assert cfg.method.name in preset.replace("-", "_")
    assert (cfg.model.encoder, cfg.model.encoder_args, cfg.data.image_size) == VIT_PRESETS[preset]
    if cfg.method.name == "dino":  # main_dino.py's recipe
        assert (cfg.optim.name, cfg.optim.weight_decay, cfg.optim.weight_decay_end) == ("adamw", 0.04, 0.4)
        assert (cfg.method.clip_grad, cfg.method.freeze_last_layer_epochs, cfg.method.momentum) == (3.0, 1, 0.996)
        assert cfg.method.local_crop_size % cfg.model.encoder_args["patch_size"] == 0


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
    (None, ["method.name=swaw"], ["--set method.name=swaw: allowed: simclr, moco, byol, simsiam, barlow_twins, "
                                  "vicreg, dino, swav, mae"]),
    (None, ["method.name=mae"], ["model.encoder = 'convnet'", "MAE needs a ViT encoder"]),
    (None, ["method.name=mae", "model.encoder=vit_tiny", "model.encoder_args={patch_size: 16}"],
     ["data.image_size = 28", "multiple of the ViT's patch size (16)"]),
    (None, ["method.name=mae", "method.mask_ratio=1.0"], ["method.mask_ratio", "[0, 1)"]),
    (None, ["method.name=mae", "model.encoder=vit_tiny", "model.encoder_args={patch_size: 4}", "method.decoder_dim=30"],
     ["--set method.decoder_dim=30", "multiple of 4"]),
    (None, ["method.name=swav", "method.queue_length=-1"], ["method.queue_length", ">= 0"]),
    (None, ["method.name=mae", "method.local_crops=2"], ["method.local_crops", "only dino, swav take it, not mae"]),
    (None, ["model.encoder=vit"], ["--set model.encoder=vit", "convnet, resnet18, resnet50, vit_tiny", "timm:"]),
    (None, ["model.encoder=timm:no_such_net"], ["model.encoder", "timm:<a timm model name>"]),
    (None, ["model.encoder=vit_tiny", "model.encoder_args={patch_size: 4, no_such_arg: 1}"],
     ["model.encoder_args", "not taken by encoder vit_tiny", "no_such_arg"]),
    (None, ["model.encoder=vit_tiny", "model.encoder_args={pretrained: true}"],
     ["model.encoder_args", "'pretrained' is not allowed"]),
    (None, ["model.encoder_args={depth: {a: 1}}"], ["model.encoder_args", "depth", "expected a number"]),
    (None, ["model.encoder_args={depth: 2}"], ["model.encoder_args", "takes no arguments"]),
    (None, ["optim.name=adam"], ["--set optim.name=adam", "sgd, lars, adamw"]),
    (None, ["method.momentum=0.99"], ["method.momentum", "only moco, byol, dino take it, not simclr"]),
    (None, ["method.name=vicreg", "method.lambd=0.01"], ["method.lambd", "only barlow_twins take it, not vicreg"]),
    (None, ["method.name=barlow_twins", "method.lambd=-0.1"], ["--set method.lambd=-0.1: must be >= 0"]),
    (None, ["method.name=barlow_twins", "method.lambd=.nan"], ["--set method.lambd=nan: expected a finite number"]),
    (None, ["method.name=vicreg", "method.var_weight=.inf"], ["method.var_weight", "finite"]),
    (None, ["method.name=simclr", "method.temperature=.nan"], ["method.temperature", "finite"]),
    (None, ["method.name=dino", "method.teacher_temp=0"], ["--set method.teacher_temp=0: must be > 0"]),
    (None, ["method.name=dino", "method.momentum=1.5"], ["method.momentum", "[0, 1)"]),
    (None, ["method.name=dino", "method.local_crops=-1"], ["method.local_crops", ">= 0"]),
    (None, ["method.name=dino", "method.local_crop_size=64"], ["method.local_crop_size", "<= data.image_size (28)"]),
    (None, ["method.name=dino", "data.augment_on=data", "data.loader=stream"],
     ["data.augment_on", "local crops are made on the worker"]),
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
    # NaN and infinity: every float field must be finite, from a file or from --set
    (None, ["optim.lr=nan"], ["--set optim.lr=nan: expected a finite number"]),
    (None, ["optim.lr=inf"], ["--set optim.lr=inf: expected a finite number"]),
    ("optim:\n  lr: .nan\n", [], ["bad.yaml: optim.lr: expected a finite number, got nan"]),
    ("optim:\n  warmup_epochs: .inf\n", [], ["bad.yaml: optim.warmup_epochs: expected a finite number"]),
    ("optim:\n  weight_decay: -.inf\n", [], ["bad.yaml: optim.weight_decay: expected a finite number"]),
    (None, ["method.temperature=NaN"], ["--set method.temperature=NaN: expected a finite number"]),
    (None, ["eval.knn_t=.inf"], ["--set eval.knn_t=inf: expected a finite number"]),
    (None, ["method.name=byol", "method.momentum=.nan"], ["--set method.momentum=nan: expected a finite"]),
    # bounds
    (None, ["method.name=byol", "method.momentum=1"], ["--set method.momentum=1: must be in [0, 1)"]),
    (None, ["optim.sgd_momentum=1.5"], ["--set optim.sgd_momentum=1.5: must be in [0, 1)"]),
    (None, ["optim.batch_size=131072"], ["--set optim.batch_size=131072: must be <= 65536 (the global batch)"]),
    (None, ["data.image_size=4096"], ["--set data.image_size=4096: must be <= 1024"]),
    (None, ["data.image_size=1024", "optim.batch_size=4096"],
     ["--set optim.batch_size=4096: with data.image_size 1024 and 2 worker(s)", "48 GiB; at most 16 GiB"]),
    (None, ["tracking.model_name=a'b"], ["--set tracking.model_name=a'b", "letters, digits"]),
    # elastic scaling.num_workers: [min, max]; the global batch must split over every count in it
    (None, ["scaling.num_workers=[1, 3]", "optim.batch_size=256"],
     ["optim.batch_size", "scaling.num_workers [1, 3]", "does not split over 3", "multiple of 6"]),
    (None, ["scaling.num_workers=[2, 1]"], ["--set scaling.num_workers=[2, 1]", "1 <= min <= max"]),
    (None, ["scaling.num_workers=[0, 2]"], ["--set scaling.num_workers=[0, 2]", "1 <= min <= max"]),
    (None, ["scaling.num_workers=[1, 2, 4]"], ["--set scaling.num_workers=[1, 2, 4]", "[min, max]"]),
    (None, ["scaling.num_workers=[1, two]"], ["scaling.num_workers", "expected an integer, got 'two'"]),
    (None, ["scaling.num_workers=two"], ["scaling.num_workers", "an integer or a list [min, max]"]),
    (None, ["scaling.num_workers=[1, 2]", "scaling.elastic_resize_monitor_interval_s=0"],
     ["scaling.elastic_resize_monitor_interval_s", "must be > 0"]),
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


def test_config_that_is_not_text_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "binary.yaml"
    f.write_bytes(b"\xff\xfe\x00\x01optim:")
    assert cli.main(["pretrain", "--config", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"selfsup pretrain: error: {f}: not UTF-8 text (byte 0); a config is a YAML file"


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


@pytest.mark.slow  # starts a local Ray
def test_local_ray_stays_on_loopback_and_a_config_address_says_to_use_ray_address(
        tmp_path: Path, data_dir: Path) -> None:
    """The CLI keeps the Ray it starts on 127.0.0.1; a cluster is joined through RAY_ADDRESS."""
    import subprocess
    import sys

    from orchestrator.ray_compat import LOOPBACK_ENV

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", LOOPBACK_ENV)}
    code = ("import os, sys; from orchestrator import cli, ray_compat; ray_compat.keep_local_ray_on_loopback(); "
            "print(os.environ.get(ray_compat.LOOPBACK_ENV)); sys.exit(cli.main(sys.argv[1:]))")
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


def test_method_list_and_preset_pairing_come_from_the_packages() -> None:
    from methods import METHODS
    from orchestrator.config import AUGMENT_PRESETS, METHOD_NAMES, METHOD_PRESET
    from pipelines.augment import PRESETS as AUGMENT

    assert METHOD_NAMES == tuple(METHODS) and AUGMENT_PRESETS == tuple(AUGMENT)
    assert set(METHOD_PRESET.values()) <= set(AUGMENT)
    assert METHOD_PRESET["dino"] == "dino" and METHOD_PRESET["barlow_twins"] == "byol"


@pytest.mark.parametrize("overrides,kwargs", [
    ({"method.name": "barlow_twins", "method.lambd": 0.01}, {"lambd": 0.01}),
    ({"method.name": "vicreg", "method.sim_weight": 10, "method.cov_weight": 0.5},
     {"sim_weight": 10.0, "cov_weight": 0.5}),
    ({"method.name": "dino", "method.teacher_temp": 0.05, "method.momentum": 0.99, "method.local_crops": 4},
     {"teacher_temp": 0.05, "momentum": 0.99}),  # local crops shape the augmentation, not the model
    ({"method.name": "simsiam", "method.hidden_dim": 64}, {"hidden_dim": 64}),
])
def test_new_method_fields_become_constructor_kwargs(overrides: dict, kwargs: dict) -> None:
    from orchestrator.training import build_model

    cfg = apply_overrides(Config(), overrides)
    assert cfg.method_kwargs() == kwargs
    if cfg.method.name != "dino":  # DINO's 65,536 prototypes are slow to build for a config test
        build_model(cfg)


def test_dino_multi_crop_settings_reach_the_augmenter() -> None:
    cfg = apply_overrides(Config(), {"method.name": "dino"})
    assert cfg.multi_crop() == (2, 12)  # 2 local crops of 28 * 96/224 px
    assert cfg.augment_kwargs() == {"local_crops": 2, "local_size": 12}
    assert cfg.resolved_augment_on() == "worker" and cfg.augment_preset() == "dino"
    off = apply_overrides(cfg, {"method.local_crops": 0})
    assert off.multi_crop() == (0, 0) and off.augment_kwargs() == {}
    assert apply_overrides(cfg, {"method.local_crops": 6, "method.local_crop_size": 16}).multi_crop() == (6, 16)
    assert apply_overrides(Config(), {"method.name": "byol"}).augment_kwargs() == {}


@pytest.mark.parametrize("path", sorted(p for p in (REPO / "configs").glob("*.yaml")
                                         if not p.name.startswith(("sweep", "cluster"))),  # their own tests
                         ids=lambda p: p.name)
def test_every_config_file_loads_and_validates(path: Path, data_dir: Path) -> None:
    """Every file in configs/ passes validation (the data folder and GPU left out: they are the
    machine's, not the file's)."""
    from orchestrator.config.validation import validate

    cfg = load_config(str(path), [f"data.path={data_dir}"], check=False)
    validate(cfg, check_data=False, check_gpu=False)
    if path.name.startswith("imagenet-resnet50-"):
        assert (cfg.model.encoder, cfg.model.cifar_stem, cfg.data.image_size) == ("resnet50", False, 224)
        assert cfg.augment_preset() in ("simclr", "byol", "dino")


def test_eval_resize_is_checked(data_dir: Path) -> None:
    with pytest.raises(ConfigError, match="data.eval_resize"):
        load_config(None, [f"data.path={data_dir}", "data.eval_resize=20", "data.image_size=32"])
