"""`selfsup registry` against a real `mlflow server` and a local SQLite store.

Encoders are small real torch models registered the way pretraining registers them (tags
`method`, `dataset`, `knn_top1`; pt2 with a dynamic batch dimension), so every subcommand runs
the real MLflow paths, including loading the model back for `embed`.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from orchestrator import registry
from orchestrator.cli import main as cli_main
from orchestrator.errors import UserError

pytestmark = pytest.mark.slow


@dataclass
class Store:
    uri: str
    dataset: str          # unique per store, so a shared server's other models never interfere
    model: str            # f"{dataset}-encoder"
    versions: dict[str, tuple[str, float]]  # version -> (method, knn_top1)


class TinyEncoder(torch.nn.Module):
    """A small real conv encoder ([B, 3, H, W] -> [B, 16], H, W >= 8); untrained, distinct per seed."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.output_dim = 16
        self.min_input_size = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


def _register(uri: str, model: str, dataset: str, method: str, knn_top1: float) -> str:
    """Register an encoder through the real pretraining path; returns the version."""
    from orchestrator import tracking

    exp = tracking.ensure_experiment(uri, f"registry-test-{dataset}")
    run_id = tracking.start_run(uri, exp, f"{method}-{knn_top1}", {"method.name": method}, "{}\n")
    encoder = TinyEncoder(seed=len(method) + int(knn_top1 * 100))
    v = tracking.register_encoder(encoder, tracking_uri=uri, run_id=run_id, model_name=model,
                                  image_size=32, tags={"method": method, "dataset": dataset,
                                                       "knn_top1": f"{knn_top1:.4f}"})
    tracking.finish_run(uri, run_id)
    return str(v.version)


def _make_store(uri: str) -> Store:
    dataset = f"ds{uuid.uuid4().hex[:6]}"
    model = f"{dataset}-encoder"
    versions = {}
    for method, acc in (("simclr", 0.41), ("byol", 0.57), ("moco", 0.33)):
        versions[_register(uri, model, dataset, method, acc)] = (method, acc)
    return Store(uri, dataset, model, versions)


@pytest.fixture(scope="module", params=["sqlite", "server"])
def store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    if request.param == "sqlite":
        uri = f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}"
    else:
        uri = request.getfixturevalue("mlflow_server")
    yield _make_store(uri)


def _cli(*argv: str) -> int:
    return cli_main(list(argv))


