"""Run and sweep folders share one naming rule: `<stem>-<n>`, or the name the user gave."""

from pathlib import Path

import pytest

from orchestrator.errors import UserError
from orchestrator.run_folders import numbered_dir


@pytest.mark.parametrize("kind", ["run", "sweep"])
def test_numbered_dirs_count_up_and_resume_the_newest_recorded(tmp_path: Path, kind: str) -> None:
    def pick(name: str | None = None, resume: bool = False) -> Path:
        return Path(numbered_dir(tmp_path, name=name, stem="demo", record="rec.json", resume=resume, kind=kind))

    assert pick() == tmp_path / "demo-1"
    for n in (1, 2):
        (tmp_path / f"demo-{n}").mkdir()
        (tmp_path / f"demo-{n}" / "rec.json").write_text("{}")
    (tmp_path / "demo-3").mkdir()  # a folder without a record is taken, but not resumable
    assert pick() == tmp_path / "demo-4"
    assert pick(resume=True) == tmp_path / "demo-2"
    assert pick("mine") == tmp_path / "mine"
    assert pick("demo-1", resume=True) == tmp_path / "demo-1"
    with pytest.raises(UserError, match=f"{kind}.name = 'demo-1': .* exists already"):
        pick("demo-1")
    with pytest.raises(UserError, match=f"there is no {kind} 'demo-3'"):
        pick("demo-3", resume=True)


def test_resume_with_nothing_recorded_says_how_to_start(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"--resume: no demo-<n> sweep under .* \(set sweep.name"):
        numbered_dir(tmp_path / "none", name=None, stem="demo", record="r", resume=True, kind="sweep")


# --- reservation: a lease created if absent, before Ray and MLflow start ------------------------

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time

from orchestrator.reservation import LEASE, STALE_S, acquire, try_acquire
from orchestrator.run_folders import reserve_dir
from pipelines import storage

N_COMMANDS = 6


def _reserve_at_once(root: str, barrier: object, out: object, name: str | None, env: dict[str, str]) -> None:
    os.environ.update(env)
    barrier.wait()  # type: ignore[attr-defined]
    try:
        d, lease = reserve_dir(root, name=name, stem="demo", record="rec.json", resume=False, kind="run")
        out.put(storage.name(d))  # type: ignore[attr-defined]
        barrier.wait()  # hold the lease until every command has picked (as a running command does)
        lease.release()
    except UserError as e:
        out.put(f"refused: {e}")  # type: ignore[attr-defined]
        barrier.wait()  # type: ignore[attr-defined]


def _start_together(root: str, name: str | None) -> list[str]:
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(N_COMMANDS), ctx.Queue()
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    procs = [ctx.Process(target=_reserve_at_once, args=(root, barrier, out, name, env)) for _ in range(N_COMMANDS)]
    for p in procs:
        p.start()
    got = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return got


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.slow)])  # slow: a moto_server
def test_commands_started_at_once_never_share_a_run_name(tmp_path: Path, where: str, request: pytest.FixtureRequest) -> None:
    root = str(tmp_path) if where == "local" else storage.join(request.getfixturevalue("s3_bucket"), "names")
    names = _start_together(root, None)
    assert sorted(names) == [f"demo-{n}" for n in range(1, N_COMMANDS + 1)]
    # The same name asked for by all of them: one runs, the others are refused with one line.
    got = _start_together(root, "mine")
    assert got.count("mine") == 1
    refused = [g for g in got if g != "mine"]
    assert len(refused) == N_COMMANDS - 1
    assert all(r.startswith("refused: run 'mine' ") and "\n" not in r for r in refused)
    # Every lease was released at the end.
    assert not storage.exists(storage.join(root, "demo-1", LEASE))


def test_a_live_runs_name_is_refused_and_a_dead_ones_taken_over(tmp_path: Path) -> None:
    d = str(tmp_path / "demo-1")
    (tmp_path / "demo-1").mkdir()
    (tmp_path / "demo-1" / "rec.json").write_text("{}")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from orchestrator.reservation import acquire; "
                               f"l = acquire({d!r}, kind='run'); print('held', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=r"^run 'demo-1' is in use by another command \(pid "
                                            rf"{holder.pid} on .*choose another run.name$"):
            reserve_dir(tmp_path, name=None, stem="demo", record="rec.json", resume=True, kind="run")
    finally:
        holder.kill()
        holder.wait()
    # Killed: its lease stays, but its pid is gone: --resume takes it over.
    assert (tmp_path / "demo-1" / LEASE).exists()
    d2, lease = reserve_dir(tmp_path, name=None, stem="demo", record="rec.json", resume=True, kind="run")
    assert d2 == d and json.loads((tmp_path / "demo-1" / LEASE).read_text())["pid"] == os.getpid()
    lease.release()
    assert not (tmp_path / "demo-1" / LEASE).exists()


@pytest.mark.slow  # a moto_server
def test_a_lease_from_another_host_is_live_until_it_stops_being_renewed(s3_bucket: str) -> None:
    d = storage.join(s3_bucket, "hosts", "demo-1")
    other = {"host": socket.gethostname() + "-elsewhere", "pid": 1, "token": "x", "renewed": time.time()}
    storage.write_text(storage.join(d, LEASE), json.dumps(other))
    lease, holder = try_acquire(d)
    assert lease is None and holder is not None and holder["token"] == "x"
    storage.write_text(storage.join(d, LEASE), json.dumps({**other, "renewed": time.time() - STALE_S - 1}))
    with acquire(d, kind="run") as mine:
        assert json.loads(storage.read_text(storage.join(d, LEASE)))["token"] == mine.token
    assert not storage.exists(storage.join(d, LEASE))
