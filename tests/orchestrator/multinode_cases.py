"""A 2-node Ray cluster on one host whose worker node cannot see the head's disk, runs and sweeps on S3.

Run by tests/orchestrator/test_multinode.py inside a network namespace of its own (`unshare --net`,
as root), so everything below listens on 127.0.0.1 of that namespace only and Ray's address
detection finds nothing but loopback (outside one, `ray start` binds every interface; the
single-host test's RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 would make a second node refuse to join).
Not collected on its own (no `test_` prefix): the cases need that namespace.

The cluster (one per module, shared by the cases):
- a Ray head with 0 CPUs, so every Train worker and Tune trial runs on the worker node;
- a worker node joined with `ray start --address`, in a mount namespace of its own with a tmpfs over
  the jobs' working folders and over the head's Ray temp folder: what a driver writes locally is
  not there, as on a second machine;
- `moto_server` (S3-compatible, what Ray's own storage tests use) with the bucket; every process
  gets `AWS_ENDPOINT_URL` and dummy credentials;
- an `mlflow server` (tests/conftest.py);
- for the elastic case only, a second worker node that stays up (started and stopped by that case).

Every process started here carries `SELFSUP_MN_MARKER=<this module's temp folder>` in its
environment; teardown stops those processes by pid (Ray's daemons outlive their parents). Never a
`ray stop`, which would stop every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cluster_sandbox import alive, cmdline, terminate  # this folder: pytest puts it on sys.path
from orchestrator.ray_compat import ELASTIC_START_TIMEOUT_S
from tests.moto_server import create_bucket, start_moto

# Each case with the shared cluster's start-up (the first case pays it) on a busy 2-core machine.
pytestmark = pytest.mark.timeout(1500)

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
MARKER_ENV = "SELFSUP_MN_MARKER"
BUCKET = "selfsup-test"
SMALL = {"optim.warmup_epochs": 0, "optim.batch_size": 128, "data.limit": 512, "scaling.num_workers": 2,
         "eval.knn_train_limit": 500, "eval.knn_test_limit": 200, "data.source": None}


def loopback_up() -> None:
    """`ip link set lo up` without iproute2: a new network namespace starts with `lo` down."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = struct.unpack("16sh", fcntl.ioctl(s, siocgifflags, struct.pack("16sh", b"lo", 0)))[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sh", b"lo", flags | iff_up))


if os.environ.get("SELFSUP_IN_NETNS") == "1":
    loopback_up()  # before any fixture starts a server


# --- processes ----------------------------------------------------------------------------------

def _environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def marked(marker: str, where: Callable[[int], bool] = lambda pid: True) -> list[int]:
    """Live processes whose environment holds `SELFSUP_MN_MARKER=marker` (and `where(pid)`)."""
    needle = f"{MARKER_ENV}={marker}".encode()
    me = os.getpid()
    return [p for p in (int(d) for d in os.listdir("/proc") if d.isdigit())
            if p != me and needle in _environ(p).split(b"\0") and alive(p) and where(p)]


