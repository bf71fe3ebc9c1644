"""How a run's images reach its workers: the `data.loader` choice, and the decoded data put in Ray's object store.

`data.loader`:
- "memory" (`pipelines.memory`): the driver decodes the train split once, plus the kNN memory bank
  and queries, and puts them into Ray's object store (`put_decoded`); workers map that copy and
  shuffle by index each epoch. A sweep's driver does this once for all its trials
  (`orchestrator.sweep`), since the data fields are the same in every trial.
- "stream" (`pipelines.stream.read_split`): Ray Data reads, shuffles and decodes the shards every
  epoch and splits them over the workers (`get_dataset_shard`): for splits of any size.
- "auto": memory when the decoded train split with the kNN images takes at most `AUTO_FRACTION`
  of the smallest node's object store (CIFAR-10: 154 MB), else stream. `data.augment_on=data`
  (views made inside Ray Data) implies stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from orchestrator.config import Config, ConfigError, check_data_folder
from pipelines import storage

AUTO_FRACTION = 0.25  # of the smallest node's object store
MEMORY_FRACTION = 0.8  # data.loader=memory refuses more than this


@dataclass
class DecodedData:
    """What `put_decoded` made: the object-store reference and what it holds.

    `key` names the config fields the data depend on; a run whose fields differ (a sweep trial that
    changes data.image_size, say) cannot use it and decodes its own.
    """

    key: tuple[Any, ...]
    ref: Any  # ray.ObjectRef of {"train": DecodedSplit, "bank": DecodedSplit, "test": DecodedSplit}
    train_rows: int
    nbytes: int

    def for_worker(self) -> dict[str, Any]:
        """What a worker's config carries (the ObjectRef travels as a reference, not the data)."""
        return {"key": list(self.key), "ref": self.ref, "train_rows": self.train_rows}


@dataclass
class DataCheck:
    """What `check_data` found out about a run's dataset before Ray starts.

    `label_metrics`: whether label-based evaluation (the kNN probe; a linear probe) runs. False for
    a dataset without classes (loose images, Parquet without labels): it still pretrains and its
    encoder is registered, without those metrics; `label_note` says why, for the log and MLflow.
    """

    train_rows: int  # after data.limit
    label_metrics: bool
    label_note: str = ""


LABEL_METRICS_TAG = "selfsup.label_metrics"


def check_data(cfg: Config, *, need_labels: str | None = None) -> DataCheck:
    """Everything about the dataset that would otherwise fail a run after Ray started, checked here.

    - the manifest is valid and its shard names stay inside the folder; the shards of the splits the
      run reads match their sha256 (`pipelines.manifest.split_files`);
    - no image ingest kept is over `data.max_image_pixels` (the manifest's `largest_image`; every
      decode checks again, but inside Ray a failure would cost `run.max_failures` restarts);
    - the train split has at least one global batch (`optim.batch_size`) of rows after `data.limit`
      (fewer would make every epoch 0 steps and register an untrained encoder);
    - a labelled dataset has test rows for the kNN probe. A dataset without labels needs no test
      split (it may lack one or have 0 rows): label metrics are left out instead.

    Args:
        need_labels: refuse a dataset without labels, this text saying what needs them (a sweep
            ranks its trials by kNN accuracy).

    Raises:
        ConfigError / DataError: one line naming the field or file.
    """
    from pipelines.manifest import MANIFEST, read_manifest, split_files

    d, o = cfg.data, cfg.optim
    manifest = read_manifest(d.path)
    where = f"{d.path}/{MANIFEST}"
    rows = manifest.rows(d.train_split)
    if rows == 0:
        raise ConfigError(f"data.train_split = {d.train_split!r}: {where} lists 0 rows for it; "
                          "nothing to train on")
    split_files(d.path, d.train_split)
    if manifest.largest_image and manifest.largest_image[0] * manifest.largest_image[1] > d.max_image_pixels:
        h, w = manifest.largest_image
        raise ConfigError(f"data.max_image_pixels = {d.max_image_pixels}: {d.path} holds a {w}x{h} image "
                          f"({h * w:,} pixels, ingested with --max-image-pixels {manifest.max_image_pixels}); "
                          "raise data.max_image_pixels, or ingest again with a lower --max-image-pixels")
    used = min(rows, d.limit) if d.limit is not None else rows
    if used < o.batch_size:
        limit = f" (data.limit = {d.limit})" if d.limit is not None and d.limit < rows else ""
        raise ConfigError(f"optim.batch_size = {o.batch_size}: more than the {used} training images{limit} in "
                          f"{d.path} ({rows} rows); every epoch would take 0 steps. Lower optim.batch_size "
                          f"to at most {used}, or train on more images")
    if not manifest.labeled:
        if need_labels:
            raise ConfigError(f"data.path = {d.path!r}: the dataset has no labels ({where} lists no classes), "
                              f"and {need_labels}; pretrain it with `selfsup pretrain` instead")
        return DataCheck(used, False, no_labels_note(d.path))
    test_rows = manifest.rows(d.test_split)
    if test_rows == 0:
        raise ConfigError(f"data.test_split = {d.test_split!r}: {where} lists 0 rows for it, and the kNN probe of a "
                          "labelled dataset needs test images; ingest again with --test-fraction > 0 "
                          "(or a source with a test split)")
    split_files(d.path, d.test_split)
    return DataCheck(used, True)


