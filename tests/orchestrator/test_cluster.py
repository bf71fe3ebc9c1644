"""The cluster path: `cluster.yaml` and `configs/cluster-local.yaml` pass Ray's own schema, and
`ray up` / `ray submit orchestrator/submit.py -- pretrain` / `ray down` work end to end against a
real Ray cluster launched over SSH on 127.0.0.1.

The end-to-end test runs its own sshd (127.0.0.1, a free port, a host key and a client key made for
the test, `AuthorizedKeysFile` in its temp folder) and points the SSH login's HOME at a folder in
its temp folder, so every file Ray writes "on the node" (`~/ray_bootstrap_config.yaml`, the uploaded
`~/submit.py`, `~/.selfsup-env`, `~/.bashrc`, MLflow's database) lands there. `.ci/install-sshd.sh`
installs the sshd binary on CI machines. Nothing listens beyond 127.0.0.1: sshd, MLflow and Ray
(`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` makes Ray use the loopback address) bind to it.
"""

from __future__ import annotations

import copy
import getpass
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

import cluster_sandbox as sandbox
from orchestrator import mlflow_auth
from tests.http_wait import wait_http

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
CLOUD_CONFIG = REPO / "cluster.yaml"
LOCAL_CONFIG = REPO / "configs" / "cluster-local.yaml"
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ray_validate(raw: dict) -> dict:
    """Ray's own check, as `ray up` does it before touching any machine."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)
    return cfg


# --- the config files -------------------------------------------------------------------------

def test_cluster_yaml_passes_ray_schema() -> None:
    raw = yaml.safe_load(CLOUD_CONFIG.read_text())
    cfg = ray_validate(raw)
    assert cfg["provider"]["type"] == "aws"
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert "xlarge" in head["node_config"]["InstanceType"]
    gpu_types = [n for k, n in cfg["available_node_types"].items() if k != cfg["head_node_type"]]
    assert gpu_types and all(n["node_config"]["InstanceType"].startswith(("g5.", "g6.")) for n in gpu_types)
    assert all(n["min_workers"] == 0 and n["max_workers"] >= 1 for n in gpu_types)
    setup = "\n".join(raw["setup_commands"])
    assert "pip install" in setup and "~/selfsup" in setup and "MLFLOW_TRACKING_URI" in setup
    # The bucket is named once, and every node exports it (relative storage paths resolve under it).
    assert setup.count("s3://") == 1 and "export SELFSUP_STORAGE=" in setup
    start = "\n".join(raw["head_start_ray_commands"])
    # MLflow on the head's private IP (never 0.0.0.0), artifacts served through the server.
    assert "mlflow server" in start and '--host "$SELFSUP_HEAD_IP"' in start
    assert "--artifacts-destination" in start
    assert "0.0.0.0" not in start + setup and "--dashboard-host" not in start
    check_mlflow_auth(raw, CLOUD_CONFIG.read_text())
    # No credentials or account ids in the file.
    text = CLOUD_CONFIG.read_text().lower()
    for secret in ("aws_access_key_id", "aws_secret_access_key", "aws_session_token", "arn:aws"):
        assert secret not in text


def test_cluster_yaml_is_least_privilege() -> None:
    """Each node type: its own narrow instance profile and IMDSv2; the security group is the one
    cluster/setup-aws.sh makes (SSH from the admin CIDR, the rest from members); the policies grant
    what the README says and no more."""
    raw = yaml.safe_load(CLOUD_CONFIG.read_text())
    cfg = ray_validate(raw)  # Ray's schema still accepts it
    assert raw["provider"]["security_group"] == {"GroupName": "selfsup-cluster"}
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]["node_config"]
    assert head["IamInstanceProfile"] == {"Name": "selfsup-head"}
    for name, node_type in types.items():
        nc = node_type["node_config"]
        assert nc["MetadataOptions"]["HttpTokens"] == "required", name
        assert nc["MetadataOptions"]["HttpPutResponseHopLimit"] == 1, name
        assert "SecurityGroupIds" not in nc, name  # Ray finds selfsup-cluster by name
        if name != cfg["head_node_type"]:
            assert nc["IamInstanceProfile"] == {"Name": "selfsup-worker"}, name

    iam = REPO / "cluster" / "iam"
    worker = json.loads((iam / "worker-policy.json").read_text())
    actions = {a for st in worker["Statement"] for a in ([st["Action"]] if isinstance(st["Action"], str) else st["Action"])}
    assert all(a.startswith("s3:") for a in actions)
    resources = {r for st in worker["Statement"] for r in ([st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"])}
    assert resources == {"arn:aws:s3:::YOUR-BUCKET", "arn:aws:s3:::YOUR-BUCKET/*"}
    head_policy = json.loads((iam / "head-policy.json").read_text())
    for st in head_policy["Statement"]:
        acts = [st["Action"]] if isinstance(st["Action"], str) else st["Action"]
        assert st["Effect"] == "Allow" and "*" not in "".join(acts)
        if any(a in ("ec2:TerminateInstances", "ec2:StopInstances") for a in acts):
            assert st["Condition"] == {"StringEquals": {"ec2:ResourceTag/ray-cluster-name": raw["cluster_name"]}}
        if any(a.startswith(("s3:", "iam:")) for a in acts):
            assert "*" not in str(st["Resource"]).replace("YOUR-BUCKET/*", "").replace("role/*", "X").replace(
                "arn:aws:iam::*:", ""), st
        if "iam:PassRole" in acts:
            assert st["Resource"] == "arn:aws:iam::*:role/selfsup-worker"
    run_instances = [st for st in head_policy["Statement"] if st["Action"] == "ec2:RunInstances"
                     and "arn:aws:ec2:*:*:instance/*" in st["Resource"]]
    assert run_instances and run_instances[0]["Condition"] == {
        "StringEquals": {"aws:RequestTag/ray-cluster-name": raw["cluster_name"]}}
    setup = (REPO / "cluster" / "setup-aws.sh").read_text()
    assert "FromPort=22,ToPort=22,IpRanges=[{CidrIp=$ADMIN_CIDR}]" in setup
    assert "IpProtocol=-1,UserIdGroupPairs=[{GroupId=$SG}]" in setup and "0.0.0.0/0" not in setup


def test_cluster_yaml_has_on_demand_and_spot_gpu_workers() -> None:
    """An elastic run's [min, max] maps to the node types: `min` on-demand GPUs, up to max - min on spot."""
    cfg = ray_validate(yaml.safe_load(CLOUD_CONFIG.read_text()))
    types = cfg["available_node_types"]
    spot = {k: n for k, n in types.items() if n["node_config"].get("InstanceMarketOptions") == {"MarketType": "spot"}}
    on_demand = {k: n for k, n in types.items() if k != cfg["head_node_type"] and k not in spot}
    assert list(spot) == ["gpu_a10g_spot"] and list(on_demand) == ["gpu_a10g"]
    # The same machine either way, so a run resized between them trains the same.
    assert spot["gpu_a10g_spot"]["node_config"]["InstanceType"] == on_demand["gpu_a10g"]["node_config"]["InstanceType"]
    assert types["gpu_a10g"]["max_workers"] + types["gpu_a10g_spot"]["max_workers"] <= cfg["max_workers"]