def _mount_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def wait_for(what: str, check: Callable[[], bool], timeout_s: float, proc: subprocess.Popen | None = None,
             log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {proc.returncode} first:\n{_tail(log)}")
        time.sleep(1.0)
    raise AssertionError(f"{what}: not after {timeout_s} s\n{_tail(log)}")


def _tail(log: Path | None, n: int = 4000) -> str:
    return log.read_text(errors="replace")[-n:] if log is not None and log.exists() else ""


# --- the cluster --------------------------------------------------------------------------------

@dataclass
class Cluster:
    root: Path  # this module's temp folder (the marker)
    work: Path  # the jobs' working folders live here; hidden from the worker node
    env: dict[str, str]  # what drivers get: RAY_ADDRESS, AWS_*, the marker
    tracking_uri: str
    bucket: str
    worker: subprocess.Popen | None = None
    workers_started: int = 0

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def start_worker_node(self) -> None:
        """A worker node in its own mount namespace: tmpfs over the jobs' folders and the head's Ray
        temp folder (its own Ray session goes there, in its private view)."""
        self.workers_started += 1
        hide = " && ".join(f"mount -t tmpfs -o size=256m tmpfs {d}" for d in (self.work, self.root / "h"))
        # 6 logical CPUs: 2 Train workers take 1 each and Ray Data's stages need the rest. With 4 the
        # two concurrent Parquet read tasks took the last 2, then waited (streaming backpressure) for
        # a downstream stage that got no CPU budget: the epoch hung (seen here, Ray 2.60).
        script = (f"{hide} && exec {VENV_BIN / 'ray'} start --address=127.0.0.1:6379 --num-cpus=6 "
                  "--object-store-memory=300000000 --disable-usage-stats --block")
        log = open(self.root / f"worker-node-{self.workers_started}.log", "wb")
        self.worker = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script],
                                       env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
        before = self.alive_nodes()
        wait_for("the worker node joins", lambda: bool(self.alive_nodes() - before), 180, self.worker,
                 self.root / f"worker-node-{self.workers_started}.log")

    def alive_nodes(self) -> set[str]:
        """Ids of the alive nodes, as the GCS says; this process stays connected (a new driver per
        check costs ~20 s of imports and start-up on a busy 2-core machine)."""
        import ray

        if not ray.is_initialized():
            try:
                ray.init(address="127.0.0.1:6379", logging_level="ERROR", log_to_driver=False)
            except ConnectionError:
                return set()
        return {n["NodeID"] for n in ray.nodes() if n["Alive"]}

    def kill_worker_node(self) -> int:
        """SIGKILL the worker node's raylet (a lost machine), then whatever of that node is left.

        The node's processes are the marked ones in its mount namespace (`ray start` made them; Ray
        starts its daemons in sessions of their own, so the session does not tell them apart)."""
        assert self.worker is not None
        ns = _mount_ns(self.worker.pid)
        assert ns is not None and ns != _mount_ns(os.getpid())
        on_node = marked(str(self.root), lambda p: _mount_ns(p) == ns)
        raylet = [p for p in on_node if "/raylet/raylet " in cmdline(p)]
        assert len(raylet) == 1, [(p, cmdline(p)[:80]) for p in on_node]
        os.kill(raylet[0], signal.SIGKILL)
        time.sleep(1.0)
        terminate(on_node, grace_s=2.0, sig=signal.SIGKILL)
        self.worker.wait(timeout=30)
        return raylet[0]

    def selfsup(self, args: list[str], cwd: Path, log: Path, *, extra_env: dict[str, str] | None = None
                ) -> subprocess.Popen:
        cwd.mkdir(parents=True, exist_ok=True)
        f = open(log, "ab")
        return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd,
                                env={**self.env, **(extra_env or {})}, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


