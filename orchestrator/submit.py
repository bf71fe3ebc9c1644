"""Entry point that `ray submit` uploads to the head node and runs there.

    ray submit cluster.yaml orchestrator/submit.py -- pretrain --config configs/cifar10-simclr.yaml

Ray copies this one file to `~/submit.py` on the head and runs `python ~/submit.py ARGS` in a login
shell, so it imports the installed `orchestrator` package (the cluster's setup commands install it)
and never its own neighbours. The arguments after `--` are any `selfsup` subcommand line.

It points every Ray call in the job at the running cluster by setting `RAY_ADDRESS=auto` (unless the
caller set an address already): the drivers (`orchestrator.pretrain`, `orchestrator.sweep`) then
connect to it instead of starting a local Ray, and `auto` finds the cluster that `ray start --head`
recorded on this node.

It runs the job in `$SELFSUP_WORKDIR` when that is set (the cluster configs set it to the project's
copy on the node, `~/selfsup`), so `--config configs/...`, `data/...` and `runs/` mean what they
mean in your checkout.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `selfsup` subcommand against the Ray cluster this node belongs to.

    Args:
        argv: the `selfsup` command line without the program name, e.g.
            `["pretrain", "--set", "optim.epochs=2"]`; a leading `--` is dropped. Defaults to
            `sys.argv[1:]`.

    Returns:
        The subcommand's exit code (2 for a user error, as `selfsup` itself).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print("usage: ray submit CLUSTER.yaml orchestrator/submit.py -- SUBCOMMAND [ARGS...]\n"
              "  e.g. ... -- pretrain --config configs/demo.yaml", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_ADDRESS", "auto")
    workdir = os.environ.get("SELFSUP_WORKDIR")
    if workdir and os.path.isdir(workdir):
        os.chdir(workdir)
    from orchestrator.cli import main as selfsup_main

    return selfsup_main(args)


if __name__ == "__main__":
    sys.exit(main())
