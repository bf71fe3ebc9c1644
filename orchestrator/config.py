"""The pretraining config: typed dataclasses with every default in one place.

A config is built from the defaults below, then a YAML file (``--config``), then ``--set a.b=c``
overrides, in that order. Every key and value is checked before Ray starts; a bad one raises
`ConfigError` with one message naming the file or flag, the field, the value and what is allowed.

The defaults are the built-in demo (``configs/demo.yaml`` spells them out): 5,000 MNIST digits,
the small ConvNet, SimCLR, 2 Ray Train workers on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from methods import METHODS
from methods.encoders import ENCODERS
from orchestrator.errors import UserError
from pipelines.augment import PRESETS, local_crop_size
from pipelines.images import DEFAULT_MAX_IMAGE_PIXELS

METHOD_NAMES = tuple(METHODS)
ENCODER_NAMES = ENCODERS
OPTIMIZER_NAMES = ("sgd", "lars", "adamw")
AUGMENT_PRESETS = tuple(PRESETS)
METHOD_PRESET = {name: cls.augment_preset for name, cls in METHODS.items()}
AUGMENT_ON = ("auto", "worker", "data")
LOADERS = ("auto", "memory", "stream")
# Method fields that only some methods take: (field, methods that accept it).
METHOD_ONLY = {"temperature": ("simclr", "moco"), "momentum": ("moco", "byol", "dino"), "queue_size": ("moco",),
               "lambd": ("barlow_twins",), "sim_weight": ("vicreg",), "var_weight": ("vicreg",),
               "cov_weight": ("vicreg",), "teacher_temp": ("dino",), "warmup_teacher_temp": ("dino",),
               "warmup_teacher_temp_fraction": ("dino",), "local_crops": ("dino",), "local_crop_size": ("dino",)}
# Method fields that are not constructor arguments: they shape the augmentation (`Config.multi_crop`).
AUGMENT_FIELDS = ("local_crops", "local_crop_size")
DINO_LOCAL_CROPS = 2  # the paper: 8 (main_dino.py) or 10 local crops at 96 px; 2 keeps CPU runs short
# Upper bounds: far above any recipe here (SimCLR's largest batch is 8192, LARS runs reach 32768),
# low enough that a typo (an extra zero or two) is refused before it asks for memory no machine has.
MAX_BATCH_SIZE = 65536
MAX_IMAGE_SIZE = 1024
MAX_VIEWS_GIB = 16  # the two float32 views of one worker's batch
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# Registered model names: what `models:/NAME@ALIAS` URIs, MLflow search filters and file names all
# take as they are (no quotes, '/', '@' or spaces).
MODEL_NAME = RUN_NAME


class ConfigError(UserError):
    """A config key or value that cannot be used; the message says which and what is allowed."""


@dataclass
class DataConfig:
    path: str = "data/demo"  # folder with manifest.json + Parquet shards (relative to the working dir), or a URI
    source: str | None = "demo"  # if `path` has no manifest yet, `selfsup ingest SOURCE PATH` runs first
    train_split: str = "train"
    test_split: str = "test"
    image_size: int = 28  # views and kNN images are this size (square)
    augment: str | None = None  # augmentation preset (simclr, moco_v2, byol); None = the method's own
    # Where the two views are made: "worker" (on the Train worker's device), "data" (in Ray Data
    # tasks), "auto" (worker on GPU; on CPU what pipelines.stream measured faster).
    augment_on: str = "auto"
    # How the train split reaches the workers (orchestrator.data): "memory" decodes it once into
    # Ray's object store and shuffles by index each epoch; "stream" reads, shuffles and decodes the
    # shards through Ray Data every epoch (any size); "auto": memory when the decoded split takes at
    # most a quarter of a node's object store, else stream.
    loader: str = "auto"
    limit: int | None = None  # use only the first N training images (tests, benchmarks)
    # Refuse an image whose header declares more pixels, before decoding it (decompression bombs;
    # pipelines.images), at every decode of the memory and stream loaders and the kNN probe.
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS


@dataclass
class ModelConfig:
    encoder: str = "convnet"
    cifar_stem: bool = False  # ResNets: 3x3 stem conv, no max-pool (for 32x32 images)


@dataclass
class MethodConfig:
    """None means the method's own (paper) default, set in its constructor in `methods/`."""

    name: str = "simclr"
    temperature: float | None = None  # SimCLR, MoCo
    momentum: float | None = None  # MoCo, BYOL, DINO: base EMA rate of the momentum encoder / teacher
    queue_size: int | None = None  # MoCo
    projection_dim: int | None = None  # DINO: the number of prototypes K
    hidden_dim: int | None = None
    lambd: float | None = None  # Barlow Twins: off-diagonal weight (paper 0.0051)
    sim_weight: float | None = None  # VICReg: invariance weight lambda (25)
    var_weight: float | None = None  # VICReg: variance weight mu (25)
    cov_weight: float | None = None  # VICReg: covariance weight nu (1)
    teacher_temp: float | None = None  # DINO: teacher temperature after the warm-up (0.07)
    warmup_teacher_temp: float | None = None  # DINO: teacher temperature at the start (0.04)
    warmup_teacher_temp_fraction: float | None = None  # DINO: share of training it rises over (0.3)
    local_crops: int | None = None  # DINO: local crops per image (null = DINO_LOCAL_CROPS; 0 = none)
    local_crop_size: int | None = None  # DINO: their side (null = data.image_size * 96/224, as the paper)


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 2e-3  # at `batch_size`, unless scale_lr (then at batch 256, scaled linearly)
    scale_lr: bool = False  # lr * batch_size / 256 (Goyal et al., 2017), as SimCLR/BYOL do
    weight_decay: float = 1e-4
    sgd_momentum: float = 0.9  # SGD and LARS
    lars_eta: float = 0.001  # LARS trust coefficient (You et al. 2017; solo-learn's CIFAR recipes: 0.02)
    batch_size: int = 256  # GLOBAL batch, split evenly over the workers
    epochs: int = 5
    warmup_epochs: float = 1.0