@pytest.fixture(scope="module")
def cluster(mlflow_server: str) -> Iterator[Cluster]:
    if os.environ.get("SELFSUP_IN_NETNS") != "1":
        pytest.skip("run through tests/orchestrator/test_multinode.py (needs its network namespace)")
    root = Path(tempfile.mkdtemp(prefix="smn", dir="/tmp"))  # short: Ray's socket paths < 107 bytes
    work, home = root / "w", root / "home"
    for d in (work, home, root / "h"):
        d.mkdir()
    marker = str(root)
    s3 = "http://127.0.0.1:5555"
    env = {**os.environ, MARKER_ENV: marker, "HOME": str(home), "PYTHONPATH": str(REPO),
           "AWS_ENDPOINT_URL": s3, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_ADDRESS": "127.0.0.1:6379", "MLFLOW_TRACKING_URI": mlflow_server, "PYTHONUNBUFFERED": "1",
           # A lost node is declared dead after ~3 s instead of ~15 s (GCS health checks).
           "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
           # The restarted worker group waits for the replacement node (default 60 s; this machine is slow).
           "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300"}
    for k in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "SELFSUP_FAULT_KILL_AT_EPOCH"):
        env.pop(k, None)
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION", "RAY_AUTH_MODE")}
    os.environ.update({k: env[k] for k in saved})  # this process reads the bucket and joins the cluster too
    c = Cluster(root=root, work=work, env=env, tracking_uri=mlflow_server, bucket=BUCKET)
    t0 = time.monotonic()
    try:
        start_moto(5555, env=env, log=open(root / "moto.log", "wb"))
        create_bucket(s3, BUCKET)
        head_log = open(root / "head.log", "wb")
        subprocess.Popen([str(VENV_BIN / "ray"), "start", "--head", "--port=6379", "--num-cpus=0",
                          "--object-store-memory=300000000", "--include-dashboard=false",
                          f"--temp-dir={root / 'h'}", "--disable-usage-stats", "--block"],
                         env=env, stdout=head_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         start_new_session=True)
        wait_for("the head starts", lambda: len(c.alive_nodes()) == 1, 180, None, root / "head.log")
        c.start_worker_node()
        # The demo data in the bucket, once for every case (shards written straight to it, manifest last).
        ingest = subprocess.run([sys.executable, "-m", "orchestrator.cli", "ingest", "demo", c.uri("demo"), "--quiet"],
                                env=env, cwd=work, capture_output=True, text=True, timeout=300)
        assert ingest.returncode == 0, ingest.stderr
        print(f"\ncluster up, data in the bucket: {time.monotonic() - t0:.0f} s")
        yield c
    finally:
        import ray

        ray.shutdown()
        terminate(marked(marker), grace_s=10.0)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for log in sorted(root.glob("*.log")):
            print(f"--- {log.name} (tail)\n{_tail(log, 1500)}")
        subprocess.run(["rm", "-rf", str(root)], check=False)


OMIT = object()  # leave the field at the config's value


def _args(c: Cluster, name: str, **over: object) -> list[str]:
    values = {**SMALL, "data.path": c.uri("demo"), "run.storage_path": c.uri("runs"), "run.name": name,
              "tracking.uri": c.tracking_uri, "tracking.model_name": "mn-encoder", **over}
    args = []
    for k, v in values.items():
        if v is OMIT:
            continue
        args += ["--set", f"{k}={'null' if v is None else v}"]
    return args


def _history(c: Cluster, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(c.tracking_uri).get_metric_history(run_id, key))


def _record(c: Cluster, *parts: str) -> dict:
    from pipelines import storage

    return json.loads(storage.read_text(c.uri(*parts)))


# --- the cases ----------------------------------------------------------------------------------

def test_local_storage_path_on_two_nodes_is_one_line_error(cluster: Cluster) -> None:
    c = cluster
    log = c.root / "case-local.log"
    local = c.work / "local" / "runs"
    proc = c.selfsup(["pretrain", *_args(c, "local-run", **{"run.storage_path": str(local)})], c.work / "local", log)
    assert proc.wait(timeout=300) == 2, _tail(log)
    lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("selfsup pretrain: error:")]
    assert len(errors) == 1, lines[-20:]
    assert "run.storage_path" in errors[0] and "2 nodes" in errors[0] and "run.shared_filesystem=true" in errors[0]
    assert "Traceback" not in log.read_text()
    assert not local.exists(), "nothing is written before the check"