def test_list_shows_versions_tags_and_aliases(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    client = registry.connect(store.uri)
    registry.promote(client, store.model, "2", "champion")
    assert _cli("registry", "--tracking-uri", store.uri, "list") == 0
    out = capsys.readouterr().out
    lines = [ln.split() for ln in out.splitlines() if store.model in ln]
    assert len(lines) == 3
    by_version = {ln[1]: ln for ln in lines}
    assert by_version["2"][2] == "champion" and "0.5700" in by_version["2"] and "byol" in by_version["2"]
    assert "simclr" in by_version["1"] and "0.4100" in by_version["1"] and store.dataset in by_version["1"]


def test_show_by_alias_version_and_name(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    client = registry.connect(store.uri)
    registry.promote(client, store.model, "2", "champion")
    assert _cli("registry", "--tracking-uri", store.uri, "show", f"{store.model}@champion") == 0
    out = capsys.readouterr().out
    assert f"models:/{store.model}/2" in out and "tag.method       byol" in out
    assert _cli("registry", "--tracking-uri", store.uri, "show", f"models:/{store.model}/3") == 0
    assert "tag.method       moco" in capsys.readouterr().out
    # a bare name means its champion
    assert str(registry.resolve_version(client, store.model).version) == "2"


@pytest.mark.parametrize("ref, message", [
    ("nosuchmodel", "no registered model 'nosuchmodel'; registered: "),
    ("{model}@nosuchalias", "has no alias 'nosuchalias'; aliases: "),
    ("{model}/99", "has no version 99; versions: 1, 2, 3"),
    ("a/b/c", "bad model reference 'a/b/c'"),
])
def test_show_unknown_reference_is_one_line_exit_2(store: Store, ref: str, message: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli("registry", "--tracking-uri", store.uri, "show", ref.format(model=store.model)) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    if ref == "nosuchmodel":
        assert store.model in err  # the message lists what is registered


def test_best_filters_by_dataset_and_method(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli("registry", "--tracking-uri", store.uri, "best", "--metric", "knn_top1",
                "--dataset", store.dataset) == 0
    assert capsys.readouterr().out.strip() == f"models:/{store.model}/2\tknn_top1=0.5700"
    assert _cli("registry", "--tracking-uri", store.uri, "best", "--dataset", store.dataset,
                "--method", "simclr") == 0
    assert capsys.readouterr().out.startswith(f"models:/{store.model}/1\t")
    assert _cli("registry", "--tracking-uri", store.uri, "best", "--dataset", "nosuchdataset") == 2
    assert "no registered encoder matches dataset=nosuchdataset" in capsys.readouterr().err
    assert _cli("registry", "--tracking-uri", store.uri, "best", "--dataset", store.dataset,
                "--metric", "nosuchmetric") == 2
    assert "has a metric 'nosuchmetric'" in capsys.readouterr().err
    assert _cli("registry", "--tracking-uri", store.uri, "best", "--model", "nosuchmodel") == 2
    assert "no registered model 'nosuchmodel'" in capsys.readouterr().err


def test_promote_moves_alias_and_rejects_unknowns(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    client = registry.connect(store.uri)
    assert _cli("registry", "--tracking-uri", store.uri, "promote", store.model, "3", "--alias", "staging") == 0
    assert str(client.get_model_version_by_alias(store.model, "staging").version) == "3"
    assert _cli("registry", "--tracking-uri", store.uri, "promote", store.model, "1", "--alias", "staging") == 0
    assert str(client.get_model_version_by_alias(store.model, "staging").version) == "1"
    capsys.readouterr()
    assert _cli("registry", "--tracking-uri", store.uri, "promote", store.model, "42", "--alias", "x") == 2
    assert "has no version 42" in capsys.readouterr().err
    assert _cli("registry", "--tracking-uri", store.uri, "promote", "nosuchmodel", "1") == 2
    assert "no registered model 'nosuchmodel'" in capsys.readouterr().err


def test_promote_if_better_only_moves_champion_up(store: Store) -> None:
    client = registry.connect(store.uri)
    model = f"{store.model}-champ"
    v_low = _register(store.uri, model, store.dataset, "simclr", 0.30)
    assert registry.promote_if_better(client, model, v_low)          # no champion yet
    v_high = _register(store.uri, model, store.dataset, "moco", 0.50)
    assert registry.promote_if_better(client, model, v_high)         # better: moves
    v_mid = _register(store.uri, model, store.dataset, "byol", 0.40)
    assert not registry.promote_if_better(client, model, v_mid)      # worse: stays
    assert not registry.promote_if_better(client, model, v_high)     # already champion
    assert str(client.get_model_version_by_alias(model, "champion").version) == v_high


def test_embed_image_folder(store: Store, tmp_path: Path, cifar10_dir: Path) -> None:
    folder = tmp_path / "images"
    rows = pq.read_table(cifar10_dir / "test-00000-of-00001.parquet").slice(0, 10).to_pylist()
    for i, row in enumerate(rows):
        cls = folder / ("a" if i % 2 else "b")
        cls.mkdir(parents=True, exist_ok=True)
        (cls / f"{i}.jpg").write_bytes(row["image"])
    out = tmp_path / "emb.parquet"
    assert _cli("registry", "--tracking-uri", store.uri, "embed", f"models:/{store.model}/1",
                str(folder), str(out)) == 0
    table = pq.read_table(out)
    assert table.num_rows == 10 and set(table.column("label").to_pylist()) == {0, 1}
    emb = table.column("embedding").to_pylist()
    assert len(emb[0]) == 16 and len({tuple(e) for e in emb}) == 10  # real, distinct features

    # The same images as a shard folder (both splits): the same embeddings.
    from pipelines.ingest import ingest

    ingest(str(folder), str(tmp_path / "shards"), progress=False)
    out2 = tmp_path / "emb2.parquet"
    assert _cli("registry", "--tracking-uri", store.uri, "embed", f"models:/{store.model}/1",
                str(tmp_path / "shards"), str(out2)) == 0
    table2 = pq.read_table(out2)
    assert table2.num_rows == 10
    assert {p.split(":", 1)[0] for p in table2.column("path").to_pylist()} == {"train", "test"}
    import numpy as np

    np.testing.assert_allclose(np.array(sorted(map(tuple, table2.column("embedding").to_pylist()))),
                               np.array(sorted(map(tuple, emb))), atol=1e-5)


def test_embed_errors(store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from torchvision.io import encode_jpeg

    (tmp_path / "empty").mkdir()
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "x.jpg").write_bytes(
        encode_jpeg(torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8)).numpy().tobytes())
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"not a jpeg")
    assert _cli("registry", "--tracking-uri", store.uri, "embed", f"{store.model}@nosuchalias",
                str(tmp_path / "one"), str(tmp_path / "o.parquet")) == 2
    assert "has no alias 'nosuchalias'" in capsys.readouterr().err
    assert _cli("registry", "--tracking-uri", store.uri, "embed", f"{store.model}/1",
                str(tmp_path / "empty"), str(tmp_path / "o.parquet")) == 2
    assert "no shard folder (manifest.json) and no" in capsys.readouterr().err
    assert _cli("registry", "--tracking-uri", store.uri, "embed", f"{store.model}/1",
                str(tmp_path / "bad"), str(tmp_path / "o.parquet")) == 2
    assert "x.jpg: cannot decode image" in capsys.readouterr().err
    assert not (tmp_path / "o.parquet").exists()


def test_embed_any_image_size_and_one_line_input_errors(store: Store, tmp_path: Path, cifar10_dir: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for i, row in enumerate(pq.read_table(cifar10_dir / "test-00000-of-00001.parquet").slice(0, 4).to_pylist()):
        (folder / f"{i}.jpg").write_bytes(row["image"])
    uri = f"models:/{store.model}/1"
    v = registry.connect(store.uri).get_model_version(store.model, "1")
    assert v.tags["input_min_size"] == "8" and v.tags["input_channels"] == "3"
    assert "any height and width >= 8 (trained at 32x32)" in v.description
    out = tmp_path / "emb.parquet"
    assert _cli("registry", "--tracking-uri", store.uri, "embed", uri, str(folder), str(out),
                "--image-size", "40x36") == 0
    assert pq.read_table(out).num_rows == 4
    capsys.readouterr()
    assert _cli("registry", "--tracking-uri", store.uri, "embed", uri, str(folder), str(tmp_path / "small.parquet"),
                "--image-size", "7") == 2
    err = capsys.readouterr().err
    assert err == f"selfsup registry: error: {uri} takes images of at least 8x8 pixels; got 7x7\n"
    assert not (tmp_path / "small.parquet").exists()

    encoder = registry.load_encoder(uri, tracking_uri=store.uri)  # the Python API checks the same way
    assert encoder(torch.randn(2, 3, 8, 11)).shape == (2, 16)
    with pytest.raises(UserError, match=r"takes 3-channel \(RGB\) images; got 1 channel "):
        encoder(torch.randn(2, 1, 32, 32))


def test_missing_store_and_unreachable_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert _cli("registry", "--tracking-uri", f"sqlite:///{tmp_path / 'nope.db'}", "list") == 2
    assert "no MLflow store at" in capsys.readouterr().err
    assert not (tmp_path / "nope.db").exists()
    assert _cli("registry", "--tracking-uri", f"http://127.0.0.1:{port}", "list") == 2
    assert "cannot reach the MLflow server" in capsys.readouterr().err


def test_console_script_exit_code(tmp_path: Path) -> None:
    with pytest.raises(UserError):
        registry.connect(f"sqlite:///{tmp_path / 'nope.db'}")
    proc = subprocess.run([str(Path(sys.executable).parent / "selfsup"), "registry", "--tracking-uri",
                           f"sqlite:///{tmp_path / 'nope.db'}", "list"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("selfsup registry: error: no MLflow store")