@dataclass
class ScalingConfig:
    num_workers: int = 2
    use_gpu: bool = False
    # None = automatic: 1 per worker when the node has CPUs to spare for Ray Data, else a fraction
    # (on 2 cores, 2 workers of 1 CPU leave none for the Parquet read tasks and the job hangs).
    cpus_per_worker: float | None = None
    gpus_per_worker: float = 1.0  # with use_gpu


@dataclass
class RunConfig:
    name: str | None = None  # None = "<config name>-<n>", the next free n under storage_path
    # Ray Train run folders (checkpoints) and run records go to STORAGE_PATH/NAME: a local folder or
    # a URI (s3://BUCKET/prefix, gs://..., abfs://...; pipelines.storage).
    storage_path: str = "runs"
    # A local storage_path (and data.path) that every node of the cluster mounts at the same path
    # (NFS, ...): lets a multi-node run use it (otherwise refused, see orchestrator.pretrain).
    shared_filesystem: bool = False
    max_failures: int = 3  # worker-group restarts from the last checkpoint; -1 = unlimited
    checkpoints_to_keep: int = 2
    seed: int = 0
    ray_address: str | None = None  # None = $RAY_ADDRESS if set, else a new local Ray


@dataclass
class TrackingConfig:
    uri: str | None = None  # None = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working dir
    experiment: str = "selfsup"
    register: bool = True
    model_name: str | None = None  # None = "<dataset>-encoder"


