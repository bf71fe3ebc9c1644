"""The config's value checks: `validate` rejects an impossible value with one message, before Ray
starts; `check_data_folder` checks that the data folder can be read (or ingested first).

Each section has its own check; `validate` runs them in a fixed order and raises the first problem
found. The message starts with the field ("section.field = value: what is allowed"), which
`orchestrator.config.sources.where_set` turns into where that field was set.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from orchestrator.config.schema import (AUGMENT_ON, AUGMENT_PRESETS, ENCODER_NAMES, LOADERS, MAX_BATCH_SIZE,
                                        MAX_IMAGE_SIZE, MAX_VIEWS_GIB, METHOD_NAMES, METHOD_ONLY, MODEL_NAME,
                                        OPTIMIZER_NAMES, RUN_NAME, Config, ConfigError, OptimConfig)
from pipelines import storage


def validate(cfg: Config, *, check_data: bool = True, check_gpu: bool = True) -> None:
    """Reject impossible values with one message each; called before Ray starts.

    Args:
        check_data: the data folder must hold a manifest with both splits (or `data.source` must be
            set, so that it can be ingested first).
        check_gpu: `scaling.use_gpu` needs a local CUDA GPU when Ray runs locally.

    Raises:
        ConfigError: the first problem found.
    """
    _check_choices(cfg)
    _check_method(cfg)
    _check_optim(cfg.optim)
    _check_scaling(cfg)
    _check_sizes(cfg)
    _check_run_and_tracking(cfg)
    _check_eval(cfg)
    _check_environment(cfg, check_gpu=check_gpu)
    if check_data:
        check_data_folder(cfg)


def _fail(field_name: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{field_name} = {value!r}: {allowed}")


def _one_of(field_name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        _fail(field_name, value, f"allowed: {', '.join(allowed)}")


def _positive(field_name: str, value: float | int | None, *, zero_ok: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not zero_ok)):
        _fail(field_name, value, "must be >= 0" if zero_ok else "must be > 0")


def _check_choices(cfg: Config) -> None:
    """The fields that name one of a fixed set: method, encoder, optimizer, augmentation, loader."""
    d = cfg.data
    _one_of("method.name", cfg.method.name, METHOD_NAMES)
    _check_encoder(cfg)
    _one_of("optim.name", cfg.optim.name, OPTIMIZER_NAMES)
    if d.augment is not None:
        _one_of("data.augment", d.augment, AUGMENT_PRESETS)
    _one_of("data.augment_on", d.augment_on, AUGMENT_ON)
    _one_of("data.loader", d.loader, LOADERS)
    if d.loader == "memory" and d.augment_on == "data":
        _fail("data.augment_on", d.augment_on, "needs data.loader=stream (with data.loader=memory the views are "
              "made on the worker); use data.augment_on=worker or auto")


def _check_encoder(cfg: Config) -> None:
    """`model.encoder` names an encoder and `model.encoder_args` are arguments it takes: the encoder is
    built on the meta device (no memory, no weights), so a wrong argument fails here, not in a worker."""
    import torch

    from methods.encoders import build_encoder, is_encoder_name

    m = cfg.model
    if not is_encoder_name(m.encoder):
        _fail("model.encoder", m.encoder, f"allowed: {', '.join(ENCODER_NAMES)} or timm:<a timm model name>")
    try:
        with torch.device("meta"):
            build_encoder(m.encoder, cifar_stem=m.cifar_stem, **m.encoder_args)
    except (TypeError, ValueError, AssertionError) as e:
        _fail("model.encoder_args", m.encoder_args, f"not taken by encoder {m.encoder}: {str(e).splitlines()[0]}")


def _check_method(cfg: Config) -> None:
    """`method.*`: only the fields the chosen method takes, each in its range."""
    m, d = cfg.method, cfg.data
    for name, allowed in METHOD_ONLY.items():
        if getattr(m, name) is not None and m.name not in allowed:
            _fail(f"method.{name}", getattr(m, name),
                  f"only {', '.join(allowed)} take it, not {m.name} (remove it or set it to null)")
    _positive("method.temperature", m.temperature)
    if m.momentum is not None and not 0 <= m.momentum < 1:
        _fail("method.momentum", m.momentum, "must be in [0, 1)")
    for name in ("queue_size", "projection_dim", "hidden_dim", "teacher_temp", "warmup_teacher_temp",
                 "local_crop_size", "num_prototypes", "sinkhorn_iterations", "sinkhorn_epsilon", "decoder_dim",
                 "decoder_depth", "decoder_heads"):
        _positive(f"method.{name}", getattr(m, name))
    for name in ("lambd", "sim_weight", "var_weight", "cov_weight", "local_crops", "freeze_last_layer_epochs",
                 "clip_grad", "queue_length", "queue_start_epoch", "freeze_prototypes_epochs"):
        _positive(f"method.{name}", getattr(m, name), zero_ok=True)
    if m.warmup_teacher_temp_fraction is not None and not 0 <= m.warmup_teacher_temp_fraction <= 1:
        _fail("method.warmup_teacher_temp_fraction", m.warmup_teacher_temp_fraction, "must be in [0, 1]")
    if m.local_crop_size is not None and m.local_crop_size > d.image_size:
        _fail("method.local_crop_size", m.local_crop_size, f"must be <= data.image_size ({d.image_size})")
    if cfg.multi_crop()[0] and d.augment_on == "data":
        _fail("data.augment_on", d.augment_on, f"{m.name}'s local crops are made on the worker; use "
              "data.augment_on=worker or auto (or method.local_crops=0)")
    if m.mask_ratio is not None and not 0 <= m.mask_ratio < 1:
        _fail("method.mask_ratio", m.mask_ratio, "must be in [0, 1)")
    if m.name == "mae":
        _check_mae_encoder(cfg)
        dim, heads = m.decoder_dim or 512, m.decoder_heads or 16
        if dim % 4 or dim % heads:
            _fail("method.decoder_dim", dim, f"must be a multiple of 4 (sin-cos positions) and of method.decoder_heads "
                  f"({heads})")


def _check_mae_encoder(cfg: Config) -> None:
    """MAE masks ViT patches: the encoder must be a ViT and the images a whole number of patches."""
    import torch

    from methods.encoders import build_encoder

    with torch.device("meta"):
        encoder = build_encoder(cfg.model.encoder, cifar_stem=cfg.model.cifar_stem, **cfg.model.encoder_args)
    patch_embed = getattr(getattr(encoder, "model", None), "patch_embed", None)
    if patch_embed is None:
        _fail("model.encoder", cfg.model.encoder, "MAE needs a ViT encoder (vit_tiny, vit_small, vit_base or a "
              "timm: ViT)")
    patch = int(patch_embed.patch_size[0])
    if cfg.data.image_size % patch:
        _fail("data.image_size", cfg.data.image_size, f"MAE needs a multiple of the ViT's patch size ({patch})")


def _check_optim(o: OptimConfig) -> None:
    """`optim.*`: rates, batch and epochs."""
    _positive("optim.lr", o.lr)
    _positive("optim.weight_decay", o.weight_decay, zero_ok=True)
    _positive("optim.weight_decay_end", o.weight_decay_end, zero_ok=True)
    if not 0 <= o.sgd_momentum < 1:
        _fail("optim.sgd_momentum", o.sgd_momentum, "must be in [0, 1)")
    _positive("optim.lars_eta", o.lars_eta)
    if not (isinstance(o.compile, bool) or o.compile == "auto"):
        _fail("optim.compile", o.compile, "allowed: auto, true, false")
    _positive("optim.batch_size", o.batch_size)
    _positive("optim.epochs", o.epochs)
    _positive("optim.warmup_epochs", o.warmup_epochs, zero_ok=True)
    if o.warmup_epochs > o.epochs:
        _fail("optim.warmup_epochs", o.warmup_epochs, f"must be <= optim.epochs ({o.epochs})")


def _check_scaling(cfg: Config) -> None:
    """`scaling.*`: workers and their resources; the global batch splits evenly over every worker
    count the run may have (an elastic run may be resized to any count in [min, max])."""
    o, s = cfg.optim, cfg.scaling
    if s.elastic:
        n = s.num_workers
        if len(n) != 2 or not 1 <= n[0] <= n[1]:
            _fail("scaling.num_workers", n, "must be an integer, or [min, max] with 1 <= min <= max (elastic)")
    else:
        _positive("scaling.num_workers", s.num_workers)
    uneven = [n for n in s.worker_counts() if o.batch_size % n]
    if uneven and s.elastic:
        step = math.lcm(*s.worker_counts())
        _fail("optim.batch_size", o.batch_size,
              f"the global batch is split evenly over the workers, and an elastic run may have any count in "
              f"scaling.num_workers {s.num_workers}, but it does not split over {', '.join(map(str, uneven))} "
              f"(use a multiple of {step}, or a narrower range)")
    if uneven:
        _fail("optim.batch_size", o.batch_size,
              f"must be divisible by scaling.num_workers ({s.num_workers}): it is the global batch, "
              "split evenly over the workers")
    if o.batch_size // s.max_workers < 2:
        _fail("optim.batch_size", o.batch_size, f"needs at least 2 images per worker (with {s.max_workers})")
    if s.elastic_resize_monitor_interval_s <= 0:
        _fail("scaling.elastic_resize_monitor_interval_s", s.elastic_resize_monitor_interval_s, "must be > 0")
    _positive("scaling.cpus_per_worker", s.cpus_per_worker)
    _positive("scaling.gpus_per_worker", s.gpus_per_worker)


def _check_sizes(cfg: Config) -> None:
    """Image size, batch and image limits: each within its bound, and one worker's two views in memory."""
    d, o, s = cfg.data, cfg.optim, cfg.scaling
    _positive("data.image_size", d.image_size)
    if d.image_size > MAX_IMAGE_SIZE:
        _fail("data.image_size", d.image_size, f"must be <= {MAX_IMAGE_SIZE} (pixels per side)")
    if o.batch_size > MAX_BATCH_SIZE:
        _fail("optim.batch_size", o.batch_size, f"must be <= {MAX_BATCH_SIZE} (the global batch)")
    views_gib = 2 * (o.batch_size // s.min_workers) * 3 * d.image_size ** 2 * 4 / 2 ** 30
    if views_gib > MAX_VIEWS_GIB:
        _fail("optim.batch_size", o.batch_size,
              f"with data.image_size {d.image_size} and {s.min_workers} worker(s) the two float32 views of one "
              f"worker's batch take {views_gib:.0f} GiB; at most {MAX_VIEWS_GIB} GiB (use more workers, a smaller "
              "batch or smaller images)")
    _positive("data.limit", d.limit)
    _positive("data.max_image_pixels", d.max_image_pixels)
    if d.eval_resize is not None and not d.image_size <= d.eval_resize <= MAX_IMAGE_SIZE:
        _fail("data.eval_resize", d.eval_resize,
              f"must be null (data.image_size * 256/224) or between data.image_size ({d.image_size}) and "
              f"{MAX_IMAGE_SIZE}: the shorter side before the centre crop")


def _check_run_and_tracking(cfg: Config) -> None:
    """`run.*` and `tracking.*`: restarts, checkpoints, run and model names, the MLflow store."""
    r, t = cfg.run, cfg.tracking
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


def _check_eval(cfg: Config) -> None:
    """`eval.*`: the kNN and linear probe settings."""
    e = cfg.eval
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


def _check_environment(cfg: Config, *, check_gpu: bool) -> None:
    """What this machine must offer: a way to reach `run.ray_address`, and a GPU for a local GPU run."""
    r, s = cfg.run, cfg.scaling
    if r.ray_address and not os.environ.get("RAY_ADDRESS") and os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0":
        # The CLI imported Ray in loopback-only mode (orchestrator.cli), which cannot join a cluster.
        _fail("run.ray_address", r.ray_address, f"set the environment variable RAY_ADDRESS={r.ray_address} "
              "instead (without it selfsup keeps its own Ray on 127.0.0.1)")
    if check_gpu and s.use_gpu and not _ray_address(cfg):
        import torch

        if not torch.cuda.is_available():
            _fail("scaling.use_gpu", True, "this machine has no CUDA GPU (set scaling.use_gpu=false, "
                  "or run.ray_address to a cluster with GPU workers)")


def _ray_address(cfg: Config) -> str | None:
    return cfg.run.ray_address or os.environ.get("RAY_ADDRESS") or None


def check_data_folder(cfg: Config) -> None:
    """The data folder must hold a readable manifest with both splits, or be ingestable from data.source.

    Raises:
        ConfigError: missing folder/manifest (and no source), or a split the manifest lacks.
    """
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
