"""`selfsup evaluate MODEL_URI DATA`: kNN and linear top-1/top-5 of a registered encoder on an ingested dataset,
and with `--finetune-epochs N` the top-1/top-5 of a copy fine-tuned end to end (`methods.evaluate.fine_tune`).

The protocol is pretraining's (`orchestrator.training.probe_metrics`, settings from `EvalConfig`):
features of a seeded per-class subset of `--train-limit` training images (the kNN memory bank and
the linear probe's training set) and of the test split (or `--test-limit` of it), no augmentation,
every image resized to the encoder's training size (or `--image-size`) and normalised.

The encoder loads through `orchestrator.registry.load_encoder` (rebuilt by selfsup's code), which checks the input
against what the model version states (channels, minimum size): a size it does not take is one
line, exit 2.

The result is an MLflow run in the experiment `selfsup-evaluations`, linked to the model version
both ways: the run's tags and params name the model (name, version, URI), the dataset and the
protocol; its metrics are logged with the version's `model_id` (MLflow 3 shows them on the logged
model); the version gets the tag `evaluation_run.<dataset>` = the run id.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from mlflow.entities import Metric, Param, RunTag

from orchestrator import tracking
from orchestrator.config import EvalConfig
from orchestrator.encoder_input import check_input_side
from orchestrator.errors import UserError
from orchestrator.registry import LoadedEncoder, load_encoder
from orchestrator.probes import probe_metrics
from pipelines.augment import normalize
from pipelines import storage
from pipelines.manifest import MANIFEST, read_manifest
from pipelines.memory import decode_split

EXPERIMENT = "selfsup-evaluations"
METRICS = ("knn_top1", "knn_top5", "linear_top1", "linear_top5", "finetune_top1", "finetune_top5")


@dataclass
class Evaluation:
    """What `evaluate` measured and where it logged it."""

    model_uri: str  # models:/NAME/VERSION
    dataset: str
    metrics: dict[str, float]
    train_images: int
    test_images: int
    image_size: int
    run_id: str = ""
    tracking_uri: str = ""
    seconds: float = 0.0
    params: dict[str, Any] = field(default_factory=dict)


def evaluate(model_ref: str, data: str | Path, *, tracking_uri: str | None = None,
             image_size: int | None = None, train_limit: int | None = EvalConfig.knn_train_limit,
             test_limit: int | None = None, linear_epochs: int = EvalConfig.linear_epochs,
             train_split: str = "train", test_split: str = "test", seed: int = 0, finetune_epochs: int = 0,
             finetune_lr: float = 1e-4) -> Evaluation:
    """Score a registered encoder on an ingested dataset and log the evaluation run.

    Args:
        model_ref: `models:/NAME@ALIAS`, `models:/NAME/VERSION` (or without `models:/`).
        data: a shard folder with `manifest.json` (`selfsup ingest`).
        tracking_uri: the MLflow store of the registry, which also receives the evaluation run.
        image_size: resize images to this square size (default: the encoder's training size).
        train_limit, test_limit: at most this many images of each split (seeded per-class
            subsets); None = all.
        linear_epochs: the linear probe's epochs (0: kNN only).
        seed: seed of the subsets, the linear probe and the fine-tuning.
        finetune_epochs: > 0: also fine-tune a copy of the encoder with a linear head on the
            training images for this many epochs (`methods.evaluate.fine_tune`, AdamW at
            `finetune_lr`) and score it on the test images (finetune_top1/top5).

    Raises:
        UserError / DataError: unknown model, no dataset there, unlabelled splits, or an image size
            the encoder does not take.
    """
    start = time.perf_counter()
    if image_size is not None:
        check_input_side(image_size, image_size)  # before the model is downloaded or a split decoded
    if linear_epochs < 0:
        raise UserError(f"--linear-epochs {linear_epochs}: must be >= 0 (0 = kNN only)")
    if finetune_epochs < 0 or not finetune_lr > 0:
        raise UserError(f"--finetune-epochs {finetune_epochs} / --finetune-lr {finetune_lr}: epochs must be >= 0 "
                        "(0 = no fine-tuning) and the learning rate > 0")
    manifest = read_manifest(data)  # DataError (one line) when DATA is no ingested dataset
    for split in (train_split, test_split):
        if split not in manifest.splits:
            raise UserError(f"{data}: the dataset has no {split!r} split; it has "
                            f"{', '.join(sorted(manifest.splits)) or '(none)'}")
    encoder = load_encoder(model_ref, tracking_uri=tracking_uri)
    h, w = encoder.input_size((image_size, image_size) if image_size else None)  # checked: one-line error
    settings = replace(EvalConfig(), knn_train_limit=train_limit, knn_test_limit=test_limit,
                       linear_epochs=linear_epochs, linear_train_limit=None)
    bank_x, bank_y = _split_images(data, train_split, h, train_limit, seed)
    test_x, test_y = _split_images(data, test_split, h, test_limit, seed)
    for split, labels in ((train_split, bank_y), (test_split, test_y)):
        if len(labels) == 0 or bool((labels < 0).any()):
            raise UserError(f"{data}: the {split!r} split has {'no images' if len(labels) == 0 else 'unlabelled images'}"
                            "; evaluate needs labelled train and test images")
    metrics = probe_metrics(_features(encoder, bank_x, settings.batch_size), bank_y,
                            _features(encoder, test_x, settings.batch_size), test_y, settings, seed=seed)
    if finetune_epochs > 0:
        from methods.evaluate import fine_tune

        tuned = fine_tune(encoder.module, normalize(bank_x), bank_y, normalize(test_x), test_y,
                          epochs=finetune_epochs, lr=finetune_lr, seed=seed)
        metrics.update(finetune_top1=tuned["top1"], finetune_top5=tuned["top5"],
                       finetune_train_top1=tuned["train_top1"])
    params = _params(encoder, data, manifest.name, splits=(train_split, test_split), image_size=f"{h}x{w}",
                     counts=(len(bank_y), len(test_y)), settings=settings, seed=seed)
    if finetune_epochs > 0:
        params.update(finetune_epochs=finetune_epochs, finetune_lr=finetune_lr)
    out = Evaluation(model_uri=encoder.uri, dataset=manifest.name, metrics=metrics, train_images=len(bank_y),
                     test_images=len(test_y), image_size=h, tracking_uri=tracking.resolve_tracking_uri(tracking_uri),
                     params=params)
    out.seconds = time.perf_counter() - start
    out.run_id = _log(out, encoder.version, encoder.model_id)
    return out


def _split_images(data: str | Path, split: str, size: int, limit: int | None, seed: int) -> tuple[Any, Any]:
    """A seeded per-class subset of `limit` images of `split` (None: all): uint8 [N, 3, size, size], labels."""
    images = decode_split(data, split, image_size=size, limit=limit, stratified=True, seed=seed,
                          threads=max(1, torch.get_num_threads()))
    return images.tensors()


def _features(encoder: Any, images_uint8: Any, batch_size: int) -> Any:
    with torch.inference_mode():
        return torch.cat([encoder(normalize(images_uint8[i:i + batch_size])).float()
                          for i in range(0, len(images_uint8), batch_size)])


def _params(encoder: LoadedEncoder, data: str | Path, dataset: str, *, splits: tuple[str, str], image_size: str,
            counts: tuple[int, int], settings: EvalConfig, seed: int) -> dict[str, Any]:
    """The evaluation run's params: the model, the data (and which version of it), the protocol."""
    return {"model.name": encoder.version.name, "model.version": str(encoder.version.version),
            "model.uri": encoder.uri, "data.path": storage.absolute(data), "data.name": dataset,
            # which version of the data: the manifest lists every shard and its row count. Read
            # through the storage layer: DATA may be a URI (never made a local path).
            "data.digest": hashlib.sha256(storage.read_bytes(storage.join(storage.absolute(data), MANIFEST))
                                          ).hexdigest()[:16],
            "data.train_split": splits[0], "data.test_split": splits[1], "image_size": image_size,
            "train_images": counts[0], "test_images": counts[1], "knn_k": settings.knn_k,
            "knn_t": settings.knn_t, "linear_epochs": settings.linear_epochs, "linear_lr": settings.linear_lr,
            "seed": seed}


def _log(e: Evaluation, version: Any, model_id: str | None) -> str:
    """The evaluation run, its metrics linked to the version's logged model, and the version's tag."""
    c = tracking.client(e.tracking_uri)
    exp = tracking.ensure_experiment(e.tracking_uri, EXPERIMENT)
    protocol = (f"weighted kNN (k={e.params['knn_k']}, T={e.params['knn_t']}) and a linear probe "
                f"({e.params['linear_epochs']} epochs) on frozen features of {e.train_images} "
                f"{e.params['data.train_split']} images, scored on {e.test_images} "
                f"{e.params['data.test_split']} images at {e.params['image_size']}")
    if "finetune_epochs" in e.params:
        protocol += (f"; fine-tuned end to end with a linear head for {e.params['finetune_epochs']} epochs "
                     f"(AdamW, lr {e.params['finetune_lr']}) on the same train images")
    tags = {"model_name": version.name, "model_version": str(version.version), "model_uri": e.model_uri,
            "dataset": e.dataset, "protocol": protocol, "selfsup.kind": "evaluation"}
    run = c.create_run(exp, run_name=f"{version.name}-v{version.version}-on-{e.dataset}", tags=tags)
    run_id = str(run.info.run_id)
    ts = int(time.time() * 1000)
    digest = e.params["data.digest"]
    metrics = [Metric(k, float(v), ts, 0, model_id=model_id, dataset_name=e.dataset, dataset_digest=digest)
               for k, v in e.metrics.items()] + [Metric("evaluate_seconds", e.seconds, ts, 0)]
    try:
        c.log_batch(run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in e.params.items()],
                    tags=[RunTag("mlflow.note.content", protocol)])
    except BaseException:
        c.set_terminated(run_id, "FAILED")
        raise
    c.set_terminated(run_id, "FINISHED")
    c.set_model_version_tag(version.name, str(version.version), f"evaluation_run.{e.dataset}", run_id)
    return run_id


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def main(args: argparse.Namespace) -> int:
    """`selfsup evaluate MODEL_URI DATA [--tracking-uri URI] [--image-size N] ...`; see `orchestrator.cli`."""
    r = evaluate(args.model_uri, args.data, tracking_uri=args.tracking_uri, image_size=args.image_size,
                 train_limit=getattr(args, "train_limit", EvalConfig.knn_train_limit), test_limit=args.test_limit,
                 linear_epochs=getattr(args, "linear_epochs", EvalConfig.linear_epochs),
                 finetune_epochs=getattr(args, "finetune_epochs", 0), finetune_lr=getattr(args, "finetune_lr", 1e-4))
    print(f"selfsup evaluate: {r.model_uri} on {r.dataset} ({r.train_images:,} train / {r.test_images:,} test "
          f"images, {r.image_size}x{r.image_size}) in {r.seconds:.1f}s")
    for key in METRICS:
        if key.startswith("finetune") and key not in r.metrics:
            continue
        print(f"{key:13} {_fmt(r.metrics.get(key))}")
    print(f"MLflow run:  {r.run_id} (experiment {EXPERIMENT!r}) in {r.tracking_uri}")
    return 0
