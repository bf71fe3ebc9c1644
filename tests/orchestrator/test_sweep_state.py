"""`sweep --resume` unpickles nothing another job could have written: a real Tune experiment, saved
under `ray_compat.sign_after_tune_saves`, verifies as saved (and with a file from an earlier save, as
a driver killed mid-upload leaves it) and is refused (one line) once any of its state files is
changed or added, or its record is altered or gone."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from orchestrator.errors import UserError
from orchestrator.ray_compat import sign_after_tune_saves
from orchestrator.sweep.state_signing import KEY_ENV, StateSigner, signature_file, verify_state


def _trainable(config: dict) -> None:
    from ray import tune

    for i in range(2):
        tune.report({"score": config["x"] * (i + 1)})


@pytest.fixture()
def saved_experiment(ray_local: None, tmp_path: Path) -> Path:
    import ray.cloudpickle
    from ray import tune

    # Tune's trial processes cannot import this test module: the trainable travels by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

    exp = tmp_path / "sweeps" / "s-1"
    tuner = tune.Tuner(_trainable, param_space={"x": tune.grid_search([1, 2])},
                       run_config=tune.RunConfig(name="s-1", storage_path=str(tmp_path / "sweeps"), verbose=0))
    with sign_after_tune_saves(StateSigner(str(exp))):
        tuner.fit()
    return exp


@pytest.mark.slow  # a local Ray and a real Tune experiment
def test_tune_state_verifies_as_saved_and_is_refused_once_changed(saved_experiment: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from ray import tune

    exp = saved_experiment
    record = signature_file(str(exp))
    saves = json.loads(record.read_text())["saves"]
    assert len(saves) > 1 and "tuner.pkl" in saves[-1] and any(n.startswith("experiment_state") for n in saves[-1])
    assert oct(os.stat(record).st_mode & 0o777) == "0o600" and not list(exp.rglob("*.sig"))
    verify_state(str(exp))  # as saved: passes, and Tune can restore it
    assert tune.Tuner.restore(str(exp), trainable=_trainable).get_results().num_errors == 0

    state = next(exp.glob("experiment_state*.json"))
    original = state.read_bytes()
    state.write_bytes(original.replace(b'"score"', b'"scorE"', 1) if b'"score"' in original else original + b" ")
    with pytest.raises(UserError) as e:
        verify_state(str(exp))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{state}: Tune's saved state is changed since this sweep's driver "
                                              "signed it; ") and msg.endswith("start a new sweep instead of --resume")
    state.write_bytes(original)
    verify_state(str(exp))

    planted = exp / "searcher-state-2099.pkl"  # a pickle another job dropped next to the state
    planted.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(UserError, match=r"searcher-state-2099\.pkl: Tune's saved state is unsigned"):
        verify_state(str(exp))
    planted.unlink()

    # A job that also rewrote the record (it cannot: the record is in the driver's home; say it could)
    # without the key: refused.
    body = json.loads(record.read_text())
    body["saves"][-1][state.name] = "0" * 64
    record.write_text(json.dumps(body))
    with pytest.raises(UserError, match=r"does not match this head's key"):
        verify_state(str(exp))
    # Another key (another head's driver) has no record of this sweep.
    monkeypatch.setenv(KEY_ENV, str(tmp_path / "another" / "key"))
    with pytest.raises(UserError, match=r"this driver has no record of signing Tune's saved state"):
        verify_state(str(exp))
    assert oct(os.stat(tmp_path / "another" / "key").st_mode & 0o777) == "0o600"


def test_a_driver_killed_mid_upload_leaves_a_state_that_still_verifies(tmp_path: Path) -> None:
    """Tune uploads its state file by file after each save: the bucket can hold this save's files
    beside the last one's. Every file content of a recent save verifies; a content no save had does not."""
    exp = tmp_path / "sweeps" / "s-2"
    staging = tmp_path / "staging"
    staging.mkdir()
    exp.mkdir(parents=True)
    sign = StateSigner(str(exp))
    for i in range(3):
        (staging / "experiment_state-1.json").write_text(f'{{"save": {i}}}')
        (staging / "searcher-state-1.pkl").write_bytes(bytes([i]))
        sign(str(staging))
    (exp / "experiment_state-1.json").write_text('{"save": 2}')  # uploaded already
    (exp / "searcher-state-1.pkl").write_bytes(bytes([1]))      # still the save before's
    verify_state(str(exp))
    (exp / "searcher-state-1.pkl").write_bytes(bytes([7]))
    with pytest.raises(UserError, match=r"searcher-state-1\.pkl: Tune's saved state is changed"):
        verify_state(str(exp))
