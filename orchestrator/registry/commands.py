"""`selfsup registry {list,show,best,promote,embed}`: runs the command and prints its result.

`orchestrator.cli` defines the arguments; this module turns them into calls of the registry
functions and prints what they return.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import pandas as pd

from orchestrator.encoder_input import parse_size
from orchestrator.registry.champion import promote
from orchestrator.registry.embed import embed
from orchestrator.registry.versions import aliases_by_version, best_version, connect, list_versions, resolve_version

def _fmt_metric(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _print_table(df: pd.DataFrame) -> None:
    if df.empty:
        print("(no registered encoders)")
        return
    show = df.copy()
    for col in show.columns:
        if show[col].dtype.kind == "f" or col == "knn_top1":
            show[col] = show[col].map(_fmt_metric)
    print(show.to_string(index=False))


def _describe(client: Any, v: Any) -> dict[str, Any]:
    aliases = aliases_by_version(client, v.name).get(str(v.version), [])
    return {"name": v.name, "version": v.version, "aliases": ",".join(sorted(aliases)),
            "uri": f"models:/{v.name}/{v.version}", "run_id": v.run_id, "source": v.source,
            "status": v.status, "description": v.description or "",
            **{f"tag.{k}": val for k, val in sorted((v.tags or {}).items())}}


def main(args: argparse.Namespace) -> int:
    """`selfsup registry {list,show,best,promote,embed}`; see `orchestrator.cli`."""
    cmd = args.registry_command
    if cmd == "embed":
        n = embed(args.uri, args.source, args.out, tracking_uri=args.tracking_uri,
                  max_pixels=args.max_image_pixels,
                  image_size=parse_size(args.image_size) if args.image_size else None)
        print(f"wrote {n} embeddings to {args.out}")
        return 0
    client = connect(args.tracking_uri)
    if cmd == "list":
        _print_table(list_versions(client))
    elif cmd == "show":
        for k, val in _describe(client, resolve_version(client, args.ref)).items():
            print(f"{k:16} {val}")
    elif cmd == "best":
        v, value = best_version(client, args.metric, dataset=args.dataset, method=args.method,
                                model=getattr(args, "model", None))
        print(f"models:/{v.name}/{v.version}\t{args.metric}={value:.4f}")
    elif cmd == "promote":
        v = promote(client, args.name, args.version, args.alias)
        print(f"{args.alias} -> models:/{v.name}/{v.version}")
    else:  # argparse only lets the commands above through
        print(f"unknown registry command {cmd!r}", file=sys.stderr)
        return 2
    return 0
