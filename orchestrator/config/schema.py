"""The config's schema: typed dataclasses with every default in one place, and the type check of
each field's value (`Config.from_dict`, `--set` overrides).

The defaults are the built-in demo (``configs/demo.yaml`` spells them out): 5,000 MNIST digits,
the small ConvNet, SimCLR, 2 Ray Train workers on CPU. The value checks beyond types are in
`orchestrator.config.validation`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any

from methods import METHODS
from methods.encoders import ENCODERS
from orchestrator.errors import UserError
from pipelines.augment import PRESETS, local_crop_size
from pipelines.images import DEFAULT_MAX_IMAGE_PIXELS
from pipelines.stream import default_augment_on

METHOD_NAMES = tuple(METHODS)
ENCODER_NAMES = ENCODERS
OPTIMIZER_NAMES = ("sgd", "lars", "adamw")
AUGMENT_PRESETS = tuple(PRESETS)
METHOD_PRESET = {name: cls.augment_preset for name, cls in METHODS.items()}
AUGMENT_ON = ("auto", "worker", "data")
LOADERS = ("auto", "memory", "stream")
# Method fields that only some methods take: (field, methods that accept it).
MULTI_CROP_METHODS = ("dino", "swav")  # their forward takes local crops
# Method fields that are not constructor arguments: they shape the augmentation (`Config.multi_crop`).
AUGMENT_FIELDS = ("local_crops", "local_crop_size")
# DINO's and SwAV's default: the papers use 8 or 10 (DINO) / 6 (SwAV) local crops at 96 px; 2 keeps CPU runs short
DINO_LOCAL_CROPS = 2
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
    # Evaluation (kNN, linear probe): an image not already image_size square has its shorter side
    # resized to this many pixels, then its centre image_size crop is taken (pipelines.images.
    # eval_transform). null = image_size * 256/224 (ImageNet's Resize(256) + CenterCrop(224));
    # images at their native training size (CIFAR at 32, the demo at 28) are used whole, as before.
    eval_resize: int | None = None


@dataclass
class ModelConfig:
    # convnet, resnet18, resnet50, vit_tiny, vit_small, vit_base, or timm:<any timm model name>
    encoder: str = "convnet"
    cifar_stem: bool = False  # ResNets: 3x3 stem conv, no max-pool (for 32x32 images)
    # Keyword arguments of the encoder (JSON primitives): the ViTs' patch_size (16 for 224 px, 4
    # for 32 px), img_size, depth, embed_dim, ...; a timm: model's timm arguments.
    encoder_args: dict[str, Any] = field(default_factory=dict)


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
    local_crops: int | None = None  # DINO, SwAV: local crops per image (null = DINO_LOCAL_CROPS; 0 = none)
    local_crop_size: int | None = None  # DINO, SwAV: their side (null = data.image_size * 96/224, as the paper)
    freeze_last_layer_epochs: int | None = None  # DINO: the prototypes take no step for N epochs (1)
    clip_grad: float | None = None  # DINO: per-parameter gradient norm clipping (3.0; 0 = none)
    num_prototypes: int | None = None  # SwAV: K (3000)
    sinkhorn_iterations: int | None = None  # SwAV: 3
    sinkhorn_epsilon: float | None = None  # SwAV: 0.05
    queue_length: int | None = None  # SwAV: queued features per worker for the codes (0 = none)
    queue_start_epoch: int | None = None  # SwAV: the queue is used from this epoch, counted from 0 (15)
    freeze_prototypes_epochs: int | None = None  # SwAV: the prototypes take no step for N epochs (1)
    mask_ratio: float | None = None  # MAE: share of patches hidden from the encoder (0.75)
    decoder_dim: int | None = None  # MAE: decoder width (512)
    decoder_depth: int | None = None  # MAE: decoder blocks (8)
    decoder_heads: int | None = None  # MAE: decoder attention heads (16)
    norm_pix: bool | None = None  # MAE: per-patch normalised pixel targets (true)


def _method_only() -> dict[str, tuple[str, ...]]:
    """Which methods take each `method.*` field: those whose constructor has that argument (the
    method classes say it; no second list to keep in step), and for the augmentation's fields the
    multi-crop methods."""
    import inspect

    return {f.name: (MULTI_CROP_METHODS if f.name in AUGMENT_FIELDS else
                     tuple(m for m, cls in METHODS.items() if f.name in inspect.signature(cls.__init__).parameters))
            for f in fields(MethodConfig) if f.name != "name"}


METHOD_ONLY = _method_only()


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 2e-3  # at `batch_size`, unless scale_lr (then at batch 256, scaled linearly)
    scale_lr: bool = False  # lr * batch_size / 256 (Goyal et al., 2017), as SimCLR/BYOL do
    weight_decay: float = 1e-4
    # null = constant; else the weight decay follows a per-step cosine from weight_decay to this
    # (DINO's ViT recipe: 0.04 -> 0.4). Biases and norm weights have none either way.
    weight_decay_end: float | None = None
    sgd_momentum: float = 0.9  # SGD and LARS
    lars_eta: float = 0.001  # LARS trust coefficient (You et al. 2017; solo-learn's CIFAR recipes: 0.02)
    batch_size: int = 256  # GLOBAL batch, split evenly over the workers
    epochs: int = 5
    warmup_epochs: float = 1.0
    # torch.compile of the method's forward (encoder, head and loss): "auto" = on for CUDA workers,
    # off on CPU (measured slower there, benchmarks/README.md "GPU step"); true / false force it.
    compile: bool | str = "auto"


@dataclass
class ScalingConfig:
    # An integer (a fixed group), or [min, max]: elastic (Ray Train starts with what the cluster has,
    # at least min, continues with the workers left after a lost node and grows back towards max
    # when nodes return). The global batch stays optim.batch_size whatever the count (docs/design.md).
    num_workers: int | list[int] = 2
    # Elastic runs: how often (seconds) Ray Train checks whether more workers fit (Ray's default).
    elastic_resize_monitor_interval_s: float = 60.0
    use_gpu: bool = False
    # None = automatic: 1 per worker when the node has CPUs to spare for Ray Data, else a fraction
    # (on 2 cores, 2 workers of 1 CPU leave none for the Parquet read tasks and the job hangs).
    cpus_per_worker: float | None = None
    gpus_per_worker: float = 1.0  # with use_gpu

    @property
    def elastic(self) -> bool:
        """Whether `num_workers` is a [min, max] range (Ray Train's elastic scaling)."""
        return isinstance(self.num_workers, list)

    @property
    def min_workers(self) -> int:
        return int(self.num_workers[0] if isinstance(self.num_workers, list) else self.num_workers)

    @property
    def max_workers(self) -> int:
        return int(self.num_workers[-1] if isinstance(self.num_workers, list) else self.num_workers)

    def worker_counts(self) -> range:
        """Every worker count a run may have: min..max (one count for a fixed group)."""
        return range(self.min_workers, self.max_workers + 1)

    def for_ray(self) -> int | tuple[int, int]:
        """`ray.train.ScalingConfig(num_workers=...)`: an int, or the (min, max) tuple Ray wants."""
        return (self.min_workers, self.max_workers) if self.elastic else self.min_workers


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
    probe on the same images' features after the last epoch (`orchestrator.training.KnnProbe`)."""

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
                set_field(cfg, f"{section}.{key}", value, source)
        return cfg

    def method_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `METHODS[name](encoder, **kwargs)`: only the fields that are set."""
        m = self.method
        kw = {f.name: getattr(m, f.name) for f in fields(m) if f.name != "name" and f.name not in AUGMENT_FIELDS}
        return {k: v for k, v in kw.items() if v is not None}

    def multi_crop(self) -> tuple[int, int]:
        """(local crops per image, their side): DINO's and SwAV's multi-crop, (0, 0) for every other method."""
        m = self.method
        if m.name not in MULTI_CROP_METHODS:
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
        return str(default_augment_on("cuda" if self.scaling.use_gpu else "cpu"))

    def effective_lr(self) -> float:
        """The peak learning rate after linear scaling (if `optim.scale_lr`)."""
        o = self.optim
        return o.lr * o.batch_size / 256 if o.scale_lr else o.lr

    def flat(self) -> dict[str, Any]:
        """{"section.field": value}: MLflow params, sweep overrides."""
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}


# --- field values: type checks ---------------------------------------------------------------------

def _sections() -> dict[str, type]:
    return {f.name: f.default_factory for f in fields(Config)}  # type: ignore[misc]


def _field_type(section_cls: type, name: str) -> Any:
    return typing.get_type_hints(section_cls)[name]


def parse_value(tp: Any, value: Any, where: str) -> Any:
    """Check (and gently coerce: int -> float, "1e-3" -> float) a value against a field type."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{where}: expected a mapping of names to values, got {value!r}")
        for k, v in value.items():
            items = v if isinstance(v, list) else [v]
            if not all(x is None or isinstance(x, (bool, int, float, str)) for x in items):
                raise ConfigError(f"{where}: {k} = {v!r}: expected a number, string, boolean, null or a list of those")
        return dict(value)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if bool in inner and str in inner and isinstance(value, (bool, str)):
            return value  # a switch with a word besides true/false (optim.compile: auto); validation checks the word
        listed = [a for a in inner if typing.get_origin(a) is list]
        if listed and isinstance(value, (list, tuple)):  # `int | list[int]`: scaling.num_workers = [min, max]
            return parse_value(listed[0], value, where)
        try:
            return parse_value(inner[0], value, where)
        except ConfigError:
            if listed:
                raise ConfigError(f"{where}: expected an integer or a list [min, max], got {value!r}") from None
            raise
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        return [parse_value(item, v, where) for v in value]
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


def set_field(cfg: Config, dotted: str, value: Any, source: str, label: str | None = None) -> None:
    """Set `cfg`'s "section.field" to `value`, type-checked; errors name `source` (or `label`)."""
    section, _, key = dotted.partition(".")
    if section not in _sections() or not key:
        raise ConfigError(f"{source}: unknown field {dotted!r}; sections are {', '.join(_sections())} "
                          "(write section.field, e.g. optim.lr)")
    sec = getattr(cfg, section)
    names = [f.name for f in fields(sec)]
    if key not in names:
        raise ConfigError(f"{source}: unknown field {dotted!r}; {section} has: {', '.join(names)}")
    where = label or f"{source}: {dotted}"
    setattr(sec, key, parse_value(_field_type(type(sec), key), value, where))
