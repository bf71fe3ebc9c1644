"""`selfsup sweep`: the search space (fast, no Ray) and whole sweeps on a local Ray against a real
`mlflow server` (slow): trials, child runs, table, plot, champion, ASHA, divergence, resume."""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from methods import METHODS
from orchestrator.config import ConfigError
from orchestrator.errors import UserError
from orchestrator.sweep import SweepConfig, load_sweep, run_sweep
from orchestrator.sweep.space import build_search, grid_trials, n_grid_trials, optuna_space, random_trial
from orchestrator.timeline import ENV as TIMELINE_ENV

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, doc: dict, name: str = "sweep.yaml") -> str:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(p)


CIFAR_LIKE = {
    "searcher": "grid",
    "methods": {"simclr": {"method.temperature": [0.1, 0.2, 0.5]},
                "moco": {"method.temperature": [0.1, 0.2, 0.5], "method.momentum": [0.99, 0.996, 0.999]},
                "byol": {"method.momentum": [0.99, 0.996, 0.999]}},
    "space": {"optim.batch_size": [256, 512]},
}


# --- the search space (no Ray) ---------------------------------------------------------------------

def test_conditional_grid_does_not_multiply_ignored_dimensions(tmp_path: Path) -> None:
    s = load_sweep(_write(tmp_path, {"data": {"source": None}, "sweep": CIFAR_LIKE}))
    trials = grid_trials(s.sweep)
    # simclr 3 temps x 2 batches, moco 3 x 3 x 2, byol 3 momenta x 2: 6 + 18 + 6, not 3 x 3 x 3 x 2
    assert len(trials) == n_grid_trials(s.sweep) == 30
    by_method = {m: [t for t in trials if t["method.name"] == m] for m in ("simclr", "moco", "byol")}
    assert [len(v) for v in by_method.values()] == [6, 18, 6]
    assert all("method.momentum" not in t for t in by_method["simclr"])
    assert all("method.temperature" not in t for t in by_method["byol"])
    assert {t["optim.batch_size"] for t in trials} == {256, 512}
    assert len({json.dumps(t, sort_keys=True) for t in trials}) == 30  # no duplicates


def test_repository_sweep_configs_load() -> None:
    demo = load_sweep(str(REPO / "configs" / "sweep-demo.yaml"))
    assert n_grid_trials(demo.sweep) >= 4 and len(demo.sweep.methods) >= 2
    assert demo.sweep.scheduler == "asha"
    every = load_sweep(str(REPO / "configs" / "sweep-all-methods.yaml"))
    assert set(every.sweep.methods) == set(METHODS)
    trials = grid_trials(every.sweep)
    assert len(trials) == n_grid_trials(every.sweep) == 13
    assert {t["method.lambd"] for t in trials if "method.lambd" in t} == {0.0051, 0.02}
    assert {t["method.teacher_temp"] for t in trials if t["method.name"] == "dino"} == {0.04, 0.07}
    assert all(("method.sim_weight" in t) == (t["method.name"] == "vicreg") for t in trials)
    cifar = load_sweep(str(REPO / "configs" / "sweep-cifar10.yaml"), ["data.source=null"])
    assert set(cifar.sweep.methods) == {"simclr", "moco", "byol"}
    trials = grid_trials(cifar.sweep)
    assert {t.get("method.temperature") for t in trials} - {None} == {0.1, 0.2, 0.5}
    assert {t.get("method.momentum") for t in trials} - {None} == {0.99, 0.996, 0.999}
    assert {t["optim.batch_size"] for t in trials} == {256, 512}