def test_pretrain_on_s3_runs_on_the_worker_node_and_registers(cluster: Cluster) -> None:
    import mlflow
    import torch

    from pipelines import storage
    from pipelines.augment import normalize
    from pipelines.memory import load_split

    c = cluster
    log = c.root / "case-pretrain.log"
    # Stream: Ray Data read tasks and the rank-0 kNN probe read the shards from S3 on the worker node.
    # run.storage_path stays the demo's "runs": SELFSUP_STORAGE (cluster.yaml sets it on every node)
    # puts it in the bucket.
    proc = c.selfsup(["pretrain", *_args(c, "mn-pretrain", **{"optim.epochs": 2, "data.loader": "stream",
                                                               "run.storage_path": OMIT})],
                     c.work / "pretrain", log, extra_env={"SELFSUP_STORAGE": f"s3://{c.bucket}"})
    assert proc.wait(timeout=900) == 0, _tail(log)
    names = storage.list_names(c.uri("runs", "mn-pretrain"))
    assert any(n.startswith("checkpoint_") for n in names), names
    record = _record(c, "runs", "mn-pretrain", "selfsup-run.json")
    assert record["status"] == "finished" and record["model_uri"], record
    assert not (c.work / "pretrain" / "runs").exists(), "nothing of the run went to the local folder"
    mlflow.set_tracking_uri(c.tracking_uri)
    model = mlflow.pytorch.load_model(record["model_uri"])
    images, _ = load_split(c.uri("demo"), "test", limit=8, image_size=28)
    with torch.no_grad():
        z = model(normalize(images))
    assert z.shape[0] == 8 and torch.isfinite(z).all()


NODE_LOSS_EPOCHS = 8


def test_lost_worker_node_resumes_from_s3_checkpoint(cluster: Cluster) -> None:
    from pipelines import storage

    c = cluster
    log = c.root / "case-node-loss.log"
    run = c.uri("runs", "mn-node-loss")
    # 8 epochs of about a second each: the run must still be training when the node is killed after
    # the first checkpoint (with 3, an idle machine finished before the kill landed).
    proc = c.selfsup(["pretrain", *_args(c, "mn-node-loss", **{"optim.epochs": NODE_LOSS_EPOCHS,
                                                               "data.loader": "memory",
                                                               "run.max_failures": 5, "tracking.register": "false"})],
                     c.work / "node-loss", log)
    snapshot = storage.join(run, "checkpoint_manager_snapshot.json")
    wait_for("the first checkpoint in S3",
             lambda: storage.is_file(snapshot) and "checkpoint_dir_name" in storage.read_text(snapshot), 600, proc, log)
    c.kill_worker_node()
    c.start_worker_node()
    assert proc.wait(timeout=900) == 0, _tail(log)
    record = json.loads(storage.read_text(storage.join(run, "selfsup-run.json")))
    assert record["status"] == "finished"
    run_id = record["mlflow_run_id"]
    assert [s for s, _ in _history(c, run_id, "loss")] == list(range(1, NODE_LOSS_EPOCHS + 1))  # each logged once
    resumed = [v for _, v in _history(c, run_id, "resumed_from_epoch")]
    assert resumed[0] == 0 and resumed[-1] >= 1, resumed  # the new worker group started from a checkpoint


SWEEP_YAML = """\
base: {base}
data: {{path: {data}, source: null, limit: 512, loader: memory}}
optim: {{epochs: 2, warmup_epochs: 0, batch_size: 128}}
scaling: {{num_workers: 2}}
eval: {{knn_train_limit: 500, knn_test_limit: 200}}
tracking: {{uri: {tracking}, model_name: mn-sweep-encoder}}
sweep:
  name: mn-sweep
  storage_path: {storage}
  searcher: grid
  scheduler: fifo
  max_concurrent_trials: 1
  methods:
    simclr: {{method.temperature: [0.2, 0.5]}}
"""