@dataclass
class EvalConfig:
    """Weighted kNN (Wu et al., 2018, InstDisc), computed by rank 0 after every epoch; the linear
    probe on the same images' features after the last epoch (`orchestrator.train_loop.KnnProbe`)."""

    knn_k: int = 200
    knn_t: float = 0.1
    knn_train_limit: int | None = 10000  # memory bank: the first N images of the train split
    knn_test_limit: int | None = None  # None = the whole test split
    batch_size: int = 512  # feature extraction batch
    # Linear probe: a linear classifier (Adam, from zero) on the frozen features of the kNN memory
    # bank, scored on the kNN queries; logged as linear_top1/top5. ~1 s on the demo, one core.
    linear_epochs: int = 30  # 0 = no linear probe
    linear_lr: float = 1e-3
    linear_train_limit: int | None = 10000  # train on at most N bank images (seeded subset); None = all
    linear_every_epoch: bool = False  # also after every epoch (a sweep ranking by linear_top1 with ASHA)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict (YAML/JSON-safe)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> Config:
        """Build from a nested dict; sections and fields left out keep their defaults.

        Raises:
            ConfigError: unknown section/field or a value of the wrong type.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a mapping of sections, got {type(d).__name__}")
        cfg = cls()
        for section, values in d.items():
            if section not in _sections():
                raise ConfigError(f"{source}: unknown section {section!r}; allowed: {', '.join(_sections())}")
            if values is None:
                continue
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: section {section!r} must be a mapping, got {values!r}")
            for key, value in values.items():
                _set_field(cfg, f"{section}.{key}", value, source)
        return cfg

    def method_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `METHODS[name](encoder, **kwargs)`: only the fields that are set."""
        m = self.method
        kw = {f.name: getattr(m, f.name) for f in fields(m) if f.name != "name" and f.name not in AUGMENT_FIELDS}
        return {k: v for k, v in kw.items() if v is not None}

    def multi_crop(self) -> tuple[int, int]:
        """(local crops per image, their side): DINO's multi-crop, (0, 0) for every other method."""
        m = self.method
        if m.name != "dino":
            return 0, 0
        n = DINO_LOCAL_CROPS if m.local_crops is None else m.local_crops
        size = m.local_crop_size or local_crop_size(self.data.image_size)
        return (n, size) if n > 0 else (0, 0)

    def augment_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `pipelines.augment.TwoViewAugment` beyond preset, size and seed."""
        n, size = self.multi_crop()
        return {"local_crops": n, "local_size": size} if n else {}

    def augment_preset(self) -> str:
        """The augmentation preset: `data.augment`, else the method's own."""
        return self.data.augment or METHOD_PRESET[self.method.name]

    def resolved_augment_on(self) -> str:
        """"worker" or "data" ("auto" resolved by `pipelines.stream.default_augment_on`)."""
        if self.data.augment_on != "auto":
            return self.data.augment_on
        if self.multi_crop()[0]:
            return "worker"  # local crops are made on the worker only (Ray Data carries two views)
        from pipelines.stream import default_augment_on

        return str(default_augment_on("cuda" if self.scaling.use_gpu else "cpu"))

    def effective_lr(self) -> float:
        """The peak learning rate after linear scaling (if `optim.scale_lr`)."""
        o = self.optim
        return o.lr * o.batch_size / 256 if o.scale_lr else o.lr

    def flat(self) -> dict[str, Any]:
        """{"section.field": value}: MLflow params, sweep overrides."""
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}


def _sections() -> dict[str, type]:
    return {f.name: f.default_factory for f in fields(Config)}  # type: ignore[misc]


def _field_type(section_cls: type, name: str) -> Any:
    return typing.get_type_hints(section_cls)[name]


def _parse_value(tp: Any, value: Any, where: str) -> Any:
    """Check (and gently coerce: int -> float, "1e-3" -> float) a value against a field type."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _parse_value(inner[0], value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)  # YAML 1.1 reads "1e-3" as a string
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        # Every float field is a rate, a count of epochs/CPUs or a time: NaN or infinity (YAML
        # `.nan`/`.inf`, `--set x=nan`) is never meant, and NaN would pass every `<`/`>` bound below.
        if not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise AssertionError(f"unsupported config field type {tp}")


def _set_field(cfg: Config, dotted: str, value: Any, source: str, label: str | None = None) -> None:
    section, _, key = dotted.partition(".")
    if section not in _sections() or not key:
        raise ConfigError(f"{source}: unknown field {dotted!r}; sections are {', '.join(_sections())} "
                          "(write section.field, e.g. optim.lr)")
    sec = getattr(cfg, section)
    names = [f.name for f in fields(sec)]
    if key not in names:
        raise ConfigError(f"{source}: unknown field {dotted!r}; {section} has: {', '.join(names)}")
    where = label or f"{source}: {dotted}"
    setattr(sec, key, _parse_value(_field_type(type(sec), key), value, where))


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """["a.b=1", "c.d=x"] -> {"a.b": 1, "c.d": "x"}; values are read as YAML scalars."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set optim.lr=0.1")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        out[key.strip()] = value
    return out