@pytest.mark.parametrize("sweep, message", [
    ({"searcher": "annealing"}, "sweep.searcher = 'annealing': allowed: grid, random, bayes"),
    ({"methods": {"swaw": {}}}, "sweep.methods = 'swaw': allowed methods: simclr, moco, byol, simsiam, "
                                "barlow_twins, vicreg, dino, swav, mae"),
    ({"methods": {"simsiam": {"method.lambd": [0.01]}}}, "only barlow_twins take it, not simsiam"),
    ({"methods": {"byol": {"method.temperature": [0.1]}}}, "only simclr, moco, swav take it, not byol"),
    ({"space": {"method.momentum": [0.9]}}, "list it under sweep.methods.<method>"),
    ({"space": {"optim.lr": {"loguniform": [1e-4, 1e-2]}}}, "the grid searcher takes lists"),
    ({"searcher": "random", "space": {"optim.lr": {"loguniform": [0, 1]}}}, "loguniform needs low > 0"),
    ({"space": {"optim.nosuchfield": [1]}}, "unknown field 'optim.nosuchfield'"),
    ({"space": {"optim.batch_size": [256, 100]}, "methods": {"simclr": {}}}, None),
    ({"nosuchkey": 1}, "unknown field 'sweep.nosuchkey'"),
    ({"max_concurrent_trials": 0}, "sweep.max_concurrent_trials = 0: must be >= 1"),
    ({"cpus_per_trial": 0}, "sweep.cpus_per_trial = 0.0: must be > 0"),
    ({"time_budget_s": -5}, "sweep.time_budget_s = -5.0: must be > 0 (or null)"),
    ({"trial_kind": "thread"}, "sweep.trial_kind = 'thread': allowed: auto, in_process, train"),
    ({"trial_kind": "in_process", "space": {"scaling.num_workers": [1, 2]}},
     "sweep.trial_kind = 'in_process': runs one worker per trial, but a trial has scaling.num_workers = 2"),
    ({"space": {"scaling.num_workers": [[1, 2]]}},
     "scaling.num_workers = [1, 2]: a sweep's trials have a fixed number of workers"),
    # NaN and infinity: in search spaces (lists, choices, range ends) and in sweep fields
    ({"methods": {"simclr": {"method.temperature": [0.1, math.nan]}}},
     "sweep.methods.simclr.method.temperature = [0.1, nan]: values must be finite numbers"),
    ({"space": {"optim.lr": {"choice": [math.inf]}}}, "values must be finite numbers"),
    ({"searcher": "random", "space": {"optim.lr": {"loguniform": [1e-4, math.inf]}}},
     "loguniform takes [low, high]: finite numbers with low < high"),
    ({"searcher": "random", "space": {"optim.lr": {"uniform": [math.nan, 1]}}}, "finite numbers with low < high"),
    ({"time_budget_s": math.inf}, "sweep.time_budget_s: expected a finite number, got inf"),
    ({"reduction_factor": math.nan}, "sweep.reduction_factor: expected a finite number, got nan"),
])
def test_bad_sweeps_are_rejected_with_one_message(tmp_path: Path, sweep: dict, message: str | None) -> None:
    path = _write(tmp_path, {"data": {"source": None}, "scaling": {"num_workers": 1}, "sweep": sweep})
    if message is None:  # a valid one, for contrast
        assert n_grid_trials(load_sweep(path).sweep) == 2
        return
    with pytest.raises(ConfigError) as e:
        load_sweep(path)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_auto_trial_kind_runs_one_worker_trials_in_process(tmp_path: Path) -> None:
    from orchestrator.sweep.trials import resolved_trial_kind

    one = load_sweep(_write(tmp_path, {"data": {"source": None}, "scaling": {"num_workers": 1}, "sweep": {}}))
    assert resolved_trial_kind(one) == "in_process"
    assert resolved_trial_kind(load_sweep(_write(tmp_path, {"data": {"source": None}, "scaling": {"num_workers": 1},
                                                            "sweep": {"trial_kind": "train"}}))) == "train"
    swept = load_sweep(_write(tmp_path, {"data": {"source": None}, "scaling": {"num_workers": 1},
                                         "sweep": {"space": {"scaling.num_workers": [1, 2]}}}))
    assert resolved_trial_kind(swept) == "train"


def test_a_sweep_can_rank_by_the_linear_probe(tmp_path: Path) -> None:
    doc = {"data": {"source": None}, "scaling": {"num_workers": 1}, "sweep": {"metric": "linear_top1"}}
    s = load_sweep(_write(tmp_path, doc))
    # ASHA compares trials after every epoch: the probe then runs after every epoch, not the last only.
    assert s.sweep.metric == "linear_top1" and s.base.eval.linear_every_epoch
    assert not load_sweep(_write(tmp_path, doc), ["sweep.scheduler=fifo"]).base.eval.linear_every_epoch
    with pytest.raises(ConfigError, match="sweep.metric = 'linear_top1': needs the linear probe: set eval.linear_epochs > 0"):
        load_sweep(_write(tmp_path, doc), ["eval.linear_epochs=0"])


