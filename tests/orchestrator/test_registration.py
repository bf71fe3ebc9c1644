"""The one registration path (`orchestrator.registry.register`) and the champion lock, against a real
`mlflow server`: a retried run adds no second version, no reader sees a version without its tags,
two promotions at once leave the champion on the better version, a dead promoter's lock is taken."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from orchestrator import registry, tracking
from orchestrator.config import load_config
from orchestrator.errors import UserError
from orchestrator.registry.register import default_model_name, register_run_encoder
from orchestrator.registry.versions import LOCK_PREFIX, versions_of

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]




def _cfg(data: Path, uri: str, model: str):  # type: ignore[no-untyped-def]
    return load_config(None, [f"data.path={data}", "data.source=null", f"tracking.uri={uri}",
                              f"tracking.model_name={model}", f"tracking.experiment=reg-{model}"])


def _state(cfg) -> dict:  # type: ignore[no-untyped-def]
    from orchestrator.training import build_model

    return {"model": build_model(cfg).state_dict()}


def _run(uri: str, name: str) -> str:
    exp = tracking.ensure_experiment(uri, f"reg-{name}")
    return tracking.start_run(uri, exp, name, {}, "{}\n")


def test_a_retried_run_registers_one_version_and_no_reader_sees_it_half_tagged(demo_data: Path,
                                                                                 mlflow_server: str) -> None:
    model = f"reg-{uuid.uuid4().hex[:8]}"
    cfg = _cfg(demo_data, mlflow_server, model)
    state = _state(cfg)
    c = tracking.client(mlflow_server)
    seen: list[dict[str, str]] = []
    stop = threading.Event()

    def read_all_the_time() -> None:  # a reader of the registry while versions are being created
        while not stop.is_set():
            try:
                for v in versions_of(c, model):
                    seen.append(dict(v.tags or {}))
                seen.append(dict(registry.resolve_version(c, model).tags or {}))  # a bare NAME
            except UserError:  # no model / no version yet
                pass

    reader = threading.Thread(target=read_all_the_time, daemon=True)
    reader.start()
    try:
        run_a, run_b = _run(mlflow_server, model), _run(mlflow_server, model)
        first = register_run_encoder(cfg, state, uri=mlflow_server, run_id=run_a, model_name=model,
                                     tags={"method": "simclr", "knn_top1": 0.4})
        # The command died after registering, before its record said so: --resume registers again.
        again = register_run_encoder(cfg, state, uri=mlflow_server, run_id=run_a, model_name=model,
                                     tags={"method": "simclr", "knn_top1": 0.4})
        other = register_run_encoder(cfg, state, uri=mlflow_server, run_id=run_b, model_name=model,
                                     tags={"method": "simclr", "knn_top1": 0.5})
    finally:
        stop.set()
        reader.join(timeout=30)
    assert (first.existed, again.existed, other.existed) == (False, True, False)
    assert again.version == first.version and other.version != first.version
    assert [v.run_id for v in versions_of(c, model)] == [run_a, run_b]
    assert first.promotion.moved and other.promotion.moved and not again.promotion.moved
    assert len(seen) > 0
    needed = {"method", "knn_top1", "dataset", "image_size", "embedding_dim", "knn_bank"}
    assert all(needed <= set(tags) for tags in seen), [t for t in seen if not needed <= set(t)][:1]


_PROMOTE = """
import os, sys, time
from pathlib import Path
from orchestrator.registry import connect, promote_if_better
uri, model, folder, version, rounds = sys.argv[1:6]
c = connect(uri)
for r in range(int(rounds)):
    Path(folder, f"ready-{r}-{version}").touch()
    while not Path(folder, f"go-{r}").exists():
        time.sleep(0.001)
    p = promote_if_better(c, model, version)
    print(p.moved, p.holder, flush=True)
"""
ROUNDS = 6


def _version(c, model: str, run_id: str, knn: float) -> str:  # type: ignore[no-untyped-def]
    tags = {"knn_top1": str(knn), "dataset": "d", "image_size": "32", "embedding_dim": "16", "knn_k": "20",
            "knn_t": "0.1", "knn_bank": "100", "knn_queries": "50", "knn_bank_split": "train",
            "knn_query_split": "test"}
    return str(c.create_model_version(model, f"runs:/{run_id}/encoder", run_id=run_id, tags=tags).version)


def test_two_promotions_at_once_leave_the_champion_on_the_better_version(mlflow_server: str, tmp_path: Path) -> None:
    c = tracking.client(mlflow_server)
    model = f"race-{uuid.uuid4().hex[:8]}"
    c.create_registered_model(model)
    run_id = _run(mlflow_server, model)
    low, mid, high = (_version(c, model, run_id, k) for k in (0.3, 0.5, 0.7))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # Two promoters, each in its own process with its own client, released at the same instant each
    # round: one promotes the middle version, the other the best.
    procs = [subprocess.Popen([sys.executable, "-c", _PROMOTE, mlflow_server, model, str(tmp_path), v, str(ROUNDS)],
                              stdout=subprocess.PIPE, text=True, env=env) for v in (mid, high)]
    try:
        for round_ in range(ROUNDS):
            c.set_registered_model_alias(model, "champion", low)
            deadline = time.monotonic() + 120
            while not all((tmp_path / f"ready-{round_}-{v}").exists() for v in (mid, high)):
                assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
                time.sleep(0.01)
            (tmp_path / f"go-{round_}").touch()
            outs = [p.stdout.readline() for p in procs]  # type: ignore[union-attr]
            assert c.get_model_version_by_alias(model, "champion").version == high, (round_, outs)
    finally:
        for p in procs:
            p.wait(timeout=60)
    assert all(p.returncode == 0 for p in procs)
    assert LOCK_PREFIX + model not in [m.name for m in c.search_registered_models()]  # released
    assert model in registry.registered_names(c) and all(not n.startswith(LOCK_PREFIX)
                                                         for n in registry.registered_names(c))


def test_a_dead_promoters_lock_is_taken_after_it_expires(mlflow_server: str) -> None:
    c = tracking.client(mlflow_server)
    model = f"stale-{uuid.uuid4().hex[:8]}"
    c.create_registered_model(model)
    v = _version(c, model, _run(mlflow_server, model), 0.4)
    c.create_registered_model(LOCK_PREFIX + model, tags={"token": "dead", "expires": f"{time.time() - 1:.3f}"})
    assert registry.promote_if_better(c, model, v).moved
    # A live lock is waited for, then refused with one line.
    c.create_registered_model(LOCK_PREFIX + model, tags={"token": "live", "expires": f"{time.time() + 60:.3f}"})
    with pytest.raises(UserError, match=r"another promotion has held its lock"):
        with registry.champion_lock(c, model, wait_s=1.0):
            pass
    c.delete_registered_model(LOCK_PREFIX + model)


@pytest.mark.parametrize(("dataset", "name"), [("cifar10", "cifar10-encoder"), ("cats@v2", "cats-v2-encoder"),
                                                ("my photos (2024)", "my-photos-2024-encoder")])
def test_the_default_model_name_is_always_a_valid_one(dataset: str, name: str) -> None:
    cfg = load_config(None, ["data.source=null"], check=False)
    assert default_model_name(cfg, dataset) == name
    with pytest.raises(UserError, match=r"^the dataset's name '@@@' gives no valid model name: set tracking.model_name"):
        default_model_name(cfg, "@@@")