def test_killed_sweep_resumes_from_another_folder(cluster: Cluster) -> None:
    from pipelines import storage

    c = cluster
    text = SWEEP_YAML.format(base=REPO / "configs" / "demo.yaml", data=c.uri("demo"), tracking=c.tracking_uri,
                             storage=c.uri("sweeps"))
    first, second = c.work / "sweep-a", c.work / "sweep-b"
    for d in (first, second):
        d.mkdir(parents=True)
        (d / "sweep.yaml").write_text(text)
    trials = c.uri("sweeps", "mn-sweep", "trials")

    def finished_trials() -> list[str]:
        done = []
        for name in storage.list_names(trials):
            rec = storage.join(trials, name, "selfsup-run.json")
            if name.startswith("trial-") and storage.is_file(rec) and '"finished"' in storage.read_text(rec):
                done.append(name)
        return done

    log = c.root / "case-sweep.log"
    proc = c.selfsup(["sweep", "--config", "sweep.yaml"], first, log)
    wait_for("the first trial finishes", lambda: len(finished_trials()) >= 1, 900, proc, log)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver dies; Ray ends its job's trials with it
    proc.wait(timeout=30)
    done = finished_trials()
    before = {t: storage.read_text(storage.join(trials, t, "selfsup-run.json")) for t in done}

    proc = c.selfsup(["sweep", "--config", "sweep.yaml", "--resume"], second, log)
    assert proc.wait(timeout=900) == 0, _tail(log)
    record = _record(c, "sweeps", "mn-sweep", "selfsup-sweep.json")
    assert record["status"] == "finished" and record.get("model_uri"), record  # the best encoder registered
    assert storage.is_file(c.uri("sweeps", "mn-sweep", "results.md"))
    for t, text_before in before.items():  # finished trials were not run again
        rec = json.loads(storage.read_text(storage.join(trials, t, "selfsup-run.json")))
        assert storage.read_text(storage.join(trials, t, "selfsup-run.json")) == text_before
        assert [s for s, _ in _history(c, rec["mlflow_run_id"], "loss")] == [1, 2]
    assert len(finished_trials()) == 2
    assert not (first / "runs").exists() and not (second / "runs").exists()


# --- elastic: a run on [1, 2] workers loses a node, goes on with one, grows back -------------------

ELASTIC_EPOCHS = 6


def start_stable_node(c: Cluster, cpus: int) -> subprocess.Popen:
    """A second worker node that stays up (the on-demand machine next to the spot one that is lost), in
    a mount namespace of its own like the worker node; `cpus` logical CPUs."""
    hide = " && ".join(f"mount -t tmpfs -o size=256m tmpfs {d}" for d in (c.work, c.root / "h"))
    script = (f"{hide} && exec {VENV_BIN / 'ray'} start --address=127.0.0.1:6379 --num-cpus={cpus} "
              "--object-store-memory=200000000 --disable-usage-stats --block")
    log = c.root / "stable-node.log"
    before = c.alive_nodes()
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script],
                            env=c.env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    wait_for("the stable node joins", lambda: bool(c.alive_nodes() - before), 180, proc, log)
    return proc


def stop_node(c: Cluster, proc: subprocess.Popen) -> None:
    """Stop every process of the node `proc` started (by pid: the marked ones in its mount namespace)."""
    ns = _mount_ns(proc.pid)
    if ns is not None and ns != _mount_ns(os.getpid()):
        terminate(marked(str(c.root), lambda p: _mount_ns(p) == ns), grace_s=5.0)
    proc.wait(timeout=30)


def _latest_reported(run: str) -> dict:
    """The metrics of the newest checkpoint Train has registered (its snapshot in the run folder)."""
    from pipelines import storage

    snapshot = storage.join(run, "checkpoint_manager_snapshot.json")
    try:
        return (json.loads(storage.read_text(snapshot)).get("latest_checkpoint_result") or {}).get("metrics", {})
    except (OSError, ValueError):
        return {}


def _controller_said(c: Cluster, text: str) -> bool:
    """Whether the Train controller (on the head) has logged `text` (Ray writes it to the session logs)."""
    logs = c.root / "h" / "session_latest" / "logs"
    for f in logs.rglob("*"):
        with contextlib.suppress(OSError):
            if f.is_file() and f.suffix in (".log", ".out", ".err") and text.encode() in f.read_bytes():
                return True
    return False