def test_a_bad_value_is_told_from_where_it_was_set(tmp_path: Path) -> None:
    """The message names the file for a value the file sets, the --set for a value a --set sets."""
    path = _write(tmp_path, {"data": {"source": None}, "scaling": {"num_workers": 1},
                             "sweep": {"max_concurrent_trials": 0, "methods": {"simclr": {}}}})
    with pytest.raises(ConfigError) as e:
        load_sweep(path)
    assert str(e.value) == f"{path}: sweep.max_concurrent_trials = 0: must be >= 1"
    with pytest.raises(ConfigError) as e:
        load_sweep(path, ["sweep.max_concurrent_trials=-1"])
    assert str(e.value) == "--set sweep.max_concurrent_trials=-1: must be >= 1"
    path = _write(tmp_path, {"data": {"source": None}, "scaling": {"num_workers": 1},
                             "sweep": {"methods": {"simclr": {"method.temperature": [0.1, -1]}}}})
    with pytest.raises(ConfigError) as e:  # a swept value: the file's trial
        load_sweep(path)
    assert str(e.value).startswith(f"{path}: sweep trial simclr: temperature=-1: method.temperature = -1.0: ")
    with pytest.raises(ConfigError) as e:  # a base value every trial takes from a --set
        load_sweep(path, ["optim.lr=0"])
    assert str(e.value) == "--set optim.lr=0: must be > 0 (in sweep trial simclr: temperature=0.1)"


def test_set_overrides_reach_sweep_and_base(tmp_path: Path) -> None:
    path = _write(tmp_path, {"data": {"source": None}, "sweep": CIFAR_LIKE})
    s = load_sweep(path, ["sweep.searcher=random", "sweep.num_samples=7", "optim.epochs=3"])
    assert (s.sweep.searcher, s.sweep.num_samples, s.base.optim.epochs) == ("random", 7, 3)
    with pytest.raises(ConfigError, match="unknown field 'sweep.nope'"):
        load_sweep(path, ["sweep.nope=1"])


def test_base_file_is_overridden_by_the_sweep_file(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"optim": {"epochs": 7, "lr": 0.5},
                                                        "data": {"source": None}}))
    s = load_sweep(_write(tmp_path, {"base": "base.yaml", "optim": {"lr": 0.1},
                                     "sweep": {"methods": {"simclr": {}}}}))
    assert (s.base.optim.epochs, s.base.optim.lr) == (7, 0.1)


def test_random_trials_follow_each_methods_own_space() -> None:
    sw = SweepConfig(searcher="random", methods={m: dict(v) for m, v in CIFAR_LIKE["methods"].items()},
                     space={"optim.lr": {"loguniform": [1e-4, 1e-2]}})
    rng = random.Random(0)
    trials = [random_trial(sw, rng) for _ in range(200)]
    assert {t["method.name"] for t in trials} == {"simclr", "moco", "byol"}
    for t in trials:
        assert 1e-4 <= t["optim.lr"] <= 1e-2
        assert ("method.temperature" in t) == (t["method.name"] != "byol")
        assert ("method.momentum" in t) == (t["method.name"] != "simclr")


def test_optuna_define_by_run_space_is_conditional() -> None:
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sw = SweepConfig(searcher="bayes", methods={m: dict(v) for m, v in CIFAR_LIKE["methods"].items()},
                     space={"optim.lr": {"loguniform": [1e-4, 1e-2]}})
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    define = optuna_space(sw)
    seen = []
    for _ in range(25):
        trial = study.ask()
        over = define(trial)["overrides"]
        seen.append(over)
        # a made-up objective: the sampler must be able to learn from conditional parameters
        study.tell(trial, float(over.get("method.temperature", 0.3)) + math.log10(over["optim.lr"]))
    for over in seen:
        assert ("method.temperature" in over) == (over["method.name"] != "byol")
        assert ("method.momentum" in over) == (over["method.name"] != "simclr")
    assert {o["method.name"] for o in seen} == {"simclr", "moco", "byol"}