def no_labels_note(path: str) -> str:
    """What the log and the MLflow tag `LABEL_METRICS_TAG` say of a dataset without labels."""
    from pipelines.manifest import MANIFEST

    return f"{path} has no labels ({MANIFEST} lists no classes): label metrics (kNN) left out"


def label_metrics(cfg: Config) -> bool:
    """Whether the run's dataset has labels, so that kNN (and any label-based probe) can run."""
    from pipelines.manifest import read_manifest

    return read_manifest(cfg.data.path).labeled


def data_key(cfg: Config) -> tuple[Any, ...]:
    d, e = cfg.data, cfg.eval
    return (d.path, d.train_split, d.test_split, d.image_size, d.eval_resize, d.limit, e.knn_train_limit,
            e.knn_test_limit)


def needed_bytes(cfg: Config) -> int:
    """Bytes of the decoded train split (after `data.limit`), kNN bank and kNN queries."""
    from pipelines.memory import decoded_bytes, split_rows

    d, e = cfg.data, cfg.eval
    rows = split_rows(d.path, d.train_split, d.limit)
    if label_metrics(cfg):
        rows += split_rows(d.path, d.train_split, e.knn_train_limit) + split_rows(d.path, d.test_split, e.knn_test_limit)
    return decoded_bytes(rows, d.image_size)


def node_object_store_bytes() -> float:
    """The smallest object store among the alive Ray nodes (every node with workers maps a copy)."""
    import ray

    sizes = [n["Resources"].get("object_store_memory", 0.0) for n in ray.nodes() if n.get("Alive")]
    return min(sizes) if sizes else 0.0


def resolve_loader(cfg: Config) -> str:
    """"memory" or "stream" for this run (Ray must be initialised for "auto").

    Raises:
        ConfigError: `data.loader=memory` for data that do not fit in the object store.
    """
    d = cfg.data
    if d.loader == "stream" or (d.loader == "auto" and d.augment_on == "data"):
        return "stream"
    need, store = needed_bytes(cfg), node_object_store_bytes()
    if d.loader == "memory":
        if store and need > MEMORY_FRACTION * store:
            raise ConfigError(f"data.loader = 'memory': the decoded images take {need / 1e9:.2f} GB, more than "
                              f"{MEMORY_FRACTION:.0%} of a node's Ray object store ({store / 1e9:.2f} GB); "
                              "use data.loader=stream (or auto)")
        return "memory"
    return "memory" if store and need <= AUTO_FRACTION * store else "stream"


def decode_knn(cfg: Config, *, threads: int = 1) -> dict[str, Any]:
    """The kNN memory bank and queries, decoded here: seeded stratified subsets of
    `eval.knn_train_limit` training and `eval.knn_test_limit` test images (None: the whole split).

    Returns:
        {"bank", "test"}: `pipelines.memory.DecodedSplit` each.
    """
    from pipelines.memory import decode_split

    d, e = cfg.data, cfg.eval
    return {
        "bank": decode_split(d.path, d.train_split, image_size=d.image_size, limit=e.knn_train_limit,
                             stratified=True, threads=threads, max_pixels=d.max_image_pixels, resize=d.eval_resize),
        "test": decode_split(d.path, d.test_split, image_size=d.image_size, limit=e.knn_test_limit,
                             stratified=True, threads=threads, max_pixels=d.max_image_pixels, resize=d.eval_resize),
    }