def run_elastic_case(c: Cluster, name: str, events: dict[str, float]) -> str:
    """An elastic [1, 2] run, one worker per node: the worker node is killed after the first checkpoint,
    the run goes on with the stable node's worker, a fresh worker node joins and the run grows back.
    Fills `events` (unix times of the kill and of the new node's join); returns the MLflow run id."""
    from pipelines import storage

    stable = start_stable_node(c, cpus=4)
    try:
        log = c.root / f"case-{name}.log"
        run = c.uri("runs", name)
        # 4 CPUs per worker: one fits on each node (the worker node has 6, the stable one 4), so the
        # run has 2 workers when both nodes are up and 1 when one is lost.
        proc = c.selfsup(["pretrain", *_args(c, name, **{
            "optim.epochs": ELASTIC_EPOCHS, "data.loader": "memory", "run.max_failures": 5,
            "tracking.register": "false", "scaling.num_workers": "[1, 2]", "scaling.cpus_per_worker": 4,
            "scaling.elastic_resize_monitor_interval_s": 5, "eval.linear_epochs": 0, "optim.lr": 0.004})],
            # selfsup's own start timeout for elastic runs, not the fixture's 300 s (the fixed-size run
            # of test_lost_worker_node_resumes_from_s3_checkpoint waits for its replacement node).
            c.work / name, log, extra_env={"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(ELASTIC_START_TIMEOUT_S)})
        wait_for("the first checkpoint, on 2 workers", lambda: _latest_reported(run).get("epoch", 0) >= 1, 600,
                 proc, log)
        assert _latest_reported(run)["world_size"] == 2
        events["kill"] = time.time()
        c.kill_worker_node()
        # No replacement yet: the run must go on with the stable node's worker alone.
        wait_for("an epoch on the 1 worker left", lambda: _latest_reported(run).get("world_size") == 1, 300, proc, log)
        # A node takes 10-60 s to join here and these epochs under a second, so the run would end
        # before the new node is there (on real data an epoch outlasts a node's boot): hold the
        # one-worker group (SIGSTOP; Train counts only missed health checks, for up to 10 min) while
        # the fresh node starts, and let it go on once Train has decided to grow.
        worker = [p for p in marked(str(c.root), lambda p: _mount_ns(p) == _mount_ns(stable.pid))
                  if "RayTrainWorker" in cmdline(p)]
        assert len(worker) == 1, worker
        os.kill(worker[0], signal.SIGSTOP)
        try:
            c.start_worker_node()
            events["join"] = time.time()
            with contextlib.suppress(AssertionError):
                wait_for("Train decides to grow", lambda: _controller_said(c, "resize the worker group from 1 -> 2"),
                         120, proc, log)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker[0], signal.SIGCONT)
        assert proc.wait(timeout=600) == 0, _tail(log)
        record = json.loads(storage.read_text(storage.join(run, "selfsup-run.json")))
        assert record["status"] == "finished", record
        return str(record["mlflow_run_id"])
    finally:
        stop_node(c, stable)


def test_elastic_run_shrinks_on_a_lost_node_and_grows_back(cluster: Cluster) -> None:
    from mlflow.tracking import MlflowClient

    c = cluster
    events: dict[str, float] = {}
    run_id = run_elastic_case(c, "mn-elastic", events)
    epochs = list(range(1, ELASTIC_EPOCHS + 1))
    assert [s for s, _ in _history(c, run_id, "loss")] == epochs  # every epoch logged exactly once
    world = [int(v) for _, v in _history(c, run_id, "world_size")]
    loss = dict(_history(c, run_id, "loss"))
    assert len(world) == ELASTIC_EPOCHS and world[0] == 2 and 1 in world and world[-1] == 2, (world, loss)
    shrunk = world.index(1) + 1  # the first epoch on one worker
    assert 2 in world[shrunk:], world  # grew back at a later epoch
    assert {v for _, v in _history(c, run_id, "global_batch")} == {SMALL["optim.batch_size"]}
    # The loss curve goes on: the one-worker group started from a checkpoint (not from scratch),
    # and its first epoch's loss is below the first epoch's.
    resumed = dict(_history(c, run_id, "resumed_from_epoch"))
    assert resumed[shrunk] >= 1, resumed
    assert loss[shrunk] < loss[1], loss
    run = MlflowClient(c.tracking_uri).get_run(run_id)
    assert run.data.metrics["resizes"] >= 2, run.data.metrics  # 2 -> 1 and 1 -> 2
    assert "2->1 before epoch" in run.data.tags["resizes"] and "1->2 before epoch" in run.data.tags["resizes"], \
        run.data.tags["resizes"]
    out = os.environ.get("SELFSUP_ELASTIC_EVENTS")  # benchmarks/elastic_resize.py reads these
    if out:
        Path(out).write_text(json.dumps({**events, "run_id": run_id, "world_size": world,
                                         "epoch_seconds": [v for _, v in _history(c, run_id, "epoch_seconds")],
                                         "resizes": run.data.tags["resizes"]}))


def test_photos_ingested_from_s3_on_the_worker_node_then_pretrain_embed_evaluate(cluster: Cluster) -> None:
    """Issue 23: photo-like JPEGs (320-640 px) in the bucket, ingested s3:// -> s3:// by Ray Data
    tasks that run on the worker node (the head has 0 CPUs, and ingest names the nodes its shard
    tasks ran on), a streamed pretrain from that dataset, then `registry embed` with an s3://
    output and `evaluate` on the s3:// dataset."""
    import re

    import pyarrow.parquet as pq
    import ray

    from pipelines import storage
    from tests.image_files import photo_jpeg

    c = cluster
    for i in range(48):
        storage.write_bytes(c.uri("photo-src", f"c{i % 3}", f"{i:02d}.jpg"), photo_jpeg(i))
    log = c.root / "case-photos.log"
    proc = c.selfsup(["ingest", c.uri("photo-src"), c.uri("photos"), "--test-fraction", "0.25"], c.work / "photos", log)
    assert proc.wait(timeout=600) == 0, _tail(log)
    m = re.search(r"shards written on (\d+) node\(s\): (.*)$", log.read_text(), re.MULTILINE)
    assert m, _tail(log)
    ran_on = set(re.findall(r"([0-9a-f]{12}) \(\d+\)", m.group(2)))
    workers = {n["NodeID"][:12] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" not in n["Resources"]}
    assert ran_on and ran_on <= workers, (ran_on, workers)  # every shard task ran on the worker node
    assert "manifest.json" in storage.list_names(c.uri("photos"))
    assert not (c.work / "photos" / "s3:").exists(), "nothing staged on the driver's disk"

    proc = c.selfsup(["pretrain", *_args(c, "mn-photos", **{"data.path": c.uri("photos"), "data.image_size": 32,
                                                            "data.loader": "stream", "data.limit": None,
                                                            "optim.epochs": 1, "optim.batch_size": 8,
                                                            "tracking.model_name": "mn-photos-encoder"})],
                     c.work / "photos", log)
    assert proc.wait(timeout=900) == 0, _tail(log)
    record = _record(c, "runs", "mn-photos", "selfsup-run.json")
    assert record["status"] == "finished" and record["model_uri"], record

    out = c.uri("emb", "photos.parquet")
    proc = c.selfsup(["registry", "embed", record["model_uri"], c.uri("photos"), out], c.work / "photos", log)
    assert proc.wait(timeout=300) == 0, _tail(log)
    assert pq.read_table(storage.open_input_file(out)).num_rows == 48
    assert not (c.work / "photos" / "s3:").exists(), "an s3:// output never becomes a local folder"
    proc = c.selfsup(["evaluate", record["model_uri"], c.uri("photos"), "--linear-epochs", "0"], c.work / "photos", log)
    assert proc.wait(timeout=300) == 0, _tail(log)
    assert "knn_top1" in log.read_text()