def apply_overrides(cfg: Config, overrides: dict[str, Any], *, source: str = "--set") -> Config:
    """A copy of `cfg` with {"section.field": value} applied (typed and checked like YAML)."""
    new = Config.from_dict(cfg.to_dict())
    for dotted, value in overrides.items():
        label = f"{source} {dotted}={value}"
        _set_field(new, dotted, value, label, label)
    return new


def load_config(path: str | None, overrides: list[str] | None = None, *, check: bool = True,
                check_data: bool | None = True) -> Config:
    """Defaults, then the YAML file at `path` (None: the built-in demo), then `--set` overrides.

    Args:
        path: YAML file; sections and fields it leaves out keep their defaults.
        overrides: ["section.field=value", ...] as given to ``--set``.
        check: run `validate` (data folder, GPU, ...) on the result; its message starts with where
            the field it names was set (`--set KEY=VALUE` or the file), see `where_set`.
        check_data: passed to `validate`; None checks the data folder only when no `data.source`
            will ingest it first.

    Raises:
        ConfigError: unreadable file, unknown key, wrong type or impossible value.
    """
    cfg, raw = Config(), None
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config {path}: no such file")
        raw = read_yaml(p)
        cfg = Config.from_dict(raw or {}, source=str(path))
    over = parse_overrides(overrides or [])
    cfg = apply_overrides(cfg, over)
    if check:
        try:
            validate(cfg, check_data=cfg.data.source is None if check_data is None else check_data)
        except ConfigError as e:
            raise ConfigError(where_set(str(e), path=path, raw=raw, overrides=over)) from None
    return cfg


def read_yaml(p: Path) -> Any:
    """A YAML file's content, or `ConfigError` naming the file when it is unreadable or not YAML text."""
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}); a config is a YAML file") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None


_NAMED_FIELD = re.compile(r"([a-z_]+)\.([a-z_0-9]+) = .*?: ")


def where_set(message: str, *, path: str | None, raw: Any, overrides: dict[str, Any]) -> str:
    """A validation error ("section.field = value: what is allowed") told from where that field was
    set, as the type errors are: "--set section.field=value: ..." when an override set it,
    "PATH: section.field = value: ..." when the file does; unchanged for a default value (or a
    message that names no field first)."""
    m = _NAMED_FIELD.match(message)
    if m is None:
        return message
    key = f"{m[1]}.{m[2]}"
    if key in overrides:
        return f"--set {key}={overrides[key]}: {message[m.end():]}"
    if path is not None and isinstance(raw, dict) and isinstance(raw.get(m[1]), dict) and m[2] in raw[m[1]]:
        return f"{path}: {message}"
    return message


# A cluster's shared store (cluster.yaml sets it on every node, e.g. s3://BUCKET/selfsup): relative
# run.storage_path / sweep.storage_path ("runs", "runs/sweeps" in the presets) resolve under it, so
# the presets' commands need no extra flags there.
STORAGE_ENV = "SELFSUP_STORAGE"


def storage_location(path: str) -> str:
    """`run.storage_path` / `sweep.storage_path` as a location (`pipelines.storage`): a URI or an
    absolute path as given; a relative path under `$SELFSUP_STORAGE` when that is set, else under
    the working directory."""
    from pipelines import storage

    base = os.environ.get(STORAGE_ENV)
    if base and not storage.is_uri(path) and not Path(path).expanduser().is_absolute() \
            and not path.startswith("file://"):
        return storage.join(storage.absolute(base), path)
    return storage.absolute(path)


def config_name(path: str | None) -> str:
    """The stem used for automatic run names: 'demo' for the built-in demo, else the file stem."""
    return "demo" if path is None else Path(path).stem