# --- whole sweeps on a local Ray (slow) ------------------------------------------------------------



DIVERGING_LR = 1e30


def _e2e_config(tmp_path: Path, data: Path, uri: str, model_name: str, kind: str) -> str:
    """5 tiny trials, run one at a time so that ASHA's decisions are deterministic:
    SimCLR x 2 temperatures, BYOL at a good lr, a useless lr (1e-8: the encoder stays as it was
    initialised, so its kNN top-1 stays at the untrained level) and lr = 1e30 (NaN loss from its
    second step; a config refuses lr = inf)."""
    return _write(tmp_path, {
        "data": {"path": str(data), "source": None, "image_size": 28, "limit": 256},
        "optim": {"name": "adamw", "lr": 2e-3, "batch_size": 64, "epochs": 2, "warmup_epochs": 0.5},
        "scaling": {"num_workers": 1},
        "eval": {"knn_train_limit": 1000, "knn_test_limit": 500},
        "run": {"checkpoints_to_keep": 1, "max_failures": 1},
        "tracking": {"uri": uri, "experiment": f"sweep-test-{tmp_path.name}", "model_name": model_name},
        "sweep": {"name": "e2e", "storage_path": str(tmp_path / "sweeps"), "searcher": "grid",
                  "methods": {"simclr": {"method.temperature": [0.5, 0.2]},
                              "byol": {"optim.lr": [2e-3, 1e-8, DIVERGING_LR]}},
                  "scheduler": "asha", "grace_period": 1, "reduction_factor": 2,
                  "max_concurrent_trials": 1, "trial_kind": kind},
    })


