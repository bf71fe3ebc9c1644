"""The `selfsup` command line: ingest, pretrain, sweep, registry, evaluate.

Each subcommand parses its arguments here and hands them to the module that does the work.
`main` is the one place that turns an exception into an exit code: whatever a user can cause
(a `UserError`/`DataError`, a file that is missing or unreadable, an MLflow error such as an
unknown model, bytes that do not decode) ends as one line on stderr and exit code 2; anything
else as one line and exit code 1. `SELFSUP_DEBUG=1` prints the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

from orchestrator.errors import UserError
from pipelines.errors import DataError
from pipelines.images import DEFAULT_MAX_IMAGE_PIXELS

USER_ERRORS: tuple[type[BaseException], ...] = (UserError, DataError)
DEBUG_ENV = "SELFSUP_DEBUG"
MAX_MESSAGE = 600  # characters of a foreign exception's message (MLflow's can hold a whole JSON body)
TRACKING_URI_HELP = "MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)"


# Each command imports the module that does its work when it runs: `selfsup ingest` never imports
# MLflow, and Ray only for a source it runs as a Ray Data job (more than 2,000 images, or a cluster
# named by RAY_ADDRESS); Ray is imported only after `keep_local_ray_on_loopback` (see `main`).

def _cmd_ingest(args: argparse.Namespace) -> int:
    from orchestrator.ray_compat import ray_session_at
    from pipelines.ingest import ingest

    ingest(args.source, args.out, test_fraction=args.test_fraction, seed=args.seed,
           overwrite=args.overwrite, progress=not args.quiet, image_column=args.image_column,
           label_column=args.label_column, max_image_pixels=args.max_image_pixels, max_side=args.max_side,
           ray_session=ray_session_at)
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from orchestrator.pretrain import main as pretrain_main

    return pretrain_main(config=args.config, overrides=args.set, resume=args.resume)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from orchestrator.sweep import main as sweep_main

    return sweep_main(config=args.config, overrides=args.set, resume=args.resume)


def _cmd_registry(args: argparse.Namespace) -> int:
    from orchestrator.registry.commands import main as registry_main

    return registry_main(args)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from orchestrator.evaluate_encoder import main as evaluate_main

    return evaluate_main(args)


def _limit(text: str) -> int | None:
    """`--train-limit`/`--test-limit`: a positive count, or `all`."""
    if text.lower() in ("all", "none"):
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number of images, or 'all'")
    return value


class OneLineParser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (argparse prints the usage above them) and exit 2.
    Subcommands' parsers are made with the same class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="selfsup", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    _add_ingest(sub)
    _add_pretrain_and_sweep(sub)
    _add_registry(sub)
    _add_evaluate(sub)
    return p


def _add_ingest(sub: Any) -> None:
    ing = sub.add_parser("ingest", help="turn an image source into Parquet shards + manifest.json")
    ing.add_argument("source", help="an ImageFolder directory or URI prefix (s3://, gs://, abfs://), a folder/file "
                                    "of Parquet, a torchvision dataset name, or 'demo'")
    ing.add_argument("out", help="output folder or URI for the shards and manifest.json")
    ing.add_argument("--test-fraction", type=float, default=0.2,
                     help="fraction held out as the test split when the source has no split (default 0.2)")
    ing.add_argument("--seed", type=int, default=0, help="seed of the train/test split (default 0)")
    ing.add_argument("--overwrite", action="store_true", help="replace a dataset already in OUT")
    ing.add_argument("--quiet", action="store_true", help="no progress bar")
    ing.add_argument("--image-column", default=None, help="Parquet sources: the column with the image bytes (default: image)")
    ing.add_argument("--label-column", default=None, help="Parquet sources: the column with the labels (default: label)")
    ing.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS, metavar="N",
                     help="skip images whose header declares more than N pixels, before decoding them "
                          f"(decompression bombs; default {DEFAULT_MAX_IMAGE_PIXELS:,})")
    ing.add_argument("--max-side", type=int, default=None, metavar="N",
                     help="re-encode images whose longer side exceeds N pixels down to N (default: keep every size)")
    ing.set_defaults(func=_cmd_ingest)


def _add_pretrain_and_sweep(sub: Any) -> None:
    for name, func, what in (("pretrain", _cmd_pretrain, "pretrain one encoder on Ray Train"),
                             ("sweep", _cmd_sweep, "sweep methods and hyper-parameters on Ray Tune")):
        sp = sub.add_parser(name, help=what)
        sp.add_argument("--config", default=None, help="YAML config (default: the built-in demo)")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config field, e.g. --set scaling.num_workers=4 (repeatable)")
        sp.add_argument("--resume", action="store_true", help="continue the run/sweep of the same name")
        sp.set_defaults(func=func)


def _add_registry(sub: Any) -> None:
    reg = sub.add_parser("registry", help="look up, promote and use registered encoders")
    reg.add_argument("--tracking-uri", default=None, help=TRACKING_URI_HELP)
    reg.set_defaults(func=_cmd_registry)
    rsub = reg.add_subparsers(dest="registry_command", required=True)
    lst = rsub.add_parser("list", help="encoders, versions, aliases, kNN top-1, method, dataset")
    show = rsub.add_parser("show", help="one encoder: NAME, NAME@ALIAS or NAME/VERSION")
    show.add_argument("ref")
    best = rsub.add_parser("best", help="the best registered encoder by a metric")
    best.add_argument("--metric", default="knn_top1")
    best.add_argument("--dataset", default=None)
    best.add_argument("--method", default=None)
    best.add_argument("--model", default=None, help="restrict to one registered model name")
    prom = rsub.add_parser("promote", help="point an alias at a version")
    prom.add_argument("name")
    prom.add_argument("version")
    prom.add_argument("--alias", default="champion")
    emb = rsub.add_parser("embed", help="write embeddings of an image folder or shard folder to Parquet")
    emb.add_argument("uri", help="models:/NAME@ALIAS, models:/NAME/VERSION, or NAME@ALIAS")
    emb.add_argument("source", help="an image folder or a shard folder")
    emb.add_argument("out", help="output Parquet file")
    emb.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS, metavar="N",
                     help=f"refuse images over N pixels before decoding them (default {DEFAULT_MAX_IMAGE_PIXELS:,})")
    emb.add_argument("--image-size", default=None, metavar="SIZE|HxW",
                     help="resize every image to this (default: the encoder's training size); "
                          "the encoder takes any size from its stated minimum up")
    # --tracking-uri also after the command (`selfsup registry list --tracking-uri URI`). SUPPRESS:
    # a subcommand default would overwrite the value given before the command.
    for sp in (lst, show, best, prom, emb):
        sp.add_argument("--tracking-uri", default=argparse.SUPPRESS, help=TRACKING_URI_HELP)


def _add_evaluate(sub: Any) -> None:
    ev = sub.add_parser("evaluate", help="kNN and linear top-1/top-5 of a registered encoder on an ingested dataset")
    ev.add_argument("model_uri", help="models:/NAME@ALIAS or models:/NAME/VERSION")
    ev.add_argument("data", help="an ingested dataset folder (manifest.json + shards, from `selfsup ingest`)")
    ev.add_argument("--tracking-uri", default=None, help=TRACKING_URI_HELP)
    ev.add_argument("--image-size", type=int, default=None,
                    help="resize images to SIZE x SIZE (default: the encoder's training size)")
    # Defaults left out here (argparse.SUPPRESS) and taken from EvalConfig by `selfsup evaluate`:
    # the config schema imports torch, which no other command's parser should pay for.
    ev.add_argument("--train-limit", type=_limit, default=argparse.SUPPRESS,
                    help="training images for the kNN bank and the linear probe, or 'all' "
                         "(default: pretraining's eval.knn_train_limit)")
    ev.add_argument("--test-limit", type=_limit, default=None, help="test images (default: all)")
    ev.add_argument("--linear-epochs", type=int, default=argparse.SUPPRESS,
                    help="epochs of the linear probe; 0 = kNN only (default: pretraining's eval.linear_epochs)")
    ev.add_argument("--finetune-epochs", type=int, default=0,
                    help="also fine-tune a copy of the encoder end to end with a linear head for N epochs on the "
                         "training images and report finetune_top1/top5 (MAE's protocol; default 0 = no)")
    ev.add_argument("--finetune-lr", type=float, default=1e-4, help="AdamW learning rate of the fine-tuning (1e-4)")
    ev.set_defaults(func=_cmd_evaluate)


def is_user_error(e: BaseException) -> bool:
    """Whether the user can fix what `e` says: their input, files, store or model names.

    OS errors (a missing, unreadable or unwritable path), MLflow errors (an unknown model, run or
    experiment, a store that refuses a value) and decode errors (bytes or text that are not what
    they claim) come from what the user pointed selfsup at; other exceptions are selfsup's bugs.
    """
    if isinstance(e, USER_ERRORS + (OSError, UnicodeError)):
        return True
    if isinstance(e, json.JSONDecodeError):
        return True
    mlflow_exc = sys.modules.get("mlflow.exceptions")  # only if MLflow was imported (it is slow to)
    if mlflow_exc is not None and isinstance(e, mlflow_exc.MlflowException):
        return True
    pyarrow = sys.modules.get("pyarrow")  # a Parquet file that is not one (ArrowInvalid, ...)
    if pyarrow is not None and isinstance(e, pyarrow.ArrowException):
        return True
    yaml = sys.modules.get("yaml")
    return yaml is not None and isinstance(e, yaml.YAMLError)


def one_line(e: BaseException) -> str:
    """The exception as one line: its message (OS errors: "PATH: reason"), prefixed with its type
    unless it is one of selfsup's own errors."""
    from orchestrator.mlflow_auth import refusal_message, refusal_status

    if (status := refusal_status(e)) is not None:  # MLflow's 401/403 past the checks that name the server
        return refusal_message(status, None)
    if isinstance(e, OSError) and e.strerror:
        where = f"{e.filename}: " if e.filename is not None else ""
        to = f" -> {e.filename2}" if e.filename2 is not None else ""
        text = f"{where}{e.strerror}{to}"
    else:
        message = getattr(e, "message", None)  # MlflowException: without its error-code wrapping
        text = " ".join(str(message if isinstance(message, str) else e).split())
    if len(text) > MAX_MESSAGE:
        text = text[:MAX_MESSAGE] + " ..."
    if isinstance(e, USER_ERRORS):
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from orchestrator.ray_compat import keep_local_ray_on_loopback
    from pipelines.manifest import read_once

    keep_local_ray_on_loopback()  # before anything imports Ray

    try:
        with read_once():  # a dataset's manifest is read once per command
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"selfsup {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        code = 2 if is_user_error(e) else 1
        if os.environ.get(DEBUG_ENV) == "1":
            traceback.print_exc()
            return code
        hint = "" if code == 2 else f" (unexpected; {DEBUG_ENV}=1 shows the traceback)"
        print(f"selfsup {args.command}: error: {one_line(e)}{hint}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
