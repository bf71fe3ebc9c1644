"""What a run's worker-group restarts cost: resizes of an elastic run, and restarts after a failure.

Ray Train restarts the whole worker group from the last checkpoint when a worker dies, and an
elastic run (`scaling.num_workers: [min, max]`) also restarts it to change its size: with the
workers left after a lost node, or with more when nodes return. The epoch in flight is thrown away
each time. Every epoch's report carries the worker count it ran with (`world_size`), the checkpoint
its group started from (`resumed_from_epoch`), its own duration (`epoch_seconds`) and when it ended
(`ended_at`, unix time), so the restarts can be read back from the run's epoch history alone (the
last checkpoint holds it), also after `--resume`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Restart:
    """One worker-group restart, seen at the first epoch the new group finished."""

    epoch: int  # the first epoch the new group ran
    world_before: int
    world_after: int
    # From the end of the last epoch before the restart to the start of the new group's first
    # epoch: the epoch in flight that was thrown away, noticing the loss, and starting the group.
    seconds_lost: float

    @property
    def resize(self) -> bool:
        return self.world_before != self.world_after


def worker_group_restarts(history: list[dict[str, Any]]) -> list[Restart]:
    """The restarts in a run's epoch history (`state["history"]`: one metrics dict per epoch).

    A group that starts from the checkpoint of epoch e-1 and reports epoch e (e > 1) is a new group
    (a group that ran epoch e-1 itself started from an earlier checkpoint). Epochs without the
    fields (runs from before they were reported) are skipped.
    """
    by_epoch = {int(m["epoch"]): m for m in history if "epoch" in m}
    out = []
    for e in sorted(by_epoch):
        m, prev = by_epoch[e], by_epoch.get(e - 1)
        if prev is None or int(m.get("resumed_from_epoch", -1)) != e - 1:
            continue
        if not all(k in m for k in ("world_size", "epoch_seconds", "ended_at")) or "ended_at" not in prev:
            continue
        lost = float(m["ended_at"]) - float(prev["ended_at"]) - float(m["epoch_seconds"])
        out.append(Restart(epoch=e, world_before=int(prev.get("world_size", m["world_size"])),
                           world_after=int(m["world_size"]), seconds_lost=max(0.0, lost)))
    return out


def describe(restarts: list[Restart]) -> str:
    """One line for the run's summary: "2 resizes: 2->1 before epoch 3 (41 s lost), 1->2 before epoch 6 (30 s lost)"."""
    if not restarts:
        return "no worker-group restarts"
    resizes = [r for r in restarts if r.resize]
    parts = [f"{r.world_before}->{r.world_after} before epoch {r.epoch} ({r.seconds_lost:.0f} s lost)"
             if r.resize else f"restart at {r.world_after} before epoch {r.epoch} ({r.seconds_lost:.0f} s lost)"
             for r in restarts]
    return f"{len(resizes)} resize{'' if len(resizes) == 1 else 's'}: {', '.join(parts)}"