# Seconds from the third trial's start to the driver's SIGKILL: inside that trial (an in-process
# trial reports its first epoch ~2-3 s after it starts, a Train run ~15 s).
KILL_AFTER_S = {"in_process": 2, "train": 8}


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("kind", ["in_process", "train"])
def test_sweep_end_to_end_killed_and_resumed(kind: str, tmp_path: Path, demo_data: Path, mlflow_server: str,
                                             capsys: pytest.CaptureFixture[str], ray_temp_root: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Both kinds of trial: ASHA stops a trial, one diverges, the killed driver's sweep resumes
    without rerunning or relogging an ended trial, MLflow has one run per trial (each epoch once)."""
    from mlflow import MlflowClient

    model_name = f"sweep-e2e-{kind}-{tmp_path.name[-12:].strip('_')}-encoder"
    config = _e2e_config(tmp_path, demo_data, mlflow_server, model_name, kind)
    # Both drivers keep their Ray sessions under ray_temp_root: the killed one cannot remove its own.
    monkeypatch.setenv("SELFSUP_RAY_TEMP_ROOT", ray_temp_root)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    # 1. The driver in its own process group, killed (SIGKILL, with its whole local Ray) while the
    #    third trial runs, i.e. after two trials ended.
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "sweep", "--config", config],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    ended: list[str] = []
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if m := re.match(r"\s+trial (\S+) ended", line):
                ended.append(m.group(1))
            if len(ended) >= 2 and re.match(r"\s+trial \S+ started", line):
                time.sleep(KILL_AFTER_S[kind])  # into the third trial's training; Tune saved its state
                break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert len(ended) == 2, "".join(lines)[-3000:]

    # 2. --resume with another base config is refused (as pretrain --resume), before Ray starts.
    with pytest.raises(UserError) as changed:
        run_sweep(load_sweep(config, ["optim.epochs=3", "eval.knn_t=0.2"]), resume=True)
    assert str(changed.value).startswith("--resume continues sweep 'e2e' with its recorded base config (")
    assert str(changed.value).endswith("these differ: optim.epochs (2 -> 3), eval.knn_t (0.1 -> 0.2) "
                                       "(start a new sweep instead)")
    # --resume: the rest of the sweep; the two ended trials neither run again nor log again.
    timeline = tmp_path / "timeline.jsonl"
    monkeypatch.setenv(TIMELINE_ENV, str(timeline))  # the trial processes inherit it
    s = load_sweep(config)
    out = run_sweep(s, resume=True, verbose=True)
    printed = capsys.readouterr().out
    restarted = set(re.findall(r"trial (\S+) started", printed))
    events = [json.loads(line) for line in timeline.read_text().splitlines()]
    # A trial that had ended trains no epoch again (Tune may restart one whose end it had not saved
    # yet: it reports its last checkpoint's end at once).
    trained = {e["run"] for e in events if e["event"] == "epoch_start"}
    assert not trained & {f"trial-{t}" for t in ended}, (printed, trained)
    assert {e["run"] for e in events if e["event"] == "trial_start"} <= {f"trial-{t}" for t in restarted}
    if kind == "train":
        # The driver made the trials' MLflow runs: no trial process imported MLflow before training.
        fits = [e for e in events if e["event"] == "fit_start"]
        assert fits and not any(e["mlflow_imported"] for e in fits), fits
    else:
        # One MLflow writer: the driver (this process) logged the in-process trials' epochs.
        logged = [e for e in events if e["event"] == "epoch_logged"]
        assert logged and {e["pid"] for e in logged} == {os.getpid()}, logged
        assert not [e for e in events if e["event"] == "fit_start"]  # no Train run

    table = out.table
    assert len(table) == 5 and table["trial"].is_unique
    by_lr = {r.lr: r for r in table.itertuples() if r.method == "byol"}
    assert by_lr[DIVERGING_LR].status == "diverged" and math.isnan(by_lr[DIVERGING_LR].knn_top1)
    assert by_lr[1e-8].status == "stopped" and by_lr[1e-8].epochs == 1, table.to_string()  # ASHA
    assert (table["status"] == "finished").any(), table.to_string()
    assert "| trial | method |" in out.markdown and "diverged" in out.markdown

    # 3. MLflow: one parent, one child run per trial (each epoch logged once), final statuses.
    c = MlflowClient(tracking_uri=mlflow_server)
    parent = c.get_run(out.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert {a.path for a in c.list_artifacts(out.parent_run_id)} >= {"results.csv", "results.md",
                                                                     "knn_by_hparam.png"}
    children = c.search_runs([parent.info.experiment_id],
                             filter_string=f"tags.mlflow.parentRunId = '{out.parent_run_id}'")
    assert len(children) == 5
    assert {r.info.run_name for r in children} == {f"trial-{t}" for t in table["trial"]}
    for run in children:
        row = table[table["mlflow_run_id"] == run.info.run_id].iloc[0]
        steps = [m.step for m in c.get_metric_history(run.info.run_id, "loss")]
        assert steps == sorted(set(steps)) and len(steps) == row["epochs"], (row.to_dict(), steps)
        assert run.data.tags["selfsup.trial_status"] == row["status"]
        assert run.data.params["method.name"] == row["method"]
        expected = {"finished": "FINISHED", "stopped": "KILLED", "diverged": "FAILED"}[row["status"]]
        assert run.info.status == expected, row.to_dict()

    # 4. The best trial's encoder is registered and, being the first of its name, the champion.
    best = table[table["status"] == "finished"].iloc[0]
    assert out.model_uri is not None and out.champion
    champion = c.get_model_version_by_alias(model_name, "champion")
    assert out.model_uri == f"models:/{model_name}/{champion.version}"
    assert champion.tags["method"] == best["method"]
    assert float(champion.tags["knn_top1"]) == pytest.approx(best["knn_top1"])
    assert champion.tags["dataset"] == "mnist-demo"
    assert (Path(out.sweep_dir) / "knn_by_hparam.png").stat().st_size > 5000
    csv = (Path(out.sweep_dir) / "results.csv").read_text()
    assert csv.count("\n") == 6 and "diverged" in csv

    # 5. A finished sweep is not run or logged again by another --resume.
    with pytest.raises(UserError, match=r"sweep 'e2e' has finished \(.*results\.md\); nothing to resume"):
        run_sweep(load_sweep(config), resume=True)


# A budget shorter than one trial: a Train run's start-up alone is ~15 s here; an in-process trial
# takes ~3-4 s to start (2 at once on 2 cores) and ~2 s per epoch.
BUDGET_S = {"in_process": 5, "train": 6}


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", ["in_process", "train"])
def test_time_budget_ends_the_sweep_and_says_so(kind: str, tmp_path: Path, demo_data: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """sweep.time_budget_s shorter than a trial (both kinds of trial), so the budget ends the sweep
    inside its first trials. They end as 'stopped' (table and
    MLflow), nothing is registered, `selfsup sweep` exits 1 saying why, and --resume refuses."""
    from mlflow import MlflowClient

    from orchestrator.cli import main as cli_main

    monkeypatch.chdir(tmp_path)  # a SQLite store's artifacts go to ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = _write(tmp_path, {
        # Every image of the demo each epoch, so that an epoch outlasts the budget even on an idle
        # machine (with 256 images all four trials could finish inside it).
        "data": {"path": str(demo_data), "source": None, "image_size": 28},
        "optim": {"name": "adamw", "lr": 2e-3, "batch_size": 64, "epochs": 3, "warmup_epochs": 0.5},
        "scaling": {"num_workers": 1},
        "eval": {"knn_train_limit": 500, "knn_test_limit": 200},
        "tracking": {"uri": uri, "experiment": "budget", "model_name": "budget-encoder"},
        "sweep": {"name": "budget", "storage_path": str(tmp_path / "sweeps"), "searcher": "grid",
                  "methods": {"simclr": {"method.temperature": [0.5, 0.2]}, "byol": {"method.momentum": [0.99, 0.9]}},
                  "max_concurrent_trials": 2, "time_budget_s": BUDGET_S[kind], "trial_kind": kind},
    })
    assert cli_main(["sweep", "--config", config]) == 1
    captured = capsys.readouterr()
    assert "no trial reported knn_top1 before the time budget (sweep.time_budget_s) ran out" in captured.err
    m = re.search(r"time budget:\s+ran out: (\d) of 4 trials started, 0 finished", captured.out)
    assert m and 1 <= int(m.group(1)) <= 2, captured.out

    import pandas as pd

    table = pd.read_csv(tmp_path / "sweeps" / "budget" / "results.csv")
    assert len(table) == int(m.group(1)) and set(table["status"]) == {"stopped"}, table.to_string()
    c = MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name("budget")
    runs = c.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("selfsup.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert parent[0].data.tags["selfsup.ended_by"] == "time_budget_s"
    assert len(children) == len(table) and {r.info.status for r in children} == {"KILLED"}
    assert {r.data.tags["selfsup.trial_status"] for r in children} == {"stopped"}
    assert c.search_registered_models(filter_string="name = 'budget-encoder'") == []

    assert cli_main(["sweep", "--config", config, "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"sweep 'budget' ended on its time budget (sweep.time_budget_s = {BUDGET_S[kind]:.1f} s" in err
    assert "start a new sweep with a larger sweep.time_budget_s" in err


@pytest.mark.slow
@pytest.mark.parametrize("searcher", ["random", "bayes"])
def test_random_and_bayes_searchers_run_in_tune(searcher: str, ray_local: None, tmp_path: Path) -> None:
    from ray import tune

    def fake_trial(config: dict) -> None:  # defined here: Ray workers cannot import this test module
        """Stands in for a pretraining run: a score that depends on the method's own parameters."""
        import json
        import time

        import ray
        from ray import tune

        start = time.time()
        over = config["overrides"]
        score = {"simclr": 0.5, "moco": 0.6, "byol": 0.7}[over["method.name"]]
        score += 0.1 * float(over.get("method.temperature", 0.0)) - abs(float(over.get("method.momentum", 0.99)) - 0.99)
        time.sleep(1.0)  # long enough for the trials Tune runs at once to overlap
        tune.report({"knn_top1": score, "epoch": 1, "seen": json.dumps(over), "start": start, "end": time.time(),
                     "cpu": ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)})

    sw = SweepConfig(searcher=searcher, num_samples=8, max_concurrent_trials=2, cpus_per_trial=0.5, seed=1,
                     methods={m: dict(v) for m, v in CIFAR_LIKE["methods"].items()},
                     space={"optim.lr": {"loguniform": [1e-4, 1e-2]}})
    param_space, search_alg, num_samples = build_search(sw)
    tuner = tune.Tuner(tune.with_resources(fake_trial, {"cpu": sw.cpus_per_trial}), param_space=param_space,
                       tune_config=tune.TuneConfig(search_alg=search_alg, num_samples=num_samples,
                                                   max_concurrent_trials=sw.max_concurrent_trials),
                       run_config=tune.RunConfig(storage_path=str(tmp_path), name=searcher, verbose=0))
    results = tuner.fit()
    assert len(results) == 8 and not results.errors
    # Each trial's process held sweep.cpus_per_trial, and never more than max_concurrent_trials ran
    # at once (4 logical CPUs would have fit 8 trials of 0.5).
    assert {r.metrics["cpu"] for r in results} == {0.5}
    spans = [(r.metrics["start"], r.metrics["end"]) for r in results]
    assert max(sum(s <= t < e for s, e in spans) for t, _ in spans) <= sw.max_concurrent_trials
    seen = [json.loads(r.metrics["seen"]) for r in results]
    for over in seen:
        assert 1e-4 <= over["optim.lr"] <= 1e-2
        assert ("method.temperature" in over) == (over["method.name"] != "byol")
        assert ("method.momentum" in over) == (over["method.name"] != "simclr")
    assert len({o["method.name"] for o in seen}) >= 2