def _fail(field_name: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{field_name} = {value!r}: {allowed}")


def _one_of(field_name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        _fail(field_name, value, f"allowed: {', '.join(allowed)}")


def _positive(field_name: str, value: float | int | None, *, zero_ok: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not zero_ok)):
        _fail(field_name, value, "must be >= 0" if zero_ok else "must be > 0")


def validate(cfg: Config, *, check_data: bool = True, check_gpu: bool = True) -> None:
    """Reject impossible values with one message each; called before Ray starts.

    Args:
        check_data: the data folder must hold a manifest with both splits (or `data.source` must be
            set, so that it can be ingested first).
        check_gpu: `scaling.use_gpu` needs a local CUDA GPU when Ray runs locally.

    Raises:
        ConfigError: the first problem found.
    """
    d, m, o, s, r, t, e = cfg.data, cfg.method, cfg.optim, cfg.scaling, cfg.run, cfg.tracking, cfg.eval
    _one_of("method.name", m.name, METHOD_NAMES)
    _one_of("model.encoder", cfg.model.encoder, ENCODER_NAMES)
    _one_of("optim.name", o.name, OPTIMIZER_NAMES)
    if d.augment is not None:
        _one_of("data.augment", d.augment, AUGMENT_PRESETS)
    _one_of("data.augment_on", d.augment_on, AUGMENT_ON)
    _one_of("data.loader", d.loader, LOADERS)
    if d.loader == "memory" and d.augment_on == "data":
        _fail("data.augment_on", d.augment_on, "needs data.loader=stream (with data.loader=memory the views are "
              "made on the worker); use data.augment_on=worker or auto")
    for name, allowed in METHOD_ONLY.items():
        if getattr(m, name) is not None and m.name not in allowed:
            _fail(f"method.{name}", getattr(m, name),
                  f"only {', '.join(allowed)} take it, not {m.name} (remove it or set it to null)")
    _positive("method.temperature", m.temperature)
    if m.momentum is not None and not 0 <= m.momentum < 1:
        _fail("method.momentum", m.momentum, "must be in [0, 1)")
    for name in ("queue_size", "projection_dim", "hidden_dim", "teacher_temp", "warmup_teacher_temp",
                 "local_crop_size"):
        _positive(f"method.{name}", getattr(m, name))
    for name in ("lambd", "sim_weight", "var_weight", "cov_weight", "local_crops"):
        _positive(f"method.{name}", getattr(m, name), zero_ok=True)
    if m.warmup_teacher_temp_fraction is not None and not 0 <= m.warmup_teacher_temp_fraction <= 1:
        _fail("method.warmup_teacher_temp_fraction", m.warmup_teacher_temp_fraction, "must be in [0, 1]")
    if m.local_crop_size is not None and m.local_crop_size > d.image_size:
        _fail("method.local_crop_size", m.local_crop_size, f"must be <= data.image_size ({d.image_size})")
    if cfg.multi_crop()[0] and d.augment_on == "data":
        _fail("data.augment_on", d.augment_on, "DINO's local crops are made on the worker; use "
              "data.augment_on=worker or auto (or method.local_crops=0)")
    _positive("optim.lr", o.lr)
    _positive("optim.weight_decay", o.weight_decay, zero_ok=True)
    if not 0 <= o.sgd_momentum < 1:
        _fail("optim.sgd_momentum", o.sgd_momentum, "must be in [0, 1)")
    _positive("optim.lars_eta", o.lars_eta)
    _positive("optim.batch_size", o.batch_size)
    _positive("optim.epochs", o.epochs)
    _positive("optim.warmup_epochs", o.warmup_epochs, zero_ok=True)
    if o.warmup_epochs > o.epochs:
        _fail("optim.warmup_epochs", o.warmup_epochs, f"must be <= optim.epochs ({o.epochs})")
    _positive("scaling.num_workers", s.num_workers)
    if o.batch_size % s.num_workers:
        _fail("optim.batch_size", o.batch_size,
              f"must be divisible by scaling.num_workers ({s.num_workers}): it is the global batch, "
              "split evenly over the workers")
    if o.batch_size // s.num_workers < 2:
        _fail("optim.batch_size", o.batch_size, "needs at least 2 images per worker")
    _positive("scaling.cpus_per_worker", s.cpus_per_worker)
    _positive("scaling.gpus_per_worker", s.gpus_per_worker)
    _positive("data.image_size", d.image_size)
    if d.image_size > MAX_IMAGE_SIZE:
        _fail("data.image_size", d.image_size, f"must be <= {MAX_IMAGE_SIZE} (pixels per side)")
    if o.batch_size > MAX_BATCH_SIZE:
        _fail("optim.batch_size", o.batch_size, f"must be <= {MAX_BATCH_SIZE} (the global batch)")
    views_gib = 2 * (o.batch_size // s.num_workers) * 3 * d.image_size ** 2 * 4 / 2 ** 30
    if views_gib > MAX_VIEWS_GIB:
        _fail("optim.batch_size", o.batch_size,
              f"with data.image_size {d.image_size} and {s.num_workers} worker(s) the two float32 views of one "
              f"worker's batch take {views_gib:.0f} GiB; at most {MAX_VIEWS_GIB} GiB (use more workers, a smaller "
              "batch or smaller images)")
    _positive("data.limit", d.limit)
    _positive("data.max_image_pixels", d.max_image_pixels)
    if r.max_failures < -1:
        _fail("run.max_failures", r.max_failures, "must be >= 0, or -1 for unlimited")
    _positive("run.checkpoints_to_keep", r.checkpoints_to_keep)
    if r.name is not None and not RUN_NAME.match(r.name):
        _fail("run.name", r.name, "use letters, digits, '.', '_' and '-' (no '/' or spaces)")
    if t.model_name is not None and not MODEL_NAME.match(t.model_name):
        _fail("tracking.model_name", t.model_name, "use 1-100 letters, digits, '.', '_' and '-', starting with "
              "a letter or digit (null = <dataset>-encoder)")
    if t.uri is not None and t.uri.startswith("file:"):
        _fail("tracking.uri", t.uri, "MLflow 3 refuses file:// stores; use sqlite:///PATH or http://HOST:PORT")
    _positive("eval.knn_k", e.knn_k)
    _positive("eval.knn_t", e.knn_t)
    _positive("eval.knn_train_limit", e.knn_train_limit)
    _positive("eval.knn_test_limit", e.knn_test_limit)
    _positive("eval.batch_size", e.batch_size)
    if e.batch_size > MAX_BATCH_SIZE:
        _fail("eval.batch_size", e.batch_size, f"must be <= {MAX_BATCH_SIZE}")
    _positive("eval.linear_epochs", e.linear_epochs, zero_ok=True)
    _positive("eval.linear_lr", e.linear_lr)
    _positive("eval.linear_train_limit", e.linear_train_limit)
    if r.ray_address and not os.environ.get("RAY_ADDRESS") and os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0":
        # The CLI imported Ray in loopback-only mode (orchestrator.cli), which cannot join a cluster.
        _fail("run.ray_address", r.ray_address, f"set the environment variable RAY_ADDRESS={r.ray_address} "
              "instead (without it selfsup keeps its own Ray on 127.0.0.1)")
    if check_gpu and s.use_gpu and not _ray_address(cfg):
        import torch

        if not torch.cuda.is_available():
            _fail("scaling.use_gpu", True, "this machine has no CUDA GPU (set scaling.use_gpu=false, "
                  "or run.ray_address to a cluster with GPU workers)")
    if check_data:
        check_data_folder(cfg)


def _ray_address(cfg: Config) -> str | None:
    return cfg.run.ray_address or os.environ.get("RAY_ADDRESS") or None


def check_data_folder(cfg: Config) -> None:
    """The data folder must hold a readable manifest with both splits, or be ingestable from data.source.

    Raises:
        ConfigError: missing folder/manifest (and no source), or a split the manifest lacks.
    """
    from pipelines import storage

    d = cfg.data
    manifest = storage.join(d.path, "manifest.json")
    try:
        found = storage.is_file(manifest)
    except OSError as e:  # an object store that cannot be reached or read (endpoint, credentials)
        raise ConfigError(f"data.path = {d.path!r}: cannot read it ({str(e).splitlines()[0]})") from None
    if not found:
        if d.source is not None:
            return  # pretrain ingests it first
        where = "folder does not exist" if not storage.exists(d.path) else "folder has no manifest.json"
        _fail("data.path", d.path, f"{where}; create it with `selfsup ingest SOURCE {d.path}`, "
              "or set data.source to ingest it automatically")
    try:
        raw = json.loads(storage.read_text(manifest))
        splits, classes = raw.get("splits", {}), raw.get("classes")
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"data.path = {d.path!r}: unreadable manifest.json ({e})") from None
    for key in ("train_split", "test_split"):
        split = getattr(d, key)
        if key == "test_split" and not classes:
            continue  # no labels: nothing evaluates on a test split (orchestrator.data.check_data)
        if split not in splits:
            _fail(f"data.{key}", split, f"{manifest} has splits: {', '.join(sorted(splits)) or 'none'}")


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (logged with each run; loads back with `load_config`)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