def decode_all(cfg: Config, *, threads: int | None = None) -> dict[str, Any]:
    """The train split (first `data.limit` rows) and the kNN images (`decode_knn`), decoded here.

    Returns:
        {"train", "bank", "test"}: `pipelines.memory.DecodedSplit` each; only "train" for a
        dataset without labels (no kNN).
    """
    import os

    from pipelines.memory import training_split

    d = cfg.data
    threads = threads or max(1, os.cpu_count() or 1)
    # photos (not all at data.image_size) stay encoded: their views are cut from the whole photo
    train = training_split(d.path, d.train_split, image_size=d.image_size, limit=d.limit, threads=threads,
                           max_pixels=d.max_image_pixels)
    return {"train": train, **(decode_knn(cfg, threads=threads) if label_metrics(cfg) else {})}


def put_decoded(cfg: Config, *, threads: int | None = None) -> DecodedData:
    """`decode_all`, put into Ray's object store once (Ray must be initialised)."""
    import ray

    splits = decode_all(cfg, threads=threads)
    return DecodedData(key=data_key(cfg), ref=ray.put(splits), train_rows=len(splits["train"]),
                       nbytes=sum(s.nbytes for s in splits.values()))


def get_decoded(worker_data: dict[str, Any]) -> dict[str, Any]:
    """In a worker: the decoded splits behind `DecodedData.for_worker()` (zero-copy on the same node)."""
    import ray

    return ray.get(worker_data["ref"])


def matches(data: DecodedData | None, cfg: Config) -> bool:
    """Whether `data` were decoded for this config's data fields."""
    return data is not None and tuple(data.key) == data_key(cfg)



# --- the dataset a run reads -----------------------------------------------------------------

def ensure_data(cfg: Config, *, quiet: bool = False) -> None:
    """Ingest `data.source` into `data.path` if it has no manifest yet (the demo's first run)."""
    from orchestrator.ray_compat import ray_session_at
    from pipelines.ingest import ingest

    if cfg.data.source is None or storage.is_file(storage.join(cfg.data.path, "manifest.json")):
        check_data_folder(cfg)
        return
    if not quiet:
        print(f"selfsup: first run: ingesting {cfg.data.source!r} into {cfg.data.path} ...", flush=True)
    ingest(cfg.data.source, cfg.data.path, progress=False, ray_session=ray_session_at)
    check_data_folder(cfg)


def train_dataset(cfg: Config) -> Any:
    """The lazy Ray Data train split (shuffled, decoded, maybe augmented each epoch): the first
    `data.limit` rows, the same every epoch (`data.loader=stream`)."""
    from pipelines.stream import read_split  # Ray Data: imported only by runs that stream

    return read_split(cfg.data.path, cfg.data.train_split, image_size=cfg.data.image_size,
                      augment_on=cfg.resolved_augment_on(), preset=cfg.augment_preset(),  # type: ignore[arg-type]
                      view_size=cfg.data.image_size, seed=None, limit=cfg.data.limit,
                      max_pixels=cfg.data.max_image_pixels)


def train_rows(cfg: Config) -> int:
    from pipelines.manifest import read_manifest

    rows = read_manifest(cfg.data.path).rows(cfg.data.train_split)
    return min(rows, cfg.data.limit) if cfg.data.limit is not None else rows


def dataset_name(cfg: Config) -> str:
    from pipelines.manifest import read_manifest

    return read_manifest(cfg.data.path).name


def protocol_tags(cfg: Config) -> dict[str, Any]:
    """How this run's kNN accuracy was measured, as model version tags: the registry's champion
    rule compares only versions that agree on these (`orchestrator.registry.PROTOCOL_TAGS`)."""
    from pipelines.memory import split_rows

    d, e = cfg.data, cfg.eval
    return {"dataset": dataset_name(cfg), "image_size": d.image_size, "knn_k": e.knn_k, "knn_t": e.knn_t,
            "knn_bank": split_rows(d.path, d.train_split, e.knn_train_limit),
            "knn_queries": split_rows(d.path, d.test_split, e.knn_test_limit),
            "knn_bank_split": d.train_split, "knn_query_split": d.test_split}


__all__ = ["DataCheck", "DecodedData", "check_data", "data_key", "dataset_name", "decode_all", "decode_knn",
           "ensure_data", "get_decoded", "label_metrics", "matches", "needed_bytes", "protocol_tags", "put_decoded",
           "resolve_loader", "train_dataset", "train_rows"]