def check_mlflow_auth(raw: dict, text: str) -> None:
    """MLflow behind its basic-auth app, the credentials made on the head, none in the file."""
    head_setup = "\n".join(raw["head_setup_commands"])
    assert "python -m orchestrator.mlflow_auth init ~/mlflow" in head_setup
    start = "\n".join(raw["head_start_ray_commands"])
    assert "--app-name basic-auth" in start and ". ~/mlflow/server.env;" in start
    server = next(i for i, c in enumerate(raw["head_start_ray_commands"]) if "mlflow server" in c)
    assert "mlflow_auth job-user ~/mlflow" in raw["head_start_ray_commands"][server + 1]
    # Only the job user's file travels to the workers; every node's ~/.selfsup-env sources it.
    assert raw["cluster_synced_files"] == ["~/mlflow/credentials.env"]
    setup = "\n".join(raw["setup_commands"])
    assert '. "$HOME/mlflow/credentials.env"' in setup
    for secret in ("admin_password", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert secret not in text


def test_cluster_local_yaml_passes_ray_schema() -> None:
    raw = yaml.safe_load(LOCAL_CONFIG.read_text())
    assert raw["provider"]["type"] == "local" and "available_node_types" not in raw
    check_mlflow_auth(raw, LOCAL_CONFIG.read_text())
    cfg = ray_validate(raw)
    assert list(cfg["available_node_types"]) == ["local.cluster.node"]
    # Ray refuses node types for this provider: the reason the local file has none.
    bad = dict(raw, available_node_types={"x": {"node_config": {}, "resources": {}}})
    with pytest.raises(BaseException, match="available_node_types"):
        ray_validate(bad)


def test_submit_py_runs_selfsup_from_its_own_folder(tmp_path: Path) -> None:
    """`ray submit` uploads submit.py alone to ~/: it must work away from this checkout."""
    script = tmp_path / "submit.py"
    shutil.copy(REPO / "orchestrator" / "submit.py", script)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, str(script), "--", "--help"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pretrain" in out.stdout and "registry" in out.stdout
    bad = subprocess.run([sys.executable, str(script), "pretrain", "--set", "nosuch.field=1"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "nosuch.field" in bad.stderr
    empty = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
    assert empty.returncode == 2 and "usage" in empty.stderr


# --- the sandbox: an sshd of our own, a fake home, and a check of everything outside -----------

@dataclass
class Outside:
    """What the test must leave exactly as it found it, outside its temp folder."""

    home: Path = field(default_factory=Path.home)
    files: dict[str, bytes | None] = field(default_factory=dict)  # path -> bytes (None: absent)
    home_entries: set[str] = field(default_factory=set)
    tmp_entries: set[str] = field(default_factory=set)
    run_sshd_existed: bool = True

    def take(self) -> Outside:
        for p in self._watched():
            self.files[str(p)] = p.read_bytes() if p.is_file() else None
        self.home_entries = set(os.listdir(self.home))
        self.tmp_entries = set(os.listdir("/tmp"))
        self.run_sshd_existed = Path("/run/sshd").exists()
        return self

    def _watched(self) -> list[Path]:
        ssh = self.home / ".ssh"
        found = sorted(p for p in ssh.rglob("*") if p.is_file()) if ssh.is_dir() else []
        return [self.home / ".bashrc", self.home / ".profile", self.home / ".bash_profile",
                ssh / "known_hosts", ssh / "authorized_keys", ssh / "config", *found]

    def restore_and_check(self, made_by_test: set[str]) -> list[str]:
        """Remove what this test left outside its folder; return what still differs."""
        problems = []
        for name in sorted(set(os.listdir("/tmp")) - self.tmp_entries):
            if name in made_by_test:
                shutil.rmtree(Path("/tmp") / name, ignore_errors=True)
        for name in sorted(set(os.listdir(self.home)) - self.home_entries):
            problems.append(f"new entry in {self.home}: {name}")
        for path, before in self.files.items():
            p = Path(path)
            now = p.read_bytes() if p.is_file() else None
            if now != before:
                problems.append(f"{path} changed")
        for p in self._watched():
            if str(p) not in self.files:
                problems.append(f"{p} appeared")
        if not self.run_sshd_existed and Path("/run/sshd").exists():
            shutil.rmtree("/run/sshd", ignore_errors=True)
        return problems


def _wait_port(port: int, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def _run(cmd: list[str], log: Path, env: dict[str, str], timeout_s: float) -> float:
    """Run a ray CLI command in its own session, output to `log`; returns its wall time."""
    t0 = time.monotonic()
    with open(log, "ab") as f:
        f.write(f"\n$ {' '.join(cmd)}\n".encode())
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            sandbox.terminate([proc.pid, *sandbox.children(proc.pid)])
            raise AssertionError(f"{cmd[1]} ran over {timeout_s} s; log:\n{_tail(log)}")
    if rc != 0:
        raise AssertionError(f"{' '.join(cmd[:3])} exited {rc}; log:\n{_tail(log)}")
    return time.monotonic() - t0


def _tail(p: Path, n: int = 6000) -> str:
    return p.read_text(errors="replace")[-n:] if p.exists() else f"({p} missing)"


@pytest.fixture()
def sandbox_root() -> Iterator[Path]:
    """A short temp folder in /tmp (Ray's socket paths must stay under 107 bytes)."""
    root = Path(tempfile.mkdtemp(prefix="selfsup-cl-", dir="/tmp"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _sshd_config(root: Path, port: int, remote_env: dict[str, str]) -> str:
    setenv = " ".join(f"{k}={v}" for k, v in remote_env.items())
    return "\n".join([
        f"Port {port}",
        "ListenAddress 127.0.0.1",
        f"HostKey {root}/ssh/host_key",
        f"PidFile {root}/ssh/sshd.pid",
        f"AuthorizedKeysFile {root}/ssh/authorized_keys",
        "StrictModes no",  # the key files live in a temp folder, not in a 0700 ~/.ssh
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",
        f"AllowUsers {getpass.getuser()}",
        "UsePAM no",
        "PrintMotd no",
        # ssh -W through this same sshd is how Ray's ssh reaches the port (see the proxy command).
        "AllowTcpForwarding yes",
        f"PermitOpen 127.0.0.1:{port}",
        "X11Forwarding no",
        # The login's HOME is the test's fake home: `~` on the "node" never reaches the real one.
        f"SetEnv {setenv}",
        "",
    ])


# --- end to end ---------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_ray_up_submit_pretrain_down(sandbox_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not Path(SSHD).exists():
        if IN_CI:
            pytest.fail(f"{SSHD} missing: .ci/install-sshd.sh should have installed openssh-server")
        pytest.skip(f"{SSHD} not installed (run .ci/install-sshd.sh as root)")
    import importlib.util

    if importlib.util.find_spec("flask_wtf") is None:  # the head's MLflow runs its basic-auth app
        if IN_CI:
            pytest.fail("Flask-WTF missing: pyproject's mlflow[auth] should have installed it")
        pytest.skip("Flask-WTF not installed (pip install -e . installs mlflow[auth])")
    root = sandbox_root
    outside = Outside().take()
    home, rt, tmp, ssh_dir = root / "home", root / "rt", root / "t", root / "ssh"
    for d in (home, rt, tmp, ssh_dir):
        d.mkdir(mode=0o700)
    log = root / "ray.log"
    cluster_name = f"selfsup-test-{root.name.removeprefix('selfsup-cl-')}"
    # Where Ray's ssh puts its ControlMaster socket (hard-coded in Ray under /tmp).
    control_dir = "ray_ssh_" + hashlib.sha256(getpass.getuser().encode()).hexdigest()[:10]
    made_by_test = {control_dir} if not (Path("/tmp") / control_dir).exists() else set()
    ssh_port, mlflow_port, gcs_port = free_port(), free_port(), free_port()
    ray_ports = {k: free_port() for k in ("ray-client-server-port", "dashboard-agent-listen-port",
                                          "dashboard-agent-grpc-port", "runtime-env-agent-port",
                                          "metrics-export-port", "node-manager-port",
                                          "object-manager-port")}
    remote_env = {
        "HOME": str(home),
        "RAY_TMPDIR": str(rt),  # Ray's session dirs, the cluster state file, the address file
        "TMPDIR": str(tmp),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Ray binds 127.0.0.1 instead of the host's IP
        "AUTOSCALER_METRIC_PORT": str(free_port()),  # fixed 44217/44227 by default: shared machine
        "DASHBOARD_METRIC_PORT": str(free_port()),
        "RAY_USAGE_STATS_ENABLED": "0",
        "SELFSUP_HEAD_IP": "127.0.0.1",  # MLflow's bind address and the tracking URI host
        "SELFSUP_MLFLOW_PORT": str(mlflow_port),
        # The shared store every node gets (the config's bucket placeholder otherwise): on this
        # one-node cluster a folder in the fake home, where the job's runs/ then lands.
        "SELFSUP_STORAGE": str(home / "selfsup"),
        "PYTHONDONTWRITEBYTECODE": "1",
        # The project as uploaded to the "node" first (a real node's `pip install -e ~/selfsup`): the
        # .venv's own editable install may point at another checkout sharing it. Then whatever this
        # test's Python path holds (the node is this machine, with this Python).
        "PYTHONPATH": os.pathsep.join([str(home / "selfsup"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]),
    }
    markers = [f"{rt}/", f"{home}/"]  # command lines of this cluster's Ray daemons, MLflow, the job
    # `ray stop` (ray down, head start commands) must not kill other Ray clusters on this machine.
    (home / ".bashrc").write_text(
        f"ray() {{ if [ \"$1\" = stop ]; then {VENV_BIN}/python {Path(sandbox.__file__)} stop "
        f"--keep {os.getpid()} {' '.join(markers)}; else command ray \"$@\"; fi; }}\n"
        "cd ~\n")

    # Keys and sshd.
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "selfsup-test",
                        "-f", str(ssh_dir / name)], check=True)
    shutil.copy(ssh_dir / "client_key.pub", ssh_dir / "authorized_keys")
    (ssh_dir / "sshd_config").write_text(_sshd_config(root, ssh_port, remote_env))
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
    subprocess.run([SSHD, "-t", "-f", str(ssh_dir / "sshd_config")], check=True)
    sshd = subprocess.Popen([SSHD, "-D", "-f", str(ssh_dir / "sshd_config"), "-E", str(ssh_dir / "sshd.log")],
                            start_new_session=True)
    key = ssh_dir / "client_key"
    ssh_opts = (f"-F /dev/null -i {key} -o IdentitiesOnly=yes -o StrictHostKeyChecking=no "
                f"-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR")
    timings: dict[str, float] = {}
    up_started = passed = False
    local_env = dict(os.environ, HOME=str(home), TMPDIR=str(tmp), RAY_TMPDIR=str(rt),
                     RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0", PYTHONDONTWRITEBYTECODE="1",
                     PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}")
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        local_env.pop(name, None)
    try:
        _wait_port(ssh_port)

        # The cluster config: configs/cluster-local.yaml, pointed at this sandbox.
        cfg = yaml.safe_load(LOCAL_CONFIG.read_text())
        cfg["cluster_name"] = cluster_name
        cfg["provider"] = {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
        cfg["max_workers"] = 0
        cfg["auth"] = {
            "ssh_user": getpass.getuser(),
            "ssh_private_key": str(key),
            # Ray's cluster config has no SSH port setting; ssh reaches our port through our sshd.
            "ssh_proxy_command": f"ssh {ssh_opts} -p {ssh_port} -W 127.0.0.1:{ssh_port} "
                                 f"{getpass.getuser()}@127.0.0.1",
        }
        # The project's files and the token travel as on a real cluster; the project is not installed
        # again: the "node" is this machine, with this checkout's .venv. (README.md only serves that
        # install; the lead writes it: skip it while it is missing.)
        assert {"~/selfsup/orchestrator", "~/.ray/auth_token"} <= set(cfg["file_mounts"])
        if not (REPO / "README.md").exists():
            cfg["file_mounts"].pop("~/selfsup/README.md")
        installs = [c for c in cfg["setup_commands"] if "pip install" in c or "venv ~/selfsup-venv" in c]
        assert len(installs) == 2, cfg["setup_commands"]
        cfg["setup_commands"] = [f"ln -sfn {VENV_BIN.parent} ~/selfsup-venv"] + [
            c for c in cfg["setup_commands"] if c not in installs]
        ports = " ".join(f"--{k}={v}" for k, v in ray_ports.items())
        starts = cfg["head_start_ray_commands"]
        assert sum("ray start" in c for c in starts) == 1 and any("mlflow server" in c for c in starts)
        # One MLflow worker process instead of two: this "head" has 2 cores and also trains.
        starts = [c.replace("--workers 2", "--workers 1") for c in starts]
        cfg["head_start_ray_commands"] = [
            c if "ray start" not in c else
            f"ray start --head --port={gcs_port} {ports} --num-cpus=4 --include-dashboard=false "
            "--autoscaling-config=~/ray_bootstrap_config.yaml --disable-usage-stats"
            for c in starts]
        ray_validate(cfg)
        config_file = root / "cluster.yaml"
        config_file.write_text(yaml.safe_dump(cfg, sort_keys=False))

        ray = str(VENV_BIN / "ray")
        _run([ray, "get-auth-token", "--generate"], log, local_env, 120)
        assert (home / ".ray" / "auth_token").is_file()

        up_started = True
        timings["ray_up_s"] = _run([ray, "up", "-y", "--no-config-cache", str(config_file)],
                                   log, local_env, 600)
        tracking_uri = f"http://127.0.0.1:{mlflow_port}"
        # MLflow starts in the background of the head's start commands: wait until it answers.
        server_log = home / "mlflow" / "server.log"
        wait_http(f"{tracking_uri}/health", 300, why=lambda reason: f"{reason}; {server_log}:\n{_tail(server_log)}")
        # Nothing of the cluster (Ray's daemons, MLflow) nor our sshd listens beyond 127.0.0.1.
        listening = sandbox.listening_addresses(sandbox.session_members(markers) + [sshd.pid])
        assert listening, "found no listening socket of the cluster"
        wide = {p: a for p, a in listening.items() if any("not loopback" in x for x in a)}
        assert not wide, {p: (sandbox.cmdline(p)[:120], a) for p, a in wide.items()}
        env_file = (home / ".selfsup-env").read_text()
        assert f"MLFLOW_TRACKING_URI={tracking_uri}" in env_file and "RAY_AUTH_MODE=token" in env_file

        # MLflow asks for a login: the credentials were made on the head, private, outside the project.
        creds = home / "mlflow"
        for name in ("credentials.env", "basic_auth.ini", "server.env"):
            assert (creds / name).stat().st_mode & 0o777 == 0o600, name
        job_env = mlflow_auth.read_env_file(creds / "credentials.env")
        user, password = job_env["MLFLOW_TRACKING_USERNAME"], job_env["MLFLOW_TRACKING_PASSWORD"]
        with pytest.raises(urllib.error.HTTPError) as anonymous:
            urllib.request.urlopen(f"{tracking_uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout=30)
        assert anonymous.value.code == 401

        # The demo config on 2 Train workers, cut to one short epoch (the demo's own test covers learning).
        job = ["pretrain", "--config", "configs/demo.yaml",
               "--set", "optim.epochs=1", "--set", "optim.warmup_epochs=0", "--set", "scaling.num_workers=2",
               "--set", "optim.batch_size=128", "--set", "data.limit=512",
               "--set", "eval.knn_train_limit=1000", "--set", "eval.knn_test_limit=500",
               "--set", "run.name=cluster-test"]
        timings["ray_submit_s"] = _run([ray, "submit", str(config_file), "orchestrator/submit.py", "--", *job],
                                       log, local_env, 900)
        assert (home / "submit.py").is_file()
        assert (home / "selfsup" / "runs" / "cluster-test").is_dir()  # the job ran in SELFSUP_WORKDIR

        # The run and the registered encoder, seen through the head's MLflow server with the job's login.
        from mlflow.tracking import MlflowClient

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        client = MlflowClient(tracking_uri)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert runs, f"no MLflow run on the head's server; log:\n{_tail(log)}"
        run = runs[0]
        assert run.info.status == "FINISHED"
        assert "knn_top1" in run.data.metrics
        models = client.search_registered_models()
        assert models, "no registered encoder on the head's server"
        versions = client.search_model_versions(f"name='{models[0].name}'")
        assert any(v.run_id == run.info.run_id for v in versions)
        assert all(password not in str(v) for v in run.data.params.values())

        # From "your machine" (this process's side of the SSH): the registry with the credentials
        # from the head, and one line with exit code 2 for a wrong password.
        cli_env = {k: v for k, v in local_env.items() if k != "HOME"}
        ok = subprocess.run([str(VENV_BIN / "selfsup"), "registry", "list", "--tracking-uri", tracking_uri],
                            env={**cli_env, "MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password},
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert ok.returncode == 0 and models[0].name in ok.stdout, ok.stderr
        wrong = subprocess.run([str(VENV_BIN / "selfsup"), "registry", "list", "--tracking-uri", tracking_uri],
                               env={**cli_env, "MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": "wrong"},
                               cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1, wrong.stderr
        assert f"error: MLflow at {tracking_uri} refused the credentials (user {user}, HTTP 401)" in wrong.stderr

        # The password is in no log: `ray up`/`submit` output, the server's log, Ray's session logs.
        logged = [p for p in (log, home / "mlflow" / "server.log", *rt.rglob("*"))
                  if p.is_file() and not p.is_symlink() and password.encode() in p.read_bytes()]
        assert not logged, f"the job password is written in {logged}"

        down_t = _run([ray, "down", "-y", str(config_file)], log, local_env, 300)
        timings["ray_down_s"] = down_t
        up_started = False
        assert not sandbox.matching(markers), "processes of the cluster survived `ray down`"
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", mlflow_port)) != 0, "MLflow still serves after ray down"
        print("\ncluster timings:", json.dumps({k: round(v, 1) for k, v in timings.items()}))
        passed = True
    finally:
        if up_started:  # a failure half way: take the cluster down, then make sure
            try:
                subprocess.run([str(VENV_BIN / "ray"), "down", "-y", str(root / "cluster.yaml")],
                               cwd=REPO, env=local_env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, timeout=300, start_new_session=True)
            except (subprocess.TimeoutExpired, OSError):
                pass
        leftovers = sandbox.stop_sessions(markers, keep=[os.getpid()])
        # Ray's ssh ControlMaster and proxy processes carry our key's path; then sshd and its children.
        sandbox.terminate(sandbox.matching([str(key)]))
        sshd_children = sandbox.children(sshd.pid)
        sshd.terminate()
        try:
            sshd.wait(timeout=10)
        except subprocess.TimeoutExpired:
            sshd.kill()
            sshd.wait(timeout=10)
        sandbox.terminate(sshd_children)
        socket_dir = Path("/tmp") / control_dir / hashlib.sha256(cluster_name.encode()).hexdigest()[:10]
        shutil.rmtree(socket_dir, ignore_errors=True)  # holds the socket (ControlPath=DIR/%C)
        for f in (log, home / "mlflow" / "server.log", ssh_dir / "sshd.log"):  # kept by pytest
            if f.exists():
                shutil.copy(f, tmp_path / f.name)
        problems = outside.restore_and_check(made_by_test)
        # Checked also when the test failed (the original error is chained to this one).
        assert not problems, f"left outside {root}: {problems}"
        assert not (passed and leftovers), f"{len(leftovers)} cluster processes survived ray down"
