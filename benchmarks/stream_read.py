"""Per-epoch cost of reading the shards through Ray Data: Ray's default Parquet reader vs selfsup's.

`data.loader=stream` re-runs its lazy Ray Data dataset every epoch. With Ray 2.60's default V2
Parquet datasource every run lists the files again, and its footer indexer starts 32 actor
processes for that each time; `pipelines.stream.read_split` builds the read through the V1
datasource instead, which reads the footers once when the dataset is built (see
`pipelines.stream._read_parquet`). Both readers here, in the same run, alternating rounds, on a
local Ray with `num_cpus=4` as `selfsup` starts it on 2 cores:

- read: the Parquet read alone (encoded rows, `image` + `label`), iterated on the driver;
- epoch: the whole per-epoch pipeline of `read_split` (read, `random_shuffle`, decode), iterated
  on the driver, as one Train worker would take it.

Reported: the median epoch time of each reader over epochs 2..n of every round (epoch 1 holds
first-touch costs: worker processes, imports), and the ratio default / selfsup. Rows per epoch are
checked equal. Writes benchmarks/results/stream_read.json and .md.

    .venv/bin/python benchmarks/stream_read.py                      # demo data (ingested if missing)
    .venv/bin/python benchmarks/stream_read.py --data data/cifar10 --limit 10000
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.results_io import write_results  # noqa: E402

def ray_default_reader(files: list[str], columns: list[str], concurrency: int, filesystem: Any = None) -> Any:
    """The baseline: `ray.data.read_parquet` with Ray's defaults (the V2 datasource in Ray 2.60), as
    `read_split` called it before (V2 deprecates `columns=` for `select_columns`). Takes what
    `pipelines.stream._read_parquet` takes, which `read_split` passes it in its place."""
    import ray.data

    return ray.data.read_parquet(files, concurrency=concurrency, filesystem=filesystem).select_columns(columns)


def epochs(make: Callable[[], Any], n: int) -> tuple[list[float], list[int]]:
    ds = make()
    seconds, rows = [], []
    for _ in range(n):
        t0, count = time.perf_counter(), 0
        for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
            count += len(batch["label"])
        seconds.append(time.perf_counter() - t0)
        rows.append(count)
    return seconds, rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/demo", help="shard folder (data/demo is ingested if missing)")
    p.add_argument("--limit", type=int, default=None, help="use the first N training rows")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args()

    import ray
    import ray.data

    from pipelines import stream
    from pipelines.manifest import split_files

    data = Path(args.data)
    if not (data / "manifest.json").is_file():
        if data.name != "demo":
            sys.exit(f"stream_read.py: no shard folder at {data} (run `selfsup ingest SOURCE {data}` first)")
        from pipelines.ingest import ingest

        ingest("demo", data, progress=False)
    files = [str(f) for f in split_files(data, "train")]
    cols = ["image", "label"]

    def read_only(reader: Callable[..., Any]) -> Callable[[], Any]:
        def make() -> Any:
            ds = reader(files, cols, 2)
            return ds.limit(args.limit) if args.limit else ds
        return make

    def whole_epoch(reader: Callable[..., Any]) -> Callable[[], Any]:
        def make() -> Any:
            mine = stream._read_parquet
            stream._read_parquet = reader  # read_split with this reader, the rest unchanged
            try:
                return stream.read_split(data, "train", seed=0, limit=args.limit)
            finally:
                stream._read_parquet = mine
        return make

    readers = {"ray_default": ray_default_reader, "selfsup": stream._read_parquet}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {m: {r: [] for r in readers} for m in ("read", "epoch")}
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        for r in range(args.rounds):
            for measure, wrap in (("read", read_only), ("epoch", whole_epoch)):
                for name, reader in readers.items():
                    seconds, rows = epochs(wrap(reader), args.epochs)
                    runs[measure][name].append({"epoch_seconds": seconds, "rows": rows})
                    print(f"round {r} {measure:5s} {name:11s}: " + ", ".join(f"{s:.2f}" for s in seconds)
                          + f" s per epoch, {rows[0]} rows", flush=True)
    finally:
        ray.shutdown()

    summary: dict[str, Any] = {}
    for measure, by_reader in runs.items():
        med = {name: statistics.median(s for run in rs for s in run["epoch_seconds"][1:])
               for name, rs in by_reader.items()}
        rows = {n for rs in by_reader.values() for run in rs for n in run["rows"]}
        if len(rows) != 1:
            sys.exit(f"stream_read.py: the readers gave different row counts per epoch: {sorted(rows)}")
        summary[measure] = {"median_epoch_seconds": med, "rows_per_epoch": rows.pop(),
                            "ratio_default_over_selfsup": med["ray_default"] / med["selfsup"]}
    result = {"benchmark": "stream_read", "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "load_avg_1min_at_end": os.getloadavg()[0], "ray": ray.__version__,
              "config": {k: v for k, v in vars(args).items() if k != "out"}, "summary": summary, "runs": runs}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python benchmarks/stream_read.py " + " ".join(sys.argv[1:])
    md = [
        "# Ray Data read per epoch: Ray's default Parquet reader vs selfsup's (`read_split`)",
        "",
        f"`{cmd.strip()}` on {result['machine']}, Ray {ray.__version__} (1-min load average at the end "
        f"{result['load_avg_1min_at_end']:.1f}); data `{args.data}`"
        + (f" (first {args.limit} rows)" if args.limit else "")
        + f", {args.epochs} epochs per reader, {args.rounds} alternating rounds, median of epochs 2..n.",
        "",
        "| per epoch, iterated on the driver | rows | Ray default (V2 datasource), s | selfsup (V1 datasource), s | default / selfsup |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    labels = {"read": "Parquet read alone", "epoch": "read + shuffle + decode (`read_split`)"}
    for measure, s in summary.items():
        md.append(f"| {labels[measure]} | {s['rows_per_epoch']:,} | {s['median_epoch_seconds']['ray_default']:.2f} | "
                  f"{s['median_epoch_seconds']['selfsup']:.2f} | **{s['ratio_default_over_selfsup']:.1f}x** |")
    write_results(out, "stream_read", result, "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