def test_a_trial_process_imports_no_mlflow_before_it_trains() -> None:
    """The modules a trial process loads for either kind of trial leave MLflow out: the sweep driver
    (and a Train run's controller) write MLflow, and the import costs a trial ~2 s of CPU."""
    code = ("import sys, orchestrator.sweep.trials, orchestrator.epoch_loop; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'mlflow'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_swav_mae_and_dino_on_a_vit_run_in_a_sweep(tmp_path: Path, demo_data: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """The new methods, one short in-process trial each: SwAV with local crops on the ConvNet, MAE and
    DINO on a CPU-sized ViT-Tiny/4 (model.* swept per method); the best one registers."""
    import pandas as pd

    from orchestrator.cli import main as cli_main

    monkeypatch.chdir(tmp_path)  # a SQLite store's artifacts go to ./mlruns
    vit = {"model.encoder": ["vit_tiny"],
           "model.encoder_args": [{"patch_size": 4, "depth": 1, "embed_dim": 32, "num_heads": 2}]}
    config = _write(tmp_path, {
        "data": {"path": str(demo_data), "source": None, "image_size": 28, "limit": 128},
        "optim": {"name": "adamw", "lr": 1e-3, "batch_size": 64, "epochs": 1, "warmup_epochs": 0},
        "scaling": {"num_workers": 1},
        "eval": {"knn_train_limit": 300, "knn_test_limit": 100, "linear_epochs": 0},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "new-methods",
                     "model_name": "new-methods-encoder"},
        "sweep": {"name": "new", "storage_path": str(tmp_path / "sweeps"), "searcher": "grid", "scheduler": "fifo",
                  "methods": {"swav": {"method.num_prototypes": [30], "method.hidden_dim": [64],
                                       "method.projection_dim": [16]},
                              "mae": {**vit, "method.decoder_dim": [16], "method.decoder_depth": [1],
                                      "method.decoder_heads": [2]},
                              "dino": {**vit, "method.projection_dim": [64], "method.hidden_dim": [32]}},
                  "max_concurrent_trials": 1, "trial_kind": "in_process"},
    })
    assert cli_main(["sweep", "--config", config]) == 0, capsys.readouterr()
    table = pd.read_csv(tmp_path / "sweeps" / "new" / "results.csv")
    assert sorted(table["method"]) == ["dino", "mae", "swav"], table.to_string()
    assert set(table["status"]) == {"finished"} and table["knn_top1"].notna().all(), table.to_string()
    assert "models:/new-methods-encoder/1" in capsys.readouterr().out
